# The baseline with a fixed residual cut: x_{l+1} = cut_alpha * x_l + F_l(x_l) at layer cut_layer.
#   torchrun --standalone --nproc_per_node=8 train.py config/cut.py
# Layer sweep (one run per block of the 12):
#   for L in $(seq 0 11); do torchrun --standalone --nproc_per_node=8 train.py config/cut.py --cut_layer=$L --out_dir=out-cut$L; done
# Runs config/baseline.py first (paths are relative to the repository root, where train.py runs), so the
# two runs differ only in the lines below.
exec(open("config/baseline.py").read())

out_dir = "out-cut"
residual_mode = "cut"
cut_layer = -1  # the last block: where the learned layer gate moves its attenuation (the paper's finding)
cut_alpha = 0.5  # must stay > 0: alpha = 0 removes the residual path and breaks optimisation
