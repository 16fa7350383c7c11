# config/demo.py with the paper's learned layer gate: python train.py config/demo_gate.py
exec(open("config/demo.py").read())

out_dir = "out-demo-gate"
residual_mode = "gate"
gate_mode = "layer"
gate_alpha_min = 0.5
gate_lr_mult = 10.0  # a 2,000-step run: let the gate move far enough to see where it puts the attenuation
