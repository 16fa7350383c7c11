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
(configurator.py; `python train.py --help` lists and describes them). Every setting is checked, and
the data and model built, before the process group starts or any training runs; a bad one exits
with status 2 and a message naming it.

init_from: 'scratch'; 'resume' continues out_dir/ckpt.pt (an FSDP run: its sharded checkpoint) exactly
(same losses and weights as a run that was never stopped); 'auto' resumes if out_dir holds a checkpoint,
else starts from scratch (for requeued jobs); 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', a hub name ('HuggingFaceTB/SmolLM2-360M') or a
local HuggingFace GPT-2 or Llama directory continues training those weights with the configured
residual mode (a retrofit; attenuation_warmup_iters > 0 makes step 0 the pretrained model and brings
the attenuation in linearly). A new run (scratch or pretrained) into an out_dir that already holds
a checkpoint is refused unless --overwrite=True.

Tokenizers: the model reads the tokens of its own tokenizer (the `tokenizer` setting for a scratch run,
GPT-2's for GPT-2 weights, the HF directory's own for Llama weights); data prepared with another one
(its _done.json says which) is refused with exit 2 naming both. A run with an HF tokenizer copies it
into out_dir/tokenizer, so analyze.py and eval_benchmarks.py read the checkpoint with it.

Outputs in out_dir (rank 0 writes; parallelism='fsdp': see Sharded training below):
    ckpt.pt    the latest state, written at every eval (so at the end) and on SIGTERM/SIGUSR1: 'model'
               (unwrapped state dict) and 'model_args' (GPTConfig.to_dict(); GPT.from_checkpoint reads
               these two), 'optimizer', 'scaler', 'iter_num', 'best_val_loss', 'loader' (train data
               position), 'rng' (python/numpy/torch/cuda states of every rank), 'config' (all settings),
               'weights_from' ('scratch' or the pretrained weights the run started from), 'tokenizer'
               ({'name', 'id', 'vocab_size'} of the tokenizer the model reads). With
               save_optimizer_at_end=False the final one (max_iters reached) holds the weights only.
    best.pt    the weights (no optimizer) of the eval with the lowest val loss so far (save_best); a hard
               link to ckpt.pt, not a copy, when the final weights-only ckpt.pt is that eval
    log.jsonl  one JSON object per line: "type" is "run", "train", "eval" or "end" (its "memory": per rank,
               the bytes of weights, gradients and optimizer state held, and peak memory)

Sharded training (parallelism='fsdp', README: Sharded training): PyTorch's FSDP2 (fully_shard) shards every
block and then the root (embeddings, final norm, output layer and the residual gate, which every block reads
and which is gathered once per step with the embeddings), so each rank holds 1/world_size of the weights,
gradients and AdamW state. bfloat16 runs gather weights in bfloat16 and reduce gradients in float32
(MixedPrecisionPolicy; the master weights and AdamW stay float32); float16 is refused (loss scaling over
sharded gradients is not supported here). torch.compile compiles each block. Gradient
accumulation keeps the gathered weights and unsharded float32 gradients between micro-steps and
reduce-scatters once per step (fsdp_reshard_micro_steps=True: every micro-step, for the least memory).
`python train.py --parallelism=fsdp` without torchrun runs a 1-rank group (nothing is sharded: for testing).
Checkpoints are PyTorch Distributed Checkpoint directories, every rank writing its own part in parallel:
    ckpt-00000250.dcp/  one per save: each rank's shards of weights and AdamW moments, DCP's .metadata, and
                        train_state.pt (iter_num, best_val_loss, loader, every rank's RNG, config, model_args,
                        weights_from, tokenizer, world_size); older ones are deleted once a newer one is whole
    ckpt.dcp.json       the pointer to the newest complete one, moved atomically by rank 0 after every rank
                        wrote its part: a save killed midway leaves a directory no pointer names, never
                        resumed from and removed by the next run. resume/auto read this, not ckpt.pt.
    ckpt.pt             at the end of the run (max_iters): the consolidated weights only (a weights-only
                        checkpoint that GPT.from_checkpoint, analyze.py and eval_benchmarks.py read);
                        `python export_checkpoint.py out_dir` writes it from the newest sharded checkpoint
    best.pt             as for DDP: the consolidated weights of the best eval (gathered to rank 0)
With save_optimizer_at_end=False the final state is ckpt.pt alone (the sharded checkpoints are deleted: like
DDP's final weights-only ckpt.pt, such a run cannot be resumed). A sharded checkpoint resumes on any number of
ranks (DCP reshards it): weights, AdamW state and the data stream continue exactly; with another world size the
per-rank dropout masks differ and the float sums of the gradient reduction run in another order (so losses
agree to float precision, not bit for bit). A checkpoint resumes with the parallelism that wrote it.

Reliability:
- Checkpoints are written atomically (a temporary file, fsynced, renamed): a crash, kill -9 or a full
  disk mid-save leaves the previous ckpt.pt whole and no temporary file. They are read weights-only
  (checkpoint.py): a crafted file cannot run code here.
- A non-finite loss (train or val) or non-finite weights never reach a checkpoint: the run stops with
  exit 1 and names the file that holds the last good state.
- A new run never destroys an old one: --overwrite=True is needed to replace a run, and even then the
  old ckpt.pt, best.pt and log.jsonl stay until the new run writes its first checkpoint.
- A data folder without the prepare's _done.json (an interrupted prepare) is refused; a token id
  outside the model's vocabulary is an error naming the shard and position.
(nanoGPT's always_save_checkpoint=False skipped saves when val got worse, which loses progress on a
crash; here ckpt.pt always holds the latest state and the best model has its own file.)

Exit status: 0 finished, or stopped by SIGTERM/SIGUSR1 after writing ckpt.pt (requeue with
--init_from=resume or auto); 1 bad data, an unreadable checkpoint, a failed write, or the loss became
NaN/inf; 2 a bad setting. Under torchrun these are the workers' codes; torchrun itself exits 1 when
it was the one signalled (it forwards SIGTERM to the workers, which checkpoint and exit 0).
"""

import glob
import json
import math
import os
import random
import re
import resource
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

from nanoshift import checkpoint
from nanoshift.common import (InputError, NanoshiftError, SettingError, atomic_write, check_out_dir, exit_with, read_jsonl,
                    report_uncaught_errors, set_threads)
from nanoshift.configurator import configure_or_exit
from nanoshift.data import GPT2_NAME, MANIFEST_NAME, ShardLoader, first_windows, get_tokenizer, manifest_tokenizer, read_manifest
from nanoshift.lens import LensOptions, lens_sums, summarise
from nanoshift.lm import OurGPT
from model import GPT, GPTConfig, attenuation_ramp, dtype_from_name

report_uncaught_errors()  # bad data found mid-run (common.InputError): one line and exit 1, not a traceback

_names_before_settings = set(globals())
# -----------------------------------------------------------------------------
# default settings: GPT-2 124M on FineWeb-Edu (config/baseline.py spells the paper's run out)
# I/O
out_dir = "out"  # folder for ckpt.pt, best.pt and log.jsonl
init_from = "scratch"  # 'scratch' | 'resume' | 'auto' | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | HF GPT-2/Llama dir or hub name
overwrite = False  # let a new run (scratch or pretrained) replace the run already in out_dir
eval_interval = 250  # iterations between evals; every eval also writes ckpt.pt
eval_tokens = 2**23  # global val tokens per eval (8.4M): the first ones of the val split, the same every time
eval_only = False  # evaluate once (e.g. a pretrained GPT-2) and exit
log_interval = 10  # iterations between train rows in log.jsonl (and console lines)
save_best = True  # keep the weights of the lowest-val-loss eval as best.pt
track_alignment = True  # at every eval, the lens metrics (lens.py) on fixed val windows, in log.jsonl's eval rows
track_sequences = 16  # val windows (of block_size tokens) alignment tracking reads: the first ones of the val split
save_optimizer_at_end = True  # the final ckpt.pt keeps the optimizer (extendable); False: weights only, 1/3 the size
wandb_log = False  # also log to Weights & Biases (imported only when on)
wandb_project = "nanoshift"  # Weights & Biases project
wandb_run_name = ""  # Weights & Biases run name; empty: the out_dir name
# data: shards written by prepare_fineweb.py ({dataset}_{split}_{index:06d}.bin)
data_dir = "data/fineweb_edu"  # folder of token shards written by prepare_fineweb.py / prepare_owt.py
train_pattern = "*_train_*.bin"  # glob of the train shards inside data_dir
val_pattern = "*_val_*.bin"  # glob of the val shards inside data_dir
require_manifest = True  # refuse a data_dir without the prepare's _done.json (False: shards from llm.c etc.)
tokenizer = "gpt2"  # a scratch model's tokenizer ('gpt2' or an HF dir / hub name); pretrained weights bring their own
# batch
batch_size = 32  # sequences per micro-step per rank
block_size = 1024  # tokens per sequence (and the model's context length)
total_batch_tokens = 2**19  # global tokens per optimizer step; gradient accumulation makes up the rest
# model (GPTConfig)
arch = "gpt2"  # block family: 'gpt2' (LayerNorm, GELU, learned positions) | 'llama' (RMSNorm, RoPE, SwiGLU, GQA)
n_layer = 12  # transformer blocks
n_head = 12  # attention heads per block
n_embd = 768  # width of the residual stream
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
dropout = 0.0  # dropout probability (0 for pretraining)
bias = True  # biases in linear layers and LayerNorms, as GPT-2
gelu_approx = "tanh"  # gpt2: 'tanh' (GPT-2's own GELU) | 'none' (exact, karpathy/nanoGPT's)
n_kv_head = None  # llama: key/value heads (grouped-query attention); None = n_head
intermediate_size = None  # llama: SwiGLU hidden width; None = 8/3 * n_embd rounded up to a multiple of 64
rope_theta = 10000.0  # llama: rotary position base
rope_scaling = None  # llama: None or transformers' rope-scaling dict (rope_type 'llama3' or 'linear')
norm_eps = 1e-5  # epsilon of the LayerNorms (gpt2) / RMSNorms (llama)
tie_embeddings = True  # the output layer shares the token embedding (always for gpt2)
# residual attenuation (model.py): x_{l+1} = alpha_l * x_l + F_l(x_l)
residual_mode = "none"  # 'none' | 'cut' | 'gate'
cut_layer = -1  # cut: block index or list of indices (negative counts from the end)
cut_alpha = 0.5  # cut: alpha at the cut layer(s), in (0, 1]
gate_mode = "layer"  # gate: 'layer' (the paper's) | 'token' | 'scalar'
gate_alpha_min = 0.5  # gate: alpha_l = 1 - (1 - gate_alpha_min) * p_l, in [0, 1)
gate_lr_mult = 1.0  # gate: the gate parameters' learning rate is learning_rate * gate_lr_mult
attenuation_warmup_iters = 0  # ramp: effective alpha = 1 - min(1, iter / this) * (1 - alpha); 0 = full from step 0
# AdamW
learning_rate = 6e-4  # peak learning rate
min_lr = 6e-5  # learning rate at the end of the schedule, in [0, learning_rate]
weight_decay = 0.1  # AdamW weight decay of the >= 2-D weights
beta1 = 0.9  # AdamW beta1, in [0, 1)
beta2 = 0.95  # AdamW beta2, in [0, 1)
grad_clip = 1.0  # max global gradient norm; 0 disables clipping
# learning-rate schedule: linear warmup, then 'cosine' to min_lr or 'wsd' (warmup-stable-decay)
lr_schedule = "cosine"  # 'cosine' | 'wsd' (warmup-stable-decay)
warmup_iters = 715  # iterations of linear warmup
max_iters = 19073  # optimizer steps of the run
lr_decay_iters = 0  # iteration where the schedule reaches min_lr; 0 = max_iters (set it to stop a run early)
wsd_decay_frac = 0.2  # wsd: the last fraction of the schedule decays linearly to min_lr
# parallelism: what each torchrun rank holds (README: Sharded training)
parallelism = "ddp"  # 'ddp' (each rank holds all weights, gradients, AdamW state) | 'fsdp' (FSDP2: each holds 1/world_size)
activation_checkpointing = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute
fsdp_reshard_micro_steps = False  # fsdp + accumulation: True re-shards every micro-step (least memory); False gathers once a step
# system
device = "auto"  # 'auto' (cuda if available) | 'cpu' | 'cuda'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16; float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = None  # torch.compile; None = on for CUDA, off for CPU
peak_flops = None  # peak FLOP/s of one device for MFU; None = looked up from the GPU name (none on CPU)
threads = 0  # CPU threads per process: 0 = OMP_NUM_THREADS if set, else half the cores (see common.cpu_threads)
seed = 1337  # seed of the weights, the data order and dropout
# -----------------------------------------------------------------------------
config_keys = [k for k in globals() if k not in _names_before_settings and not k.startswith("_")]
DEFAULTS = {k: globals()[k] for k in config_keys}
config = configure_or_exit(DEFAULTS, extra_types={"cut_layer": (int, list), "rope_scaling": (dict,)},
                           help_from=__file__)
globals().update(config)
# -----------------------------------------------------------------------------

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # 'org/model' (a local path of that form is tried first)
# settings a fine-tune takes from the configuration (its shape comes from the pretrained weights)
RESIDUAL_KEYS = ("dropout", "residual_mode", "cut_layer", "cut_alpha", "gate_mode", "gate_alpha_min")
FSDP_FLOAT16 = ("parallelism='fsdp' does not support dtype='float16' (its loss scaling over sharded gradients is not "
                "implemented here): use dtype='bfloat16' (or 'float32')")
# settings that only act in some residual modes: {setting: the modes it acts in}
MODE_SETTINGS = {"cut_layer": ("cut",), "cut_alpha": ("cut",), "gate_mode": ("gate",), "gate_alpha_min": ("gate",),
                 "gate_lr_mult": ("gate",)}


def check_settings(c):
    """Every check that needs no data or model, so a typo costs seconds, not a queue slot (SettingError)."""
    if (c["init_from"] not in ("scratch", "resume", "auto") + GPT2_NAMES and not os.path.isdir(c["init_from"])
            and not HUB_NAME.fullmatch(c["init_from"])):
        raise SettingError(f"init_from={c['init_from']!r}: expected 'scratch', 'resume', 'auto', one of "
                           f"{GPT2_NAMES}, a local HuggingFace GPT-2 or Llama directory, or a hub name 'org/model'")
    for key in ("batch_size", "block_size", "total_batch_tokens", "eval_interval", "eval_tokens", "log_interval"):
        if c[key] <= 0:
            raise SettingError(f"{key} must be positive, got {c[key]}")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "threads",
                "attenuation_warmup_iters", "track_sequences"):
        if c[key] < 0:
            raise SettingError(f"{key} must be >= 0, got {c[key]}")
    if not c["learning_rate"] > 0 or not 0 <= c["min_lr"] <= c["learning_rate"]:
        raise SettingError(f"need learning_rate > 0 and 0 <= min_lr <= learning_rate, got learning_rate="
                           f"{c['learning_rate']}, min_lr={c['min_lr']}")
    if not (0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1) or c["gate_lr_mult"] < 0:
        raise SettingError(f"need betas in [0, 1) and gate_lr_mult >= 0, got beta1={c['beta1']}, "
                           f"beta2={c['beta2']}, gate_lr_mult={c['gate_lr_mult']}")
    if c["lr_schedule"] not in ("cosine", "wsd"):
        raise SettingError(f"lr_schedule must be 'cosine' or 'wsd', got {c['lr_schedule']!r}")
    if not 0 < c["wsd_decay_frac"] <= 1:
        raise SettingError(f"wsd_decay_frac must be in (0, 1], got {c['wsd_decay_frac']}")
    decay_end = c["lr_decay_iters"] or c["max_iters"]
    decay_start = decay_end - c["wsd_decay_frac"] * decay_end if c["lr_schedule"] == "wsd" else decay_end
    if not c["eval_only"] and c["warmup_iters"] > decay_start:
        raise SettingError(f"warmup_iters={c['warmup_iters']} does not fit the schedule: it must be <= "
                           f"{decay_start:g} (lr_schedule={c['lr_schedule']!r}, lr_decay_iters or max_iters = "
                           f"{decay_end})")
    if c["compile"] not in (None, True, False):
        raise SettingError(f"compile must be None (auto), True or False, got {c['compile']!r}")
    flops = c["peak_flops"]
    if flops is not None and (isinstance(flops, bool) or not isinstance(flops, (int, float)) or flops <= 0):
        raise SettingError(f"peak_flops must be None or a positive number of FLOP/s, got {flops!r}")
    if c["dtype"] != "auto":
        dtype_from_name(c["dtype"], also=["auto"])
    if c["device"] != "auto" and c["device"].split(":")[0] not in ("cpu", "cuda"):
        raise SettingError(f"device must be 'auto', 'cpu' or 'cuda', got {c['device']!r}")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(f"device={c['device']!r} but torch sees no CUDA GPU")
    if c["dtype"] == "bfloat16" and c["device"].startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SettingError("dtype='bfloat16' but this GPU does not support it; use dtype='float16'")
    if c["parallelism"] not in ("ddp", "fsdp"):
        raise SettingError(f"parallelism must be 'ddp' or 'fsdp', got {c['parallelism']!r}")
    if c["parallelism"] == "fsdp" and c["dtype"] == "float16":
        raise SettingError(FSDP_FLOAT16)
    check_out_dir(c["out_dir"])
    ckpt = os.path.join(c["out_dir"], "ckpt.pt")
    pointer = os.path.join(c["out_dir"], checkpoint.SHARDED_POINTER)
    has_ckpt, has_pointer = os.path.exists(ckpt), os.path.exists(pointer)
    if c["init_from"] == "resume" or (c["init_from"] == "auto" and (has_ckpt or has_pointer)):
        # a checkpoint resumes with the parallelism that wrote it (README: Sharded training)
        if c["parallelism"] == "fsdp" and not has_pointer:
            raise SettingError(f"init_from={c['init_from']!r} with parallelism='fsdp' resumes a sharded checkpoint, "
                               f"but there is no {pointer}" + (
                                   f": {ckpt} is a DDP run's checkpoint (resume it with --parallelism=ddp) or a "
                                   f"finished FSDP run's weights-only export (not resumable)" if has_ckpt else
                                   " (check out_dir)"))
        if c["parallelism"] == "ddp" and has_pointer:
            raise SettingError(f"{c['out_dir']} holds an FSDP run's sharded checkpoint ({pointer}): resume it with "
                               f"--parallelism=fsdp")
        if c["parallelism"] == "ddp" and not has_ckpt:
            raise SettingError(f"init_from='resume' but there is no checkpoint at {ckpt} (check out_dir)")
    new_run = c["init_from"] not in ("resume", "auto") and not c["eval_only"]
    if new_run and (has_ckpt or has_pointer) and not c["overwrite"]:
        raise SettingError(f"{c['out_dir']} already holds a run ({ckpt if has_ckpt else pointer}); init_from="
                           f"{c['init_from']!r} would replace it. Continue it with --init_from=resume, choose "
                           f"another --out_dir, or pass --overwrite=True to replace it")


def unused_setting_warnings(c):
    """Settings changed from their defaults that do nothing in the chosen residual mode."""
    return [f"warning: {key}={c[key]!r} has no effect with residual_mode={c['residual_mode']!r} "
            f"(it acts in {' / '.join(modes)})" for key, modes in MODE_SETTINGS.items()
            if c[key] != DEFAULTS[key] and c["residual_mode"] not in modes]


try:
    check_settings(config)
except SettingError as e:
    exit_with(e)
set_threads(threads)
ckpt_path, best_path, log_path = (os.path.join(out_dir, name) for name in ("ckpt.pt", "best.pt", "log.jsonl"))
pointer_path = os.path.join(out_dir, checkpoint.SHARDED_POINTER)  # fsdp: names the newest sharded checkpoint
fsdp = parallelism == "fsdp"
if init_from == "auto":
    init_from = "resume" if os.path.exists(ckpt_path) or os.path.exists(pointer_path) else "scratch"
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = device.split(":")[0]
if dtype == "auto":
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
if fsdp and dtype == "float16":
    exit_with(SettingError(FSDP_FLOAT16 + " (dtype='auto' chose float16: this GPU has no bfloat16)"))
use_compile = device_type == "cuda" if compile is None else compile
decay_end = lr_decay_iters or max_iters  # the schedule reaches min_lr here
decay_start = decay_end - wsd_decay_frac * decay_end if lr_schedule == "wsd" else decay_end

# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process (with fsdp: a 1-rank
# process group, so the sharded code paths and checkpoints are the same with one rank as with many)
torchrun = "RANK" in os.environ
distributed = torchrun or fsdp  # a process group exists
rank, local_rank, world_size = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
                                if torchrun else (0, 0, 1))
master = rank == 0
if torchrun and device_type == "cuda":
    device = f"cuda:{local_rank}"
micro_tokens = batch_size * block_size * world_size  # global tokens per micro-step
if total_batch_tokens % micro_tokens:
    exit_with(SettingError(f"total_batch_tokens={total_batch_tokens} is not a multiple of batch_size * block_size * "
                           f"world_size = {batch_size} * {block_size} * {world_size} = {micro_tokens}"))
grad_accum_steps = total_batch_tokens // micro_tokens
if master:
    for line in unused_setting_warnings(config):
        print(line, file=sys.stderr)

# the model's settings, validated by GPTConfig itself (pretrained weights bring their own shape and are
# checked when they load, below)
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.init}
if init_from in ("scratch", "resume"):
    try:
        GPTConfig(**model_args)
    except ValueError as e:
        exit_with(SettingError(str(e)))


def open_data():
    """The train and val loaders. One train-loader call returns a whole optimizer step
    ([grad_accum_steps * batch_size, block_size] on each rank), so the token stream depends only on
    total_batch_tokens, not on how it is split into ranks and micro-steps: 8 GPUs, 1 GPU with 8x
    accumulation, or a resume on another node count read the same tokens."""
    if require_manifest and read_manifest(data_dir) is None:
        raise InputError(f"data_dir={data_dir!r} has no {MANIFEST_NAME}: its prepare did not finish (or never ran). "
                         f"Rerun the prepare command that writes it (e.g. python prepare_fineweb.py "
                         f"--out_dir={data_dir} ...; a rerun redoes an interrupted prepare), or pass "
                         f"--require_manifest=False for shards written by another tool (llm.c)")
    train_glob, val_glob = os.path.join(data_dir, train_pattern), os.path.join(data_dir, val_pattern)
    try:
        return (ShardLoader(train_glob, grad_accum_steps * batch_size, block_size, rank, world_size, seed),
                ShardLoader(val_glob, batch_size, block_size, rank, world_size, seed, shuffle=False))
    except ValueError as e:
        raise InputError(f"data_dir={data_dir!r}: {e}") from e


def resume_source():
    """What init_from='resume' continues: ckpt.pt, or (fsdp) the newest complete sharded checkpoint directory."""
    if not fsdp:
        return ckpt_path
    pointer = checkpoint.read_sharded_pointer(out_dir)
    if pointer is None:
        raise InputError(f"no sharded checkpoint to resume: {pointer_path} is gone")
    return pointer["dir"]


def load_resume_checkpoint():
    """ckpt.pt (fsdp: the sharded checkpoint's train_state.pt; its weights load once the model is sharded),
    checked against the settings: they must describe its model, or this would silently continue another
    experiment (a fine-tune's shape came from the pretrained weights: only the residual settings)."""
    if fsdp:
        ckpt = checkpoint.load_checkpoint(os.path.join(resume_from, checkpoint.TRAIN_STATE))
    else:
        ckpt = checkpoint.load_checkpoint(ckpt_path)
        if "optimizer" not in ckpt:
            raise InputError(f"{ckpt_path} is a final weights-only checkpoint (save_optimizer_at_end=False): it "
                             "cannot be resumed. Analyse or evaluate it; to train further, start a run with "
                             "save_optimizer_at_end=True")
    keys = model_args if ckpt["weights_from"] == "scratch" else RESIDUAL_KEYS
    # a checkpoint from before a GPTConfig field existed holds that field's default (e.g. arch='gpt2')
    saved = {**{f.name: f.default for f in fields(GPTConfig) if f.init}, **ckpt["model_args"]}
    changed = {k: (saved.get(k), model_args[k]) for k in keys if saved.get(k) != model_args[k]}
    if changed:
        raise SettingError(f"{resume_from} was trained with different model settings: "
                           + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items()))
    return ckpt


try:
    train_loader, val_loader = open_data()
    resume_from = resume_source() if init_from == "resume" else None  # a file, or (fsdp) a directory
    checkpoint_in = load_resume_checkpoint() if init_from == "resume" else None
    if checkpoint_in is not None:
        model_args = checkpoint_in["model_args"]
        try:
            train_loader.load_state_dict(checkpoint_in["loader"])
        except ValueError as e:
            raise SettingError(f"cannot resume the data stream of {resume_from} (keep total_batch_tokens, block_size, "
                               f"seed and the data the same): {e}") from e
except NanoshiftError as e:
    exit_with(e)
weights_from = checkpoint_in["weights_from"] if checkpoint_in is not None else init_from
# alignment tracking reads the first track_sequences windows of the val split at every eval (and after a
# resume): every rank takes its share of them (rank r: windows r, r + world_size, ...)
track_windows = None
if track_alignment and track_sequences:
    try:
        track_windows = first_windows(os.path.join(data_dir, val_pattern), track_sequences, block_size + 1)
    except InputError as e:
        exit_with(SettingError(f"track_sequences={track_sequences}: {e} (lower it, or track_alignment=False)"))
val_windows = sum(n for _, n in val_loader.windows_per_shard)
eval_steps = min(math.ceil(eval_tokens / micro_tokens), val_windows)  # never count a val token twice
if eval_steps * micro_tokens < eval_tokens and master:
    print(f"note: the val split holds {val_windows * micro_tokens:,} tokens in batches of {micro_tokens:,}; "
          f"evaluating on those, not eval_tokens={eval_tokens:,}")

wandb = None
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        exit_with(SettingError("wandb_log=True but wandb is not installed (pip install wandb)"))

# the model: scratch, the checkpoint to resume, or pretrained GPT-2 / Llama weights
torch.manual_seed(seed + rank)  # rank 0's initial weights are broadcast (DDP, FSDP); dropout differs per rank
random.seed(seed + rank)
np.random.seed(seed + rank)
if init_from == "scratch":
    model = GPT(GPTConfig(**model_args))
elif init_from == "resume":  # fsdp: the weights are read into the sharded model below
    model = GPT(GPTConfig(**model_args)) if fsdp else GPT.from_checkpoint(checkpoint_in)
else:
    try:
        model = GPT.from_pretrained(init_from, **{k: config[k] for k in RESIDUAL_KEYS})
    except (OSError, ValueError) as e:  # not on the hub / not in the local cache, or not a GPT-2 / Llama
        exit_with(SettingError(f"init_from={init_from!r}: {e}"))
    model_args = model.config.to_dict()
if block_size > model.config.block_size:  # pretrained weights bring their own context length
    exit_with(SettingError(f"block_size={block_size} is longer than the model's context of {model.config.block_size}"))


def model_tokenizer():
    """({'name', 'id', 'vocab_size'} of the tokenizer this model reads, the HFTokenizer to copy into out_dir
    or None): a resume's recorded one, GPT-2's for GPT-2 weights, a Llama dir's own (else the `tokenizer`
    setting), a scratch model's `tokenizer` setting."""
    if init_from == "resume":
        return checkpoint_in.get("tokenizer") or {"name": GPT2_NAME, "id": GPT2_NAME, "vocab_size": 50257}, None
    name = tokenizer
    if init_from != "scratch":
        name = GPT2_NAME
        if model.config.arch == "llama":
            try:
                enc = get_tokenizer(init_from)
                return {"name": init_from, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab}, enc
            except (InputError, ImportError) as e:
                name = tokenizer
                if master:
                    print(f"note: init_from={init_from!r} has no usable tokenizer ({e}); the model's tokenizer is "
                          f"tokenizer={tokenizer!r}", file=sys.stderr)
    if name == GPT2_NAME:  # no need to build it to know what it is
        return {"name": GPT2_NAME, "id": GPT2_NAME, "vocab_size": 50257}, None
    try:
        enc = get_tokenizer(name)
    except (InputError, ImportError) as e:
        raise SettingError(f"tokenizer={name!r}: {e}") from e
    return {"name": name, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab}, enc


def check_tokenizer(manifest):
    """The data must be the model's tokens: the same tokenizer, and ids the model can embed (SettingError)."""
    if tokenizer_info["vocab_size"] > model.config.vocab_size:
        raise SettingError(f"the model's tokenizer {tokenizer_info['name']!r} has {tokenizer_info['vocab_size']:,} "
                           f"ids but the model's vocab_size is {model.config.vocab_size:,}")
    if manifest is None:
        return
    data_name, data_id, data_vocab = manifest_tokenizer(manifest)
    if data_id != tokenizer_info["id"]:
        raise SettingError(f"tokenizer mismatch: {data_dir} was tokenized with {data_name!r} ({data_id}) but the "
                           f"model reads {tokenizer_info['name']!r} tokens ({tokenizer_info['id']}). Prepare the data "
                           f"with --tokenizer={tokenizer_info['name']} (or, for a scratch model, set "
                           f"--tokenizer={data_name})")
    if data_vocab is not None and data_vocab > model.config.vocab_size:
        raise SettingError(f"{data_dir} holds {data_name!r} tokens (ids up to {data_vocab - 1:,}) but the model's "
                           f"vocab_size is {model.config.vocab_size:,}")


try:
    tokenizer_info, tokenizer_to_save = model_tokenizer()
    check_tokenizer(read_manifest(data_dir))
except NanoshiftError as e:
    exit_with(e)
tokenizer_dir = os.path.join(out_dir, "tokenizer")  # a copy of an HF tokenizer, next to the checkpoints
train_loader.vocab_size = val_loader.vocab_size = model.config.vocab_size  # every batch checked (cheap)
raw_model = model  # the unwrapped module: its state_dict has no '_orig_mod.' / 'module.' prefixes
model.set_activation_checkpointing(activation_checkpointing)

if distributed:  # everything above succeeded on every rank: now the process group
    if device_type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if torchrun:
        dist.init_process_group(backend=backend)
    else:  # fsdp in one plain process: a group of one, in memory
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        print("note: parallelism='fsdp' without torchrun: a 1-rank process group, nothing is sharded")
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # only affects float32 matmuls (fp32 runs, the lm loss)
    torch.backends.cudnn.allow_tf32 = True
ptdtype = dtype_from_name(dtype)
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)


def shard_model():
    """FSDP2: each block its own unit (gathered just before it runs, freed after), then the root (embeddings,
    final norm, lm_head and the gate: the gate is read before the first block and every block's backward adds
    to its gradient, so it is gathered with the embeddings once per step and reduce-scattered after the last
    block's backward). Weights are gathered in the compute dtype and gradients reduced in float32, while the
    sharded master weights and AdamW state stay float32. Moves the local shards to the device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # a scratch model's weights are rank 0's (each rank drew its own init from seed + rank, as under DDP, so
    # the RNG streams that dropout then uses are DDP's too); pretrained or resumed weights are the same everywhere
    rank0_init = init_from == "scratch" and world_size > 1
    initial = {k: v.clone() for k, v in model.state_dict().items()} if rank0_init and master else {}
    mesh = init_device_mesh(device_type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None if ptdtype == torch.float32 else ptdtype, reduce_dtype=torch.float32)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if use_compile:
            block.compile()  # in place (the parameter names stay), before sharding, as PyTorch recommends
        # the last block's weights would be gathered again at once for the backward pass: keep them
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if rank0_init:
        set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def keep_blocks_gathered(keep):
    """fsdp gradient accumulation: keep every block's weights gathered through the forward pass (the loop also
    keeps them after each backward but the last), so a step gathers them once, not twice per micro-step."""
    for block in model.transformer.h[:-1]:  # the last block (and the root) stay gathered after forward anyway
        block.set_reshard_after_forward(not keep)


# fsdp + gradient accumulation: weights gathered once per step and float32 gradients summed unsharded, one
# reduce-scatter per step (fsdp_reshard_micro_steps=True: FSDP's default cycle on every micro-step instead)
accumulate_gathered = fsdp and grad_accum_steps > 1 and not fsdp_reshard_micro_steps


if fsdp:
    shard_model()  # before the optimizer: FSDP replaces the parameters by their shards (DTensors)
else:
    model.to(device)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, gate_lr_mult)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # bf16 and fp32 need no loss scaling
iter_num, best_val_loss = 0, float("inf")
if checkpoint_in is not None:
    # the hyperparameters come from the settings (they may change on resume), the moments from the checkpoint
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if fsdp:
        try:
            checkpoint.load_sharded(resume_from, model, optimizer)  # resharded if written by another world size
        except NanoshiftError as e:
            exit_with(e)
    else:
        optimizer.load_state_dict(checkpoint_in["optimizer"])
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h)
    if checkpoint_in["scaler"]:
        scaler.load_state_dict(checkpoint_in["scaler"])
    iter_num, best_val_loss = checkpoint_in["iter_num"], checkpoint_in["best_val_loss"]
start_iter = iter_num
held_bytes = None  # held_state_bytes() of this rank, measured at the first step

if use_compile and not fsdp:  # fsdp compiled each block above
    model = torch.compile(model)
if distributed and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

# MFU: training FLOPs per token against the device's dense bf16 peak
if peak_flops is None and device_type == "cuda":
    gpu_name = torch.cuda.get_device_name(device)
    for name, flops in (("H200", 989e12), ("H100", 756e12 if "PCIe" in gpu_name else 989e12), ("A100", 312e12)):
        if name in gpu_name:
            peak_flops = flops
            break
flops_per_token = raw_model.flops_per_token(block_size)

# -----------------------------------------------------------------------------
# helpers: schedule, eval, checkpoints, log


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


def attenuation_at(it):
    """The attenuation ramp (model.set_attenuation): a function of the iteration only, so a resume is exact."""
    return attenuation_ramp(it, attenuation_warmup_iters)


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
    if distributed:
        dist.all_reduce(total)
    model.train()
    if fsdp:
        reshard_all()
    return total.item() / (eval_steps * world_size)


def reshard_all():
    """fsdp: free every gathered weight (FSDP keeps the root's, and the last block's, after a forward pass
    that no backward follows), so what reads parameters next sees the float32 shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


TRACKED_CURVES = ("topk_input", "topk_target", "cos_input", "cos_target", "projection")
TRACKED_SUMMARIES = ("topk_crossing", "cosine_crossing", "projection_half", "first_win_median", "never_fraction")


@torch.no_grad()
def track_alignment_now():
    """lens.py's metrics on the tracked val windows, raw and normed space, as a dict for the eval row.

    Each window is measured alone and the ranks' per-window sums are added on every rank in window order,
    so the numbers do not depend on the number of ranks, and equal analyze.py's on the checkpoint with
    --shards <val> --windows=first --num_sequences=track_sequences --batch_size=1 exactly.
    """
    if fsdp:  # the lens calls the model's parts, not its forward: gather the root's weights for it (blocks
        model.unshard()  # gather their own); under bf16 they are the bf16 copies, so the numbers are close, not equal
    lm = OurGPT(raw_model, os.path.basename(os.path.abspath(out_dir)))  # puts the model in eval mode
    mine = range(rank, len(track_windows), world_size)
    tracked = {"windows": len(track_windows), "tokens": track_windows[:, 1:].numel()}
    spaces = ("raw", "normed")
    sums = [(i, lens_sums(lm, [track_windows[i:i + 1]], spaces=spaces)) for i in mine]  # one lens pass each
    if distributed:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, sums)
        sums = [item for part in gathered for item in part]
    sums.sort(key=lambda item: item[0])
    for space in spaces:
        total = None
        for _, window in sums:
            total = window[space] if total is None else total + window[space]
        result = summarise(lm, total, LensOptions(space=space))
        tracked["misalignment"] = result["misalignment"]
        tracked[space] = {**{name: [row[name] for row in result["layers"]] for name in TRACKED_CURVES},
                          **{name: result["shift_depth"][name] for name in TRACKED_SUMMARIES}}
    if fsdp:
        reshard_all()  # after the last use of lm, which holds the gathered embeddings
    raw_model.train()
    return tracked


def gather_rng_states():
    """The RNG states of every rank, gathered (a collective: every rank calls it)."""
    mine = checkpoint.rng_state(device_type, device)
    if not distributed:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def local(t):
    """This rank's part of a tensor: its shard if FSDP sharded it (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def weights_finite():
    finite = all(bool(torch.isfinite(local(p)).all()) for p in raw_model.parameters())
    if not fsdp:
        return finite  # every rank holds the same whole weights
    flag = torch.tensor(float(finite), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # each rank checked its shards: all must be finite
    return bool(flag.item())


def local_bytes(tensors):
    """Bytes this rank holds for these tensors (a sharded one: its shard), each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        t = local(t)
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def held_state_bytes():
    """What this rank holds between steps: weights, gradients (as the optimizer sees them) and AdamW state.
    DDP's gradient buckets (another copy of the gradients) are not counted."""
    params = list(raw_model.parameters())
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": local_bytes(v for state in optimizer.state.values() for v in state.values()
                                     if torch.is_tensor(v))}


def memory_report():
    """Per rank (a collective): held_state_bytes at the first step, peak resident memory, peak CUDA memory."""
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device_type == "cuda" else None
    mine = dict(held_bytes or {}, rank=rank, max_rss_mib=round(max_rss_mib, 1),
                cuda_max_allocated_mib=None if cuda_mib is None else round(cuda_mib, 1))
    if not distributed:
        return [mine]
    report = [None] * world_size
    dist.all_gather_object(report, mine)
    return report


last_saved = (resume_from, start_iter) if checkpoint_in is not None else None  # (path, iter) of the last good state
# a new run over an old one (--overwrite): the old ckpt.pt, best.pt and log.jsonl stay until the first checkpoint
replacing_old_run = init_from != "resume" and not eval_only and any(map(os.path.exists, (ckpt_path, best_path,
                                                                                          log_path, pointer_path)))
new_log_path = log_path + ".new"  # where such a run logs until then


def link_or_false(src, dst):
    """Make dst a hard link to src, atomically; False where the filesystem has no hard links."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


def run_record():
    """What every checkpoint carries besides tensors (checkpoint.WEIGHTS_KEYS)."""
    return {"model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
            "weights_from": weights_from, "tokenizer": tokenizer_info}


def save(is_best, final=False):
    """The checkpoint of this eval or stop (weights only if final and not save_optimizer_at_end), and best.pt
    (weights only) when this eval is the best so far. Atomic; a failed write leaves the previous files."""
    global last_saved
    full = not (final and not save_optimizer_at_end)
    rng = gather_rng_states() if full else None  # a collective: every rank takes part
    try:
        if fsdp:
            saved = save_sharded(is_best, final, full, rng)  # every rank writes its part
        else:
            saved = save_whole(is_best, full, rng) if master else None
    except OSError as e:
        exit_with(InputError(f"could not write a checkpoint in {out_dir}: {e.strerror or e}; the previous "
                             f"{'checkpoint' if last_saved is None else last_saved[0] + ' (iter ' + str(last_saved[1]) + ')'}"
                             f" is unchanged and no temporary file is left"))
    if master:
        last_saved = (saved, iter_num)
        also = f" (and {ckpt_path}, the weights)" if fsdp and final and full else ""
        print(f"saved {saved} at iter {iter_num}{also}" + (" (and best.pt)" if is_best else "")
              + ("" if full else ", weights only"))


def save_whole(is_best, full, rng):
    """ddp, rank 0: ckpt.pt (everything resume needs, or the weights only), best.pt."""
    weights = {"model": raw_model.state_dict(), **run_record()}
    state = dict(weights, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 loader=train_loader.state_dict(), rng=rng) if full else weights
    checkpoint.save_checkpoint(state, ckpt_path)
    committed(ckpt_written=True)
    if is_best:
        if full or not link_or_false(ckpt_path, best_path):  # final weights-only: the same bytes, linked
            checkpoint.save_checkpoint(weights, best_path)
    return ckpt_path


def save_sharded(is_best, final, full, rng):
    """fsdp, every rank: the sharded checkpoint (checkpoint.save_sharded), and the weights gathered whole to
    rank 0 for best.pt and, at the end, ckpt.pt. The final ckpt.pt is written before the pointer moves: a crash
    in between resumes the state before, which redoes both."""
    weights = {"model": checkpoint.full_model_state(model), **run_record()} if is_best or final else None
    if master and final:
        checkpoint.save_checkpoint(weights, ckpt_path)
    saved = ckpt_path
    if full:
        name = [checkpoint.new_sharded_dir_name(out_dir, iter_num) if master else None]
        dist.broadcast_object_list(name, src=0)  # the directory rank 0 chose: every rank writes its part there
        state = dict(run_record(), scaler=scaler.state_dict(), loader=train_loader.state_dict(), rng=rng,
                     world_size=world_size)
        saved = checkpoint.save_sharded(out_dir, name[0], model, optimizer, state, master)
    if not master:
        return saved
    committed(ckpt_written=final)
    if not full:  # the final weights only, as DDP's final ckpt.pt: no sharded state is left to resume
        checkpoint.remove_sharded_run(out_dir)
    if is_best and not (final and link_or_false(ckpt_path, best_path)):  # the final ckpt.pt: the same bytes
        checkpoint.save_checkpoint(weights, best_path)
    return saved


def committed(ckpt_written):
    """Rank 0, once a checkpoint is whole: a new run's tokenizer copy, and the files of the run it replaces."""
    save_tokenizer_files()
    if replacing_old_run:
        finish_replacing_old_run(ckpt_written)


def save_tokenizer_files():
    """With a new run's first checkpoint: a copy of its HF tokenizer in out_dir/tokenizer (replacing an old one)."""
    global tokenizer_to_save
    if tokenizer_to_save is None:
        return
    tmp = f"{tokenizer_dir}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_to_save.hf.save_pretrained(tmp)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.replace(tmp, tokenizer_dir)
    tokenizer_to_save = None


def open_log():
    """log.jsonl, rank 0 only. A resumed run keeps the rows up to its checkpoint (rows of steps redone
    after it are dropped; a torn last line from a crash is ignored). A new run over an old run writes
    log.jsonl.new until its first checkpoint, so a run that dies early leaves the old log as it was."""
    if not master:
        return None
    os.makedirs(out_dir, exist_ok=True)
    for pattern in ("*.pt.*.tmp", checkpoint.SHARDED_POINTER + ".*.tmp"):  # a save killed mid-write
        for stale in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.remove(stale)
    checkpoint.remove_uncommitted_sharded(out_dir)  # a sharded save killed before its pointer moved
    if init_from == "resume" or eval_only:
        if start_iter > 0 and os.path.exists(log_path):
            rows = read_jsonl(log_path)
            kept = [r for r in rows if r.get("type") not in ("train", "eval") or r["iter"] < start_iter]
            with atomic_write(log_path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        return open(log_path, "a")
    return open(new_log_path if replacing_old_run else log_path, "w")


def finish_replacing_old_run(ckpt_written):
    """With a new run's first checkpoint: its log replaces the old one, and the old run's best.pt goes, and
    the old run's checkpoint of the other kind (ckpt.pt unless just written; sharded checkpoints)."""
    global replacing_old_run
    if os.path.exists(new_log_path):
        os.replace(new_log_path, log_path)  # the open file follows the rename
    if os.path.exists(best_path):
        os.remove(best_path)
    if not ckpt_written and os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    if not fsdp:
        checkpoint.remove_sharded_run(out_dir)
    replacing_old_run = False


def log(row):
    if log_file is None:
        return
    row["time"] = round(time.time(), 3)
    log_file.write(json.dumps(row) + "\n")
    log_file.flush()
    if wandb is not None and row["type"] in ("train", "eval"):
        wandb.log(numbers_of(row, row["type"]), step=row["iter"])


def numbers_of(row, prefix):
    """The numbers of a log row, nested keys joined by '/' (lists left out): what wandb can plot."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(numbers_of(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def alphas():
    return [round(a, 6) for a in raw_model.residual_alphas()]


def stop_nonfinite(what, value):
    """A NaN/inf loss or weight: stop before anything is saved; name the file with the last good state."""
    if master:
        good = (f"{last_saved[0]} (iter {last_saved[1]})" if last_saved else
                "none: no checkpoint was written by this run")
        print(f"error: the {what} is {value} at iter {iter_num} (lr {lr:.3g}); stopping without saving. "
              f"The last good checkpoint is {good}. Lower learning_rate, raise warmup_iters or check the data.",
              file=sys.stderr)
    log({"type": "end", "iter": iter_num, "reason": "nonfinite_" + what.split()[-1], what.split()[-1]: str(value)})
    if distributed:
        dist.destroy_process_group()
    sys.exit(1)


try:
    log_file = open_log()
except (NanoshiftError, OSError) as e:
    exit_with(e if isinstance(e, NanoshiftError) else InputError(f"cannot write the log in {out_dir}: {e}"))
if wandb is not None:
    wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)), config=config)
log({"type": "run", "iter": iter_num, "init_from": init_from, "weights_from": weights_from, "tokenizer": tokenizer_info,
     "attenuation": attenuation_at(iter_num), "attenuation_warmup_iters": attenuation_warmup_iters, "world_size": world_size,
     "grad_accum_steps": grad_accum_steps, "device": device, "dtype": dtype, "compile": use_compile,
     "threads": torch.get_num_threads(), "n_params": raw_model.num_params(), "flops_per_token": flops_per_token,
     "peak_flops": peak_flops, "eval_tokens": eval_steps * micro_tokens, "model_args": model_args, "config": config})
if master:
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {world_size} rank(s) x {batch_size} x {block_size} tokens"
          f" x {grad_accum_steps} accumulation step(s) = {total_batch_tokens:,} tokens per step; "
          f"{device}, {dtype}, compile={use_compile}, {torch.get_num_threads()} CPU thread(s); {init_from} at iter "
          f"{iter_num}")

if checkpoint_in is not None:  # the RNG last: building the model above consumed random numbers
    if len(checkpoint_in["rng"]) == world_size:
        checkpoint.set_rng_state(checkpoint_in["rng"][rank], device_type, device)
    elif master:
        print(f"note: {resume_from} was written by {len(checkpoint_in['rng'])} rank(s), this run has {world_size}: "
              f"same data stream, but dropout masks are not those of an uninterrupted run")
    del checkpoint_in

# pre-emption: the handler only sets a flag; every rank must stop at the same step, so the flag travels
# in the per-step all-reduce and the loop checkpoints right after the step in which any rank was signalled
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGUSR1, request_stop)

# -----------------------------------------------------------------------------
# the loop. Each pass: (1) at an eval boundary, evaluate and checkpoint; (2) stop at max_iters / eval_only;
# (3) one optimizer step; (4) if any rank was signalled during it, checkpoint and stop.
end_reason = None
while end_reason is None:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    attenuation = attenuation_at(iter_num)
    raw_model.set_attenuation(attenuation)

    # (1) eval + checkpoint (the first boundary of a run only evaluates: there is nothing new to save)
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        val_loss = evaluate()
        if not math.isfinite(val_loss):
            stop_nonfinite("val loss", val_loss)
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        row = {"type": "eval", "iter": iter_num, "tokens": iter_num * total_batch_tokens, "val_loss": val_loss,
               "best_val_loss": best_val_loss, "lr": lr, "attenuation": attenuation, "alphas": alphas()}
        if track_windows is not None:
            row["alignment"] = track_alignment_now()
            row["misalignment"] = row["alignment"]["misalignment"]  # top level: wandb logs the numbers of a row
        log(row)
        if master:
            shown = "" if residual_mode == "none" else " alphas " + " ".join(f"{a:.3f}" for a in row["alphas"])
            tracked = f", misalignment {row['misalignment']:.3f}" if row.get("misalignment") is not None else ""
            print(f"eval iter {iter_num}: val loss {val_loss:.4f} (best {best_val_loss:.4f}){tracked}{shown}")
        if iter_num > start_iter and not eval_only:
            if not weights_finite():
                stop_nonfinite("weights", "non-finite")
            save(is_best=improved and save_best, final=iter_num >= max_iters)

    # (2) the planned end
    if eval_only:
        end_reason = "eval_only"
        break
    if iter_num >= max_iters:
        end_reason = "max_iters"
        break

    # (3) one optimizer step: grad_accum_steps micro-steps, gradients synced across ranks on the last one only
    t0 = time.time()
    logging_step = iter_num % log_interval == 0
    step_alphas = alphas() if logging_step else None  # the alphas this step's forward uses, like its loss
    x, y = train_loader.next_batch()  # a token outside the vocabulary: an InputError naming shard and position
    if device_type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    loss_sum = torch.zeros((), device=device)
    if accumulate_gathered:
        keep_blocks_gathered(True)
    for micro_step in range(grad_accum_steps):
        last = micro_step == grad_accum_steps - 1
        if distributed and not fsdp:  # set before the forward pass: DDP decides there whether this backward all-reduces
            model.require_backward_grad_sync = last
        if accumulate_gathered:  # the last backward reduce-scatters the summed gradients and frees the weights
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)
        rows = slice(micro_step * batch_size, (micro_step + 1) * batch_size)
        with ctx:
            _, loss = model(x[rows], y[rows])
        loss_sum += loss.detach().float()
        scaler.scale(loss / grad_accum_steps).backward()
    if accumulate_gathered:
        keep_blocks_gathered(False)  # what runs between steps (evals) frees each block after its forward again
    # one small collective per step: the global mean loss, and whether any rank was asked to stop
    stats = torch.stack([loss_sum / grad_accum_steps, torch.tensor(float(stop_signal is not None), device=device)])
    if distributed:
        dist.all_reduce(stats)
    loss_sum_ranks, stop_votes = stats.tolist()  # the one host-device sync of a step
    step_loss = loss_sum_ranks / world_size
    if not math.isfinite(step_loss):  # before the optimizer applies it: the weights stay good
        stop_nonfinite("train loss", step_loss)
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # fsdp: the norm of the sharded gradients is a DTensor, summed over the ranks' shards (a collective)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if fsdp and logging_step:
            grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    if held_bytes is None:  # once, while gradients and optimizer state both exist
        held_bytes = held_state_bytes()
    optimizer.zero_grad(set_to_none=True)
    if logging_step:
        dt = time.time() - t0
        tokens_per_sec = total_batch_tokens / dt
        mfu = flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else None
        log({"type": "train", "iter": iter_num, "tokens": (iter_num + 1) * total_batch_tokens, "loss": step_loss,
             "lr": lr, "grad_norm": None if grad_norm is None else grad_norm.item(), "dt_ms": round(dt * 1000, 2),
             "tokens_per_sec": round(tokens_per_sec, 1), "mfu": None if mfu is None else round(mfu, 5),
             "attenuation": attenuation, "alphas": step_alphas})
        if master:
            print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                  f"{tokens_per_sec:,.0f} tok/s" + ("" if mfu is None else f", mfu {mfu:.1%}"))
    iter_num += 1

    # (4) pre-emption: checkpoint the state after this step, then stop
    if stop_votes > 0:
        if not weights_finite():
            stop_nonfinite("weights", "non-finite")
        save(is_best=False)
        end_reason = stop_signal or "signal on another rank"

memory = memory_report()  # a collective
log({"type": "end", "iter": iter_num, "reason": end_reason, "memory": memory})
if master:
    for m in memory:
        held = (f"weights + gradients + AdamW {sum(m[k] for k in ('params', 'grads', 'optimizer')) / 2**20:,.1f} MiB, "
                if "params" in m else "")
        peak = m["cuda_max_allocated_mib"]
        cuda = "" if peak is None else f", peak CUDA memory {peak:,.0f} MiB"
        print(f"rank {m['rank']}: {held}peak RSS {m['max_rss_mib']:,.0f} MiB{cuda}")
    print(f"stopped at iter {iter_num}: {end_reason}")
    log_file.close()
    if wandb is not None:
        wandb.finish()
if distributed:
    dist.barrier()  # no rank tears the group down while another still talks to it (gloo aborts then)
    dist.destroy_process_group()
