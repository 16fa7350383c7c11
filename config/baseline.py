# GPT-2 124M on FineWeb-Edu sample-10BT, one epoch (the paper's baseline): 8 GPUs, bf16, torch.compile.
#   python prepare_fineweb.py                                          # -> data/fineweb_edu/fineweb_edu_{train,val}_*.bin
#   torchrun --standalone --nproc_per_node=8 train.py config/baseline.py
# config/cut.py, config/gate.py and config/gate_token.py run this file first and change only the residual.
out_dir = "out-baseline"
data_dir = "data/fineweb_edu"
train_pattern = "*_train_*.bin"
val_pattern = "*_val_*.bin"

# model: GPT-2 small
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304
dropout = 0.0
bias = True
residual_mode = "none"

# batch: 2**19 = 524,288 tokens per step (GPT-3 small's 0.5M). 32 x 1024 tokens per GPU x 8 GPUs = 262,144
# per micro-step -> 2 accumulation steps; use batch_size = 16 (4 steps) on 40 GB GPUs. On fewer GPUs the
# accumulation grows and the run (data order included) stays the same.
batch_size = 32
total_batch_tokens = 524288
max_iters = 19073  # 10e9 / 524,288: one epoch of the 10B tokens

# AdamW and schedule (GPT-3 small): peak 6e-4, cosine to 10% of it. Warmup 715 steps = GPT-3's 375M
# warmup tokens / 524,288; nanoGPT's 2000 was chosen for a 600k-step OpenWebText run and would spend
# 10% of this one warming up.
learning_rate = 6e-4
min_lr = 6e-5
lr_schedule = "cosine"
warmup_iters = 715
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# eval every 250 steps on the first 2**23 = 8.4M tokens of the val split (prepare_fineweb.py writes 10M)
eval_interval = 250
eval_tokens = 2**23
log_interval = 10

# system: bfloat16 autocast and torch.compile on CUDA (the 'auto' / None defaults)
dtype = "auto"
compile = None
