"""
The pieces of a training run that train.py composes: its settings' checks, the data, the tokenizer the model
reads, the learning-rate schedule, evaluation and alignment tracking. Importable, so tests call them in-process.

    check_settings(config, defaults)           # SettingError for anything checkable before data or model
    train_loader, val_loader = open_data(config, facts)
    lr = lr_at(iter_num, config)
    val_loss = evaluate(model, val_loader, eval_steps, facts)
"""

import math
import os
import re
import sys
from dataclasses import fields

import torch
import torch.nn.functional as F

from model import RESIDUALS, GPT, GPTConfig, dtype_from_name, residual_config_keys, residual_settings
from nanoshift.hf import from_pretrained, pretrained_config
from nanoshift import checkpoint, parallel
from nanoshift.common import InputError, SettingError, check_out_dir
from nanoshift.data import (GPT2_NAME, MANIFEST_NAME, HFTokenizer, ShardLoader, get_tokenizer, manifest_tokenizer,
                            read_manifest, token_byte_lengths)
from nanoshift.floors import bits_per_byte
from nanoshift.lens import LensOptions, lens_sums, summarise
from nanoshift.lm import OurGPT

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # 'org/model' (a local path of that form is tried first)
FSDP_FLOAT16 = ("parallelism='fsdp' does not support dtype='float16' (its loss scaling over sharded gradients is not "
                "implemented here): use dtype='bfloat16' (or 'float32')")


def lr_mult_settings():
    """The training settings that multiply a residual variant's learning rate (the registry's, e.g. gate_lr_mult)."""
    return tuple(dict.fromkeys(v.lr_mult_setting for v in RESIDUALS.values() if v.lr_mult_setting))


def with_registry_settings(defaults):
    """train.py's settings plus what a registered residual variant reads that the settings block lacks (a
    variant added in model.py alone): the GPTConfig field's default, or 1.0 for a learning-rate multiplier."""
    out = dict(defaults)
    for f in fields(GPTConfig):
        if f.init and f.name not in out:
            out[f.name] = f.default
    for key in lr_mult_settings():
        out.setdefault(key, 1.0)
    return out


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
    if not (0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1):
        raise SettingError(f"need betas in [0, 1), got beta1={c['beta1']}, beta2={c['beta2']}")
    for key in lr_mult_settings():
        if c[key] < 0:
            raise SettingError(f"{key} must be >= 0, got {c[key]}")
    if c["lr_schedule"] not in ("cosine", "wsd"):
        raise SettingError(f"lr_schedule must be 'cosine' or 'wsd', got {c['lr_schedule']!r}")
    if not 0 < c["wsd_decay_frac"] <= 1:
        raise SettingError(f"wsd_decay_frac must be in (0, 1], got {c['wsd_decay_frac']}")
    decay_start, decay_end = schedule_ends(c)
    if not c["eval_only"] and c["max_iters"] > 0 and c["warmup_iters"] > decay_start:  # max_iters=0 trains nothing
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
    if c["attenuation_warmup_iters"] > 0 and c["residual_mode"] in RESIDUALS:  # a variant without a plain model
        RESIDUALS[c["residual_mode"]].check_ramp(c)                              # to ramp from refuses it now
    check_resume_settings(c)


def check_resume_settings(c):
    """What out_dir holds must fit init_from (a resume needs a resumable checkpoint: either parallelism's, as
    checkpoint.resume_source picks it; a DDP ckpt.pt continues as FSDP and a sharded checkpoint as DDP), and a
    new run never silently replaces an old one."""
    check_out_dir(c["out_dir"])
    ckpt = os.path.join(c["out_dir"], "ckpt.pt")
    pointer = os.path.join(c["out_dir"], checkpoint.SHARDED_POINTER)
    has_ckpt, has_pointer = os.path.exists(ckpt), os.path.exists(pointer)
    if c["init_from"] == "resume" or (c["init_from"] == "auto" and (has_ckpt or has_pointer)):
        try:
            checkpoint.resume_source(c["out_dir"], c["parallelism"] == "fsdp")  # SettingError: nothing resumable
        except InputError:
            pass  # an unreadable file: reported (exit 1) when the resume reads it
    new_run = c["init_from"] not in ("resume", "auto") and not c["eval_only"]
    if new_run and (has_ckpt or has_pointer) and not c["overwrite"]:
        raise SettingError(f"{c['out_dir']} already holds a run ({ckpt if has_ckpt else pointer}); init_from="
                           f"{c['init_from']!r} would replace it. Continue it with --init_from=resume, choose "
                           f"another --out_dir, or pass --overwrite=True to replace it")


def unused_setting_warnings(c, defaults):
    """Settings changed from their defaults that do nothing in the chosen residual mode (the registry says which
    modes read which settings)."""
    return [f"warning: {key}={c[key]!r} has no effect with residual_mode={c['residual_mode']!r} "
            f"(it acts in {' / '.join(modes)})" for key, modes in residual_settings().items()
            if key in c and c[key] != defaults[key] and c["residual_mode"] not in modes]


def schedule_ends(c):
    """(decay_start, decay_end): the schedule reaches min_lr at decay_end; wsd decays linearly from decay_start."""
    decay_end = c["lr_decay_iters"] or c["max_iters"]
    decay_start = decay_end - c["wsd_decay_frac"] * decay_end if c["lr_schedule"] == "wsd" else decay_end
    return decay_start, decay_end


def lr_at(it, c):
    """Linear warmup, then cosine to min_lr or warmup-stable-decay (wsd)."""
    lr, min_lr, warmup = c["learning_rate"], c["min_lr"], c["warmup_iters"]
    decay_start, decay_end = schedule_ends(c)
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    if c["lr_schedule"] == "cosine":
        progress = (it - warmup) / (decay_end - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if it < decay_start:  # wsd: stable at the peak, then a linear decay to min_lr
        return lr
    return lr + (min_lr - lr) * (it - decay_start) / (decay_end - decay_start)


def open_data(c, facts):
    """The train and val loaders. One train-loader call returns a whole optimizer step
    ([grad_accum_steps * batch_size, block_size] on each rank), so the token stream depends only on
    total_batch_tokens, not on how it is split into ranks and micro-steps: 8 GPUs, 1 GPU with 8x
    accumulation, or a resume on another node count read the same tokens."""
    data_dir = c["data_dir"]
    if c["require_manifest"] and read_manifest(data_dir) is None:
        raise InputError(f"data_dir={data_dir!r} has no {MANIFEST_NAME}: its prepare did not finish (or never ran). "
                         f"Rerun the prepare command that writes it (e.g. python prepare_fineweb.py "
                         f"--out_dir={data_dir} ...; a rerun redoes an interrupted prepare), or pass "
                         f"--require_manifest=False for shards written by another tool (llm.c)")
    train_glob, val_glob = os.path.join(data_dir, c["train_pattern"]), os.path.join(data_dir, c["val_pattern"])
    b, t, seed = c["batch_size"], c["block_size"], c["seed"]
    try:
        return (ShardLoader(train_glob, facts.grad_accum_steps * b, t, facts.rank, facts.world_size, seed),
                ShardLoader(val_glob, b, t, facts.rank, facts.world_size, seed, shuffle=False))
    except ValueError as e:
        raise InputError(f"data_dir={data_dir!r}: {e}") from e


def build_model(c, facts, model_args, resumed):
    """The model: scratch, the checkpoint to resume, or pretrained GPT-2 / Llama weights with the configured
    residual mode (a retrofit). fsdp scratch, resume and a retrofit from safetensors: on the meta device (shapes,
    no memory), materialised shard by shard once sharded (parallel.shard), its weights replayed (scratch) or
    loaded (resume, retrofit) there; a retrofit from .bin weights or a hub name is built whole (with a note)."""
    if facts.fsdp and facts.init_from in ("scratch", "resume"):
        with torch.device("meta"):
            return GPT(GPTConfig(**model_args))
    if facts.init_from == "scratch":
        return GPT(GPTConfig(**model_args))
    if facts.init_from == "resume":
        return GPT.from_checkpoint(resumed)
    overrides = {k: c[k] for k in residual_config_keys()}
    try:
        if facts.fsdp:  # a retrofit from safetensors: on the meta device, loaded shard by shard once sharded
            config = pretrained_config(facts.init_from, **overrides)
            why_whole = parallel.retrofit_builds_whole(facts.init_from, config)
            if why_whole is None:
                with torch.device("meta"):
                    return GPT(config)
            if facts.master:
                print(f"note: init_from={facts.init_from!r}: {why_whole}; every rank builds the whole float32 "
                      f"model once before sharding")
        return from_pretrained(facts.init_from, **overrides)
    except (OSError, ValueError) as e:  # not on the hub / not in the local cache, or not a GPT-2 / Llama
        raise SettingError(f"init_from={facts.init_from!r}: {e}") from e


def gpt2_tokenizer_info():
    return {"name": GPT2_NAME, "id": GPT2_NAME, "vocab_size": 50257}


def model_tokenizer(c, facts, model, resumed):
    """({'name', 'id', 'vocab_size'} of the tokenizer this model reads, the HFTokenizer to copy into out_dir
    or None): a resume's recorded one, GPT-2's for GPT-2 weights, a Llama dir's own (else the `tokenizer`
    setting), a scratch model's `tokenizer` setting."""
    if facts.init_from == "resume":
        recorded = resumed.get("tokenizer") or gpt2_tokenizer_info()
        if resumed["weights_from"] == "scratch" and c["tokenizer"] != recorded["name"]:
            raise SettingError(f"tokenizer={c['tokenizer']!r}, but the run being resumed reads {recorded['name']!r} "
                               f"tokens (its checkpoint says so): a resumed model keeps its tokenizer. Drop the "
                               f"setting, or start a new run (another --out_dir) to train on other tokens")
        return recorded, None
    name = c["tokenizer"]
    if facts.init_from != "scratch":
        name = GPT2_NAME
        if model.config.arch == "llama":
            try:
                enc = get_tokenizer(facts.init_from)
                return {"name": facts.init_from, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab}, enc
            except (InputError, ImportError) as e:
                name = c["tokenizer"]
                if facts.master:
                    print(f"note: init_from={facts.init_from!r} has no usable tokenizer ({e}); the model's "
                          f"tokenizer is tokenizer={name!r}", file=sys.stderr)
    if name == GPT2_NAME:  # no need to build it to know what it is
        return gpt2_tokenizer_info(), None
    try:
        enc = get_tokenizer(name)
    except (InputError, ImportError) as e:
        raise SettingError(f"tokenizer={name!r}: {e}") from e
    # only an HF tokenizer has files to copy next to the checkpoints (GPT-2's and the byte tokenizer are built in)
    return {"name": name, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab}, (enc if isinstance(enc, HFTokenizer)
                                                                               else None)


def byte_length_table(tokenizer, hf_tokenizer, out_dir, vocab_size, device):
    """[vocab_size] int64 tensor: the UTF-8 bytes of text each token id stands for (data.token_byte_lengths), so
    evaluate can report bits per byte; None (with a note) where the run's tokenizer cannot be loaded. A resumed
    run with an HF tokenizer reads the copy in out_dir/tokenizer."""
    copy = os.path.join(out_dir, "tokenizer")
    try:
        enc = hf_tokenizer or get_tokenizer(copy if os.path.isdir(copy) and tokenizer["name"] != GPT2_NAME
                                            else tokenizer["name"])
        table = torch.from_numpy(token_byte_lengths(enc).copy())
    except (InputError, ImportError, OSError, ValueError) as e:
        print(f"note: no val_bpb: the tokenizer {tokenizer['name']!r} cannot be loaded ({e})", file=sys.stderr)
        return None
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    lengths[:min(len(table), vocab_size)] = table[:vocab_size]
    return lengths.to(device)


def check_tokenizer(tokenizer, model, data_dir, manifest):
    """The data must be the model's tokens: the same tokenizer, and ids the model can embed (SettingError)."""
    if tokenizer["vocab_size"] > model.config.vocab_size:
        raise SettingError(f"the model's tokenizer {tokenizer['name']!r} has {tokenizer['vocab_size']:,} "
                           f"ids but the model's vocab_size is {model.config.vocab_size:,}")
    if manifest is None:
        return
    data_name, data_id, data_vocab = manifest_tokenizer(manifest)
    if data_id != tokenizer["id"]:
        raise SettingError(f"tokenizer mismatch: {data_dir} was tokenized with {data_name!r} ({data_id}) but the "
                           f"model reads {tokenizer['name']!r} tokens ({tokenizer['id']}). Prepare the data "
                           f"with --tokenizer={tokenizer['name']} (or, for a scratch model, set "
                           f"--tokenizer={data_name})")
    if data_vocab is not None and data_vocab > model.config.vocab_size:
        raise SettingError(f"{data_dir} holds {data_name!r} tokens (ids up to {data_vocab - 1:,}) but the model's "
                           f"vocab_size is {model.config.vocab_size:,}")


@torch.no_grad()
def evaluate(model, val_loader, eval_steps, facts, byte_lengths=None):
    """(mean val loss, val bits per byte or None) over the fixed budget (the loader restarts every time), over
    all ranks. The loss is the mean of the batches' mean losses, as always; bits per byte sums every target's
    loss in nats over the UTF-8 bytes of the targets (floors.bits_per_byte: targets of 0 bytes, the document
    separators, are left out of both sums)."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=facts.device)  # the batches' mean losses (float32, as always)
    text = torch.zeros(2, dtype=torch.float64, device=facts.device)  # nats and bytes of the targets
    for _ in range(eval_steps):
        x, y = val_loader.next_batch()
        x, y = x.to(facts.device), y.to(facts.device)
        with facts.autocast():
            logits, loss = model(x, y)
        total += loss.float()
        if byte_lengths is not None:
            nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            nbytes = byte_lengths[y.reshape(-1)]
            text[0] += (nll * (nbytes > 0)).sum()
            text[1] += nbytes.sum()
    parallel.sum_over_ranks(total, facts)
    if byte_lengths is not None:
        parallel.sum_over_ranks(text, facts)
    model.train()
    if facts.fsdp:
        parallel.reshard_all(model)
    nats, nbytes = text.tolist()
    bpb = bits_per_byte(nats, nbytes) if nbytes > 0 else None
    return total.item() / (eval_steps * facts.world_size), bpb


TRACKED_CURVES = ("topk_input", "topk_target", "cos_input", "cos_target", "projection")
TRACKED_SUMMARIES = ("topk_crossing", "cosine_crossing", "projection_half", "first_win_median", "never_fraction")


@torch.no_grad()
def measure_alignment(model, raw_model, windows, facts, name):
    """lens.py's metrics on the tracked val windows, raw and normed space, as a dict for the eval row.

    Each window is measured alone and the ranks' per-window sums are added on every rank in window order,
    so the numbers do not depend on the number of ranks, and equal analyze.py's on the checkpoint with
    --shards <val> --windows=first --num_sequences=track_sequences --batch_size=1 exactly.
    """
    if facts.fsdp:  # the lens calls the model's parts, not its forward: gather the root's weights for it (blocks
        model.unshard()  # gather their own); under bf16 they are the bf16 copies, so the numbers are close, not equal
    lm = OurGPT(raw_model, name)  # puts the model in eval mode
    mine = range(facts.rank, len(windows), facts.world_size)
    tracked = {"windows": len(windows), "tokens": windows[:, 1:].numel()}
    spaces = ("raw", "normed")
    sums = [(i, lens_sums(lm, [windows[i:i + 1]], spaces=spaces)) for i in mine]  # one lens pass each
    sums = sorted((item for part in parallel.gather_objects(sums, facts) for item in part), key=lambda item: item[0])
    for space in spaces:
        total = None
        for _, window in sums:
            total = window[space] if total is None else total + window[space]
        result = summarise(lm, total, LensOptions(space=space))
        tracked["misalignment"] = result["misalignment"]
        tracked[space] = {**{k: [row[k] for row in result["layers"]] for k in TRACKED_CURVES},
                          **{k: result["shift_depth"][k] for k in TRACKED_SUMMARIES}}
    if facts.fsdp:
        parallel.reshard_all(model)  # after the last use of lm, which holds the gathered embeddings
    raw_model.train()
    return tracked


def train_step(model, optimizer, scaler, x, y, facts, micro_batch, grad_clip, accumulate_gathered=False,
               stop_requested=False, want_grad_norm=True):
    """One optimizer step of train.py: x, y hold the whole step's rows on this rank; grad_accum_steps micro-steps
    of micro_batch rows, gradients synced across ranks on the last one only; clip; AdamW (through the loss scaler).
    Returns (the global mean loss, the gradient norm or None, whether any rank requested a stop). A non-finite
    loss returns before the optimizer applies it, so the weights stay good (the caller stops)."""
    loss_sum = torch.zeros((), device=facts.device)
    if accumulate_gathered:
        parallel.keep_blocks_gathered(model, True)
    steps = facts.grad_accum_steps
    for micro_step in range(steps):
        parallel.set_micro_step(model, facts, micro_step == steps - 1, accumulate_gathered)
        rows = slice(micro_step * micro_batch, (micro_step + 1) * micro_batch)
        with facts.autocast():
            _, loss = model(x[rows], y[rows])
        loss_sum += loss.detach().float()
        scaler.scale(loss / steps).backward()
    if accumulate_gathered:
        parallel.keep_blocks_gathered(model, False)  # between steps (evals) each block is freed after its forward
    # one small collective per step: the global mean loss, and whether any rank was asked to stop
    stats = torch.stack([loss_sum / steps, torch.tensor(float(stop_requested), device=facts.device)])
    loss_sum_ranks, stop_votes = parallel.sum_over_ranks(stats, facts).tolist()  # the step's one host sync
    step_loss = loss_sum_ranks / facts.world_size
    if not math.isfinite(step_loss):
        return step_loss, None, stop_votes > 0
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # fsdp: the norm of the sharded gradients is a DTensor, summed over the ranks' shards (a collective)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if facts.fsdp and want_grad_norm:
            grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    return step_loss, grad_norm, stop_votes > 0
