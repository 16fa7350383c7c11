# config/recipe_bytes.py's model and schedule on the demo corpus in reproduce.py's 4,096-token BPE fitted on it
# (a bench.py --section=recipe candidate):
#   python reproduce.py --steps=prepare          # fits data/repro-tokenizer, prepares data/repro
#   python train.py config/recipe_bpe.py
exec(open("config/recipe_bytes.py").read())

out_dir = "out-recipe/bpe"
data_dir = "data/repro"
tokenizer = "data/repro-tokenizer"
vocab_size = 4096
eval_tokens = 40960  # ~128 KiB of the val split's text at ~3.1 bytes a token
