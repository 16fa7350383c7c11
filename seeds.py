"""
One training config over several seeds, one run after another: a thin launcher around train.py.

    python seeds.py config/gate.py --seeds=1,2,3                        # out-gate-s1, out-gate-s2, out-gate-s3
    python seeds.py config/demo_cut.py --seeds 1 2 3 --max_iters=600    # every other setting goes to train.py
    python seeds.py config/gate.py --seeds=1,2,3 --out_dir=runs/gate    # runs/gate-s1, runs/gate-s2, runs/gate-s3

For each seed S it runs

    python train.py CONFIG... OVERRIDES... --seed=S --out_dir=<out_dir>-s<S> --init_from=auto

where <out_dir> is the out_dir that the config files and overrides set (the last one wins, as in
train.py; config files are plain Python, run here only to read out_dir, max_iters and init_from: a
config that sets neither out_dir nor gets one from --out_dir is refused). train.py checks every other
setting itself: if the first run exits with status 2 (a bad setting), the launcher stops there, since
the other seeds would fail the same way. train.py's `seed` sets the initial weights and the data order,
so runs of two configs with one seed read the same batches and pair up in a comparison (groups.py).
Pretrained weights (init_from = a model name) are kept: the seed then sets the data order and the new
parameters.

Resumable: a seed whose log.jsonl ends with an "end" row of reason max_iters, at or past the max_iters
set now (or, if nothing sets it, the run's own), is finished and skipped; any other (never started,
interrupted, pre-empted, or given a larger max_iters) is started or continued by --init_from=auto. A run
that fails does not stop the others. At the end a table says what happened to each seed; the exit status
is the first failed run's, 1 if a run stopped before max_iters without failing (e.g. SIGTERM), else 0.

Then compare:  python eval_benchmarks.py --ckpt 'out-baseline-s*' 'out-gate-s*' ...
On a cluster, run one job per seed instead: docs/results.md, "Results with error bars" (a SLURM job array).
"""

import os
import shlex
import subprocess
import sys
import time

from nanoshift.common import SettingError, markdown_table, read_jsonl, run_main
from nanoshift.configurator import config_values, configure

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DEFAULTS = dict(
    seeds=[1, 2, 3],  # the seeds to run, e.g. --seeds=1,2,3 or --seeds 1 2 3
)
READ = ("out_dir", "max_iters", "init_from")  # the train.py settings the launcher needs to know
# a run in out_dir can be resumed when it holds one of these: DDP's ckpt.pt, FSDP's pointer to its sharded
# checkpoint (checkpoint.SHARDED_POINTER; named here so that the launcher starts without importing torch)
CHECKPOINT_FILES = ("ckpt.pt", "ckpt.dcp.json")


def split_args(argv):
    """(the launcher's own arguments, train.py's): --seeds and its values are the launcher's."""
    own, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--seeds" or arg.startswith("--seeds="):
            own.append(arg)
            while arg == "--seeds" and i < len(argv) and not argv[i].startswith("--") and not argv[i].endswith(".py"):
                own.append(argv[i])
                i += 1
        else:
            rest.append(arg)
    return own, rest


def train_settings(train_args):
    """{out_dir, max_iters, init_from} as far as these config files and --key=value / --key value overrides set
    them (configurator.config_values: applied left to right; a setting that nothing sets is absent)."""
    found = {k: v for k, v in config_values(train_args).items() if k in READ}
    if "max_iters" in found and (not isinstance(found["max_iters"], int) or isinstance(found["max_iters"], bool)):
        raise SettingError(f"max_iters: expected an int, got {found['max_iters']!r}")
    for key in ("out_dir", "init_from"):  # strings as train.py reads them (e.g. --out_dir=123)
        if key in found:
            found[key] = str(found[key])
    return found


def finished(out_dir, max_iters=None):
    """Whether the run in out_dir ended at max_iters (its log's last row: end, reason max_iters, at or past
    max_iters; None: the run's own)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return False
    rows = read_jsonl(path)
    return bool(rows) and rows[-1].get("type") == "end" and rows[-1].get("reason") == "max_iters" and \
        (max_iters is None or rows[-1].get("iter", -1) >= max_iters)


def launch(argv):
    own, train_args = split_args(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        configure(DEFAULTS, ["--help"], help_from=__file__)  # the launcher's own setting, described; exits 0
    seeds = [int(s) if isinstance(s, str) and s.strip().lstrip("-").isdigit() else s  # --seeds=7 arrives as ['7']
             for s in configure(DEFAULTS, own)["seeds"]]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise SettingError(f"seeds must be different ints, got {seeds!r}")
    for arg in train_args:
        if arg.startswith("--seed=") or arg == "--seed":
            raise SettingError("the launcher sets train.py's --seed for each run: give the seeds with --seeds")
    settings = train_settings(train_args)
    if not settings.get("out_dir"):
        raise SettingError("no out_dir: set it in the config file or with --out_dir (runs go to <out_dir>-s<seed>)")
    base, max_iters = settings["out_dir"].rstrip("/"), settings.get("max_iters")
    init_from = settings.get("init_from", "scratch")
    pretrained = init_from not in ("scratch", "resume", "auto")
    outcome = []  # (seed, out_dir, status, seconds, exit status)
    launched, refused = 0, False  # refused: the first run was refused as a bad setting, so the others would be
    for seed in seeds:
        out_dir = f"{base}-s{seed}"
        if refused:
            outcome.append((seed, out_dir, "not started", 0.0, 0))
            continue
        if finished(out_dir, max_iters):
            print(f"seeds: seed {seed}: {out_dir} finished earlier, skipped", flush=True)
            outcome.append((seed, out_dir, "finished earlier", 0.0, 0))
            continue
        resume = any(os.path.exists(os.path.join(out_dir, name)) for name in CHECKPOINT_FILES)
        init = f"--init_from={'resume' if resume else init_from}" if pretrained else "--init_from=auto"
        cmd = [sys.executable, TRAIN, *train_args, f"--seed={seed}", f"--out_dir={out_dir}", init]
        print(f"\nseeds: seed {seed}: {'continuing' if resume else 'starting'} {out_dir}\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        code = subprocess.run(cmd).returncode
        launched += 1
        if code != 0:
            status = f"failed (exit {code})"
        else:
            status = "trained" if finished(out_dir, max_iters) else "stopped before max_iters: rerun to continue"
        outcome.append((seed, out_dir, status, time.time() - t0, code))
        if code == 2 and launched == 1:
            refused = True
            print("seeds: the first run was refused as a bad setting (exit 2): the others would be too; not starting them",
                  file=sys.stderr)
    print("\n" + markdown_table(["seed", "out_dir", "status", "seconds"],
                                [[s, d, status, f"{t:.0f}"] for s, d, status, t, _ in outcome]))
    failed = [(s, code) for s, _, status, _, code in outcome if code != 0]
    stopped = [s for s, _, status, _, _ in outcome if status.startswith("stopped")]
    if failed:
        print(f"seeds: {len(failed)} of {len(seeds)} run(s) failed: seed(s) {[s for s, _ in failed]}", file=sys.stderr)
        return failed[0][1]
    if stopped:
        print(f"seeds: seed(s) {stopped} stopped before max_iters", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    sys.exit(run_main(launch, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
