"""
Rewrite a checkpoint you trust in the safe form every nanoshift entry point reads (weights-only).

    python convert_checkpoint.py out-old/ckpt.pt --trust                  # in place (the old file -> ckpt.pt.orig)
    python convert_checkpoint.py old.pt --trust --out=converted.pt

Checkpoints written before nanoshift read them weights-only held numpy arrays (the numpy RNG state);
torch.load(weights_only=True) refuses those, as it refuses any pickled object, because unpickling can
run code. This one-off command is the only place that unpickles without that guard, and only with
--trust: run it on files you wrote yourself. It turns numpy arrays and scalars into tensors and plain
numbers and checks that the result loads weights-only. Exit status: 0 done, 1 unreadable input, 2 a bad setting.
"""
import os
import sys

import torch

from nanoshift.checkpoint import load_checkpoint, make_safe, save_checkpoint
from nanoshift.common import InputError, SettingError, run_main
from nanoshift.configurator import configure

DEFAULTS = dict(
    path="",  # the checkpoint to convert (also the first plain argument)
    out="",  # where to write the converted checkpoint; '' = in place, keeping the original as PATH.orig
    trust=False,  # required: you vouch that the file is yours (unpickling an untrusted file can run code)
)


def run(argv):
    if argv and not argv[0].startswith("-"):
        argv = [f"--path={argv[0]}"] + argv[1:]  # the file to convert, not a config file
    settings = configure(DEFAULTS, argv, help_from=__file__)
    path, out = settings["path"], settings["out"] or settings["path"]
    if not path:
        raise SettingError("give the checkpoint to convert: python convert_checkpoint.py PATH --trust")
    if not settings["trust"]:
        raise SettingError("unpickling can run code: pass --trust only for a file you wrote yourself")
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
    except Exception as e:
        raise InputError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if out == path:
        os.replace(path, path + ".orig")
    save_checkpoint(make_safe(ckpt), out)
    load_checkpoint(out)  # the point of it all: it now loads weights-only
    kept = f" (the original is {path}.orig)" if out == path else ""
    print(f"wrote {out}: loads weights-only{kept}")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
