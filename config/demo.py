# tiny demo on a laptop CPU: a few minutes on the Shakespeare corpus from `python prepare_fineweb.py --demo`
# python train.py config/demo.py   (config/demo_cut.py and config/demo_gate.py: the same with attenuation)
out_dir = "out-demo"
data_dir = "data/demo"
device = "cpu"
n_layer = 6
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
total_batch_tokens = 1024
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 10
max_iters = 150
eval_interval = 50
eval_tokens = 8192
log_interval = 5
