"""
Checkpoint files: the one reader, the one writer, and the RNG states they carry. A library module.

    from checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint("out/ckpt.pt")          # a dict; never runs code from the file
    save_checkpoint(ckpt, "out/ckpt.pt")           # atomic: the old file stays whole until the new one is

Safety: every checkpoint is read with torch.load(weights_only=True), which unpickles tensors and plain
Python containers only, so a crafted .pt file cannot run code in train.py, analyze.py, eval_benchmarks.py
or GPT.from_checkpoint. Everything nanoshift stores is such a type (the numpy RNG state is kept as a
tensor). Files that need more (checkpoints written by nanoshift before this change, which held numpy
arrays, or a file carrying a pickled payload) are refused with a message naming the offending global;
`python convert_checkpoint.py OLD.pt --trust` rewrites one you trust, once, in the safe form.

Atomicity: save_checkpoint writes a temporary file in the same folder, fsyncs it and renames it over
the target (common.atomic_write): a crash, a kill -9 or a full disk leaves the previous file as it was
and no temporary file behind.
"""

import os
import pickle
import random
import re

import numpy as np
import torch

from common import InputError, atomic_write


def _describe_unreadable(path, error):
    """Why a checkpoint cannot be read, and what to do, as one message."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # what a weights-only load refused to import
    if isinstance(error, pickle.UnpicklingError) and found:
        what = found.group(1)
        return (f"{path} holds pickled Python objects ({what}) that a safe, weights-only load refuses: either a "
                f"checkpoint written by an older nanoshift (numpy RNG state) or a file that would run code when "
                f"unpickled. Only if you trust where it came from, convert it once: "
                f"python convert_checkpoint.py {path} --trust")
    message = f"{path} is not a readable checkpoint (truncated, empty or not a torch file: {type(error).__name__})"
    best = os.path.join(os.path.dirname(path) or ".", "best.pt")
    if os.path.basename(path) != "best.pt" and os.path.isfile(best):
        try:
            iter_num = torch.load(best, map_location="cpu", weights_only=True).get("iter_num")
            message += f"; {best} is intact (iter {iter_num}): analyse or evaluate that one"
        except Exception:
            pass
    return message


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The dict saved in a checkpoint file, read without running any code from it (weights_only).

    mmap: map the tensors from the file instead of reading them (cheap when only the settings are
    wanted, e.g. a run's seed). InputError for a missing, unreadable or unsafe file, naming it and
    saying what to do.
    """
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file (OSError, KeyError, EOFError, ...)
        raise InputError(_describe_unreadable(path, e)) from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def save_checkpoint(state, path):
    """torch.save, atomically (common.atomic_write). OSError (e.g. a full disk) leaves the old file intact."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's writer reports a failed write (ENOSPC, EFBIG) as a RuntimeError
            raise OSError(f"writing {path} failed (disk full or over a file size limit?): {e}") from e


def rng_state(device_type="cpu", device=None):
    """This process's RNG states (python, numpy, torch, cuda) in types a weights-only load accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}


def set_rng_state(state, device_type="cpu", device=None):
    """Restore what rng_state returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device_type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_safe(obj):
    """A checkpoint structure with numpy arrays and scalars turned into tensors and Python numbers (what
    convert_checkpoint.py does to an old checkpoint, after the user vouched for it)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: make_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(make_safe(v) for v in obj)
    return obj
