# config/repro.py with the paper's learned layer gate: reproduce.py
exec(open("config/repro.py").read())

out_dir = "out-repro/gate"
residual_mode = "gate"
gate_mode = "layer"
gate_alpha_min = 0.5  # the same total attenuation as the cut (1 - 0.5), which the gate learns to place
gate_lr_mult = 10.0  # a short run: let the gate move (as in the demo)
