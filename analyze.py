"""
Layerwise alignment metrics of the causal shift (arXiv 2602.14760): decode every layer's hidden
state through the embeddings and watch it move from the input token t_i to the target t_{i+1}.

    python analyze.py --ckpt out/ckpt.pt                               # our checkpoint, WikiText test
    python analyze.py --ckpt out-baseline out-cut out-gate             # overlay (run dirs or ckpt.pt paths)
    python analyze.py --hf google/gemma-2-2b --dtype=bfloat16 --device=cuda     # the paper's setting
    python analyze.py --hf gpt2 meta-llama/Llama-3.2-3B --num_sequences=200     # each its own tokens
    python analyze.py --ckpt out/ckpt.pt --data_files 'texts/*.txt'    # local txt / jsonl / parquet
    python analyze.py --ckpt out/ckpt.pt --shards 'data/demo/*_val_*.bin' --seq_len=256
    python analyze.py --ckpt out/ckpt.pt --space=normed --k=1 --lens_norm=False --mid
    python analyze.py --ckpt out/ckpt.pt --lens=tuned                  # the tuned lens (docs/tuned-lens.md)
    python analyze.py --ckpt out/ckpt.pt --lens=both --shards 'data/demo/*_val_*.bin'   # both lenses, overlaid
    python analyze.py --ckpt out/ckpt.pt --prompt "The capital of France is" --lens=both  # the lens grid
    python analyze.py --log out-gate/log.jsonl                         # residual alphas over training
    python analyze.py --cut_sweep 'out-cut*/log.jsonl' --baseline out-baseline/log.jsonl
    python analyze.py --ckpt 'out-baseline-s*' 'out-gate-s*' --shards 'data/demo/*_val_*.bin'   # groups of seeds
    python analyze.py --log 'out-baseline-s*/log.jsonl' gate='out-gate-s*/log.jsonl'          # logs, as groups

Settings use configurator.py (config files, --key=value, --key v1 v2 for lists); --help lists and
describes them. Outputs go to --out_dir (default analysis/), each written atomically: metrics.json,
metrics.csv (one row per model and layer), topk.png, cosine_projection.png, lens.png, shift_depth.png
(+ alphas.png, cut_sweep.png), and a printed summary of the shift depth per model. Exit status: 0 done,
1 bad or missing input (models, text, logs), 2 a bad setting.

Groups of seeds (groups.py has the rules): a quoted --ckpt or --log pattern ('out-gate-s*') or
label=pattern is a group of runs. Every run is analysed as above (metrics.csv, "models" in metrics.json);
the plots draw each group as its mean with a shaded band, the 95% t interval of the mean over seeds (a
group of one run: its line, no band); groups.md (also printed) has every group's shift-depth numbers (mean
± 95% interval, sd) and their paired differences from the baseline group (--baseline_group, default the
first; by seed); metrics.json gains "groups" (every number, per layer too) and "differences". Training
logs: alphas.png and shift_training.png draw each group's mean and band at the iterations all its runs
logged, target_match_by_step.png the first tracked group's mean; --cut_sweep pools the runs that share a
cut layer (mean, 95% error bar) and --baseline may be a pattern (mean line and band).

From Python:

    from analyze import batched, read_documents, text_starts, text_windows
    from nanoshift.lens import LensOptions, analyze_models
    from nanoshift.lm import load_lm
    from nanoshift.plots import write_plots
    lm = load_lm(ckpt="out/ckpt.pt")
    docs = read_documents(data_files=["texts/*.txt"])
    windows = text_windows(lm, docs, text_starts(docs, 100, seed=0), 257)  # [100, 256 inputs + 1 target]
    results = analyze_models([lm], batched(windows, 8), LensOptions(k=5))  # one dict per model
    write_plots(results, "analysis")                                      # or plot_topk(results) -> Figure

What the metrics are, exactly, is in nanoshift/lens.py (the engine that training and the demo use too); the
figures are drawn by nanoshift/plots.py.
The lens decodes all L+1 states through the unembedding where a forward decodes one, so for GPT-2
124M it costs ~4x a forward (bench.py --section analyze); --lens_dtype=bfloat16 runs the lens
matmuls in bf16 (~2.5x faster on CPUs with bf16 units, logits to ~3 digits).
"""

import csv
import dataclasses
import os
import re
import sys

import numpy as np
import torch

from nanoshift.common import (InputError, SettingError, atomic_write, check_out_dir, expand_globs, read_jsonl, run_main, set_threads,
                    write_json, write_text)
from nanoshift.configurator import configure
from nanoshift.data import GPT2_NAME, first_windows, iter_documents, read_shard, read_shard_header, shards_tokenizer, wikitext_articles
from nanoshift.groups import Run, baseline_of, band, differences, expand, group_tables, make_group, mean, model_groups, summarize
from nanoshift.lens import METRICS, LensOptions, analyze_models, summary_table
from nanoshift.lens_grid import lens_grid, plot_grid, plot_lens_overlay, write_grid_html
from nanoshift.tuned_lens import REFERENCE_STEPS, file_stem, translators_for
from nanoshift.lm import load_models
from nanoshift.plots import (PLOTS, group_result, plot_alphas, plot_cut_sweep, plot_shift_over_training,
                             plot_target_match_by_step, save_figure, write_plots)
from model import GPT, Cut, GPTConfig, dtype_from_name, initial_alphas, residual_label
from nanoshift.stats import describe

DEFAULTS = dict(
    # models: several of each for an overlay
    ckpt=[],  # our checkpoints: ckpt.pt paths or run dirs holding one (label = run dir name); quoted patterns / label=pattern: groups of seeds
    hf=[],  # transformers causal LMs: hub names or local save_pretrained dirs
    # text: the hub dataset (default WikiText-103 test, like the paper), local files, or token shards
    dataset="Salesforce/wikitext",  # hub dataset to read text from (when neither data_files nor shards is given)
    dataset_config="wikitext-103-raw-v1",  # its config (subset) name
    split="test",  # its split
    data_files=[],  # local .txt (one document per file) / .jsonl / .parquet files or globs
    text_column="text",  # the column holding the text (hub datasets, jsonl, parquet)
    wikitext=None,  # rows are WikiText lines, grouped into articles: None = auto (True for the hub's wikitext)
    max_chars=20_000_000,  # read at most this much text (windows are sampled from it)
    shards="",  # glob of GPT-2 token shards (data.py format) instead of text
    windows="random",  # shards: 'random' offsets (seed), or the 'first' windows back to back (what training tracks)
    num_sequences=1000,  # windows of text to analyse (the paper: 1,000)
    seq_len=0,  # tokens per sequence (inputs); 0 = the smallest block size of the models, at most 1024
    seed=1337,  # random windows: the same seed gives the same text
    # metrics
    k=5,  # top-k of the input / target match (the paper: 5)
    space="raw",  # 'raw' | 'normed': the state the cosine and projection are computed on
    lens_norm=True,  # decode with the final norm recomputed per layer (False: decode h itself)
    mid=False,  # also the mid-block states (after attention)
    lens="logit",  # 'logit' | 'tuned' (trained affine translators, tuned_lens.py) | 'both' (each model under both lenses, overlaid)
    lens_steps=REFERENCE_STEPS,  # tuned lens: translator training steps, when none are saved (next to the checkpoint)
    lens_tokens_per_step=0,  # tuned lens: tokens per training step; 0 = 2^18 on a GPU (tuned-lens's default), 2^8 on a CPU
    lens_retrain=False,  # tuned lens: train new translators even where saved ones exist (and overwrite them)
    prompt="",  # text: write its layer x position grid of top tokens (grid_*.png/html, per model and lens) instead of corpus metrics
    # running
    device="cpu",  # 'cpu' | 'cuda' | 'mps'
    dtype="float32",  # the models' weights: 'float32' | 'bfloat16' | 'float16'
    lens_dtype="auto",  # the lens matmul: auto = the model's dtype; bfloat16 is ~2.5x faster on CPUs with
    # bf16 units, with logits rounded to ~3 digits (more exact ties in the top k; CE/KL move ~1e-4)
    batch_size=4,  # sequences per forward pass (memory grows with it, not with num_sequences)
    threads=0,  # CPU threads: 0 = OMP_NUM_THREADS if set, else half the cores (common.cpu_threads)
    progress=True,  # show progress bars
    out_dir="analysis",  # folder for metrics.json/csv and the plots
    plots=list(PLOTS),  # which plots to write: topk, cosine_projection, lens, shift_depth
    # training logs
    log=[],  # train.py log.jsonl files: alpha per layer (runs with attenuation) and the tracked shift over training; patterns / label=pattern: groups
    cut_sweep=[],  # log.jsonl globs of runs with a cut at different layers: final val loss vs cut layer (runs of one layer pooled)
    baseline="",  # the baseline run's log.jsonl (or a pattern: several seeds), a horizontal line in the cut-sweep plot
    baseline_group="",  # groups of seeds: the label of the group the others are compared with ('' = the first)
)

DEFAULT_MAX_SEQ_LEN = 1024

# -----------------------------------------------------------------------------
# Text -> token windows


def read_documents(dataset=None, dataset_config=None, split="test", data_files=None, text_column="text",
                   wikitext=None, max_chars=20_000_000):
    """Non-empty document strings (at most about max_chars characters) from the hub or local files.

    WikiText's rows are the lines of its articles, not documents: they are grouped into articles the
    same way eval_benchmarks.py does (data.wikitext_articles; wikitext=None: for the hub's wikitext datasets).
    """
    if wikitext is None:
        wikitext = not data_files and (dataset or "").split("/")[-1] == "wikitext"
    where = f"--data_files {data_files}" if data_files else f"dataset {dataset!r} ({dataset_config}, {split})"
    documents, total = [], 0
    for doc in iter_documents(dataset, dataset_config, split, data_files or None, text_column=text_column):
        if not doc or doc.isspace():
            continue
        documents.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    if not documents:
        raise InputError(f"no text in {where}: every document is empty")
    if wikitext:
        documents = wikitext_articles(documents)
    return documents


_WORD_START = re.compile(r"(?<=\s)\S")
_WHITESPACE = re.compile(r"\s")


def text_starts(documents, num_sequences, seed):
    """num_sequences (document, character) starts, uniform over the text, moved to the next word start.

    Chosen in characters, not tokens, so every model reads the same text whatever its tokenizer.
    """
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(seed)
    starts = []
    for p in rng.integers(0, offsets[-1], size=num_sequences).tolist():
        d = int(np.searchsorted(offsets, p, side="right")) - 1
        c = p - int(offsets[d])
        if c > 0:
            m = _WORD_START.search(documents[d], c)
            if m is None:  # only whitespace left in this document: the next one's first word
                d, c = (d + 1) % len(documents), 0
            else:
                c = m.start()
        if c == 0:
            c = len(documents[d]) - len(documents[d].lstrip())
        starts.append((d, c))
    return starts


def _encode_from(encode, text, start, need):
    """Tokens of text[start:end] for the first end (cut at whitespace, so the last word is whole) that
    gives at least `need` tokens, or of the rest of the text: a long document (a joined WikiText, a
    book) is never tokenised whole, nor copied whole, per window."""
    span = 8 * need + 64
    while True:
        m = _WHITESPACE.search(text, start + span) if start + span < len(text) else None
        ids = list(encode(text[start:m.start()] if m else text[start:]))
        if len(ids) >= need or m is None:
            return ids
        span *= 2


def text_windows(lm, documents, starts, length):
    """[len(starts), length] int64 tokens of lm's tokenizer: the model's BOS (if its tokenizer adds one),
    then the text from each start, continuing into the next documents (the corpus wraps around) with the
    model's document separator (BOS, or GPT-2's <|endoftext|>) between them."""
    prefix, separator = list(lm.bos_prefix), list(lm.doc_separator)
    windows = np.empty((len(starts), length), dtype=np.int64)
    for row, (d, c) in enumerate(starts):
        ids, first = list(prefix), True
        for _ in range(len(documents) + 1):
            if not first:
                ids += separator
            ids += _encode_from(lm.encode, documents[d], c if first else 0, length - len(ids))
            if len(ids) >= length:
                break
            first, d = False, (d + 1) % len(documents)
        else:
            chars = sum(map(len, documents))
            raise InputError(f"the text ({chars:,} characters) gives {lm.name} fewer than {length} tokens: "
                               "too little text for one sequence of --seq_len + 1 tokens")
        windows[row] = ids[:length]
    return torch.from_numpy(windows)


def shard_windows(pattern, num_sequences, length, seed):
    """[num_sequences, length] int64 windows at random offsets of token shards (within a shard)."""
    paths = expand_globs(pattern, "token shards (--shards)")
    sizes = np.array([read_shard_header(p) for p in paths], dtype=np.int64)
    valid = np.maximum(sizes - length + 1, 0)  # window starts per shard
    if valid.sum() == 0:
        raise InputError(f"every shard matching {pattern!r} is shorter than one sequence of {length} tokens "
                           f"(largest: {sizes.max()} tokens)")
    offsets = np.concatenate([[0], np.cumsum(valid)])
    rng = np.random.default_rng(seed)
    windows = np.empty((num_sequences, length), dtype=np.int64)
    shards = {}  # memmaps, opened once
    for row, p in enumerate(rng.integers(0, offsets[-1], size=num_sequences).tolist()):
        s = int(np.searchsorted(offsets, p, side="right")) - 1
        start = p - int(offsets[s])
        if s not in shards:
            shards[s] = read_shard(paths[s])
        windows[row] = shards[s][start:start + length]
    return torch.from_numpy(windows)


def batched(windows, batch_size):
    """The rows of a [N, T+1] token tensor in batches of batch_size (a list: it can be read again)."""
    return list(torch.split(windows, batch_size))

# -----------------------------------------------------------------------------
# Outputs: JSON, CSV


CSV_FIELDS = ["model", "source", "kind", "layer", "space", "lens_norm", "k"] + [name for name, _ in METRICS] + ["lens"]


def write_metrics(results, out_dir, settings=None, groups=None):
    """metrics.json (everything; groups: {"groups", "differences"} added) and metrics.csv (one row per model
    and state), each atomic; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "metrics.csv")
    write_json(json_path, {"settings": settings or {}, "models": results, **(groups or {})})
    with atomic_write(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            for row in r["layers"]:
                writer.writerow({"model": r["label"], "source": r["source"], "lens": r.get("lens", "logit"), "space": r["space"],
                                 "lens_norm": r["lens_norm"], "k": r["k"], **row})
    return [json_path, csv_path]


# -----------------------------------------------------------------------------
# Training logs (train.py's log.jsonl: rows with "type" run / train / eval / end)


def read_log(path):
    """{"name", "path", "config", "model_args", "alphas": [(iter, [alpha per layer])], "alignment": [(iter, tracked
    metrics)], "final_val_loss", "final_iter"}."""
    if not os.path.isfile(path):
        raise InputError(f"training log not found: {path}")
    rows = read_jsonl(path)
    configs = [r["config"] for r in rows if r.get("type") == "run" and isinstance(r.get("config"), dict)]
    model_args = [r["model_args"] for r in rows if r.get("type") == "run" and isinstance(r.get("model_args"), dict)]
    evals = [r for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    # train rows are the dense series; eval rows add the iterations they do not cover (the final eval at
    # max_iters, or every point of an eval_only log)
    series = {r["iter"]: r for r in rows if r.get("type") == "eval" and r.get("alphas")}
    series.update({r["iter"]: r for r in rows if r.get("type") == "train" and r.get("alphas")})
    series = [series[it] for it in sorted(series)]
    run_dir = os.path.dirname(os.path.abspath(path))
    return {
        "name": os.path.basename(run_dir), "path": path, "config": configs[-1] if configs else None,
        "model_args": model_args[-1] if model_args else None,
        "alphas": [(r["iter"], r["alphas"]) for r in series],
        "alignment": [(r["iter"], r["alignment"]) for r in evals if r.get("alignment")],  # tracked at each eval
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_iter": evals[-1]["iter"] if evals else None,
    }


def group_log(label, paths):
    """One log of a group of runs (read_log's keys): the mean alphas and tracked alignment over the runs at the
    iterations all of them logged, with the ends of their 95% intervals ("alphas_band", "alignment_band": [(iter,
    low, high)]), and the mean final val loss. A group of one is its run under the group's label. The runs must
    be one configuration over different seeds (groups.make_group)."""
    runs = [read_log(path) for path in paths]
    make_group(label, [Run(path, run["name"], (run["config"] or {}).get("seed"), run["model_args"])
                       for path, run in zip(paths, runs)])
    if len(runs) == 1:
        return dict(runs[0], name=label)
    out = dict(runs[0], name=f"{label} (n={len(runs)}, 95% CI)", label=label, runs=[run["name"] for run in runs])
    for key in ("alphas", "alignment"):
        by_iter = [dict(run[key]) for run in runs]
        iters = sorted(set.intersection(*(set(points) for points in by_iter)))
        if any(len(points) != len(iters) for points in by_iter):
            print(f"note: the runs of {label!r} logged {key} at different iterations (one still training?): the "
                  f"group's mean is drawn at the {len(iters)} iterations all of them logged")
        series = [[points[it] for it in iters] for points in by_iter]
        low, high = band(series) if iters else ([], [])
        out[key] = list(zip(iters, mean(series))) if iters else []
        out[key + "_band"] = list(zip(iters, low, high))
    finals = [run["final_val_loss"] for run in runs]
    out["final_val_loss"] = None if None in finals else sum(finals) / len(finals)
    return out




def flops_per_iter(run):
    """Training FLOPs of one optimizer step of a logged run (model.flops_per_token x total_batch_tokens), or
    None when its log lacks the model or the batch."""
    args, tokens = run["model_args"], (run["config"] or {}).get("total_batch_tokens")
    if not args or not tokens:
        return None
    with torch.device("meta"):
        return GPT(GPTConfig(**args)).flops_per_token() * tokens


def compute_axis(logs):
    """[FLOPs per step of each log] when the logs' models differ in depth (the depth study: their iterations do
    not compare, their compute does), else None (the plots use iterations)."""
    if len({(run["model_args"] or {}).get("n_layer") for run in logs}) < 2:
        return None
    scales = [flops_per_iter(run) for run in logs]
    return None if None in scales else scales


def _starting_alpha(cfg, n_layer):
    """The alpha every layer starts from (a learned variant's uniform start, model.initial_alphas), or None
    where the alphas are not learned or start unequal."""
    start = initial_alphas({**cfg, "n_layer": n_layer})
    return start[0] if start and len(set(start)) == 1 else None


def alphas_figure(logs):
    """plots.plot_alphas of training logs (read_log / group_log): each panel titled with its run's residual
    mode, with the gate's uniform starting alpha."""
    for run in logs:
        if not run["alphas"]:
            raise InputError(f"{run['path']} has no rows with 'alphas'")
    configs = [run["config"] or {} for run in logs]
    return plot_alphas(logs, [residual_label(cfg) for cfg in configs],
                       [_starting_alpha(cfg, len(run["alphas"][0][1])) for cfg, run in zip(configs, logs)])


def _cut_layers(run):
    """The run's cut blocks as indices >= 0 (negative cut layers count from the end), as model.Cut reads them."""
    cfg = run["config"]
    if not cfg or "cut_layer" not in cfg or "n_layer" not in cfg:
        raise InputError(f"{run['path']} has no run row with the config (cut_layer, n_layer): not a train.py log?")
    try:
        return list(Cut.layers(cfg["cut_layer"], cfg["n_layer"]))
    except ValueError as e:
        raise InputError(f"{run['path']}: {e}") from None


def cut_sweep_figure(runs, baseline=None):
    """plots.plot_cut_sweep of the logs of runs with a cut: final validation loss against the cut layer, the
    baseline as a line. Runs with the same cut (seeds) are pooled: their mean, the 95% interval as an error bar.
    baseline: a run, or a list of runs (seeds): their mean line, the 95% interval shaded."""
    pooled = {}  # (cut layers, alpha) -> final val losses
    for run in runs:
        if (run["config"] or {}).get("residual_mode") != "cut":
            raise InputError(f"{run['path']}: residual_mode is {(run['config'] or {}).get('residual_mode')!r}, "
                               "not 'cut' (give the baseline with --baseline)")
        if run["final_val_loss"] is None:
            raise InputError(f"{run['path']} has no eval row with a val_loss")
        pooled.setdefault((tuple(_cut_layers(run)), run["config"].get("cut_alpha")), []).append(run["final_val_loss"])
    baselines = [] if baseline is None else baseline if isinstance(baseline, list) else [baseline]
    ends = {run["name"]: run["final_iter"] for run in runs + baselines}
    if len(set(ends.values())) > 1:  # e.g. a run stopped early: its "final" loss is from an earlier eval
        print(f"note: the runs' last evals are at different iterations: {ends}")
    points = [(layers, describe(losses)) for (layers, _), losses in sorted(pooled.items())]
    alphas = sorted({a for _, a in pooled})
    if not baselines:
        return plot_cut_sweep(points, alphas)
    for run in baselines:
        if run["final_val_loss"] is None:
            raise InputError(f"{run['path']} has no eval row with a val_loss")
    if len(baselines) == 1:
        name = "" if baselines[0]["name"] == "baseline" else f" ({baselines[0]['name']})"
    else:
        name = f" (mean of {len(baselines)} seeds, 95% CI)"
    return plot_cut_sweep(points, alphas, describe([run["final_val_loss"] for run in baselines]),
                          f"baseline, no cut{name}")


# -----------------------------------------------------------------------------
# Command line


def token_windows(lms, settings):
    """One [num_sequences, seq_len + 1] token tensor per model: the same text (or shard windows) for all."""
    length = settings["seq_len"] + 1
    if settings["shards"]:
        name, tokenizer_id = shards_tokenizer(expand_globs(settings["shards"], "token shards (--shards)"))
        for lm in lms:  # the shards' _done.json says whose tokens they are (none: GPT-2's)
            if lm.tokenizer_id != tokenizer_id:
                what = "GPT-2" if tokenizer_id == GPT2_NAME else repr(name)
                raise InputError(f"--shards hold {what} tokens, but {lm.name} uses another tokenizer: "
                                 "give it text instead (--data_files or the default dataset)")
        if settings["windows"] == "first":
            windows = first_windows(settings["shards"], settings["num_sequences"], length)
        else:
            windows = shard_windows(settings["shards"], settings["num_sequences"], length, settings["seed"])
        return [windows] * len(lms)
    documents = read_documents(settings["dataset"], settings["dataset_config"], settings["split"],
                               settings["data_files"], settings["text_column"], settings["wikitext"],
                               settings["max_chars"])
    starts = text_starts(documents, settings["num_sequences"], settings["seed"])
    cache = {}  # models with the same tokenizer share their tokens
    for lm in lms:
        if lm.tokenizer_id not in cache:
            cache[lm.tokenizer_id] = text_windows(lm, documents, starts, length)
    return [cache[lm.tokenizer_id] for lm in lms]


def check_settings(settings):
    """Every check that needs no model or data (SettingError naming the setting); the lens options."""
    for key in ("num_sequences", "batch_size"):
        if settings[key] < 1:
            raise SettingError(f"{key} must be >= 1, got {settings[key]}")
    if settings["seq_len"] < 0:
        raise SettingError(f"seq_len must be >= 1 (or 0 for the models' block size), got {settings['seq_len']}")
    dtype_from_name(settings["dtype"])
    if settings["shards"] and settings["data_files"]:
        raise SettingError("give either --shards or --data_files, not both")
    if not (settings["ckpt"] or settings["hf"] or settings["log"] or settings["cut_sweep"]):
        raise SettingError("nothing to analyse: give --ckpt and/or --hf models (or --log / --cut_sweep)")
    if settings["baseline"] and not settings["cut_sweep"]:
        raise SettingError("--baseline is the reference line of --cut_sweep: give --cut_sweep too")
    if settings["windows"] not in ("random", "first"):
        raise SettingError(f"windows must be 'random' or 'first', got {settings['windows']!r}")
    unknown = [p for p in settings["plots"] if p not in PLOTS]
    if unknown:
        raise SettingError(f"plots: unknown {unknown}; choose from {list(PLOTS)}")
    if settings["lens"] not in ("logit", "tuned", "both"):
        raise SettingError(f"lens must be 'logit', 'tuned' or 'both', got {settings['lens']!r}")
    if settings["lens_steps"] < 1 or settings["lens_tokens_per_step"] < 0:
        raise SettingError("lens_steps must be >= 1 and lens_tokens_per_step >= 0 (0 = the default)")
    set_threads(settings["threads"])
    return LensOptions.from_settings(dict(settings, lens="logit" if settings["lens"] == "logit" else "tuned"))


# the numbers of a group's table: (row label, path in a result, digits)
GROUP_ROWS = [(["misalignment"], ("misalignment",), 3), (["final CE"], ("final_loss",), 3),
              (["top-k cross"], ("shift_depth", "topk_crossing"), 2), (["cosine cross"], ("shift_depth", "cosine_crossing"), 2),
              (["projection 1/2"], ("shift_depth", "projection_half"), 2),
              (["first-win median"], ("shift_depth", "first_win_median"), 2),
              (["never (fraction)"], ("shift_depth", "never_fraction"), 3)]


def analyze_groups(groups, baseline, results):
    """For groups of runs (groups.model_groups) and their runs' results: (one group_result per group, for the
    plots; {"groups", "differences"} for metrics.json; the markdown of groups.md)."""
    by_name = {r["label"]: r for r in results}
    shown = [group_result(g.label, [by_name[run.name] for run in g.runs]) for g in groups]
    stats = {g.label: summarize([by_name[run.name] for run in g.runs]) for g in groups}
    diffs = {g.label: differences(g, baseline, by_name) for g in groups
             if baseline is not None and g is not baseline and g.pairable}
    saved = {"groups": {g.label: {"runs": [run.name for run in g.runs], "seeds": g.seeds, "stats": stats[g.label]}
                        for g in groups},
             "differences": {"baseline": baseline and baseline.label, "groups": diffs,
                             "test": "two-sided paired t-test over seeds (stats.py)"}}
    return shown, saved, group_tables(GROUP_ROWS, ["number"], groups, stats, diffs, baseline)


def run(settings):
    """Everything main() does, with errors as exceptions; returns the results (one dict per model)."""
    options = check_settings(settings)
    out_dir = settings["out_dir"]
    check_out_dir(out_dir)
    log_groups = expand(settings["log"], "training logs")
    logs = ([read_log(p) for p in expand_globs(settings["log"], "training logs")] if log_groups is None
            else [group_log(label, paths) for label, paths in log_groups])
    sweep = [read_log(p) for p in expand_globs(settings["cut_sweep"], "training logs")]
    baseline = None
    if settings["baseline"]:  # one run, or a pattern: several seeds
        baseline = ([read_log(p) for p in expand_globs(settings["baseline"], "training logs")]
                    if expand([settings["baseline"]]) else read_log(settings["baseline"]))
    groups = model_groups(settings["ckpt"], settings["hf"])
    if groups and settings["lens"] == "both":
        raise SettingError("lens='both' compares the lenses of single models: give groups of seeds one lens at a time")
    if settings["baseline_group"] and not groups:
        raise SettingError("baseline_group names a group of seeds: give --ckpt groups (quoted patterns or label=pattern)")
    compare_to = baseline_of(groups, settings["baseline_group"]) if groups else None  # seeds pair up, or an error now
    results = []
    if settings["ckpt"] or settings["hf"]:
        ckpt = [run.path for g in groups for run in g.runs if not run.hf] if groups else settings["ckpt"]
        lms = list(load_models(ckpt, settings["hf"], settings["device"], settings["dtype"]))
        auto = min(DEFAULT_MAX_SEQ_LEN, *(lm.block_size for lm in lms))
        settings["seq_len"] = settings["seq_len"] or auto
        for lm in lms:
            if settings["seq_len"] > lm.block_size:
                raise SettingError(f"seq_len={settings['seq_len']} is longer than {lm.name}'s block size "
                                   f"{lm.block_size}")
        translators = None if settings["lens"] == "logit" else translators_for(
            lms, lambda lm, n: token_windows([lm], dict(settings, num_sequences=n, seed=settings["seed"] + 1,
                                                        windows="random"))[0],
            settings["seq_len"], settings["lens_steps"], settings["lens_tokens_per_step"], settings["batch_size"],
            options.mid, settings["lens_retrain"], out_dir, settings["progress"])
        if settings["prompt"]:
            return write_grids(lms, translators, settings)
        windows = token_windows(lms, settings)
        batches = [batched(w, settings["batch_size"]) for w in windows]
        results = analyze_models(lms, batches, options, settings["progress"], translators)
        if settings["lens"] == "both":  # each model under both lenses, as "name (logit lens)" / "name (tuned lens)"
            logit = analyze_models(lms, batches, dataclasses.replace(options, lens="logit"), settings["progress"])
            results = [dict(r, label=f"{r['label']} ({r['lens']} lens)") for pair in zip(logit, results) for r in pair]
            os.makedirs(out_dir, exist_ok=True)
            for lm, (a, b) in zip(lms, zip(logit, results[1::2])):
                print(f"wrote {save_figure(plot_lens_overlay(a, b), os.path.join(out_dir, f'lens_overlay_{file_stem(lm.name)}.png'))}")
        shown, saved, text = analyze_groups(groups, compare_to, results) if groups else (results, None, None)
        for path in write_metrics(results, out_dir, settings, saved) + write_plots(shown, out_dir, settings["plots"]):
            print(f"wrote {path}")
        print(f"\nshift depth ({settings['num_sequences']} x {settings['seq_len']} tokens, {settings['lens']} lens, {options.space} "
              f"state, lens {'with' if options.lens_norm else 'without'} final norm, top-{options.k}):\n")
        print(summary_table(results))
        if groups:
            path = write_text(os.path.join(out_dir, "groups.md"), text + "\n")
            print(f"\ngroups of seeds:\n\n{text}\n\nwrote {path}")
    if logs:
        os.makedirs(out_dir, exist_ok=True)
        attenuated = [run for run in logs if (run["config"] or {}).get("residual_mode") != "none"] or logs
        print(f"wrote {save_figure(alphas_figure(attenuated), os.path.join(out_dir, 'alphas.png'))}")
        tracked = [run for run in logs if run["alignment"]]
        if tracked:
            figure = plot_shift_over_training(tracked, compute_axis(tracked))
            print(f"wrote {save_figure(figure, os.path.join(out_dir, 'shift_training.png'))}")
            print(f"wrote {save_figure(plot_target_match_by_step(tracked[0]), os.path.join(out_dir, 'target_match_by_step.png'))}")
    if sweep:
        os.makedirs(out_dir, exist_ok=True)
        print(f"wrote {save_figure(cut_sweep_figure(sweep, baseline), os.path.join(out_dir, 'cut_sweep.png'))}")
    return results


def write_grids(lms, translators, settings):
    """--prompt: each model's lens grid of the prompt (lens_grid.py) under the chosen lens(es), as
    grid_<model>_<lens>.png and .html in out_dir; returns the grids."""
    os.makedirs(settings["out_dir"], exist_ok=True)
    lenses = {"logit": ["logit"], "tuned": ["tuned"], "both": ["logit", "tuned"]}[settings["lens"]]
    grids = []
    for i, lm in enumerate(lms):
        tokens = list(lm.bos_prefix) + list(lm.encode(settings["prompt"]))
        for lens in lenses:
            grid = lens_grid(lm, tokens, translators[i] if lens == "tuned" else None, settings["mid"])
            path = os.path.join(settings["out_dir"], f"grid_{file_stem(lm.name)}_{lens}")
            print(f"wrote {save_figure(plot_grid(grid), path + '.png')}\nwrote {write_grid_html(grid, path + '.html')}")
            grids.append(grid)
    return grids


def main(argv=None):
    """The command line: settings from argv (default sys.argv), then run(); errors exit by common.run_main."""
    return run_main(lambda: run(configure(DEFAULTS, sys.argv[1:] if argv is None else argv, help_from=__file__)))


if __name__ == "__main__":
    main()
