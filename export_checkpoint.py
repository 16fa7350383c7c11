"""
The consolidated weights of an FSDP run's sharded checkpoint, as one weights-only file (the format of the final
ckpt.pt and best.pt: 'model' + 'model_args' + iter_num, config, ...), which GPT.from_checkpoint, analyze.py and
eval_benchmarks.py read unchanged.

    python export_checkpoint.py out-fsdp                              # newest complete checkpoint -> out-fsdp/ckpt.pt
    python export_checkpoint.py out-fsdp/ckpt-00000250.dcp --out=gate-250.pt

train.py writes out_dir/ckpt.pt itself at the end of a run (max_iters); this is for the state of a run that is
still going or was stopped (SIGTERM). One process, no GPU, no process group: Distributed Checkpoint reads every
rank's shards of the weights (not the optimizer state) into one CPU model, 4 bytes per parameter. A run with an
HF tokenizer keeps its copy in out_dir/tokenizer, next to the default output, where the readers look for it.
Exit status: 0 done, 1 an unreadable or missing checkpoint, 2 a bad setting.
"""
import os
import sys

from nanoshift.checkpoint import (SHARDED_DIR, TRAIN_STATE, WEIGHTS_KEYS, load_checkpoint, load_sharded_weights,
                        read_sharded_pointer, save_checkpoint)
from nanoshift.common import InputError, SettingError, run_main
from nanoshift.configurator import configure
from model import GPT, GPTConfig

DEFAULTS = dict(
    path="",  # an FSDP run's out_dir (its newest sharded checkpoint) or a ckpt-*.dcp directory (or the first argument)
    out="",  # the file to write; '' = ckpt.pt in the run's out_dir
)


def sharded_checkpoint(path):
    """The DCP directory that path means: a run's newest complete checkpoint, or path itself."""
    if SHARDED_DIR.fullmatch(os.path.basename(os.path.normpath(path))):
        if not os.path.isfile(os.path.join(path, TRAIN_STATE)):
            raise InputError(f"{path} is not a complete sharded checkpoint (no {TRAIN_STATE}): a save that was cut off")
        return os.path.normpath(path)
    if not os.path.isdir(path):
        raise InputError(f"not found: {path} (give an FSDP run's out_dir or one of its ckpt-*.dcp directories)")
    pointer = read_sharded_pointer(path)
    if pointer is None:
        raise InputError(f"{path} holds no sharded checkpoint (no ckpt.dcp.json): not an FSDP run's out_dir, or "
                         f"it has not saved yet")
    return pointer["dir"]


def run(argv):
    if argv and not argv[0].startswith("-"):
        argv = [f"--path={argv[0]}"] + argv[1:]  # the checkpoint to export, not a config file
    settings = configure(DEFAULTS, argv, help_from=__file__)
    if not settings["path"]:
        raise SettingError("give the run to export: python export_checkpoint.py OUT_DIR [--out=FILE]")
    folder = sharded_checkpoint(settings["path"])
    out = settings["out"] or os.path.join(os.path.dirname(folder), "ckpt.pt")
    state = load_checkpoint(os.path.join(folder, TRAIN_STATE))
    model = load_sharded_weights(folder, GPT(GPTConfig(**state["model_args"])))
    save_checkpoint({"model": model.state_dict(), **{key: state[key] for key in WEIGHTS_KEYS}}, out)
    print(f"wrote {out}: the weights of {folder} (iter {state['iter_num']}, "
          f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters)")
    return out


if __name__ == "__main__":
    run_main(run, sys.argv[1:])
