# config/llama_baseline.py with config/cut.py's fixed cut: alpha = 0.5 at the last block (the paper's
# fixed-cut setting), same data, tokens and schedule.
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_cut.py
exec(open("config/llama_baseline.py").read())

out_dir = "out-llama-cut"
residual_mode = "cut"
cut_layer = -1
cut_alpha = 0.5
