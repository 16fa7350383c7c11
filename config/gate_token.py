# The baseline with a per-token gate (beyond the paper): each token gets its own distribution over layers,
# p(t) = softmax(W LN(x_0[t]) + b), predicted from its input embedding; W = b = 0 at init, so it starts
# exactly like the layer gate. The logged alphas are the mean over tokens of the last forward pass.
#   torchrun --standalone --nproc_per_node=8 train.py config/gate_token.py
exec(open("config/baseline.py").read())

out_dir = "out-gate-token"
residual_mode = "gate"
gate_mode = "token"
gate_alpha_min = 0.5
gate_lr_mult = 1.0
