"""
A training run's facts and its folder: what train.py computes once and passes around.

    facts = RunFacts.from_settings(config)         # rank, world size, device, dtype, parallelism, accumulation
    folder = RunFolder(config["out_dir"], facts)   # ckpt.pt / best.pt / log.jsonl / sharded checkpoints

RunFacts are derived from the settings and the torchrun environment; the settings themselves are never
rebound (`init_from='auto'` stays 'auto' in the config that checkpoints record; the run's resolved choice is
facts.init_from).

The run folder (out_dir), rank 0 writes it (parallelism='fsdp': every rank writes its part of a sharded save):
    ckpt.pt    the latest state, written at every eval (so at the end) and on SIGTERM/SIGUSR1: 'model'
               (unwrapped state dict) and 'model_args' (GPTConfig.to_dict(); GPT.from_checkpoint reads
               these two), 'optimizer', 'scaler', 'iter_num', 'best_val_loss', 'loader' (train data
               position), 'rng' (python/numpy/torch/cuda states of every rank), 'config' (all settings),
               'weights_from' ('scratch' or the pretrained weights the run started from), 'tokenizer'
               ({'name', 'id', 'vocab_size'} of the tokenizer the model reads). With
               save_optimizer_at_end=False the final one (max_iters reached) holds the weights only.
    best.pt    the weights (no optimizer) of the eval with the lowest val loss so far (save_best); a hard
               link to ckpt.pt, not a copy, when the final weights-only ckpt.pt is that eval
    log.jsonl  one JSON object per line: "type" is "run", "train", "eval" or "end"
    tokenizer/ a copy of the run's HF tokenizer (when it has one), so analysis reads the checkpoint with it
    ckpt-00000250.dcp/, ckpt.dcp.json   parallelism='fsdp': sharded checkpoints and the pointer to the newest
               complete one (nanoshift/checkpoint.py); ckpt.pt then holds the consolidated weights at the end

Replacing a run (--overwrite=True): the old ckpt.pt, best.pt and log.jsonl stay until the new run writes its
first checkpoint; until then the new run logs to log.jsonl.new. A resumed run keeps the log rows up to its
checkpoint. Writes are atomic (nanoshift/checkpoint.py): a failed one leaves the previous files whole.
"""

import glob
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from model import GPT, GPTConfig, dtype_from_name, residual_config_keys
from nanoshift import checkpoint
from nanoshift.common import InputError, SettingError, atomic_write, read_jsonl


@dataclass(frozen=True)
class RunFacts:
    """Where and how this process trains: computed once from the settings and torchrun's environment."""

    init_from: str  # 'auto' resolved: 'scratch', 'resume', or the pretrained weights' name
    torchrun: bool  # started by torchrun (RANK, LOCAL_RANK, WORLD_SIZE set)
    distributed: bool  # a process group exists (torchrun, or fsdp in one process: a group of one)
    fsdp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cpu', 'cuda' or 'cuda:<local rank>'
    device_type: str
    dtype: str  # 'auto' resolved
    use_compile: bool
    grad_accum_steps: int
    micro_tokens: int  # global tokens per micro-step

    @property
    def master(self):
        return self.rank == 0

    @property
    def ptdtype(self):
        return dtype_from_name(self.dtype)

    def autocast(self):
        """The forward passes' context: autocast to bf16/fp16, nothing for float32."""
        if self.ptdtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)

    @classmethod
    def single_process(cls, device="cpu", dtype="float32", use_compile=False, micro_tokens=0):
        """One plain process, no process group, no accumulation (bench.py times train.py's step with these)."""
        return cls(init_from="scratch", torchrun=False, distributed=False, fsdp=False, rank=0, local_rank=0,
                   world_size=1, device=device, device_type=device.split(":")[0], dtype=dtype,
                   use_compile=use_compile, grad_accum_steps=1, micro_tokens=micro_tokens)

    @classmethod
    def from_settings(cls, c, fsdp_float16_message):
        """SettingError for what only shows once 'auto' is resolved (float16 under fsdp, the batch split)."""
        out_dir = c["out_dir"]
        init_from = c["init_from"]
        if init_from == "auto":
            has = os.path.exists(os.path.join(out_dir, "ckpt.pt")) or os.path.exists(
                os.path.join(out_dir, checkpoint.SHARDED_POINTER))
            init_from = "resume" if has else "scratch"
        device = c["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device_type = device.split(":")[0]
        dtype = c["dtype"]
        if dtype == "auto":
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
        fsdp = c["parallelism"] == "fsdp"
        if fsdp and dtype == "float16":
            raise SettingError(fsdp_float16_message + " (dtype='auto' chose float16: this GPU has no bfloat16)")
        # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process (with fsdp: a
        # 1-rank process group, so the sharded code paths and checkpoints are the same with one rank as with many)
        torchrun = "RANK" in os.environ
        rank, local_rank, world_size = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                                         int(os.environ["WORLD_SIZE"])) if torchrun else (0, 0, 1))
        if torchrun and device_type == "cuda":
            device = f"cuda:{local_rank}"
        micro_tokens = c["batch_size"] * c["block_size"] * world_size
        if c["total_batch_tokens"] % micro_tokens:
            raise SettingError(f"total_batch_tokens={c['total_batch_tokens']} is not a multiple of batch_size * "
                               f"block_size * world_size = {c['batch_size']} * {c['block_size']} * {world_size} = "
                               f"{micro_tokens}")
        return cls(init_from=init_from, torchrun=torchrun, distributed=torchrun or fsdp, fsdp=fsdp, rank=rank,
                   local_rank=local_rank, world_size=world_size, device=device, device_type=device_type,
                   dtype=dtype, use_compile=device_type == "cuda" if c["compile"] is None else c["compile"],
                   grad_accum_steps=c["total_batch_tokens"] // micro_tokens, micro_tokens=micro_tokens)


def model_args_of(config):
    """The GPTConfig arguments the settings describe (a scratch run's model)."""
    return {f.name: config[f.name] for f in fields(GPTConfig) if f.init}


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


class RunFolder:
    """out_dir: what resume reads, where checkpoints and the log go, and the replace-an-old-run protocol."""

    def __init__(self, out_dir, facts, eval_only=False):
        self.out_dir, self.facts = out_dir, facts
        self.ckpt_path, self.best_path, self.log_path = (os.path.join(out_dir, name)
                                                         for name in ("ckpt.pt", "best.pt", "log.jsonl"))
        self.pointer_path = os.path.join(out_dir, checkpoint.SHARDED_POINTER)
        self.tokenizer_dir = os.path.join(out_dir, "tokenizer")
        self.new_log_path = self.log_path + ".new"
        self.resuming = facts.init_from == "resume"
        self.eval_only = eval_only
        # a new run over an old one (--overwrite): the old files stay until the new run's first checkpoint
        self.replacing_old_run = not self.resuming and not eval_only and any(map(os.path.exists, (
            self.ckpt_path, self.best_path, self.log_path, self.pointer_path)))
        self.resume_from = None  # a file, or (fsdp) a directory
        self.last_saved = None  # (path, iter) of the last good state
        self.tokenizer_to_save = None  # an HFTokenizer copied into out_dir with the first checkpoint
        self.log_file = None
        self.wandb = None

    # ---- resume: the one place that reads what a run continues from ----

    def load_resume(self, model_args):
        """The checkpoint to continue, checked against the settings: they must describe its model, or this would
        silently continue another experiment (a fine-tune's shape came from the pretrained weights: only the
        residual settings). Sets resume_from (ckpt.pt, or a sharded checkpoint's directory) and last_saved.

        Whichever parallelism wrote it (checkpoint.resume_source: the newest resumable one in out_dir):
          fsdp, sharded: train_state.pt; the weights and AdamW state load once the model is sharded
          fsdp, ckpt.pt: memory-mapped, so each rank reads the pages of its own shards only (parallel.load_resumed)
          ddp, ckpt.pt: read whole
          ddp, sharded: train_state.pt, and the weights and AdamW moments read whole from the DCP files (any
                        world size wrote them): 'model' as in a ckpt.pt, 'optimizer_by_name' by parameter name
        """
        kind, self.resume_from = checkpoint.resume_source(self.out_dir, self.facts.fsdp)
        if kind == "sharded":
            ckpt = checkpoint.load_checkpoint(os.path.join(self.resume_from, checkpoint.TRAIN_STATE))
            if not self.facts.fsdp:
                ckpt["model"], ckpt["optimizer_by_name"] = checkpoint.read_sharded_whole(self.resume_from)
                with torch.device("meta"):  # the names a tied parameter has in a plain state_dict
                    twin = GPT(GPTConfig(**ckpt["model_args"]))
                first = {}
                for name, p in twin.named_parameters(remove_duplicate=False):
                    if id(p) in first and name not in ckpt["model"]:
                        ckpt["model"][name] = ckpt["model"][first[id(p)]]
                    first.setdefault(id(p), name)
        else:
            ckpt = checkpoint.load_checkpoint(self.resume_from, mmap=self.facts.fsdp)
        keys = model_args if ckpt["weights_from"] == "scratch" else residual_config_keys()
        # a checkpoint from before a GPTConfig field existed holds that field's default (e.g. arch='gpt2')
        saved = {**{f.name: f.default for f in fields(GPTConfig) if f.init}, **ckpt["model_args"]}
        changed = {k: (saved.get(k), model_args[k]) for k in keys if saved.get(k) != model_args[k]}
        if changed:
            raise SettingError(f"{self.resume_from} was trained with different model settings: "
                               + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items()))
        self.last_saved = (self.resume_from, ckpt["iter_num"])
        return ckpt

    # ---- the log ----

    def open_log(self, start_iter, wandb=None, wandb_args=None):
        """log.jsonl, rank 0 only. A resumed run keeps the rows up to its checkpoint (rows of steps redone
        after it are dropped; a torn last line from a crash is ignored). A new run over an old run writes
        log.jsonl.new until its first checkpoint, so a run that dies early leaves the old log as it was.
        Also removes what a save killed mid-write left behind."""
        if not self.facts.master:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        for pattern in ("*.pt.*.tmp", checkpoint.SHARDED_POINTER + ".*.tmp"):
            for stale in glob.glob(os.path.join(glob.escape(self.out_dir), pattern)):
                os.remove(stale)
        checkpoint.remove_uncommitted_sharded(self.out_dir)  # a sharded save killed before its pointer moved
        if self.resuming or self.eval_only:
            if start_iter > 0 and os.path.exists(self.log_path):
                rows = read_jsonl(self.log_path)
                kept = [r for r in rows if r.get("type") not in ("train", "eval") or r["iter"] < start_iter]
                with atomic_write(self.log_path) as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
            self.log_file = open(self.log_path, "a")
        else:
            self.log_file = open(self.new_log_path if self.replacing_old_run else self.log_path, "w")
        if wandb is not None:
            self.wandb = wandb
            wandb.init(**wandb_args)

    def log(self, row):
        if self.log_file is None:
            return
        row["time"] = round(time.time(), 3)
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        if self.wandb is not None and row["type"] in ("train", "eval"):
            self.wandb.log(numbers_of(row, row["type"]), step=row["iter"])

    def close(self):
        if self.log_file is not None:
            self.log_file.close()
        if self.wandb is not None:
            self.wandb.finish()

    # ---- checkpoints ----

    def save(self, trainer, iter_num, is_best, final, save_optimizer_at_end):
        """The checkpoint of this eval or stop (weights only if final and not save_optimizer_at_end), and best.pt
        (weights only) when this eval is the best so far. Atomic; a failed write leaves the previous files and
        raises InputError naming the last good state. trainer: nanoshift.parallel.Trainer (model, optimizer,
        scaler, loader and the run record)."""
        facts = self.facts
        full = not (final and not save_optimizer_at_end)
        rng = trainer.gather_rng_states() if full else None  # a collective: every rank takes part
        try:
            if facts.fsdp:
                saved = self._save_sharded(trainer, iter_num, is_best, final, full, rng)  # every rank writes its part
            else:
                saved = self._save_whole(trainer, is_best, full, rng) if facts.master else None
        except OSError as e:
            last = ("checkpoint" if self.last_saved is None else
                    f"{self.last_saved[0]} (iter {self.last_saved[1]})")
            raise InputError(f"could not write a checkpoint in {self.out_dir}: {e.strerror or e}; the previous "
                             f"{last} is unchanged and no temporary file is left") from e
        if facts.master:
            self.last_saved = (saved, iter_num)
            also = f" (and {self.ckpt_path}, the weights)" if facts.fsdp and final and full else ""
            print(f"saved {saved} at iter {iter_num}{also}" + (" (and best.pt)" if is_best else "")
                  + ("" if full else ", weights only"))

    def _save_whole(self, trainer, is_best, full, rng):
        """ddp, rank 0: ckpt.pt (everything resume needs, or the weights only), best.pt."""
        weights = {"model": trainer.raw_model.state_dict(), **trainer.record()}
        state = dict(weights, optimizer=trainer.optimizer.state_dict(), scaler=trainer.scaler.state_dict(),
                     loader=trainer.train_loader.state_dict(), rng=rng) if full else weights
        checkpoint.save_checkpoint(state, self.ckpt_path)
        self._committed(ckpt_written=True)
        if is_best:
            if full or not link_or_false(self.ckpt_path, self.best_path):  # final weights-only: the same bytes
                checkpoint.save_checkpoint(weights, self.best_path)
        return self.ckpt_path

    def _save_sharded(self, trainer, iter_num, is_best, final, full, rng):
        """fsdp, every rank: the sharded checkpoint (checkpoint.save_sharded), and the weights gathered whole to
        rank 0 for best.pt and, at the end, ckpt.pt. The final ckpt.pt is written before the pointer moves: a
        crash in between resumes the state before, which redoes both."""
        master = self.facts.master
        weights = ({"model": checkpoint.full_model_state(trainer.model), **trainer.record()}
                   if is_best or final else None)
        if master and final:
            checkpoint.save_checkpoint(weights, self.ckpt_path)
        saved = self.ckpt_path
        if full:
            name = [checkpoint.new_sharded_dir_name(self.out_dir, iter_num) if master else None]
            dist.broadcast_object_list(name, src=0)  # the directory rank 0 chose: every rank writes its part there
            state = dict(trainer.record(), scaler=trainer.scaler.state_dict(),
                         loader=trainer.train_loader.state_dict(), rng=rng, world_size=self.facts.world_size)
            saved = checkpoint.save_sharded(self.out_dir, name[0], trainer.model, trainer.optimizer, state, master)
        if not master:
            return saved
        self._committed(ckpt_written=final)
        if not full:  # the final weights only, as DDP's final ckpt.pt: no sharded state is left to resume
            checkpoint.remove_sharded_run(self.out_dir)
        if is_best and not (final and link_or_false(self.ckpt_path, self.best_path)):  # the same bytes
            checkpoint.save_checkpoint(weights, self.best_path)
        return saved

    def _committed(self, ckpt_written):
        """Rank 0, once a checkpoint is whole: a new run's tokenizer copy, and the files of the run it replaces."""
        if self.tokenizer_to_save is not None:
            tmp = f"{self.tokenizer_dir}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.tokenizer_to_save.hf.save_pretrained(tmp)
            shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
            os.replace(tmp, self.tokenizer_dir)
            self.tokenizer_to_save = None
        if self.replacing_old_run:  # its log replaces the old one; the old best.pt and other checkpoints go
            if os.path.exists(self.new_log_path):
                os.replace(self.new_log_path, self.log_path)  # the open file follows the rename
            if os.path.exists(self.best_path):
                os.remove(self.best_path)
            if not ckpt_written and os.path.exists(self.ckpt_path):
                os.remove(self.ckpt_path)
            if not self.facts.fsdp:
                checkpoint.remove_sharded_run(self.out_dir)
            self.replacing_old_run = False

    def last_good(self):
        """Words naming the file that holds the last good state."""
        if self.last_saved is None:
            return "none: no checkpoint was written by this run"
        return f"{self.last_saved[0]} (iter {self.last_saved[1]})"


def numbers_of(row, prefix):
    """The numbers of a log row, nested keys joined by '/' (lists left out): what wandb can plot."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(numbers_of(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def warn(facts, message):
    if facts.master:
        print(message, file=sys.stderr)
