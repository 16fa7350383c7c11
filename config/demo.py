# Tiny demo on a laptop CPU, ~2 minutes on 2 cores: the Shakespeare corpus from `python prepare_fineweb.py --demo`.
#   python train.py config/demo.py        (config/demo_cut.py, config/demo_gate.py: the same with attenuation)
out_dir = "out-demo-baseline"  # (demo.py puts its three runs in out-demo/)
data_dir = "data/demo"
device = "cpu"

# 6 layers so the layerwise curves of analyze.py have some resolution; 128 wide, 128 tokens of context.
# On CPU the 50k-vocabulary logits dominate a step: a 128 x 128-token micro-batch keeps them at 26 MB,
# under glibc's 32 MB mmap threshold, so they reuse heap memory instead of page-faulting afresh every
# step (a 1024-token batch spent a third of its time in the kernel doing that).
n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
batch_size = 1
total_batch_tokens = 512  # 4 micro-steps; small steps: in a 150k-token run, more updates beat bigger batches
dropout = 0.0

learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
max_iters = 300
eval_interval = 100
eval_tokens = 8192
log_interval = 10
# the demo's runs end at max_iters: keep their final ckpt.pt as weights only (a third of the size with AdamW's
# moments) and best.pt as a hard link to it, so the demo's three runs take ~95 MB, not ~550 MB. An
# interrupted run still resumes exactly: the checkpoints written before the end keep everything.
save_optimizer_at_end = False
# alignment tracking at every eval (train.py): the lens decodes 7 states through the 50k-token unembedding, which in
# a model this small costs more than a training step per token; 8 windows of 128 tokens keep it to a few %
track_sequences = 8
