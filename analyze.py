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
    python analyze.py --log out-gate/log.jsonl                         # residual alphas over training
    python analyze.py --cut_sweep 'out-cut*/log.jsonl' --baseline out-baseline/log.jsonl

Settings use configurator.py (config files, --key=value, --key v1 v2 for lists); --help lists them.
Outputs go to --out_dir (default analysis/): metrics.json, metrics.csv (one row per model and layer),
topk.png, cosine_projection.png, lens.png, shift_depth.png (+ alphas.png, cut_sweep.png), and a
printed summary of the shift depth per model. From Python:

    from analyze import analyze_models, batched, read_documents, text_starts, text_windows, write_plots
    from lm import load_lm
    lm = load_lm(ckpt="out/ckpt.pt")
    docs = read_documents(data_files=["texts/*.txt"])
    windows = text_windows(lm, docs, text_starts(docs, 100, seed=0), 257)  # [100, 256 inputs + 1 target]
    results = analyze_models([lm], batched(windows, 8), k=5)             # one dict per model
    write_plots(results, "analysis")                                     # or plot_topk(results) -> Figure

Metrics, for the state h = h_l[i] (l = 0 the embeddings ... L the last block; with --mid also the
state after attention of block l, plotted at l - 1/2), input t = t_i, target u = t_{i+1}:

- decoding (logit lens): z = LN_f(h) E_out^T with the final norm recomputed on h (--lens_norm=False:
  z = h E_out^T), soft-capped like the model (Gemma-2). Over every row of the unembedding (padding rows
  included), so the lens at the last layer is exactly the model's own prediction.
- top-k match: t (input) or u (target) counts as in the top k if z[t] >= the k-th largest logit.
  Ties at the k-th place therefore all count (torch.topk would pick among them arbitrarily): the rule
  is "fewer than k tokens have a strictly larger logit".
- cosine: cos(h, e_in) and cos(h, e_out); projection <h - e_in, e_out - e_in> / ||e_out - e_in||^2
  (0 at the input embedding, 1 at the target's), averaged over positions with t != u only (and
  e_in != e_out: distinct tokens with the same embedding row have no direction to project on).
  Reference vectors: e_in = s * E_in[t], the token part of h_0 (s = sqrt(d) for Gemma, 1 otherwise;
  GPT-2's position embedding is not part of it), e_out = s * E_in[u] for tied embeddings (the "shifted
  input": same space, same scale), E_out[u] for untied ones (the row that scores u; printed at load).
  --space=raw compares the raw residual state (the paper's reading); --space=normed compares LN_f(h)
  with LN_f(e_in), LN_f(e_out): state and references go through the same final norm, so nothing
  but the direction of the state moves the metric (a normed state against raw embeddings would
  mix scales: the projection of a position-free model would not even be 0 at layer 0).
- lens extras: cross-entropy -log p_l(u), entropy H(p_l), and KL(p_final || p_l) =
  sum_v p_final(v) (log p_final(v) - log p_l(v)), where p_final is the model's own output
  distribution (the final norm is always applied to it): the extra nats paid for coding the model's
  prediction with layer l's lens. 0 at the last layer when --lens_norm is on.
- target wins (per token and layer): z[u] > z[t] (strictly; positions with t == u skipped).
  The per-token first-win layer is the first layer from which the target wins at every later layer,
  "never" when it does not win at the last layer. Its distribution is the per-token shift depth.
- crossing layer of an input/target pair of curves (top-k match, cosine): the layer from which the
  target curve stays at or above the input curve, linearly interpolated between the two layers around
  it; 0 if the target is never behind, none if the input is still ahead at the last layer. The same rule
  with the constant 1/2 as "input" gives the layer where the projection passes half-way.

Computed streaming: batch by batch, and within a batch token chunk by token chunk, one layer's
logits at a time (a chunk holds at most LENS_CHUNK_BYTES of logits), accumulating sums per layer;
memory depends on --batch_size and the model, never on --num_sequences. The lens decodes all L+1
states through the unembedding where a forward decodes one, so for GPT-2 124M it costs ~4x a
forward (bench.py --section analyze); --lens_dtype=bfloat16 runs the lens matmuls in bf16 (~2.5x
faster on CPUs with bf16 units, logits to ~3 digits).
"""

import csv
import glob
import json
import math
import os
import re
import sys

import numpy as np
import torch

from configurator import configure_or_exit

DEFAULTS = dict(
    # models: several of each for an overlay
    ckpt=[],  # our checkpoints: ckpt.pt paths or run dirs holding one (label = run dir name)
    hf=[],  # transformers causal LMs: hub names or local save_pretrained dirs
    # text: the hub dataset (default WikiText-103 test, like the paper), local files, or token shards
    dataset="Salesforce/wikitext",
    dataset_config="wikitext-103-raw-v1",
    split="test",
    data_files=[],  # local .txt (one document per file) / .jsonl / .parquet files or globs
    text_column="text",
    wikitext=None,  # rows are WikiText lines, grouped into articles: None = auto (True for the hub's wikitext)
    max_chars=20_000_000,  # read at most this much text (windows are sampled from it)
    shards="",  # glob of GPT-2 token shards (data.py format) instead of text
    num_sequences=1000,
    seq_len=0,  # tokens per sequence (inputs); 0 = the smallest block size of the models, at most 1024
    seed=1337,  # random windows: the same seed gives the same text
    # metrics
    k=5,
    space="raw",  # raw | normed: the state cosine and projection are computed on
    lens_norm=True,  # decode with the final norm recomputed per layer (False: decode h itself)
    mid=False,  # also the mid-block states (after attention)
    # running
    device="cpu",
    dtype="float32",  # float32 | bfloat16 | float16
    lens_dtype="auto",  # the lens matmul: auto = the model's dtype; bfloat16 is ~2.5x faster on CPUs with
    # bf16 units, with logits rounded to ~3 digits (more exact ties in the top k; CE/KL move ~1e-4)
    batch_size=4,
    progress=True,
    out_dir="analysis",
    # training logs
    log=[],  # train.py log.jsonl files: residual alpha of every layer over training
    cut_sweep=[],  # log.jsonl globs of runs with a cut at different layers: final val loss vs cut layer
    baseline="",  # the baseline run's log.jsonl, a horizontal line in the cut-sweep plot
)
# list settings also take one plain string: --ckpt=out/ckpt.pt
EXTRA_TYPES = {key: (str,) for key in ("ckpt", "hf", "data_files", "log", "cut_sweep")}

LENS_CHUNK_BYTES = 128 << 20  # float32 logits of one token chunk (~4 such buffers live); large chunks
# amortise reading the unembedding matrix: below a few hundred rows the lens matmul is memory-bound
DEFAULT_MAX_SEQ_LEN = 1024

# per-layer metrics: (name, averaged over) -- "all" positions, "diff" = positions with t_i != t_{i+1},
# "proj" = those whose reference vectors differ too (distinct tokens can share an embedding row)
METRICS = [("topk_input", "all"), ("topk_target", "all"), ("cos_input", "all"), ("cos_target", "all"),
           ("projection", "proj"), ("target_wins", "diff"), ("lens_ce", "all"), ("entropy", "all"),
           ("kl_final", "all")]


class AnalyzeError(ValueError):
    """Bad input (models, text, settings): main() prints the message and exits with status 1."""

# -----------------------------------------------------------------------------
# Text -> token windows


def read_documents(dataset=None, dataset_config=None, split="test", data_files=None, text_column="text",
                   wikitext=None, max_chars=20_000_000):
    """Non-empty document strings (at most about max_chars characters) from the hub or local files.

    WikiText's rows are the lines of its articles, not documents: they are grouped into articles the
    same way eval_benchmarks.py does (data.wikitext_articles; wikitext=None: for the hub's wikitext datasets).
    """
    from data import iter_documents, wikitext_articles

    if wikitext is None:
        wikitext = not data_files and (dataset or "").split("/")[-1] == "wikitext"
    where = f"--data_files {data_files}" if data_files else f"dataset {dataset!r} ({dataset_config}, {split})"
    documents, total = [], 0
    try:
        for doc in iter_documents(dataset, dataset_config, split, data_files or None, text_column=text_column):
            if not doc or doc.isspace():
                continue
            documents.append(doc)
            total += len(doc)
            if total >= max_chars:
                break
    except (RuntimeError, KeyError) as e:  # hub unreachable, no such column: the message says what to do
        raise AnalyzeError(str(e).strip("'\"")) from e
    if not documents:
        raise AnalyzeError(f"no text in {where}: every document is empty")
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
            raise AnalyzeError(f"the text ({chars:,} characters) gives {lm.name} fewer than {length} tokens: "
                               "too little text for one sequence of --seq_len + 1 tokens")
        windows[row] = ids[:length]
    return torch.from_numpy(windows)


def shard_windows(pattern, num_sequences, length, seed):
    """[num_sequences, length] int64 windows at random offsets of GPT-2 token shards (within a shard)."""
    from data import read_shard, read_shard_header

    paths = sorted(glob.glob(pattern))
    if not paths:
        raise AnalyzeError(f"no token shards match --shards {pattern!r}")
    sizes = np.array([read_shard_header(p) for p in paths], dtype=np.int64)
    valid = np.maximum(sizes - length + 1, 0)  # window starts per shard
    if valid.sum() == 0:
        raise AnalyzeError(f"every shard matching {pattern!r} is shorter than one sequence of {length} tokens "
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
# Metrics


def _rowdot(a, b):
    """sum_v a[i, v] b[i, v] per row, without materialising a * b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def crossing_layer(layers, input_curve, target_curve):
    """The layer from which target_curve stays >= input_curve, interpolated; 0 if never behind, None if
    the input curve is still ahead at the last layer."""
    d = [a - b for a, b in zip(input_curve, target_curve)]
    m = len(d)
    while m > 0 and d[m - 1] <= 0:
        m -= 1
    if m == len(d):
        return None
    if m == 0:
        return float(layers[0])
    # d[m - 1] > 0 >= d[m]: linear interpolation between the two layers
    return float(layers[m - 1] + (layers[m] - layers[m - 1]) * d[m - 1] / (d[m - 1] - d[m]))


class _Reference:
    """Per token chunk: the input/target reference vectors in the chosen space."""

    def __init__(self, lm, x, y, normed_space):
        e_in, e_out = lm.input_vectors(x), lm.target_vectors(y)
        if normed_space:
            e_in, e_out = lm.final_norm(e_in), lm.final_norm(e_out)
        self.e_in, self.e_out = e_in.float(), e_out.float()
        self.in_norm, self.out_norm = self.e_in.norm(dim=-1), self.e_out.norm(dim=-1)
        self.direction = self.e_out - self.e_in
        self.direction_sq = _rowdot(self.direction, self.direction)
        self.has_direction = (self.direction_sq > 0) & (x != y)


class LensStats:
    """What the metrics need from one state's lens logits z [n, V], in one topk and one softmax pass.

    z is shifted in place by its row maximum: the distribution is unchanged, and the float32 dot
    products below then sum terms that are small wherever p is large (as p log p does), instead of
    terms of the size of the raw logits (~100 for GPT-2), which would cost three digits.
    """

    def __init__(self, z, x, y, k):
        top, top_index = z.topk(k, dim=-1)  # sorted: [:, 0] the largest logit, [:, -1] the k-th largest
        z_in, z_out = z.gather(1, x[:, None]).squeeze(1), z.gather(1, y[:, None]).squeeze(1)
        self.topk_in, self.topk_out = z_in >= top[:, -1], z_out >= top[:, -1]
        self.wins = z_out > z_in
        self.z = z.sub_(top[:, :1])
        self.p = torch.softmax(z, dim=-1)
        self.lse = -self.p.gather(1, top_index[:, :1]).squeeze(1).log()  # p(argmax) = exp(0 - lse)
        self.ce = self.lse - (z_out - top[:, 0])
        self.entropy = self.lse - _rowdot(self.p, z)

    def kl_from(self, final):
        """KL(final || self) = sum_v p_f (log p_f - log p) = -H_f - p_f . z + lse (z shifted, any shift)."""
        return self.lse - _rowdot(final.p, self.z) - final.entropy


def _state_sums(lens, v, diff, ref, final):
    """Sums over a token chunk of every per-layer metric, from the lens and the compared state v [n, C]."""
    v = v.float()
    v_norm = v.norm(dim=-1).clamp_min(1e-12)
    cos_in = _rowdot(v, ref.e_in) / (v_norm * ref.in_norm).clamp_min(1e-12)
    cos_out = _rowdot(v, ref.e_out) / (v_norm * ref.out_norm).clamp_min(1e-12)
    proj = _rowdot(v - ref.e_in, ref.direction) / ref.direction_sq.where(ref.has_direction, 1.0)
    return torch.stack([
        lens.topk_in.sum(), lens.topk_out.sum(), cos_in.sum(), cos_out.sum(),
        proj.where(ref.has_direction, 0.0).sum(), (lens.wins & diff).sum(), lens.ce.sum(), lens.entropy.sum(),
        lens.kl_from(final).sum(),
    ]).cpu().double()  # (MPS has no float64)


@torch.inference_mode()
def analyze_model(lm, token_batches, k=5, space="raw", lens_norm=True, mid=False, progress=True,
                  lens_dtype="auto"):
    """Stream token batches ([B, T+1] int64: inputs then one target) through lm; the per-layer metrics.

    Returns {"label", "source", "n_layer", ..., "layers": [row per state], "shift_depth": {...}}.
    """
    if space not in ("raw", "normed"):
        raise AnalyzeError(f"--space must be 'raw' or 'normed', got {space!r}")
    if not 1 <= k <= lm.vocab_size:
        raise AnalyzeError(f"--k={k} must be between 1 and the vocabulary size {lm.vocab_size}")
    normed_space = space == "normed"
    from model import DTYPES

    if lens_dtype != "auto" and lens_dtype not in DTYPES:
        raise AnalyzeError(f"--lens_dtype must be one of {['auto'] + list(DTYPES)}, got {lens_dtype!r}")
    weight = None if lens_dtype == "auto" else lm.out_embedding.detach().to(DTYPES[lens_dtype])
    L = lm.n_layer
    states = [("resid", float(l)) for l in range(L + 1)] + ([("mid", l + 0.5) for l in range(L)] if mid else [])
    sums = torch.zeros(len(states), len(METRICS), dtype=torch.float64)
    counts = {"all": 0, "diff": 0, "proj": 0}
    final_ce = 0.0  # the model's own loss on these tokens (the lens at the last layer, with the norm)
    first_win = torch.zeros(L + 2, dtype=torch.int64)  # layers 0..L, then "never"
    chunk = max(1, LENS_CHUNK_BYTES // (4 * lm.vocab_size))

    from tqdm import tqdm

    total = sum(b.numel() - b.size(0) for b in token_batches) if hasattr(token_batches, "__len__") else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=lm.name, disable=not progress)
    for batch in token_batches:
        batch = batch.to(lm.device)
        if batch.dim() != 2 or batch.size(1) < 2:
            raise AnalyzeError(f"token batches must be [B, T+1] with T >= 1, got {tuple(batch.shape)}")
        top = int(batch.max())
        if top >= lm.vocab_size or int(batch.min()) < 0:
            raise AnalyzeError(f"token id {top} is outside {lm.name}'s vocabulary of {lm.vocab_size}")
        if batch.size(1) - 1 > lm.block_size:
            raise AnalyzeError(f"sequences of {batch.size(1) - 1} tokens are longer than {lm.name}'s "
                               f"block size {lm.block_size}: lower --seq_len")
        x_all, y_all = batch[:, :-1], batch[:, 1:]
        resid, mids = lm.hidden_states(x_all, mid=mid)
        C = resid[0].size(-1)
        flat = [s.reshape(-1, C) for s in resid] + [s.reshape(-1, C) for s in (mids if mid else [])]
        x_all, y_all = x_all.reshape(-1), y_all.reshape(-1)
        for start in range(0, x_all.numel(), chunk):
            sl = slice(start, start + chunk)
            x, y = x_all[sl], y_all[sl]
            diff = x != y
            ref = _Reference(lm, x, y, normed_space)
            # the model's own distribution first: with lens_norm the last layer's lens *is* it
            final = LensStats(lm.decode(flat[L][sl], True, weight), x, y, k)
            never_won_after = torch.full_like(x, -1)  # the last layer at which the target did not win
            for s in [L] + [s for s in range(len(states)) if s != L]:
                h = flat[s][sl]
                normed = lm.final_norm(h) if (lens_norm or normed_space) else None
                if s == L and lens_norm:
                    lens = final
                else:
                    lens = LensStats(lm.unembed(normed if lens_norm else h, weight), x, y, k)
                sums[s] += _state_sums(lens, normed if normed_space else h, diff, ref, final)
                if s <= L:  # residual states only; visited in increasing order after L, so clamp = max
                    never_won_after = torch.where(lens.wins, never_won_after, never_won_after.clamp(min=s))
                del lens
                final.z = None  # only the final p and entropy are needed from here on
            first_win += torch.bincount((never_won_after + 1)[diff].cpu(), minlength=L + 2)
            final_ce += final.ce.sum().item()
            counts["all"] += x.numel()
            counts["diff"] += int(diff.sum())
            counts["proj"] += int(ref.has_direction.sum())
            del final, ref
        del resid, mids, flat
        bar.update(x_all.numel())
    bar.close()
    if counts["all"] == 0:
        raise AnalyzeError(f"{lm.name}: no tokens to analyse")
    return _summarise(lm, states, sums, counts, first_win, final_ce, k, space, lens_norm, lens_dtype)


def _summarise(lm, states, sums, counts, first_win, final_ce, k, space, lens_norm, lens_dtype):
    rows = []
    n_diff = counts["diff"]
    for (kind, layer), row in zip(states, sums.tolist()):
        entry = {"kind": kind, "layer": layer}
        for (name, over), value in zip(METRICS, row):
            entry[name] = value / counts[over] if counts[over] else None  # e.g. every t_i == t_{i+1}
        rows.append(entry)
    resid = [r for r in rows if r["kind"] == "resid"]
    layers = [r["layer"] for r in resid]
    curve = lambda name: [r[name] for r in resid]
    hist = first_win.tolist()
    winners = sum(hist[:-1])
    cumulative, median = 0, None
    for layer, count in enumerate(hist):  # the median token's first-win layer, "never" counted as last
        cumulative += count
        if n_diff and cumulative * 2 >= n_diff:
            median = layer if layer <= lm.n_layer else None
            break
    shift = {
        "topk_crossing": crossing_layer(layers, curve("topk_input"), curve("topk_target")),
        "cosine_crossing": crossing_layer(layers, curve("cos_input"), curve("cos_target")),
        "projection_half": (None if None in curve("projection")  # no position with t_i != t_{i+1}
                            else crossing_layer(layers, [0.5] * len(layers), curve("projection"))),
        "first_win_hist": hist[:-1],
        "first_win_never": hist[-1],
        "first_win_median": median,
        "first_win_mean": (sum(l * c for l, c in enumerate(hist[:-1])) / winners) if winners else None,
        "never_fraction": hist[-1] / n_diff if n_diff else None,
    }
    return {
        "label": lm.name, "source": getattr(lm, "source", lm.name), "n_layer": lm.n_layer,
        "vocab_size": lm.vocab_size, "tied": lm.tied, "embed_scale": lm.embed_scale,
        "space": space, "lens_norm": lens_norm, "k": k, "lens_dtype": lens_dtype,
        "positions": counts["all"], "positions_diff": n_diff,
        "positions_projection": counts["proj"],
        "final_loss": final_ce / counts["all"],
        "layers": rows, "shift_depth": shift,
    }


def analyze_models(lms, token_batches, k=5, space="raw", lens_norm=True, mid=False, progress=True,
                   lens_dtype="auto"):
    """analyze_model for each model. token_batches: one iterable of [B, T+1] token tensors shared by all
    models, or a list with one such iterable per model (models with different tokenizers)."""
    per_model = (isinstance(token_batches, (list, tuple)) and len(token_batches) == len(lms)
                 and all(isinstance(b, (list, tuple)) for b in token_batches))
    if not per_model:
        token_batches = [token_batches] * len(lms)
    return [analyze_model(lm, batches, k, space, lens_norm, mid, progress, lens_dtype)
            for lm, batches in zip(lms, token_batches)]

# -----------------------------------------------------------------------------
# Outputs: JSON, CSV, summary


CSV_FIELDS = ["model", "source", "kind", "layer", "space", "lens_norm", "k"] + [name for name, _ in METRICS]


def write_metrics(results, out_dir, settings=None):
    """metrics.json (everything) and metrics.csv (one row per model and state); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "metrics.csv")
    with open(json_path, "w") as f:
        json.dump({"settings": settings or {}, "models": results}, f, indent=1, default=str, allow_nan=False)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            for row in r["layers"]:
                writer.writerow({"model": r["label"], "source": r["source"], "space": r["space"],
                                 "lens_norm": r["lens_norm"], "k": r["k"], **row})
    return [json_path, csv_path]


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(results):
    """Markdown table: the shift depth of each model."""
    header = ["model", "layers", "tokens", "top-k cross", "cosine cross", "projection 1/2",
              "first-win median", "never", "final CE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        s = r["shift_depth"]
        lines.append("| " + " | ".join([
            r["label"], str(r["n_layer"]), f"{r['positions']:,}", _fmt(s["topk_crossing"]),
            _fmt(s["cosine_crossing"]), _fmt(s["projection_half"]),
            "-" if s["first_win_median"] is None else str(s["first_win_median"]),
            "-" if s["never_fraction"] is None else f"{s['never_fraction']:.1%}", _fmt(r["final_loss"], 3),
        ]) + " |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)


def _figure(ncols=1, width=6.4, height=4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _label(ax, title, xlabel, ylabel, ncol=1):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, ncol=ncol)


def _color(i):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _curves(ax, results, metrics, styles, ylabel):
    """One color per model; one line style per metric (e.g. input solid, target dashed)."""
    for i, r in enumerate(results):
        resid = [row for row in r["layers"] if row["kind"] == "resid"]
        mids = [row for row in r["layers"] if row["kind"] == "mid"]
        for (name, what), style in zip(metrics, styles):
            ax.plot([row["layer"] for row in resid], [row[name] for row in resid], style, color=_color(i),
                    label=f"{r['label']}: {what}", markersize=4)
            if mids:
                ax.plot([row["layer"] for row in mids], [row[name] for row in mids], style[0], color=_color(i),
                        markerfacecolor="none", markersize=5, linestyle="none")
    ax.set_xlabel("layer (0 = embeddings" + (", hollow = mid-block" if any(
        row["kind"] == "mid" for r in results for row in r["layers"]) else "") + ")")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _mark_crossings(ax, results, key):
    """A dotted vertical line per model at its crossing layer (shift_depth[key]), when there is one."""
    for i, r in enumerate(results):
        if r["shift_depth"][key] is not None:
            ax.axvline(r["shift_depth"][key], color=_color(i), linestyle=":", linewidth=1.2)


def plot_topk(results):
    k = results[0]["k"]
    fig, (ax,) = _figure()
    _curves(ax, results, [("topk_input", "input t_i"), ("topk_target", "target t_i+1")], ["o-", "s--"],
            f"top-{k} match")
    _mark_crossings(ax, results, "topk_crossing")
    ax.set_ylim(-0.02, 1.02)
    norm = "final norm" if results[0]["lens_norm"] else "no final norm"
    ax.set_title(f"logit lens top-{k} match ({norm}); dotted: crossing")
    return fig


def plot_cosine_projection(results):
    fig, (ax_cos, ax_proj) = _figure(2)
    _curves(ax_cos, results, [("cos_input", "cos(h, e_in)"), ("cos_target", "cos(h, e_out)")], ["o-", "s--"],
            "cosine similarity")
    _mark_crossings(ax_cos, results, "cosine_crossing")
    ax_cos.set_title(f"cosine to the input / target embedding ({results[0]['space']} state; dotted: crossing)")
    _curves(ax_proj, results, [("projection", "projection")], ["o-"], "<h - e_in, e_out - e_in> / |e_out - e_in|^2")
    for y, text in ((0, "input"), (1, "target")):
        ax_proj.axhline(y, color="gray", linewidth=0.8, linestyle=":")
        ax_proj.annotate(text, (0, y), xytext=(2, 2), textcoords="offset points", color="gray", fontsize=8)
    ax_proj.set_title(f"projection onto input -> target ({results[0]['space']} state, t_i != t_i+1)")
    return fig


def plot_lens(results):
    fig, axes = _figure(3, width=5)
    for ax, (name, ylabel) in zip(axes, [("lens_ce", "cross-entropy vs target (nats)"),
                                         ("entropy", "entropy of the lens (nats)"),
                                         ("kl_final", "KL(final || layer) (nats)")]):
        _curves(ax, results, [(name, ylabel.split(" (")[0])], ["o-"], ylabel)
    axes[0].set_title("logit lens cross-entropy")
    axes[1].set_title("logit lens entropy")
    axes[2].set_title("KL(model's output || lens)")
    return fig


def plot_shift_depth(results):
    """Per-token first-win layer: fraction of positions (t_i != t_i+1) per layer, 'never' last."""
    fig, (ax,) = _figure(width=7.5)
    n_max = max(r["n_layer"] for r in results)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        s = r["shift_depth"]
        counts = np.array(s["first_win_hist"] + [s["first_win_never"]], dtype=float)
        xs = np.array(list(range(r["n_layer"] + 1)) + [n_max + 1.5])
        ax.bar(xs - 0.4 + width * (i + 0.5), counts / max(counts.sum(), 1), width=width, color=_color(i),
               label=f"{r['label']} (median {s['first_win_median'] if s['first_win_median'] is not None else '-'})")
    ticks = list(range(0, n_max + 1, math.ceil((n_max + 1) / 14))) + [n_max + 1.5]
    ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["never"])
    _label(ax, "per-token shift depth", "first layer from which the target's logit stays above the input's",
           "fraction of positions")
    return fig


def save_figure(fig, path):
    fig.savefig(path, dpi=120)
    return path


def write_plots(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    plots = {"topk.png": plot_topk, "cosine_projection.png": plot_cosine_projection, "lens.png": plot_lens,
             "shift_depth.png": plot_shift_depth}
    return [save_figure(plot(results), os.path.join(out_dir, name)) for name, plot in plots.items()]

# -----------------------------------------------------------------------------
# Training logs (train.py's log.jsonl: rows with "type" run / train / eval / end)


def read_log(path):
    """{"name", "path", "config", "alphas": [(iter, [alpha per layer])], "final_val_loss", "final_iter"}."""
    if not os.path.isfile(path):
        raise AnalyzeError(f"training log not found: {path}")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AnalyzeError(f"{path}:{number}: not a JSON line ({e})") from e
    configs = [r["config"] for r in rows if r.get("type") == "run" and isinstance(r.get("config"), dict)]
    evals = [r for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    # train rows are the dense series; a log with evals only (eval_only runs) falls back to them
    series = [r for r in rows if r.get("type") == "train" and r.get("alphas")] or \
             [r for r in rows if r.get("type") == "eval" and r.get("alphas")]
    run_dir = os.path.dirname(os.path.abspath(path))
    return {
        "name": os.path.basename(run_dir), "path": path, "config": configs[-1] if configs else None,
        "alphas": [(r["iter"], r["alphas"]) for r in series],
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_iter": evals[-1]["iter"] if evals else None,
    }


def plot_alphas(logs):
    """Residual alpha of every layer over training, one panel per run (the paper's Figure 5)."""
    from matplotlib import colormaps

    fig, axes = _figure(len(logs), width=5.5)
    for ax, run in zip(axes, logs):
        if not run["alphas"]:
            raise AnalyzeError(f"{run['path']} has no rows with 'alphas'")
        iters = [it for it, _ in run["alphas"]]
        values = np.array([a for _, a in run["alphas"]], dtype=float)  # [steps, layers]
        n = values.shape[1]
        cmap = colormaps["viridis"]
        for layer in range(n):
            ax.plot(iters, values[:, layer], color=cmap(layer / max(n - 1, 1)), label=f"layer {layer}")
        cfg = run["config"] or {}
        mode = cfg.get("residual_mode", "?")
        if mode == "gate":
            mode += f" ({cfg.get('gate_mode')})"
        _label(ax, f"{run['name']}: residual alpha per layer, {mode}", "iteration", "alpha", ncol=2 if n > 8 else 1)
    return fig


def _cut_layers(run):
    cfg = run["config"]
    if not cfg or "cut_layer" not in cfg or "n_layer" not in cfg:
        raise AnalyzeError(f"{run['path']} has no run row with the config (cut_layer, n_layer): not a train.py log?")
    layers = cfg["cut_layer"] if isinstance(cfg["cut_layer"], list) else [cfg["cut_layer"]]
    return sorted(int(l) % int(cfg["n_layer"]) for l in layers)  # negative cut layers count from the end


def plot_cut_sweep(runs, baseline=None):
    """Final validation loss against the cut layer (the paper's Figure 4), the baseline as a line."""
    points = []
    for run in runs:
        if (run["config"] or {}).get("residual_mode") != "cut":
            raise AnalyzeError(f"{run['path']}: residual_mode is {(run['config'] or {}).get('residual_mode')!r}, "
                               "not 'cut' (give the baseline with --baseline)")
        if run["final_val_loss"] is None:
            raise AnalyzeError(f"{run['path']} has no eval row with a val_loss")
        points.append((_cut_layers(run), run["final_val_loss"], run["config"].get("cut_alpha")))
    ends = {run["name"]: run["final_iter"] for run in runs + ([baseline] if baseline else [])}
    if len(set(ends.values())) > 1:  # e.g. a run stopped early: its "final" loss is from an earlier eval
        print(f"note: the runs' last evals are at different iterations: {ends}")
    points.sort()
    fig, (ax,) = _figure()
    xs = [layers[0] for layers, _, _ in points]
    alphas = sorted({a for _, _, a in points})
    ax.plot(xs, [loss for _, loss, _ in points], "o-", color=_color(0),
            label="cut, alpha " + ", ".join(f"{a:g}" for a in alphas))
    for layers, loss, _ in points:
        if len(layers) > 1:  # several cut layers in one run: plotted at the first, labelled with all
            ax.annotate(",".join(map(str, layers)), (layers[0], loss), xytext=(3, 3), textcoords="offset points",
                        fontsize=8)
    if baseline is not None:
        if baseline["final_val_loss"] is None:
            raise AnalyzeError(f"{baseline['path']} has no eval row with a val_loss")
        ax.axhline(baseline["final_val_loss"], color="gray", linestyle="--", label=f"baseline ({baseline['name']})")
    ax.set_xticks(sorted(set(xs)))
    _label(ax, "validation loss vs cut layer", "cut layer (block index)", "final validation loss")
    return fig


def _expand(patterns, what):
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise AnalyzeError(f"no {what} match {pattern!r}")
        paths += matches
    return paths

# -----------------------------------------------------------------------------
# Command line


def _as_list(value):
    return [value] if isinstance(value, str) else list(value)


def load_models(settings):
    """The --ckpt and --hf models, named by lm.model_specs (run dir, hub or dir name; paths on a clash)."""
    from lm import load_lm, model_specs

    lms = []
    for kind, path, name in model_specs(_as_list(settings["ckpt"]), _as_list(settings["hf"])):
        lm = load_lm(**{kind: path}, device=settings["device"], dtype=settings["dtype"])
        lm.name = name
        lms.append(lm)
    return lms


def token_windows(lms, settings):
    """One [num_sequences, seq_len + 1] token tensor per model: the same text (or shard windows) for all."""
    length = settings["seq_len"] + 1
    if settings["shards"]:
        for lm in lms:
            if not lm.uses_gpt2_tokens():
                raise AnalyzeError(f"--shards hold GPT-2 tokens, but {lm.name} uses another tokenizer: "
                                   "give it text instead (--data_files or the default dataset)")
        windows = shard_windows(settings["shards"], settings["num_sequences"], length, settings["seed"])
        return [windows] * len(lms)
    documents = read_documents(settings["dataset"], settings["dataset_config"], settings["split"],
                               _as_list(settings["data_files"]), settings["text_column"], settings["wikitext"],
                               settings["max_chars"])
    starts = text_starts(documents, settings["num_sequences"], settings["seed"])
    cache = {}  # models with the same tokenizer share their tokens
    for lm in lms:
        if lm.tokenizer_id not in cache:
            cache[lm.tokenizer_id] = text_windows(lm, documents, starts, length)
    return [cache[lm.tokenizer_id] for lm in lms]


def check_settings(settings):
    for key in ("num_sequences", "batch_size", "k"):
        if settings[key] < 1:
            raise AnalyzeError(f"--{key} must be >= 1, got {settings[key]}")
    if settings["seq_len"] < 0:
        raise AnalyzeError(f"--seq_len must be >= 1 (or 0 for the models' block size), got {settings['seq_len']}")
    if settings["space"] not in ("raw", "normed"):
        raise AnalyzeError(f"--space must be 'raw' or 'normed', got {settings['space']!r}")
    from model import DTYPES

    for key, allowed in (("dtype", list(DTYPES)), ("lens_dtype", ["auto"] + list(DTYPES))):
        if settings[key] not in allowed:
            raise AnalyzeError(f"--{key} must be one of {allowed}, got {settings[key]!r}")
    if settings["shards"] and settings["data_files"]:
        raise AnalyzeError("give either --shards or --data_files, not both")
    if not (settings["ckpt"] or settings["hf"] or settings["log"] or settings["cut_sweep"]):
        raise AnalyzeError("nothing to analyse: give --ckpt and/or --hf models (or --log / --cut_sweep)")
    if settings["baseline"] and not settings["cut_sweep"]:
        raise AnalyzeError("--baseline is the reference line of --cut_sweep: give --cut_sweep too")


def run(settings):
    """Everything main() does, with errors as exceptions; returns the results (one dict per model)."""
    check_settings(settings)
    out_dir = settings["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    results = []
    if settings["ckpt"] or settings["hf"]:
        lms = load_models(settings)
        auto = min(DEFAULT_MAX_SEQ_LEN, *(lm.block_size for lm in lms))
        settings["seq_len"] = settings["seq_len"] or auto
        for lm in lms:
            if settings["seq_len"] > lm.block_size:
                raise AnalyzeError(f"--seq_len={settings['seq_len']} is longer than {lm.name}'s block size "
                                   f"{lm.block_size}")
        windows = token_windows(lms, settings)
        batches = [batched(w, settings["batch_size"]) for w in windows]
        results = analyze_models(lms, batches, settings["k"], settings["space"], settings["lens_norm"],
                                 settings["mid"], settings["progress"], settings["lens_dtype"])
        for path in write_metrics(results, out_dir, settings) + write_plots(results, out_dir):
            print(f"wrote {path}")
        print(f"\nshift depth ({settings['num_sequences']} x {settings['seq_len']} tokens, {settings['space']} "
              f"state, lens {'with' if settings['lens_norm'] else 'without'} final norm, top-{settings['k']}):\n")
        print(summary_table(results))
    if settings["log"]:
        logs = [read_log(p) for p in _expand(_as_list(settings["log"]), "training logs")]
        print(f"wrote {save_figure(plot_alphas(logs), os.path.join(out_dir, 'alphas.png'))}")
    if settings["cut_sweep"]:
        runs = [read_log(p) for p in _expand(_as_list(settings["cut_sweep"]), "training logs")]
        baseline = read_log(settings["baseline"]) if settings["baseline"] else None
        print(f"wrote {save_figure(plot_cut_sweep(runs, baseline), os.path.join(out_dir, 'cut_sweep.png'))}")
    return results


def main(argv=None):
    settings = configure_or_exit(DEFAULTS, argv, EXTRA_TYPES)
    try:
        run(settings)
    except (ValueError, FileNotFoundError, ImportError) as e:  # AnalyzeError, and model / shard loading errors
        print(f"analyze.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
