# The CPU recipe of the demo (bench.py --section=recipe compares it with nanoGPT's and others): the demo corpus
# as bytes, a 6 x 128 GPT, 128 bytes of context, 1,000 steps of 1,024 bytes, lr 2e-3 cosine to 2e-4.
#   python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
#   python train.py config/recipe_bytes.py                      (config/demo*.py and config/repro*.py build on it)
# Why bytes (docs/recipe.md): a 257-token unembedding costs almost nothing, so every step goes into the blocks,
# and a byte model leaves its bigram floor (3.78 bits/byte on the demo val split) far behind within a few
# hundred thousand bytes; the lens reads 257 logits. Why these numbers: nanoGPT's CPU recipe (4 x 128, ctx 64,
# 768 bytes a step, lr 1e-3), made 6 blocks deep for the lens, a step of 1,024 bytes and a peak lr twice as
# high for a run of 1,000 steps (a short run gains from larger steps while it is stable; beta2 0.99 as nanoGPT).
# ~0.14 s a step on one thread (measured: docs/recipe.md), so ~2.5 minutes a run.
out_dir = "out-recipe/bytes"
data_dir = "data/demo_bytes"
tokenizer = "bytes"
vocab_size = 257  # 256 bytes and the end-of-text separator
device = "cpu"
dtype = "float32"
compile = False
threads = 1  # one torch thread per process: bench.py measures 2 threads against it

n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
total_batch_tokens = 1024  # 8 x 128: no accumulation
dropout = 0.0
bias = False  # as nanoGPT's recipe: fewer parameters to update, no loss in quality at this size

learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
max_iters = 1000
beta2 = 0.99
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250  # 5 evals: the val curve and the alignment tracked over training
eval_tokens = 32768  # the first 32 KiB of the val split's text: ~1.5 s an eval (eval_benchmarks.py scores 128 KiB)
log_interval = 50
track_sequences = 8  # alignment tracking at every eval: 8 windows of 128 bytes, cheap with 257 logits
