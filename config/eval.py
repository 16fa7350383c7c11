# Table II of the paper: baseline vs fixed cut vs gate on the four benchmarks (one GPU, bf16).
#   python eval_benchmarks.py config/eval.py
#   python eval_benchmarks.py config/eval.py --max_tokens=100000       # a quick look
#   python eval_benchmarks.py config/eval.py --hf gpt2                  # add HF GPT-2 as a reference column
# Needs the val shards (python prepare_fineweb.py; python prepare_owt.py) and, for WikiText and LAMBADA,
# the HuggingFace hub, or local copies: wikitext103_files = [...], lambada_files = [...].
ckpt = ["out-baseline/ckpt.pt", "out-cut/ckpt.pt", "out-gate/ckpt.pt"]
benchmarks = ["wikitext103", "lambada", "openwebtext", "fineweb_edu"]
out_dir = "out-eval"

# the context the models were trained with; each window scores its last 512 tokens, so every token
# after the first window is predicted from at least 512 tokens of context
context = 1024
stride = 512

device = "cuda"
dtype = "bfloat16"  # the models trained under bf16 autocast; float32 to rule out rounding
batch_size = 16  # float32 logits: 16 x 1024 x 50304 x 4 bytes = 3.3 GB, plus the same for the scored slice
