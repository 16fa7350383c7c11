# config/llama_baseline.py with config/gate.py's learned layer gate: alpha_l = 1 - (1 - gate_alpha_min) *
# softmax(g)_l, g in R^12 starting at 0; same data, tokens and schedule.
#   torchrun --standalone --nproc_per_node=8 train.py config/llama_gate.py
exec(open("config/llama_baseline.py").read())

out_dir = "out-llama-gate"
residual_mode = "gate"
gate_mode = "layer"
gate_alpha_min = 0.5
gate_lr_mult = 1.0
