# The baseline with the paper's learned layer gate: alpha_l = 1 - (1 - gate_alpha_min) * softmax(g)_l,
# g in R^12 starting at 0 (uniform): the attenuation budget is fixed, the gate learns where to spend it.
#   torchrun --standalone --nproc_per_node=8 train.py config/gate.py
# The per-layer alphas are logged in out-gate/log.jsonl ("alphas") at every train and eval row.
exec(open("config/baseline.py").read())

out_dir = "out-gate"
residual_mode = "gate"
gate_mode = "layer"
gate_alpha_min = 0.5  # budget: the alphas' total attenuation sum_l (1 - alpha_l) = 1 - gate_alpha_min
gate_lr_mult = 1.0  # the gate trains like every other parameter (no decay); raise it to let it move faster
