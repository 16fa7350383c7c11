"""
Train GPT-2 with (optional) residual attenuation on token shards: one process, one node, many nodes.

    python train.py config/demo.py                                   # laptop CPU, a few minutes
    python train.py config/gate.py --batch_size=8 --max_iters=100    # one GPU, overrides after the file
    torchrun --standalone --nproc_per_node=8 train.py config/gate.py # one node, 8 GPUs

Several nodes: the same command on every node; the rendezvous endpoint is any one of them
(a shared filesystem for out_dir and the data is assumed):

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=gate124m --rdzv_backend=c10d \\
        --rdzv_endpoint=node001:29500 train.py config/gate.py

SLURM (one task per node; SLURM sends SIGTERM at pre-emption or time limit, torchrun passes it on):

    #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --requeue
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID \\
        --rdzv_backend=c10d --rdzv_endpoint=$head:29500 train.py config/gate.py --init_from=auto

Settings: the flat block below; config files and --key=value overrides change them
(configurator.py; `python train.py --help` lists them). Every setting is checked, and the data
and model built, before the process group starts or any training runs; a bad one exits with
status 2 and a message naming it.

init_from: 'scratch'; 'resume' continues out_dir/ckpt.pt exactly (same losses and weights as a run
that was never stopped); 'auto' resumes if that file exists, else starts from scratch (for requeued
jobs); 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HuggingFace GPT-2 directory
fine-tunes those weights with the configured residual mode.

Outputs in out_dir (rank 0 writes):
    ckpt.pt    the latest state, written at every eval (so at the end) and on SIGTERM/SIGUSR1: 'model'
               (unwrapped state dict) and 'model_args' (GPTConfig.to_dict(); GPT.from_checkpoint reads
               these two), 'optimizer', 'scaler', 'iter_num', 'best_val_loss', 'loader' (train data
               position), 'rng' (python/numpy/torch/cuda states of every rank), 'config' (all settings),
               'weights_from' ('scratch' or the pretrained weights the run started from)
    best.pt    a copy of ckpt.pt from the eval with the lowest val loss so far (save_best)
    log.jsonl  one JSON object per line: "type" is "run", "train", "eval" or "end"
Both checkpoints are written to a temporary name and renamed, so a crash never leaves a broken one.
(nanoGPT's always_save_checkpoint=False skipped saves when val got worse, which loses progress on a
crash; here ckpt.pt always holds the latest state and the best model has its own file.)

Exit status: 0 finished, or stopped by SIGTERM/SIGUSR1 after writing ckpt.pt (requeue with
--init_from=resume or auto); 1 the loss became NaN/inf (ckpt.pt keeps the last good state);
2 a bad setting. Under torchrun these are the workers' codes; torchrun itself exits 1 when it was
the one signalled (it forwards SIGTERM to the workers, which checkpoint and exit 0).
"""

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure_or_exit, exit_with_config_error
from data import ShardLoader
from model import DTYPES, GPT, GPTConfig

# -----------------------------------------------------------------------------
# default settings: GPT-2 124M on FineWeb-Edu (config/baseline.py spells the paper's run out)
# I/O
out_dir = "out"
init_from = "scratch"  # 'scratch' | 'resume' | 'auto' | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | HF dir
eval_interval = 250  # iterations between evals; every eval also writes ckpt.pt
eval_tokens = 2**23  # global val tokens per eval (8.4M): the first ones of the val split, the same every time
eval_only = False  # evaluate once (e.g. a pretrained GPT-2) and exit
log_interval = 10  # iterations between train rows in log.jsonl (and console lines)
save_best = True  # keep a copy of the lowest-val-loss checkpoint as best.pt
wandb_log = False  # also log to Weights & Biases (imported only when on)
wandb_project = "nanoshift"
wandb_run_name = ""  # empty: the out_dir name
# data: shards written by prepare_fineweb.py ({dataset}_{split}_{index:06d}.bin)
data_dir = "data/fineweb_edu"
train_pattern = "*_train_*.bin"  # glob inside data_dir
val_pattern = "*_val_*.bin"
# batch
batch_size = 32  # sequences per micro-step per rank
block_size = 1024  # tokens per sequence (and the model's context length)
total_batch_tokens = 2**19  # global tokens per optimizer step; gradient accumulation makes up the rest
# model (GPTConfig)
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
dropout = 0.0
bias = True
gelu_approx = "tanh"
# residual attenuation (model.py): x_{l+1} = alpha_l * x_l + F_l(x_l)
residual_mode = "none"  # 'none' | 'cut' | 'gate'
cut_layer = -1  # block index or list of indices for 'cut' (negative counts from the end)
cut_alpha = 0.5  # alpha at the cut layer(s), in (0, 1]
gate_mode = "layer"  # 'layer' (the paper's) | 'token' | 'scalar'
gate_alpha_min = 0.5  # gate: alpha_l = 1 - (1 - gate_alpha_min) * p_l
gate_lr_mult = 1.0  # the gate parameters' learning rate is learning_rate * gate_lr_mult
# AdamW
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # max global gradient norm; 0 disables clipping
# learning-rate schedule: linear warmup, then 'cosine' to min_lr or 'wsd' (warmup-stable-decay)
lr_schedule = "cosine"
warmup_iters = 715
max_iters = 19073
lr_decay_iters = 0  # iteration where the schedule reaches min_lr; 0 = max_iters (set it to stop a run early)
wsd_decay_frac = 0.2  # wsd: the last fraction of the schedule decays linearly to min_lr
# system
device = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16; float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = None  # torch.compile; None = on for CUDA, off for CPU
peak_flops = None  # peak FLOP/s of one device for MFU; None = looked up from the GPU name (none on CPU)
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
config = configure_or_exit({k: globals()[k] for k in config_keys}, extra_types={"cut_layer": (int, list)})
globals().update(config)
# -----------------------------------------------------------------------------


# every check that needs no data or model comes first, so a typo costs seconds, not a queue slot
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "auto":
    init_from = "resume" if os.path.exists(ckpt_path) else "scratch"
if init_from not in ("scratch", "resume") + GPT2_NAMES and not os.path.isdir(init_from):
    exit_with_config_error(f"init_from={init_from!r}: expected 'scratch', 'resume', 'auto', one of {GPT2_NAMES} "
                 f"or a local HuggingFace GPT-2 directory")
if init_from == "resume" and not os.path.exists(ckpt_path):
    exit_with_config_error(f"init_from='resume' but there is no checkpoint at {ckpt_path} (check out_dir)")
for key in ("batch_size", "block_size", "total_batch_tokens", "eval_interval", "eval_tokens", "log_interval"):
    if config[key] <= 0:
        exit_with_config_error(f"{key} must be positive, got {config[key]}")
for key in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
    if config[key] < 0:
        exit_with_config_error(f"{key} must be >= 0, got {config[key]}")
if not learning_rate > 0 or not 0 <= min_lr <= learning_rate:
    exit_with_config_error(f"need learning_rate > 0 and 0 <= min_lr <= learning_rate, got learning_rate={learning_rate}, "
                 f"min_lr={min_lr}")
if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or gate_lr_mult < 0:
    exit_with_config_error(f"need betas in [0, 1) and gate_lr_mult >= 0, got beta1={beta1}, beta2={beta2}, "
                 f"gate_lr_mult={gate_lr_mult}")
if lr_schedule not in ("cosine", "wsd"):
    exit_with_config_error(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
if not 0 < wsd_decay_frac <= 1:
    exit_with_config_error(f"wsd_decay_frac must be in (0, 1], got {wsd_decay_frac}")
decay_end = lr_decay_iters or max_iters  # the schedule reaches min_lr here
decay_start = decay_end - wsd_decay_frac * decay_end if lr_schedule == "wsd" else decay_end
if not eval_only and warmup_iters > decay_start:
    exit_with_config_error(f"warmup_iters={warmup_iters} does not fit the schedule: it must be <= {decay_start:g} "
                 f"(lr_schedule={lr_schedule!r}, lr_decay_iters or max_iters = {decay_end})")
if compile not in (None, True, False):
    exit_with_config_error(f"compile must be None (auto), True or False, got {compile!r}")
if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                               or peak_flops <= 0):
    exit_with_config_error(f"peak_flops must be None or a positive number of FLOP/s, got {peak_flops!r}")
if dtype not in ("auto", "float32", "bfloat16", "float16"):
    exit_with_config_error(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.split(":")[0] not in ("cpu", "cuda"):
    exit_with_config_error(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
device_type = device.split(":")[0]
if device_type == "cuda" and not torch.cuda.is_available():
    exit_with_config_error(f"device={device!r} but torch sees no CUDA GPU")
if dtype == "auto":
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
if device_type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
    exit_with_config_error("dtype='bfloat16' but this GPU does not support it; use dtype='float16'")
use_compile = device_type == "cuda" if compile is None else compile

# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process
ddp = "RANK" in os.environ
rank, local_rank, world_size = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
                                if ddp else (0, 0, 1))
master = rank == 0
if ddp and device_type == "cuda":
    device = f"cuda:{local_rank}"
micro_tokens = batch_size * block_size * world_size  # global tokens per micro-step
if total_batch_tokens % micro_tokens:
    exit_with_config_error(f"total_batch_tokens={total_batch_tokens} is not a multiple of batch_size * block_size * "
                 f"world_size = {batch_size} * {block_size} * {world_size} = {micro_tokens}")
grad_accum_steps = total_batch_tokens // micro_tokens

# the model's settings, validated by GPTConfig itself (pretrained weights bring their own shape and are
# checked when they load, below)
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.init}
if init_from in ("scratch", "resume"):
    try:
        GPTConfig(**model_args)
    except ValueError as e:
        exit_with_config_error(e)

# data: one loader call returns a whole optimizer step ([grad_accum_steps * batch_size, block_size] on each
# rank), so the token stream depends only on total_batch_tokens, not on how it is split into ranks and
# micro-steps: 8 GPUs, 1 GPU with 8x accumulation, or a resume on another node count read the same tokens
train_glob, val_glob = os.path.join(data_dir, train_pattern), os.path.join(data_dir, val_pattern)
try:
    train_loader = ShardLoader(train_glob, grad_accum_steps * batch_size, block_size, rank, world_size, seed)
    val_loader = ShardLoader(val_glob, batch_size, block_size, rank, world_size, seed, shuffle=False)
except (OSError, ValueError) as e:
    exit_with_config_error(f"data (data_dir={data_dir!r}): {e}")
val_windows = sum(n for _, n in val_loader.windows_per_shard)
eval_steps = min(math.ceil(eval_tokens / micro_tokens), val_windows)  # never count a val token twice
if eval_steps * micro_tokens < eval_tokens and rank == 0:
    print(f"note: the val split holds {val_windows * micro_tokens:,} tokens in batches of {micro_tokens:,}; "
          f"evaluating on those, not eval_tokens={eval_tokens:,}")

wandb = None
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        exit_with_config_error("wandb_log=True but wandb is not installed (pip install wandb)")

# the model: scratch, the checkpoint to resume, or pretrained GPT-2 weights
residual_keys = ("dropout", "residual_mode", "cut_layer", "cut_alpha", "gate_mode", "gate_alpha_min")
checkpoint, weights_from = None, init_from  # weights_from: where the run's weights first came from
if init_from == "resume":
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    weights_from = checkpoint["weights_from"]
    # the settings must describe the checkpoint's model, or this would silently continue another experiment
    # (a fine-tune's shape came from the pretrained weights, so there only the residual settings count)
    keys = model_args if weights_from == "scratch" else residual_keys
    changed = {k: (checkpoint["model_args"].get(k), model_args[k]) for k in keys
               if checkpoint["model_args"].get(k) != model_args[k]}
    if changed:
        exit_with_config_error(f"{ckpt_path} was trained with different model settings: "
                     + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items()))
    model_args = checkpoint["model_args"]
    try:
        train_loader.load_state_dict(checkpoint["loader"])
    except ValueError as e:
        exit_with_config_error(f"cannot resume the data stream of {ckpt_path} (keep total_batch_tokens, block_size, seed "
                     f"and the data the same): {e}")

torch.manual_seed(seed + rank)  # rank 0's initial weights are broadcast by DDP; dropout differs per rank
random.seed(seed + rank)
np.random.seed(seed + rank)
if init_from == "scratch":
    model = GPT(GPTConfig(**model_args))
elif init_from == "resume":
    model = GPT.from_checkpoint(checkpoint)
else:
    try:
        model = GPT.from_pretrained(init_from, **{k: config[k] for k in residual_keys})
    except (OSError, ValueError) as e:  # not on the hub / not in the local cache, or not a GPT-2
        exit_with_config_error(f"init_from={init_from!r}: {e}")
    model_args = model.config.to_dict()
if block_size > model.config.block_size:  # pretrained weights bring their own context length
    exit_with_config_error(f"block_size={block_size} is longer than the model's context of {model.config.block_size}")
raw_model = model  # the unwrapped module: its state_dict has no '_orig_mod.' / 'module.' prefixes

if ddp:  # everything above succeeded on every rank: now the process group
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # only affects float32 matmuls (fp32 runs, the lm loss)
    torch.backends.cudnn.allow_tf32 = True
ptdtype = DTYPES[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
model.to(device)

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, gate_lr_mult)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # bf16 and fp32 need no loss scaling
iter_num, best_val_loss = 0, float("inf")
if checkpoint is not None:
    # the hyperparameters come from the settings (they may change on resume), the moments from the checkpoint
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h)
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
start_iter = iter_num

if use_compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

# MFU: training FLOPs per token against the device's dense bf16 peak
if peak_flops is None and device_type == "cuda":
    gpu_name = torch.cuda.get_device_name(device)
    for name, flops in (("H200", 989e12), ("H100", 756e12 if "PCIe" in gpu_name else 989e12), ("A100", 312e12)):
        if name in gpu_name:
            peak_flops = flops
            break
flops_per_token = raw_model.flops_per_token(block_size)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_end:
        return min_lr
    if lr_schedule == "cosine":
        progress = (it - warmup_iters) / (decay_end - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    if it < decay_start:  # wsd: stable at the peak, then a linear decay to min_lr
        return learning_rate
    return learning_rate + (min_lr - learning_rate) * (it - decay_start) / (decay_end - decay_start)


@torch.no_grad()
def evaluate():
    """Mean val loss over the fixed budget (the loader restarts every time), averaged over ranks."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(eval_steps):
        x, y = val_loader.next_batch()
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    if ddp:
        dist.all_reduce(total)
    model.train()
    return total.item() / (eval_steps * world_size)


def rng_states():
    """The RNG states of every rank, gathered (a collective: every rank calls it)."""
    mine = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}
    if not ddp:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def save_checkpoint(copy_to_best):
    rng = rng_states()
    if not master:
        return
    state = {
        "model": raw_model.state_dict(), "model_args": model_args, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
        "loader": train_loader.state_dict(), "rng": rng, "config": config, "weights_from": weights_from,
    }
    tmp = ckpt_path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_path)
    if copy_to_best:
        shutil.copyfile(ckpt_path, tmp)
        os.replace(tmp, os.path.join(out_dir, "best.pt"))
    print(f"saved {ckpt_path} at iter {iter_num}" + (" (and best.pt)" if copy_to_best else ""))


# log.jsonl: rank 0, one JSON object per line, flushed per line
log_path = os.path.join(out_dir, "log.jsonl")
log_file = None
if master:
    os.makedirs(out_dir, exist_ok=True)
    if start_iter > 0 and os.path.exists(log_path):
        # rows past the checkpoint (a crash after it) are about to be redone: drop them, keep everything else
        with open(log_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in rows if r.get("type") not in ("train", "eval") or r["iter"] < start_iter]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(log_path + ".tmp", log_path)
    elif init_from != "resume" and not eval_only and os.path.exists(ckpt_path):
        print(f"warning: starting from {init_from} in {out_dir}, which holds a checkpoint: it will be overwritten")
    log_file = open(log_path, "a" if init_from == "resume" or eval_only else "w")  # a new run starts a new log
    if wandb is not None:
        wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                   config=config)


def log(row):
    if log_file is None:
        return
    row["time"] = round(time.time(), 3)
    log_file.write(json.dumps(row) + "\n")
    log_file.flush()
    if wandb is not None and row["type"] in ("train", "eval"):
        wandb.log({f"{row['type']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=row["iter"])


def alphas():
    return [round(a, 6) for a in raw_model.residual_alphas()]


log({"type": "run", "iter": iter_num, "init_from": init_from, "weights_from": weights_from, "world_size": world_size,
     "grad_accum_steps": grad_accum_steps, "device": device, "dtype": dtype, "compile": use_compile,
     "n_params": raw_model.num_params(), "flops_per_token": flops_per_token, "peak_flops": peak_flops,
     "eval_tokens": eval_steps * micro_tokens, "model_args": model_args, "config": config})
if master:
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {world_size} rank(s) x {batch_size} x {block_size} tokens"
          f" x {grad_accum_steps} accumulation step(s) = {total_batch_tokens:,} tokens per step; "
          f"{device}, {dtype}, compile={use_compile}; {init_from} at iter {iter_num}")

if checkpoint is not None:  # the RNG last: building the model above consumed random numbers
    if len(checkpoint["rng"]) == world_size:
        states = checkpoint["rng"][rank]
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if device_type == "cuda" and states["cuda"] is not None:
            torch.cuda.set_rng_state(states["cuda"], device)
    elif master:
        print(f"note: {ckpt_path} was written by {len(checkpoint['rng'])} rank(s), this run has {world_size}: "
              f"same data stream, but dropout masks are not those of an uninterrupted run")
    del checkpoint

# pre-emption: the handler only sets a flag; the step loop checkpoints at the next step boundary.
# Every rank must stop at the same step, so the flag travels in the per-step all-reduce.
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGUSR1, request_stop)
stop_now, end_reason = False, "max_iters"

while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]

    saved_here = False
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        val_loss = evaluate()
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        row = {"type": "eval", "iter": iter_num, "tokens": iter_num * total_batch_tokens, "val_loss": val_loss,
               "best_val_loss": best_val_loss, "lr": lr, "alphas": alphas()}
        log(row)
        if master:
            shown = "" if residual_mode == "none" else " alphas " + " ".join(f"{a:.3f}" for a in row["alphas"])
            print(f"eval iter {iter_num}: val loss {val_loss:.4f} (best {best_val_loss:.4f}){shown}")
        if iter_num > start_iter and not eval_only:  # nothing new to save at the first boundary
            save_checkpoint(copy_to_best=improved and save_best)
            saved_here = True
    if eval_only:
        end_reason = "eval_only"
        break
    if iter_num >= max_iters:
        break
    if stop_now:
        if iter_num > start_iter and not saved_here:
            save_checkpoint(copy_to_best=False)
        end_reason = stop_signal or "signal on another rank"
        break

    # one optimizer step: grad_accum_steps micro-steps, gradients synced across ranks on the last one only
    t0 = time.time()
    x, y = train_loader.next_batch()
    if device_type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        if ddp:  # set before the forward pass: DDP decides there whether this backward all-reduces
            model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        rows = slice(micro_step * batch_size, (micro_step + 1) * batch_size)
        with ctx:
            _, loss = model(x[rows], y[rows])
        loss_sum += loss.detach().float()
        scaler.scale(loss / grad_accum_steps).backward()
    # one small collective per step: the global mean loss, and whether any rank was asked to stop
    stats = torch.stack([loss_sum / grad_accum_steps, torch.tensor(float(stop_signal is not None), device=device)])
    if ddp:
        dist.all_reduce(stats)
    loss_sum_ranks, stop_votes = stats.tolist()  # the one host-device sync of a step
    step_loss, stop_now = loss_sum_ranks / world_size, stop_votes > 0
    if not math.isfinite(step_loss):
        # stop before the optimizer applies it: ckpt.pt keeps the last good state
        if master:
            print(f"error: the train loss is {step_loss} at iter {iter_num} (lr {lr:.3g}); stopping without saving. "
                  f"The last good checkpoint is {ckpt_path if os.path.exists(ckpt_path) else '(none written yet)'}."
                  f" Lower learning_rate, raise warmup_iters or check the data.", file=sys.stderr)
        log({"type": "end", "iter": iter_num, "reason": "nonfinite_loss", "loss": str(step_loss)})
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)
    if iter_num % log_interval == 0:
        step_alphas = alphas()  # the alphas this step's forward used, like its loss (before the update)
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0:
        dt = time.time() - t0
        tokens_per_sec = total_batch_tokens / dt
        mfu = flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else None
        row = {"type": "train", "iter": iter_num, "tokens": (iter_num + 1) * total_batch_tokens, "loss": step_loss,
               "lr": lr, "grad_norm": None if grad_norm is None else grad_norm.item(), "dt_ms": round(dt * 1000, 2),
               "tokens_per_sec": round(tokens_per_sec, 1), "mfu": None if mfu is None else round(mfu, 5),
               "alphas": step_alphas}
        log(row)
        if master:
            print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                  f"{tokens_per_sec:,.0f} tok/s" + ("" if mfu is None else f", mfu {mfu:.1%}"))
    iter_num += 1

log({"type": "end", "iter": iter_num, "reason": end_reason})
if master:
    print(f"stopped at iter {iter_num}: {end_reason}")
    log_file.close()
    if wandb is not None:
        wandb.finish()
if ddp:
    dist.destroy_process_group()
