# GPT-2 medium's shape (24 layers x 1024, 16 heads: 354.9M parameters) trained with FSDP2 (parallelism='fsdp'):
# bf16 weights gathered per block, float32 gradient reduction and master weights, torch.compile per block.
# baseline.py's data, batch and schedule otherwise, with GPT-3 medium's learning rate.
#   torchrun --standalone --nproc_per_node=8 train.py config/fsdp_350m.py
#   torchrun --standalone --nproc_per_node=8 train.py config/fsdp_350m.py --parallelism=ddp   # the same run, replicated
# bench.py --section=fsdp runs both for a few hundred steps on synthetic tokens (tokens/s, MFU, peak memory).
exec(open("config/baseline.py").read())

out_dir = "out-fsdp-350m"
parallelism = "fsdp"
n_layer = 24
n_head = 16
n_embd = 1024
batch_size = 16  # x 1024 tokens per micro-step per GPU
learning_rate = 3e-4  # GPT-3 medium
min_lr = 3e-5
dtype = "bfloat16"
compile = True
