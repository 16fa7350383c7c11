# Retrofit: continue pretraining SmolLM2-360M (a LlamaForCausalLM: 32 layers, 960 wide, 15 heads / 5 kv heads,
# tied embeddings, 49,152-token vocabulary) with the paper's layer gate, on FineWeb-Edu tokenized with SmolLM2's
# own tokenizer. FineWeb-Edu is part of SmolLM2's own pretraining mix, so the data is in distribution: a change
# in loss or in the shift depth is the gate's doing, not a domain shift.
#
#   huggingface-cli download HuggingFaceTB/SmolLM2-360M --local-dir models/SmolLM2-360M   # once, with internet
#   python prepare_fineweb.py --tokenizer=models/SmolLM2-360M --out_dir=data/fineweb_edu_smollm2 \
#       --max_tokens=2_200_000_000                     # ~2.2B tokens: the 2.1B below + the 10M val split, uint16
#   torchrun --standalone --nproc_per_node=8 train.py config/retrofit_smollm2.py
#   python analyze.py --ckpt out-retrofit-smollm2 --hf models/SmolLM2-360M      # the shift, before vs after
#
# train.py refuses shards of another tokenizer (exit 2). For Llama-3.2-1B instead: init_from its dir, the same
# --tokenizer for the prepare (128k vocabulary: 4-byte shards), batch_size = 8.
# Cost (docs/training.md, "Cost of the Llama and retrofit runs"): 2.93 GFLOP/token x 2.1B tokens = 6.1e18 FLOPs,
# ~0.54 h on 8 x H100 at 40% MFU (~4.3 GPU-hours).
out_dir = "out-retrofit-smollm2"
init_from = "models/SmolLM2-360M"  # or the hub name HuggingFaceTB/SmolLM2-360M where the hub is reachable
data_dir = "data/fineweb_edu_smollm2"
dropout = 0.0

residual_mode = "gate"
gate_mode = "layer"
gate_alpha_min = 0.5  # the same budget as config/gate.py: sum_l (1 - alpha_l) = 0.5, over 32 layers here
gate_lr_mult = 1.0
# The ramp: effective alpha_l = 1 - min(1, iter / 500) * (1 - alpha_l). Step 0 is SmolLM2 exactly (its own
# loss is the run's first point). 500 steps = 0.52B tokens = a quarter of the run: 5x the lr warmup, so AdamW's
# fresh moments have settled before most of the attenuation arrives, and each step removes only 0.1% of the
# budget's residual (a change far below one optimizer step's); the remaining 1,500 steps (1.6B tokens) train
# with the full gate, which learns where to put it during the ramp already (its gradient is scaled by the ramp).
attenuation_warmup_iters = 500

# batch: 2**20 = 1,048,576 tokens per step (2048-token sequences, SmolLM2's pretraining length); 16 x 2048 per
# GPU x 8 GPUs = 262,144 per micro-step -> 4 accumulation steps
block_size = 2048
batch_size = 16
total_batch_tokens = 1048576
max_iters = 2000  # 2.1B tokens

# continued pretraining: a lower peak than from scratch (SmolLM2's own peak was 5e-4), a short warmup for the
# fresh optimizer state, and warmup-stable-decay, which ends any prefix of the run cleanly when extended
learning_rate = 1e-4
min_lr = 1e-5
lr_schedule = "wsd"
wsd_decay_frac = 0.2
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 100
eval_tokens = 2**23
log_interval = 10
dtype = "auto"
compile = None
