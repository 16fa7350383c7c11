# config/demo.py with a fixed residual cut at the last layer: python train.py config/demo_cut.py
exec(open("config/demo.py").read())

out_dir = "out-demo-cut"
residual_mode = "cut"
cut_layer = -1
cut_alpha = 0.5
