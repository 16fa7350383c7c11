"""
Checkpoints out of a run, in two forms:

1. The consolidated weights of an FSDP run's sharded checkpoint, as one weights-only file (the format of the
final ckpt.pt and best.pt: 'model' + 'model_args' + iter_num, config, ...), which GPT.from_checkpoint,
analyze.py and eval_benchmarks.py read unchanged.

    python export_checkpoint.py out-fsdp                              # newest complete checkpoint -> out-fsdp/ckpt.pt
    python export_checkpoint.py out-fsdp/ckpt-00000250.dcp --out=gate-250.pt

2. --hf=DIR: a transformers directory (model.safetensors, config.json, generation_config.json, the tokenizer)
that AutoModelForCausalLM.from_pretrained(DIR) loads with no custom code: gpt2 -> GPT2LMHeadModel, llama ->
LlamaForCausalLM, same logits (nanoshift/hf_export.py; docs/export.md). The source may be a ckpt.pt or
best.pt file, a run's out_dir (its ckpt.pt, or its newest sharded checkpoint if that is newer) or a
ckpt-*.dcp directory. Attenuated models (residual_mode cut / gate) are refused: transformers' blocks have no
residual scale, so the weights alone would be another model; --remote_code writes them (cut, gate layer /
scalar) with a small model class of their own, loaded with trust_remote_code=True.

    python export_checkpoint.py out-base --hf=out-base/hf             # then: AutoModelForCausalLM.from_pretrained
    python export_checkpoint.py out-base/best.pt --hf=base-best --overwrite
    python export_checkpoint.py out-gate --hf=out-gate/hf --remote_code     # then: ..., trust_remote_code=True

train.py writes out_dir/ckpt.pt itself at the end of a run (max_iters); this is for the state of a run that is
still going or was stopped (SIGTERM). One process, no GPU, no process group: Distributed Checkpoint reads every
rank's shards of the weights (not the optimizer state) into one CPU model, 4 bytes per parameter. A run with an
HF tokenizer keeps its copy in out_dir/tokenizer, next to the default output, where the readers look for it.
Exit status: 0 done, 1 an unreadable or missing checkpoint or one that cannot be exported, 2 a bad setting
(e.g. --hf names a non-empty folder and --overwrite is not given).
"""
import os
import sys

from nanoshift.checkpoint import (SHARDED_DIR, TRAIN_STATE, WEIGHTS_KEYS, load_checkpoint, load_sharded_weights,
                        read_sharded_pointer, save_checkpoint)
from nanoshift.common import InputError, SettingError, run_main
from nanoshift.configurator import configure
from nanoshift.hf_export import export_hf
from model import GPT, GPTConfig

DEFAULTS = dict(
    path="",  # an FSDP run's out_dir (its newest sharded checkpoint) or a ckpt-*.dcp directory (or the first argument)
    out="",  # the file to write; '' = ckpt.pt in the run's out_dir
    hf="",  # a folder: write a transformers directory there instead of a consolidated ckpt.pt
    overwrite=False,  # with hf: replace an earlier export in that folder
    remote_code=False,  # with hf: an attenuated model (cut, gate layer/scalar) as remote code (trust_remote_code=True)
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


def consolidated(folder):
    """(weights-only checkpoint dict, model) of the DCP directory folder, read in this one process."""
    state = load_checkpoint(os.path.join(folder, TRAIN_STATE))
    model = load_sharded_weights(folder, GPT(GPTConfig(**state["model_args"])))
    return {"model": model.state_dict(), **{key: state[key] for key in WEIGHTS_KEYS}}, model


def hf_source(path):
    """(checkpoint dict, a path in its run folder, what it is) for --hf: a checkpoint file; a ckpt-*.dcp
    directory; or a run's out_dir: its ckpt.pt, or its newest sharded checkpoint when that is further on."""
    if os.path.isfile(path):
        return load_checkpoint(path), path, path
    if not os.path.isdir(path):
        raise InputError(f"not found: {path} (give a checkpoint file, a run's out_dir or a ckpt-*.dcp directory)")
    if SHARDED_DIR.fullmatch(os.path.basename(os.path.normpath(path))):
        folder = sharded_checkpoint(path)
    else:
        ckpt_file = os.path.join(path, "ckpt.pt")
        pointer = read_sharded_pointer(path)
        if pointer is None and not os.path.isfile(ckpt_file):
            raise InputError(f"{path} holds no checkpoint (no ckpt.pt, no ckpt.dcp.json): not a run's out_dir, or "
                             f"it has not saved yet")
        if pointer is None or (os.path.isfile(ckpt_file) and
                               load_checkpoint(ckpt_file, mmap=True).get("iter_num", 0) >= pointer["iter_num"]):
            return load_checkpoint(ckpt_file), ckpt_file, ckpt_file
        folder = pointer["dir"]
    ckpt, _ = consolidated(folder)
    return ckpt, os.path.join(os.path.dirname(folder), "ckpt.pt"), folder  # the run's tokenizer/ is next to it


def run(argv):
    if argv and not argv[0].startswith("-"):
        argv = [f"--path={argv[0]}"] + argv[1:]  # the checkpoint to export, not a config file
    settings = configure(DEFAULTS, argv, help_from=__file__)
    if not settings["path"]:
        raise SettingError("give the run to export: python export_checkpoint.py OUT_DIR [--out=FILE | --hf=DIR]")
    if settings["hf"]:
        if settings["out"]:
            raise SettingError("give --out (a consolidated ckpt.pt) or --hf (a transformers directory), not both")
        ckpt, ckpt_path, what = hf_source(settings["path"])
        out, hf_class, remote = export_hf(ckpt, ckpt_path, settings["hf"], overwrite=settings["overwrite"],
                                          remote_code=settings["remote_code"])
        trust = ", trust_remote_code=True" if remote else ""
        print(f"wrote {out}: {what} (iter {ckpt.get('iter_num', 0)}) as a transformers {hf_class}; load it with "
              f"AutoModelForCausalLM.from_pretrained({out!r}{trust})")
        return out
    if settings["overwrite"] or settings["remote_code"]:
        raise SettingError("--overwrite and --remote_code go with --hf (the consolidated ckpt.pt is always replaced "
                           "atomically, and is our own format)")
    folder = sharded_checkpoint(settings["path"])
    out = settings["out"] or os.path.join(os.path.dirname(folder), "ckpt.pt")
    state, model = consolidated(folder)
    save_checkpoint(state, out)
    print(f"wrote {out}: the weights of {folder} (iter {state['iter_num']}, "
          f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters)")
    return out


if __name__ == "__main__":
    run_main(run, sys.argv[1:])
