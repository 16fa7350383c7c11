# A Llama-style ~125M model (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases) trained
# exactly like config/baseline.py's GPT-2 124M: the same data, tokens, batch, schedule and seed, so the two
# archs compare at one token budget (10B tokens of FineWeb-Edu sample-10BT, 8 GPUs, bf16, torch.compile).
#   python prepare_fineweb.py                                   # the GPT-2-tokenized shards baseline.py reads
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_baseline.py
# config/llama_cut.py and config/llama_gate.py run this file first and change only the residual.
#
# Tokenizer: GPT-2's, on purpose. The paper's models differ from GPT-2 in the block *and* the tokenizer; keeping
# GPT-2's isolates the block family (the residual stream the attenuation acts on), reuses the same shards as
# the GPT-2 runs, and keeps the logit-lens metrics comparable (same vocabulary, same tokens per text).
# Cost (docs/training.md, "Cost of the Llama and retrofit runs"): 0.862 GFLOP/token x 10B tokens = 8.6e18 FLOPs,
# ~0.76 h on 8 x H100 at 40% MFU (~6 GPU-hours).
exec(open("config/baseline.py").read())

out_dir = "out-llama-baseline"
arch = "llama"
bias = False  # llama has no biases
n_layer = 12
n_head = 12
n_kv_head = 4  # grouped-query attention: 3 query heads share each key/value head (as SmolLM2 / Llama-3)
n_embd = 768
# SwiGLU width: 2432 (3.17 x 768, a multiple of 64) gives 124.77M parameters against GPT-2's 124.48M: the
# default 8/3 x 768 = 2048 would give 114.2M, because GQA's k/v projections are a third of GPT-2's.
intermediate_size = 2432
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
tie_embeddings = True  # as GPT-2 and SmolLM2: one matrix for input and output (the lens reads it)
rope_theta = 10000.0  # Llama-2's base: ample for a 1024-token context
norm_eps = 1e-5
tokenizer = "gpt2"
