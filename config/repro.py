# The small-scale reproduction (python reproduce.py): baseline, cut and gate over 5 seeds on CPU, each run
# ~2.5 minutes on one thread. By hand, after reproduce.py's prepare step:
#   python seeds.py config/repro.py --seeds 1 2 3 4 5       (config/repro_cut.py, config/repro_gate.py alike)
# Why this scale is in reproduce.py's docstring; the costs behind it in docs/results.md.
out_dir = "out-repro/baseline"  # seeds.py adds -s<seed>
data_dir = "data/repro"  # the Shakespeare corpus in the reproduction's own 4,096-token BPE (reproduce.py prepares it)
tokenizer = "data/repro-tokenizer"
device = "cpu"

# 6 blocks (depth for the lens to resolve), 128 wide, 128 tokens of context; a 4,096-token vocabulary
# instead of GPT-2's 50,257: on a CPU the unembedding of a 50k vocabulary is ~85% of a step of this model,
# so the small vocabulary buys ~5.7x the tokens per second, spent on training longer and on more seeds
n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
vocab_size = 4096
batch_size = 4
total_batch_tokens = 512  # one micro-step; small steps: in a few-hundred-thousand-token run more updates beat bigger batches
dropout = 0.0

learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
max_iters = 800  # 410k tokens, a quarter of the train split: no text is seen twice
eval_interval = 100
eval_tokens = 8192
log_interval = 10
track_sequences = 8  # the shift over training, at every eval (cheap with a 4k vocabulary)
