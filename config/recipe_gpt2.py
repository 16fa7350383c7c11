# config/recipe_bytes.py's model and schedule on the demo corpus in GPT-2's tokens (a bench.py --section=recipe
# candidate; the demo's tokenization before issue 22):
#   python prepare_fineweb.py --demo
#   python train.py config/recipe_gpt2.py
exec(open("config/recipe_bytes.py").read())

out_dir = "out-recipe/gpt2"
data_dir = "data/demo"
tokenizer = "gpt2"
vocab_size = 50304  # GPT-2's 50,257 padded to a multiple of 64
eval_tokens = 40960  # ~128 KiB of the val split's text at ~3.2 bytes a token
