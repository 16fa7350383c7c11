# nanoGPT's documented CPU recipe through nanoshift's train.py: the reference row of `python bench.py --section=recipe`.
#   python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
#   python train.py config/recipe_nanogpt.py
# karpathy/nanoGPT's README, "I only have a macbook": config/train_shakespeare_char.py with --device=cpu
# --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
# --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 (val 1.88 nats/char on its tiny-Shakespeare split).
# Characters become bytes here (the demo corpus is ASCII but for a few bytes: one byte is one character) and
# the text is the demo's 42 works, split as the demo splits them.
out_dir = "out-recipe/nanogpt"
data_dir = "data/demo_bytes"
tokenizer = "bytes"
vocab_size = 257  # 256 bytes and the end-of-text separator (nanoGPT: 65 characters, unpadded)
device = "cpu"
dtype = "float32"
compile = False
threads = 1  # its reported run: one process on a laptop; bench.py compares 2 threads on other rows

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
total_batch_tokens = 768  # 12 x 64: no accumulation
dropout = 0.0
bias = False  # nanoGPT's train.py default
gelu_approx = "none"  # nanoGPT's exact GELU

learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
max_iters = 2000
lr_decay_iters = 2000
beta2 = 0.99
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_tokens = 15360  # nanoGPT's eval_iters=20 batches of 12 x 64
log_interval = 10
track_alignment = False  # the reference trains as nanoGPT does; no lens passes
save_best = False
