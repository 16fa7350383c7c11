# config/repro.py with a fixed residual cut at the last block (the paper's best cut): reproduce.py
exec(open("config/repro.py").read())

out_dir = "out-repro/cut"
residual_mode = "cut"
cut_layer = -1
cut_alpha = 0.5
