"""
Runs over several seeds as groups: which runs form a group and under what label, each run's seed, every
number of a group summarised (mean, standard deviation, 95% interval) and compared with a baseline
group, paired by seed. A library module shared by eval_benchmarks.py and analyze.py; the statistics
themselves (and why a paired t-test) are in stats.py.

    python eval_benchmarks.py --ckpt out-baseline out-gate               # two runs: one column each, as always
    python eval_benchmarks.py --ckpt 'out-baseline-s*' 'out-gate-s*'     # two groups, labelled baseline and gate
    python analyze.py --ckpt base='runs/none-*' gate='runs/gate-*' --baseline_group=base
    python analyze.py --log 'out-baseline-s*/log.jsonl' 'out-gate-s*/log.jsonl'   # training logs alike

    from nanoshift.groups import model_groups, summarize, differences
    groups = model_groups(["out-baseline-s*", "gate=out-gate-s*"])     # [Group], or None: no entry is a group

Which entries are groups. An entry of --ckpt or --log is a group when it has a wildcard (* ? [) or the
form label=pattern (quote it, so that the shell leaves the pattern to nanoshift). As soon as one entry is
a group every entry is one, a plain path being a group of one run; with no group entry nothing changes.
An --hf model in a comparison of groups is a group of one without a seed.

Labels. label=pattern names the group. A bare pattern is named after its run folder: the first part of
the path that has a wildcard (for 'out-gate-s*/ckpt.pt' the folder), cut at the wildcard, less a trailing
seed marker (-s, _s, -seed, _seed) or separator and less a leading 'out-': 'out-gate-s*' is "gate",
'runs/cut_seed?' is "cut"; if nothing is left, the part before it ('out-demo/*' is "demo"). A plain
path is named after its run folder, less 'out-'. Two groups with one label are a setting error: name them.

Seeds. A run's seed is the one train.py recorded (config['seed']): in the checkpoint (read memory-mapped,
the weights are not loaded) or in the run row of log.jsonl. A group's runs must have different seeds and
the same model settings (model_args: shape, residual mode, cut, gate): a group is one configuration
over seeds, so a pattern that catches runs of two modes is an InputError naming them, not an average.

Paired comparison. Every group is compared with the baseline group (--baseline_group; default the
first), matched by seed: both must hold exactly the same seeds, else an InputError naming the seeds each
side lacks, raised before anything is evaluated. It is paired because runs of different modes with one
seed read the same data in the same order and start from the same values of every weight they share
(train.py seeds both; the cut and the layer and scalar gates draw no random numbers; the token gate's
projection does, so a token-gate run shares only the data order with its baseline), so the per-seed
difference cancels most of the seed-to-seed noise.

Summaries. summarize(trees) takes one nested structure per run (an eval metrics dict, an analysis result
with its per-layer rows, a series of alphas) and returns the same structure with stats.describe() at every
number; mean(trees) and band(trees) give the mean and the 95% interval's ends in the same shape (the ends
are None for a group of one run: there is no interval, and the plots draw no band). differences() does the
same with stats.paired_difference against the baseline's runs, seed by seed.
"""

import os
import re
from dataclasses import dataclass

from nanoshift.checkpoint import load_checkpoint
from nanoshift.common import InputError, SettingError, expand_globs, markdown_table
from nanoshift.lm import model_specs
from nanoshift.stats import describe, paired_difference

WILDCARD = re.compile(r"[*?[]")
NAMED = re.compile(r"([A-Za-z_][\w.+-]*)=(.+)")  # label=pattern (a label has no '/', so a path never parses as one)
SEED_MARKER = re.compile(r"([-_](s|seed)?|seed)$")

NOTE = ("Cells: mean ± half-width of the 95% t interval of the mean over seeds (sd: the standard deviation over "
        "seeds); a group of one run shows its number alone. Differences: group − baseline, paired by seed, with the "
        "95% t interval of the mean difference and the two-sided paired t-test's p-value (stats.py); n.s. = not "
        "significant at 5%: the interval contains 0, so the difference is inside the seed-to-seed noise.")


@dataclass
class Run:
    path: str  # as given to the loader: a checkpoint file or run dir, a log.jsonl, an HF name
    name: str  # the run's own name in per-run tables (lm.model_specs's rule for checkpoints)
    seed: int = None  # config['seed'] as train.py recorded it; None: not recorded (an HF model, a foreign file)
    model_args: dict = None  # the model settings, to refuse a group that mixes configurations
    hf: bool = False  # an --hf model (path is its name)


@dataclass
class Group:
    label: str
    runs: list

    @property
    def seeds(self):
        return [run.seed for run in self.runs]

    @property
    def pairable(self):
        """Whether every run has a recorded seed (what a paired comparison needs)."""
        return all(seed is not None for seed in self.seeds)


def is_group_entry(entry):
    return bool(WILDCARD.search(entry) or (NAMED.fullmatch(entry) and not os.path.exists(entry)))


def _short(name):
    return name[4:] if name.startswith("out-") and len(name) > 4 else name


def group_label(pattern):
    """The label of a group given as a bare pattern or path (the module docstring's rule)."""
    parts = [p for p in pattern.replace(os.sep, "/").split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        found = WILDCARD.search(part)
        if found:
            stem = SEED_MARKER.sub("", part[:found.start()])
            if stem:
                return _short(stem)
            return _short(parts[i - 1]) if i else pattern
    if len(parts) > 1 and os.path.splitext(parts[-1])[1] in (".pt", ".jsonl"):
        parts = parts[:-1]  # a file: named after its run folder
    return _short(parts[-1]) if parts else pattern


def expand(entries, what="checkpoints"):
    """[(label, [paths])] for entries that form groups, in the order given; None when no entry is a group
    (the caller keeps its one-column-per-run behaviour). A pattern matching nothing is an InputError (from
    common.expand_globs); a plain path is kept as given, for the caller's own "not found" message."""
    entries = list(entries)
    if not any(is_group_entry(e) for e in entries):
        return None
    out, patterns, owner = [], {}, {}
    for entry in entries:
        named = NAMED.fullmatch(entry)
        label, pattern = named.groups() if named and not os.path.exists(entry) else (group_label(entry), entry)
        if label in patterns:
            raise SettingError(f"two groups are labelled {label!r} ({patterns[label]!r} and {pattern!r}): name them, "
                               f"e.g. {label}2='{pattern}'")
        patterns[label] = pattern
        paths = expand_globs(pattern, what) if WILDCARD.search(pattern) else [pattern]
        for path in paths:
            key = os.path.abspath(path)
            if key in owner:
                raise InputError(f"{path} is in two groups ({owner[key]!r} and {label!r}): make the patterns disjoint")
            owner[key] = label
        out.append((label, paths))
    return out


def make_group(label, runs):
    """A Group of these runs, sorted by seed; InputError for missing or repeated seeds or mixed model settings."""
    if len(runs) > 1:
        missing = [run.name for run in runs if run.seed is None]
        if missing:
            raise InputError(f"group {label!r}: {', '.join(missing)} record(s) no seed (train.py writes config['seed'] "
                             "into every checkpoint and log): a group is a set of runs that differ by their seed")
        seen = {}
        for run in runs:
            if run.seed in seen:
                raise InputError(f"group {label!r}: {seen[run.seed]} and {run.name} both have seed {run.seed}: a group "
                                 "needs different seeds (the same run twice, or a copy?)")
            seen[run.seed] = run.name
        first = runs[0]
        for run in runs[1:]:
            if first.model_args and run.model_args:
                keys = sorted(k for k in first.model_args.keys() & run.model_args.keys()
                              if first.model_args[k] != run.model_args[k])
                if keys:
                    what = ", ".join(f"{k}={first.model_args[k]!r} in {first.name} but {run.model_args[k]!r} in "
                                     f"{run.name}" for k in keys)
                    raise InputError(f"group {label!r} mixes runs of different model settings ({what}): a group is "
                                     "one configuration over seeds; give each configuration its own pattern")
        runs = sorted(runs, key=lambda run: run.seed)
    return Group(label, runs)


def checkpoint_settings(path):
    """(seed, model_args) a checkpoint (file or run dir) records, read memory-mapped (the weights stay on disk)."""
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    state = load_checkpoint(file, mmap=True)
    return (state.get("config") or {}).get("seed"), state.get("model_args")


def model_groups(ckpt=(), hf=()):
    """The groups of the --ckpt entries, then each --hf model as a group of one without a seed; None when no
    --ckpt entry is a group. Runs are named as lm.model_specs names them (which also checks that every
    checkpoint exists)."""
    expanded = expand(ckpt, "checkpoints")
    if expanded is None:
        return None
    specs = iter(model_specs([p for _, paths in expanded for p in paths], hf))
    groups = []
    for label, paths in expanded:
        runs = []
        for _ in paths:
            _, path, name = next(specs)
            runs.append(Run(path, name, *checkpoint_settings(path)))
        groups.append(make_group(label, runs))
    for _, name, shown in specs:  # the --hf models
        groups.append(Group(shown, [Run(name, shown, hf=True)]))
    labels = [g.label for g in groups]
    clash = sorted({label for label in labels if labels.count(label) > 1})
    if clash:
        raise SettingError(f"two groups are labelled {clash[0]!r}: name the --ckpt groups (label=pattern)")
    return groups


def baseline_of(groups, label=""):
    """The group the others are compared with: the one labelled label, else the first. Every other group that
    has seeds must hold exactly the baseline's (InputError naming what each side lacks). Returns None when the
    baseline has no recorded seeds (nothing can be paired with it)."""
    by_label = {g.label: g for g in groups}
    if label and label not in by_label:
        raise SettingError(f"baseline_group={label!r} is not one of the groups {list(by_label)}")
    baseline = by_label[label] if label else groups[0]
    if not baseline.pairable:
        print(f"note: the baseline group {baseline.label!r} has no recorded seed: no paired comparisons")
        return None
    for g in groups:
        if g is baseline or not g.pairable:
            continue
        only_g = sorted(set(g.seeds) - set(baseline.seeds))
        only_b = sorted(set(baseline.seeds) - set(g.seeds))
        if only_g or only_b:  # name only the side(s) that lack something: "seed 3 has no 'gate' run"
            lacking = "; ".join(f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} "
                                f"{'have' if len(seeds) > 1 else 'has'} no {name!r} run"
                                for seeds, name in ((only_g, baseline.label), (only_b, g.label)) if seeds)
            raise InputError(f"cannot pair group {g.label!r} with the baseline {baseline.label!r} by seed: {lacking}. "
                             "Give both the same seeds (narrow a pattern, e.g. 'out-gate-s[123]', or finish the "
                             "missing runs)")
    return baseline

# -----------------------------------------------------------------------------
# Numbers over the runs of a group


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def map_leaves(fn, trees, ragged=False):
    """trees: nested dicts / lists of one shape, one per run. fn(the runs' values) wherever some run has a number
    there (the others may have None: e.g. no crossing); everything else keeps the first tree's value. Lists of
    different lengths are an InputError, or None where ragged (two groups of models of different depth: their
    per-layer numbers do not pair)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: map_leaves(fn, [t.get(k) if isinstance(t, dict) else None for t in trees], ragged) for k in first}
    if isinstance(first, (list, tuple)):
        if any(not isinstance(t, (list, tuple)) or len(t) != len(first) for t in trees):
            if ragged:
                return None
            raise InputError("the runs of a group differ in shape (a list of another length): are they runs of one "
                             "configuration?")
        return [map_leaves(fn, [t[i] for t in trees], ragged) for i in range(len(first))]
    if any(_is_number(v) for v in trees):
        return fn(trees)
    return first


def _describe(values):
    numbers = [float(v) for v in values if _is_number(v)]
    return describe(numbers) if numbers else None


def summarize(trees):
    """stats.describe over the runs at every number: {"n", "mean", "std", "ci95"} (n counts the runs that
    have the number)."""
    return map_leaves(_describe, trees)


def mean(trees):
    """The mean over the runs at every number; a number that all runs share keeps its type (k = 5 stays 5)."""
    return map_leaves(lambda values: values[0] if all(v == values[0] for v in values) else _describe(values)["mean"],
                      trees)


def band(trees):
    """(low, high): the ends of the 95% interval of the mean at every number; None where fewer than 2 runs
    have it."""
    return tuple(map_leaves(lambda values: (_describe(values)["ci95"] or [None, None])[end], trees) for end in (0, 1))


def differences(group, baseline, trees):
    """stats.paired_difference of group - baseline at every number: trees is {run name: tree} holding the runs
    of both groups (paired by seed; a seed where either run lacks the number is left out of that number)."""
    mine, theirs = {run.seed: run.name for run in group.runs}, {run.seed: run.name for run in baseline.runs}
    if set(mine) != set(theirs):
        raise InputError(f"cannot pair {group.label!r} with {baseline.label!r}: seeds {sorted(mine)} and {sorted(theirs)}")
    seeds = sorted(mine)

    def paired(values):
        mine, theirs = values[:len(seeds)], values[len(seeds):]
        kept = [(s, a, b) for s, a, b in zip(seeds, mine, theirs) if _is_number(a) and _is_number(b)]
        if not kept:
            return None
        return paired_difference({s: float(a) for s, a, _ in kept}, {s: float(b) for s, _, b in kept})

    # a group of another depth than the baseline: its per-layer lists have no partner (None), its scalars pair
    return map_leaves(paired, [trees[mine[s]] for s in seeds] + [trees[theirs[s]] for s in seeds], ragged=True)

# -----------------------------------------------------------------------------
# Tables


def lookup(tree, path):
    for key in path:
        if isinstance(tree, dict):
            tree = tree.get(key)
        elif isinstance(tree, list) and isinstance(key, int) and key < len(tree):
            tree = tree[key]
        else:
            return None
    return tree


def format_stat(d, digits, runs=None, sd=True):
    """"mean ± half-width (sd s)" of a describe() dict (without "(sd s)" if not sd); the number alone for one
    run; "-" for None."""
    if d is None:
        return "-"
    if d["n"] < 2:
        text = f"{d['mean']:.{digits}f}"
    else:
        half = (d["ci95"][1] - d["ci95"][0]) / 2
        text = f"{d['mean']:.{digits}f} ± {half:.{digits}f}" + (f" (sd {d['std']:.{digits}f})" if sd else "")
    return text + (f" ({d['n']} of {runs} runs)" if runs and d["n"] < runs else "")


def format_difference(d, digits):
    """"+0.0123 [+0.0040, +0.0206], p = 0.012" of a paired_difference() dict; "n.s." when not significant."""
    if d is None:
        return "-"
    text = f"{d['mean']:+.{digits}f}"
    if d["n"] < 2:
        return text + " (1 seed: no interval)"
    p = d["p_value"]
    text += f" [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}], " + ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")
    return text + ("" if d["significant"] else ", n.s.")


def group_tables(rows, label_header, groups, summaries, diffs, baseline):
    """Markdown: one table of every group's numbers (a column per group) and, if there is a baseline, one of
    the paired differences against it (a column per compared group), and NOTE.

    rows: [(label cells, path into the trees, digits)]; summaries: {label: summarize() tree}; diffs: {label:
    differences() tree} for the compared groups. A row that no group has is left out."""
    rows = [row for row in rows if any(lookup(summaries[g.label], row[1]) is not None for g in groups)]
    align = ["left"] * len(label_header)
    text = markdown_table(label_header + [f"{g.label} (n={len(g.runs)})" for g in groups],
                          [labels + [format_stat(lookup(summaries[g.label], path), digits, len(g.runs)) for g in groups]
                           for labels, path, digits in rows], align + ["right"] * len(groups))
    compared = [g for g in groups if g.label in diffs]
    if baseline is not None and compared:
        text += "\n\nPaired differences against the baseline, by seed:\n\n" + markdown_table(
            label_header + [f"{g.label} − {baseline.label}" for g in compared],
            [labels + [format_difference(lookup(diffs[g.label], path), digits) for g in compared]
             for labels, path, digits in rows], align + ["right"] * len(compared))
    return text + "\n\n" + NOTE
