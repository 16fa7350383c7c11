"""
Checkpoint files: the one reader, the one writer, and the RNG states they carry. A library module.

    from nanoshift.checkpoint import load_checkpoint, save_checkpoint
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

Sharded checkpoints (train.py with parallelism='fsdp'): PyTorch's Distributed Checkpoint (DCP) writes one
directory per save, every rank its own part in parallel; the save is committed by a small pointer file:

    out_dir/ckpt-00000250.dcp/   __0_0.distcp, __1_0.distcp, ... (each rank's shards of the weights and the
                                 AdamW moments), .metadata (DCP's index), train_state.pt (everything else
                                 resume needs: iter_num, loader position, every rank's RNG, config, ...)
    out_dir/ckpt.dcp.json        {"dir": "ckpt-00000250.dcp", "iter_num": 250, "world_size": 8}

Rank 0 moves the pointer (atomically) only after every rank has written its part, then deletes the older
directories. A crash or kill -9 mid-save leaves a directory that no pointer names: it is never resumed from,
and the next run removes it. DCP reshards on load, so a checkpoint resumes on any number of ranks; a DDP run
resumes it too (read_sharded_whole), and an FSDP run resumes a DDP ckpt.pt (resume_source picks the newest).
Reading a DCP directory stays weights-only: its tensors are read with torch.load(weights_only=True) by
DCP itself, its pickled index (.metadata) is checked here first to hold nothing but DCP's own metadata
classes, and train_state.pt is read by load_checkpoint.
"""

import json
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch

from nanoshift.common import InputError, SettingError, atomic_write, write_json


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

# -----------------------------------------------------------------------------
# Sharded checkpoints (FSDP, see the module docstring)

SHARDED_POINTER = "ckpt.dcp.json"
TRAIN_STATE = "train_state.pt"
SHARDED_DIR = re.compile(r"ckpt-\d{8}(-\d+)?\.dcp")
# what a weights-only checkpoint carries besides 'model' (train.py's final ckpt.pt and best.pt, the FSDP export)
WEIGHTS_KEYS = ("model_args", "iter_num", "best_val_loss", "config", "weights_from", "tokenizer")


def read_sharded_pointer(out_dir):
    """{'dir': absolute path, 'iter_num', 'world_size'} of the newest complete sharded checkpoint in out_dir,
    or None if there is none. InputError for a pointer that is unreadable or names no checkpoint."""
    path = os.path.join(out_dir, SHARDED_POINTER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            pointer = json.load(f)
        name, iter_num, world_size = pointer["dir"], int(pointer["iter_num"]), int(pointer["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a readable checkpoint pointer ({e})") from None
    if not SHARDED_DIR.fullmatch(str(name)):  # a name only: never a path out of out_dir
        raise InputError(f"{path} names {name!r}, not a checkpoint directory of the form ckpt-00000250.dcp")
    folder = os.path.join(out_dir, name)
    if not os.path.isfile(os.path.join(folder, TRAIN_STATE)):
        raise InputError(f"{path} names {folder}, which is missing or incomplete (no {TRAIN_STATE})")
    return {"dir": folder, "iter_num": iter_num, "world_size": world_size}


def new_sharded_dir_name(out_dir, iter_num):
    """A directory name for the save at iter_num that nothing in out_dir uses yet (an --overwrite run may
    reach an iteration whose directory the old run's pointer still names)."""
    name, n = f"ckpt-{iter_num:08d}.dcp", 1
    while os.path.exists(os.path.join(out_dir, name)):
        n += 1
        name = f"ckpt-{iter_num:08d}-{n}.dcp"
    return name


def remove_sharded(out_dir, keep=None):
    """Delete the sharded checkpoint directories in out_dir, all but the one named `keep` if given."""
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if SHARDED_DIR.fullmatch(name) and name != keep:
            shutil.rmtree(os.path.join(out_dir, name))


def remove_sharded_run(out_dir):
    """Delete the pointer first (so no half-deleted directory is ever named), then every directory."""
    if os.path.exists(os.path.join(out_dir, SHARDED_POINTER)):
        os.remove(os.path.join(out_dir, SHARDED_POINTER))
    remove_sharded(out_dir)


def remove_uncommitted_sharded(out_dir):
    """Delete the directories of sharded saves that never completed: those no pointer names."""
    pointer = read_sharded_pointer(out_dir)
    remove_sharded(out_dir, keep=None if pointer is None else os.path.basename(pointer["dir"]))


def _optimizer_tensors(optim_state):
    """The AdamW moments and step counts of a flattened DSD optimizer state dict. The param_groups
    (learning rate, betas, ...) stay out: they come from the settings on resume, and DCP would store them as
    pickled objects, which it reads back with a full (code-running) unpickle."""
    return {k: v for k, v in optim_state.items() if k.startswith("state.")}


def save_sharded(out_dir, name, model, optimizer, train_state, master):
    """Write model and optimizer (FSDP-sharded) into out_dir/name with DCP, every rank its part; then rank 0
    (master) writes train_state, moves the pointer and deletes older directories. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    folder = os.path.join(out_dir, name)
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(flatten_optimizer_state_dict=True))
    # dcp.save returns once rank 0 has written .metadata, which it does only after every rank reported its
    # files written (and fsynced): from here on the directory is whole
    try:
        dcp.save({"model": model_state, "optimizer": _optimizer_tensors(optim_state)},
                 storage_writer=dcp.FileSystemWriter(folder, sync_files=True))
    except dcp.CheckpointException as e:  # raised on every rank when any rank failed to write its part
        raise OSError(f"writing the sharded checkpoint {folder} failed: {e}") from e
    if not master:
        return folder
    save_checkpoint(train_state, os.path.join(folder, TRAIN_STATE))
    write_json(os.path.join(out_dir, SHARDED_POINTER),
               {"dir": name, "iter_num": train_state["iter_num"], "world_size": train_state["world_size"]})
    remove_sharded(out_dir, keep=name)
    return folder


def check_dcp_metadata(folder):
    """Read folder/.metadata with an unpickler that builds DCP's own metadata classes and nothing else, and
    check that it indexes tensors only (DCP unpickles non-tensor items with code execution allowed).
    InputError otherwise. Returns DCP's Metadata."""
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: {e}; refused (unpickling it could run code)") from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise InputError(f"{path} is not a readable Distributed Checkpoint index ({type(e).__name__}: {e})") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise InputError(f"{path} is not a Distributed Checkpoint index")
    others = [k for k, v in entries.items() if type(v).__name__ != "TensorStorageMetadata"]
    if others:
        raise InputError(f"{path} indexes non-tensor items ({', '.join(others[:3])}), which nanoshift never "
                         f"writes and DCP would unpickle with code execution allowed; refused")
    return metadata


class _DcpMetadataUnpickler(pickle.Unpickler):
    """The globals a DCP .metadata file refers to: DCP's metadata classes, torch.Size, dtypes, layouts, paths."""

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (
                module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        elif (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "Path"),
                                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it holds a pickled {module}.{name}, which a DCP index never does")


def load_sharded(folder, model, optimizer):
    """Fill an FSDP-sharded model and its optimizer from the DCP directory `folder`, resharding if it was
    written by another number of ranks. The optimizer keeps its own param_groups. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    check_dcp_metadata(folder)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    wanted = {"model": model_state, "optimizer": _optimizer_tensors(optim_state)}
    dcp.load(wanted, storage_reader=dcp.FileSystemReader(folder))
    optim_state.update(wanted["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=optim_state, options=options)


def full_model_state(model):
    """The unsharded state dict of an FSDP model on rank 0's CPU ({} on the other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {}  # a parameter under two names (tied embeddings): one tensor, as in a plain state_dict (saved once)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def load_sharded_weights(folder, model):
    """Fill a plain (unsharded, CPU) model with the weights of the DCP directory `folder`, in this one
    process (no process group): what the consolidated export reads."""
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(folder)
    state = model.state_dict()  # views of the model's own tensors: DCP reads into them
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    model.load_state_dict(state)
    return model

# -----------------------------------------------------------------------------
# Resume across parallelisms: a DDP ckpt.pt continues as FSDP, a sharded checkpoint continues as DDP


def resume_source(out_dir, fsdp):
    """('sharded', directory) or ('whole', ckpt.pt's path): the newest resumable checkpoint in out_dir, whichever
    parallelism wrote it (a run that changed parallelism leaves the other one's older checkpoint behind). A
    ckpt.pt without optimizer state (a final weights-only save, or a finished FSDP run's export) is not
    resumable. On a tie the running parallelism's own format. SettingError if there is nothing to resume,
    InputError for an unreadable pointer or ckpt.pt."""
    pointer = read_sharded_pointer(out_dir)
    whole_path = os.path.join(out_dir, "ckpt.pt")
    whole = None
    if os.path.isfile(whole_path):
        ckpt = load_checkpoint(whole_path, mmap=True)  # the keys and iter_num only: no tensor is read
        whole = (ckpt.get("iter_num", 0), "optimizer" in ckpt)
    candidates = []
    if pointer is not None:
        candidates.append((pointer["iter_num"], fsdp, "sharded", pointer["dir"]))
    if whole is not None and whole[1]:
        candidates.append((whole[0], not fsdp, "whole", whole_path))
    if not candidates:
        if whole is not None:
            raise SettingError(f"init_from='resume': {whole_path} holds weights only (a run finished with save_optimizer_at_end=False, "
                             f"or a finished FSDP run's weights-only export): not resumable. Analyse or evaluate it; "
                             f"to train further, start a run with save_optimizer_at_end=True")
        raise SettingError(f"init_from='resume': nothing to resume in {out_dir}: no ckpt.pt and no {SHARDED_POINTER} (check out_dir)")
    _, _, kind, path = max(candidates)
    return kind, path


def optimizer_param_names(model, optimizer):
    """The name of each parameter in the optimizer's order (what an optimizer state_dict's integer ids mean):
    the first name of a tied parameter, as torch.distributed.checkpoint names it."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(whole_state, names):
    """A plain optimizer.state_dict() (parameters as integer ids) with the parameters named instead: what
    torch.distributed.checkpoint's set_optimizer_state_dict(full_state_dict=True) reads."""
    return {"state": {names[i]: state for i, state in whole_state["state"].items()},
            "param_groups": [dict(group, params=[names[i] for i in group["params"]])
                             for group in whole_state["param_groups"]]}


def optimizer_state_by_id(flat_state, names, param_groups):
    """The AdamW moments of a sharded checkpoint read whole ({'state.<name>.<key>': tensor}) as a plain
    optimizer.state_dict() for the optimizer whose parameters are `names` (in order) and whose param_groups
    (with integer ids) are given."""
    state = {}
    for i, name in enumerate(names):
        prefix = f"state.{name}."
        entry = {k[len(prefix):]: v for k, v in flat_state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if entry:
            state[i] = entry
    return {"state": state, "param_groups": param_groups}


def read_sharded_whole(folder):
    """The weights and AdamW moments of the DCP directory `folder`, read whole in this process (no process
    group, whatever the number of ranks that wrote it): (model state dict, {'state.<name>.<key>': tensor}).
    A tied parameter is there under one of its names (its first)."""
    import torch.distributed.checkpoint as dcp

    metadata = check_dcp_metadata(folder)
    wanted = {"model": {}, "optimizer": {}}
    for key, entry in metadata.state_dict_metadata.items():
        top, _, rest = key.partition(".")
        if top in wanted:
            wanted[top][rest] = torch.empty(entry.size, dtype=entry.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return wanted["model"], wanted["optimizer"]
