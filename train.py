"""
Train a GPT (GPT-2 or Llama blocks) with a residual variant on token shards: one process, one node, many nodes.

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

Settings: the flat block below; config files and --key=value overrides change them (nanoshift/configurator.py;
`python train.py --help` lists and describes them). Every setting is checked, and the data and model built,
before the process group starts or any training runs; a bad one exits with status 2 and a message naming it.
From Python: `train.main(["config/demo.py", "--max_iters=10"])` runs the same in-process.

init_from: 'scratch'; 'resume' continues out_dir's checkpoint exactly (same losses and weights as a run that
was never stopped); 'auto' resumes if out_dir holds a checkpoint, else starts from scratch (for requeued jobs);
'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', a hub name ('HuggingFaceTB/SmolLM2-360M') or a local
HuggingFace GPT-2 or Llama directory continues training those weights with the configured residual mode (a
retrofit; attenuation_warmup_iters > 0 makes step 0 the pretrained model and brings the attenuation in
linearly). A new run into an out_dir that already holds a checkpoint is refused unless --overwrite=True.

Tokenizers: the model reads the tokens of its own tokenizer (the `tokenizer` setting for a scratch run,
GPT-2's for GPT-2 weights, the HF directory's own for Llama weights); data prepared with another one
(its _done.json says which) is refused with exit 2 naming both.

Where things live: what out_dir holds, resume and the replace-an-old-run protocol: nanoshift/run.py;
DDP/FSDP2 and sharded training: nanoshift/parallel.py and nanoshift/checkpoint.py; the schedule, evaluation
and alignment tracking: nanoshift/training.py; residual variants: model.py's registry.

Reliability: checkpoints are written atomically and read weights-only; a non-finite loss (train or val) or
non-finite weights never reach a checkpoint: the run stops with exit 1 and names the file that holds the last
good state; a data folder without the prepare's _done.json is refused; SIGTERM/SIGUSR1 checkpoint and stop.
(nanoGPT's always_save_checkpoint=False skipped saves when val got worse, which loses progress on a crash;
here ckpt.pt always holds the latest state and the best model has its own file.)

Exit status: 0 finished, or stopped by SIGTERM/SIGUSR1 after writing ckpt.pt (requeue with
--init_from=resume or auto); 1 bad data, an unreadable checkpoint, a failed write, or the loss became
NaN/inf; 2 a bad setting. Under torchrun these are the workers' codes; torchrun itself exits 1 when
it was the one signalled (it forwards SIGTERM to the workers, which checkpoint and exit 0).
"""

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from model import GPTConfig, attenuation_ramp
from nanoshift import checkpoint, parallel
from nanoshift.common import InputError, NanoshiftError, SettingError, exit_with, report_uncaught_errors, set_threads
from nanoshift.configurator import configure_or_exit
from nanoshift.data import first_windows, read_manifest
from nanoshift.floors import floors_or_none
from nanoshift.run import RunFacts, RunFolder, model_args_of
from nanoshift.training import (FSDP_FLOAT16, build_model, byte_length_table, check_settings, check_tokenizer,
                                evaluate, lr_at, lr_mult_settings, measure_alignment, model_tokenizer, open_data,
                                train_step, unused_setting_warnings, with_registry_settings)

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
residual_mode = "none"  # a registered residual variant (model.py's RESIDUALS): 'none' | 'cut' | 'gate' | ...
cut_layer = -1  # cut: block index or list of indices (negative counts from the end)
cut_alpha = 0.5  # cut: alpha at the cut layer(s), in (0, 1]
gate_mode = "layer"  # gate: 'layer' (the paper's) | 'token' | 'scalar'
gate_alpha_min = 0.5  # gate: alpha_l = 1 - (1 - gate_alpha_min) * p_l, in [0, 1)
gate_lr_mult = 1.0  # gate: the gate parameters' learning rate is learning_rate * gate_lr_mult
lambdas_lr_mult = 1.0  # lambdas: x0_λ's lr is learning_rate * this, resid_λ's 0.01 times that (nanochat's ratio)
rezero_norm = True  # rezero: keep the pre-norms inside F (False: F reads the raw x, as the ReZero paper)
rezero_lr_mult = 1.0  # rezero: the alphas' learning rate is learning_rate * rezero_lr_mult
layerscale_init = None  # layerscale: initial per-channel scale; None = CaiT's rule (0.1 up to 18 layers, 1e-5 to 24, 1e-6 deeper)
layerscale_lr_mult = 1.0  # layerscale: the scales' learning rate is learning_rate * layerscale_lr_mult
value_residual_learned = True  # value_residual: learn the value mix (λ_own, λ_first) from 0.5/0.5 (False: fixed)
hc_streams = 4  # hyper_connections: number of residual streams n
hc_sinkhorn_iters = 0  # hyper_connections: Sinkhorn rounds making the stream mix doubly stochastic (mHC); 0 = plain HC
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
# parallelism: what each torchrun rank holds (docs/sharded-training.md)
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
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_settings and not k.startswith("_")}
EXTRA_TYPES = {"cut_layer": (int, list), "rope_scaling": (dict,)}


@dataclass
class TrainState:
    """What a checkpoint holds besides the settings: the model (as wrapped and unwrapped), optimizer, loss
    scaler, data position, and the run record; iter_num and best_val_loss move with the loop."""

    model: torch.nn.Module  # what the loop calls: compiled / DDP-wrapped / FSDP-sharded
    raw_model: torch.nn.Module  # its state_dict has no '_orig_mod.' / 'module.' prefixes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: object
    facts: RunFacts
    record_fields: dict  # model_args, config, weights_from, tokenizer
    iter_num: int = 0
    best_val_loss: float = float("inf")

    def record(self):
        """What every checkpoint carries besides tensors (checkpoint.WEIGHTS_KEYS)."""
        return {"model_args": self.record_fields["model_args"], "iter_num": self.iter_num,
                "best_val_loss": self.best_val_loss, **{k: v for k, v in self.record_fields.items()
                                                        if k != "model_args"}}

    def gather_rng_states(self):
        return parallel.gather_rng_states(self.facts)


def main(argv=None):
    defaults = with_registry_settings(DEFAULTS)
    config = configure_or_exit(defaults, argv, extra_types=EXTRA_TYPES, help_from=__file__)
    c = config  # read-only from here on: derived values get their own names
    try:
        check_settings(c)
        facts = RunFacts.from_settings(c, FSDP_FLOAT16)
    except SettingError as e:
        exit_with(e)
    set_threads(c["threads"])
    if facts.master:
        for line in unused_setting_warnings(c, defaults):
            print(line, file=sys.stderr)
    folder = RunFolder(c["out_dir"], facts, c["eval_only"])

    # the model's settings, validated by GPTConfig itself (pretrained weights bring their own shape and are
    # checked when they load, below)
    model_args = model_args_of(c)
    try:
        if facts.init_from in ("scratch", "resume"):
            try:
                GPTConfig(**model_args)
            except ValueError as e:
                raise SettingError(str(e)) from e
        train_loader, val_loader = open_data(c, facts)
        resumed = folder.load_resume(model_args) if facts.init_from == "resume" else None
        if resumed is not None:
            model_args = resumed["model_args"]
            try:
                train_loader.load_state_dict(resumed["loader"])
            except ValueError as e:
                raise SettingError(f"cannot resume the data stream of {folder.resume_from} (keep total_batch_tokens, "
                                   f"block_size, seed and the data the same): {e}") from e
    except NanoshiftError as e:
        exit_with(e)
    weights_from = resumed["weights_from"] if resumed is not None else facts.init_from
    # alignment tracking reads the first track_sequences windows of the val split at every eval (and after a
    # resume): every rank takes its share of them (rank r: windows r, r + world_size, ...)
    track_windows = None
    if c["track_alignment"] and c["track_sequences"]:
        try:
            track_windows = first_windows(os.path.join(c["data_dir"], c["val_pattern"]), c["track_sequences"],
                                          c["block_size"] + 1)
        except InputError as e:
            exit_with(SettingError(f"track_sequences={c['track_sequences']}: {e} (lower it, or "
                                   f"track_alignment=False)"))
    val_windows = sum(n for _, n in val_loader.windows_per_shard)
    eval_steps = min(math.ceil(c["eval_tokens"] / facts.micro_tokens), val_windows)  # never count a val token twice
    if eval_steps * facts.micro_tokens < c["eval_tokens"] and facts.master:
        print(f"note: the val split holds {val_windows * facts.micro_tokens:,} tokens in batches of "
              f"{facts.micro_tokens:,}; evaluating on those, not eval_tokens={c['eval_tokens']:,}")
    wandb = None
    if c["wandb_log"] and facts.master:
        try:
            import wandb
        except ImportError:
            exit_with(SettingError("wandb_log=True but wandb is not installed (pip install wandb)"))

    # the model: scratch, the checkpoint to resume, or pretrained GPT-2 / Llama weights
    seed = c["seed"] + facts.rank  # rank 0's initial weights are broadcast (DDP, FSDP); dropout differs per rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        raw_model = build_model(c, facts, model_args, resumed)
        if facts.init_from not in ("scratch", "resume"):
            model_args = raw_model.config.to_dict()
        if c["block_size"] > raw_model.config.block_size:  # pretrained weights bring their own context length
            raise SettingError(f"block_size={c['block_size']} is longer than the model's context of "
                               f"{raw_model.config.block_size}")
        tokenizer, folder.tokenizer_to_save = model_tokenizer(c, facts, raw_model, resumed)
        check_tokenizer(tokenizer, raw_model, c["data_dir"], read_manifest(c["data_dir"]))
    except NanoshiftError as e:
        exit_with(e)
    train_loader.vocab_size = val_loader.vocab_size = raw_model.config.vocab_size  # every batch checked (cheap)
    raw_model.set_activation_checkpointing(c["activation_checkpointing"])

    parallel.init_process_group(facts)  # everything above succeeded on every rank
    if facts.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only affects float32 matmuls (fp32 runs, the lm loss)
        torch.backends.cudnn.allow_tf32 = True
    parallel.place(raw_model, facts, scratch=facts.init_from == "scratch", seed=c["seed"])  # rank 0's seed
    optimizer = raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                               facts.device_type, {k: c[k] for k in lr_mult_settings()})
    scaler = torch.amp.GradScaler(facts.device_type, enabled=facts.dtype == "float16")  # bf16/fp32: no loss scaling
    state = TrainState(raw_model, raw_model, optimizer, scaler, train_loader, facts, dict(
        model_args=model_args, config=config, weights_from=weights_from, tokenizer=tokenizer))
    if resumed is not None:
        # the hyperparameters come from the settings (they may change on resume), the moments from the checkpoint
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:  # a DDP ckpt.pt or a sharded checkpoint, into either parallelism, any world size
            parallel.load_resumed(raw_model, optimizer, resumed, folder.resume_from, facts)
        except NanoshiftError as e:
            exit_with(e)
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h)
        if resumed["scaler"]:
            scaler.load_state_dict(resumed["scaler"])
        state.iter_num, state.best_val_loss = resumed["iter_num"], resumed["best_val_loss"]
    start_iter = state.iter_num
    model = state.model = parallel.wrap(raw_model, facts)
    peak_flops = c["peak_flops"] if c["peak_flops"] is not None else parallel.peak_flops_of(facts)
    flops_per_token = raw_model.flops_per_token(c["block_size"])
    byte_lengths = byte_length_table(tokenizer, folder.tokenizer_to_save, c["out_dir"], raw_model.config.vocab_size,
                                     facts.device)  # for val bits per byte
    # the unigram/bigram floors of the data (nanoshift/floors.py), for the log's readers: counted once, then cached
    floors = floors_or_none(c["data_dir"], max_train_tokens=10**8) if facts.master and c["require_manifest"] else None

    try:
        folder.open_log(start_iter, wandb, dict(project=c["wandb_project"], config=config, name=c["wandb_run_name"]
                                                or os.path.basename(os.path.abspath(c["out_dir"]))))
    except (NanoshiftError, OSError) as e:
        exit_with(e if isinstance(e, NanoshiftError) else InputError(f"cannot write the log in {c['out_dir']}: {e}"))
    attenuation_at = lambda it: attenuation_ramp(it, c["attenuation_warmup_iters"])  # a function of iter: exact resume
    folder.log({"type": "run", "iter": state.iter_num, "init_from": facts.init_from, "weights_from": weights_from,
                "tokenizer": tokenizer, "attenuation": attenuation_at(state.iter_num),
                "attenuation_warmup_iters": c["attenuation_warmup_iters"], "world_size": facts.world_size,
                "grad_accum_steps": facts.grad_accum_steps, "device": facts.device, "dtype": facts.dtype,
                "compile": facts.use_compile, "threads": torch.get_num_threads(), "n_params": raw_model.num_params(),
                "flops_per_token": flops_per_token, "peak_flops": peak_flops,
                "eval_tokens": eval_steps * facts.micro_tokens, "floors": floors, "model_args": model_args,
                "config": config})
    if facts.master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {facts.world_size} rank(s) x {c['batch_size']} x "
              f"{c['block_size']} tokens x {facts.grad_accum_steps} accumulation step(s) = "
              f"{c['total_batch_tokens']:,} tokens per step; {facts.device}, {facts.dtype}, "
              f"compile={facts.use_compile}, {torch.get_num_threads()} CPU thread(s); {facts.init_from} at iter "
              f"{state.iter_num}")
    if resumed is not None:  # the RNG last: building the model above consumed random numbers
        if len(resumed["rng"]) == facts.world_size:
            checkpoint.set_rng_state(resumed["rng"][facts.rank], facts.device_type, facts.device)
        elif facts.master:
            print(f"note: {folder.resume_from} was written by {len(resumed['rng'])} rank(s), this run has "
                  f"{facts.world_size}: same data stream, but dropout masks are not those of an uninterrupted run")
        del resumed

    # pre-emption: the handler only sets a flag; every rank must stop at the same step, so the flag travels
    # in the per-step all-reduce and the loop checkpoints right after the step in which any rank was signalled
    stop_signal = []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))

    def alphas():
        return [round(a, 6) for a in raw_model.residual_alphas()]

    def stop_nonfinite(what, value, lr):
        """A NaN/inf loss or weight: stop before anything is saved; name the file with the last good state."""
        if facts.master:
            print(f"error: the {what} is {value} at iter {state.iter_num} (lr {lr:.3g}); stopping without saving. "
                  f"The last good checkpoint is {folder.last_good()}. Lower learning_rate, raise warmup_iters or "
                  f"check the data.", file=sys.stderr)
        folder.log({"type": "end", "iter": state.iter_num, "reason": "nonfinite_" + what.split()[-1],
                    what.split()[-1]: str(value)})
        parallel.abort(facts)
        sys.exit(1)

    def save(is_best, final=False):
        try:
            folder.save(state, state.iter_num, is_best, final, c["save_optimizer_at_end"])
        except InputError as e:
            exit_with(e)

    # fsdp + gradient accumulation: weights gathered once per step and float32 gradients summed unsharded, one
    # reduce-scatter per step (fsdp_reshard_micro_steps=True: FSDP's default cycle on every micro-step instead)
    accumulate_gathered = facts.fsdp and facts.grad_accum_steps > 1 and not c["fsdp_reshard_micro_steps"]
    batch_size, max_iters, total_batch_tokens = c["batch_size"], c["max_iters"], c["total_batch_tokens"]
    held_bytes = None  # parallel.held_state_bytes of this rank, measured at the first step
    run_name = os.path.basename(os.path.abspath(c["out_dir"]))

    # -------------------------------------------------------------------------
    # the loop. Each pass: (1) at an eval boundary, evaluate and checkpoint; (2) stop at max_iters / eval_only;
    # (3) one optimizer step; (4) if any rank was signalled during it, checkpoint and stop.
    end_reason = None
    while end_reason is None:
        iter_num = state.iter_num
        lr = lr_at(iter_num, c)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        attenuation = attenuation_at(iter_num)
        raw_model.set_attenuation(attenuation)

        # (1) eval + checkpoint (the first boundary of a run only evaluates: there is nothing new to save)
        if iter_num % c["eval_interval"] == 0 or iter_num == max_iters or c["eval_only"]:
            val_loss, val_bpb = evaluate(model, val_loader, eval_steps, facts, byte_lengths)
            if not math.isfinite(val_loss):
                stop_nonfinite("val loss", val_loss, lr)
            improved = val_loss < state.best_val_loss
            state.best_val_loss = min(state.best_val_loss, val_loss)
            row = {"type": "eval", "iter": iter_num, "tokens": iter_num * total_batch_tokens, "val_loss": val_loss,
                   "val_bpb": val_bpb,
                   "best_val_loss": state.best_val_loss, "lr": lr, "attenuation": attenuation, "alphas": alphas()}
            if track_windows is not None:
                row["alignment"] = measure_alignment(model, raw_model, track_windows, facts, run_name)
                row["misalignment"] = row["alignment"]["misalignment"]  # top level: wandb logs a row's numbers
            folder.log(row)
            if facts.master:
                shown = "" if c["residual_mode"] == "none" else " alphas " + " ".join(f"{a:.3f}" for a in row["alphas"])
                tracked = f", misalignment {row['misalignment']:.3f}" if row.get("misalignment") is not None else ""
                bpb = "" if val_bpb is None else f", {val_bpb:.4f} bits/byte"
                print(f"eval iter {iter_num}: val loss {val_loss:.4f}{bpb} (best {state.best_val_loss:.4f}){tracked}"
                      f"{shown}")
            # a new run that ends here saves even if it took no step (max_iters=0: the initial or pretrained model)
            if (iter_num > start_iter or (iter_num >= max_iters and not folder.resuming)) and not c["eval_only"]:
                if not parallel.weights_finite(raw_model, facts):
                    stop_nonfinite("weights", "non-finite", lr)
                save(is_best=improved and c["save_best"], final=iter_num >= max_iters)

        # (2) the planned end
        if c["eval_only"]:
            end_reason = "eval_only"
            break
        if iter_num >= max_iters:
            end_reason = "max_iters"
            break

        # (3) one optimizer step (training.train_step: micro-steps, gradient sync on the last, clip, AdamW)
        t0 = time.time()
        logging_step = iter_num % c["log_interval"] == 0
        step_alphas = alphas() if logging_step else None  # the alphas this step's forward uses, like its loss
        x, y = train_loader.next_batch()  # a token outside the vocabulary: an InputError naming shard and position
        if facts.device_type == "cuda":
            x, y = x.pin_memory().to(facts.device, non_blocking=True), y.pin_memory().to(facts.device, non_blocking=True)
        step_loss, grad_norm, stop_voted = train_step(model, optimizer, scaler, x, y, facts, batch_size, c["grad_clip"],
                                                      accumulate_gathered, bool(stop_signal), logging_step)
        if not math.isfinite(step_loss):  # the optimizer did not apply it: the weights stay good
            stop_nonfinite("train loss", step_loss, lr)
        if held_bytes is None:  # once, while gradients and optimizer state both exist
            held_bytes = parallel.held_state_bytes(raw_model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if logging_step:
            dt = time.time() - t0
            tokens_per_sec = total_batch_tokens / dt
            mfu = flops_per_token * tokens_per_sec / (peak_flops * facts.world_size) if peak_flops else None
            folder.log({"type": "train", "iter": iter_num, "tokens": (iter_num + 1) * total_batch_tokens,
                        "loss": step_loss, "lr": lr, "grad_norm": None if grad_norm is None else grad_norm.item(),
                        "dt_ms": round(dt * 1000, 2), "tokens_per_sec": round(tokens_per_sec, 1),
                        "mfu": None if mfu is None else round(mfu, 5), "attenuation": attenuation,
                        "alphas": step_alphas})
            if facts.master:
                print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                      f"{tokens_per_sec:,.0f} tok/s" + ("" if mfu is None else f", mfu {mfu:.1%}"))
        state.iter_num += 1

        # (4) pre-emption: checkpoint the state after this step, then stop
        if stop_voted:
            if not parallel.weights_finite(raw_model, facts):
                stop_nonfinite("weights", "non-finite", lr)
            save(is_best=False)
            end_reason = stop_signal[0] if stop_signal else "signal on another rank"

    memory = parallel.memory_report(facts, held_bytes)  # a collective
    folder.log({"type": "end", "iter": state.iter_num, "reason": end_reason, "memory": memory})
    if facts.master:
        for m in memory:
            held = (f"weights + gradients + AdamW {sum(m[k] for k in ('params', 'grads', 'optimizer')) / 2**20:,.1f} "
                    f"MiB, " if "params" in m else "")
            peak = m["cuda_max_allocated_mib"]
            cuda = "" if peak is None else f", peak CUDA memory {peak:,.0f} MiB"
            print(f"rank {m['rank']}: {held}peak RSS {m['max_rss_mib']:,.0f} MiB{cuda}")
        print(f"stopped at iter {state.iter_num}: {end_reason}")
    folder.close()
    parallel.finish(facts)
    return state


if __name__ == "__main__":
    report_uncaught_errors()  # bad data found mid-run (common.InputError): one line and exit 1, not a traceback
    main()
    if "RANK" in os.environ:  # under torchrun: everything is written and the group is gone; skip the interpreter's
        sys.stdout.flush()  # teardown, where a gloo worker thread still being destroyed can abort the process
        sys.stderr.flush()  # ("terminate called without an active exception", seen once in a run of 2 CPU ranks)
        os._exit(0)
