"""
Bits per byte, and the n-gram floors a trained model must beat: the loss of plain counting.

    from nanoshift.floors import bits_per_byte, data_floors, floor_label, reference_lines
    bpb = bits_per_byte(nats_sum, byte_count)          # the one definition (below)
    floors = data_floors("data/demo")                  # unigram / bigram of the val split, counted on train
    floors["bigram"]["bpb"], floors["bigram"]["nats"]  # cached in data/demo/floors.json after the first call
    floor_label(model_bpb, floors)                     # "above bigram floor" (worse than counting pairs), or ""
    for value, label, style in reference_lines(floors, "nats"):   # a loss-curve plot's reference lines
        ax.axhline(value, linestyle=style, color="grey", label=label)

    python -m nanoshift.floors data/demo               # prints the floors of a prepared folder

Bits per byte (nanochat's val_bpb). For predicted (target) tokens y_i with losses l_i in nats and b_i = the
UTF-8 bytes of text token y_i stands for (data.token_byte_lengths: a per-id table, special tokens 0):

    bpb = sum_i l_i [b_i > 0] / (ln 2 * sum_i b_i)

Targets of 0 bytes (the document separator) count in neither sum, as in nanochat: they are not text, and
their loss would otherwise be charged to the neighbouring bytes. A loss in nats per token is tokenizer-
dependent; bits per byte is not, so models of different tokenizers (GPT-2's, a small BPE, raw bytes)
compare on one scale. A byte count for a stretch of tokens is the sum of their table entries; the
manifest of a prepare records it per split (splits[s]["bytes"], prepare.py), and for text benchmarks it
equals the text's own UTF-8 length (GPT-2, 'bytes' and byte-level BPEs: exactly).

Floors of a prepared folder (its _done.json manifest and shards). Counts come from the train split's
token stream (every shard of the split in manifest order, one stream: the pair across a shard boundary
counts); the val split's stream is scored at its targets val[1:] (each token after the first, given the
one before it: the targets a model scores on that stream). With V = the tokenizer's vocabulary
(manifest vocab_size), N = train tokens, c(w) = count of w in train, c(v, w) = count of the pair v w in
train, c(v.) = sum_w c(v, w) = count of v as the first of a pair:

    unigram (add-one):        p1(w) = (c(w) + 1) / (N + V)
    bigram (interpolated):    p2(w | v) = LAMBDA * c(v, w) / c(v.) + (1 - LAMBDA) * p1(w)   if c(v.) > 0
                              p2(w | v) = p1(w)                                             if c(v.) = 0
    with LAMBDA = 0.7 (fixed, the value issue 22 measured with; not fitted).

Each floor is reported as nats/token (mean of -ln p over every target, separators included: the same
average as a model's val loss) and bits/byte (the formula above: 0-byte targets left out). The result is
cached in the folder as floors.json, keyed by the manifest's and shards' bytes-on-disk identity (their
sizes and the manifest's sha256) and the formula's constants, so a re-prepare that changes the data
invalidates it and an unchanged folder is counted once.
"""

import hashlib
import json
import math
import os
import sys

import numpy as np

from nanoshift.common import InputError, write_json
from nanoshift.data import MANIFEST_NAME, get_tokenizer, manifest_tokenizer, read_manifest, read_shard, token_byte_lengths

LAMBDA = 0.7  # weight of the bigram relative frequency in the interpolation
ADD_K = 1.0  # unigram smoothing: add-one
FLOORS_NAME = "floors.json"
FORMULA = f"unigram add-{ADD_K:g}; bigram = {LAMBDA} * c(v,w)/c(v.) + {1 - LAMBDA:.1f} * unigram (unigram if c(v.) = 0)"
CACHE_VERSION = 1  # bump when the computation changes: old floors.json files are then recomputed


def bits_per_byte(nats_sum, byte_count):
    """Bits per byte of text: a summed loss in nats (over targets with > 0 bytes) / (ln 2 * their bytes)."""
    if not byte_count > 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {byte_count!r}")
    return float(nats_sum) / (math.log(2) * float(byte_count))


def nats_and_bytes(nll, targets, byte_lengths):
    """(summed nats over targets of > 0 bytes, their bytes) for per-target losses nll of the target ids
    targets (arrays of one length), with a data.token_byte_lengths table: the two sums of bits_per_byte."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and int(targets.max()) >= len(byte_lengths):
        raise InputError(f"token id {int(targets.max())} is outside the tokenizer's {len(byte_lengths):,} ids: "
                         "the tokens and the byte-length table are of different tokenizers")
    nbytes = byte_lengths[targets]
    nll = np.asarray(nll, dtype=np.float64)
    return float(nll[nbytes > 0].sum()), int(nbytes.sum())


def floor_label(bpb, floors):
    """'above bigram floor' when a model's bits/byte is worse than counting token pairs ('above bigram floor
    and unigram floor' when it is worse than counting single tokens too), else '' (floors: data_floors'
    dict; None, or bpb None: '')."""
    if floors is None or bpb is None or floors["bigram"]["bpb"] is None or bpb <= floors["bigram"]["bpb"]:
        return ""
    return "above bigram floor" + (" and unigram floor" if bpb > floors["unigram"]["bpb"] else "")


def reference_lines(floors, unit="bpb"):
    """The floors as horizontal reference lines for a plot of loss against training steps: [(value, label,
    linestyle)], unit 'bpb' (bits/byte) or 'nats' (nats/token, for a curve of val loss). Draw each with
    ax.axhline(value, linestyle=linestyle, color="grey", label=label). floors None: no lines."""
    if floors is None:
        return []
    if unit not in ("bpb", "nats"):
        raise ValueError(f"unit must be 'bpb' or 'nats', got {unit!r}")
    what = "bits/byte" if unit == "bpb" else "nats/token"
    return [(floors[name][unit], f"{name} floor ({floors[name][unit]:.3f} {what})", style)
            for name, style in (("unigram", ":"), ("bigram", "--"))]

# -----------------------------------------------------------------------------
# Counting


def _split_stream(data_dir, manifest, split):
    """The split's tokens as one int64 array (its shards in manifest order)."""
    info = manifest.get("splits", {}).get(split)
    if not info or not info.get("shards"):
        raise InputError(f"{data_dir}: the prepare has no {split!r} split (splits: {sorted(manifest.get('splits', {}))}); "
                         "floors need a train split to count and a val split to score")
    tokens = [np.asarray(read_shard(os.path.join(data_dir, name)), dtype=np.int64) for name in info["shards"]]
    return np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)


def count_floors(train, val, vocab_size, byte_lengths):
    """The floors (module docstring) of token stream val under counts of token stream train: {"unigram":
    {"nats", "bpb"}, "bigram": {...}, "val_targets", "val_bytes", "train_tokens"}. numpy only: pair ids
    v * V + w, np.unique for the train pairs, searchsorted for the val ones."""
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    if len(val) < 2:
        raise InputError(f"the val split holds {len(val)} token(s): at least 2 are needed (one target)")
    if len(train) < 2:
        raise InputError(f"the train split holds {len(train)} token(s): at least 2 are needed to count pairs")
    top = max(int(train.max()), int(val.max()))
    if top >= vocab_size:
        raise InputError(f"token id {top} is outside the vocabulary of {vocab_size:,}")
    V = int(vocab_size)
    unigram_counts = np.bincount(train, minlength=V).astype(np.float64)
    p1 = (unigram_counts + ADD_K) / (len(train) + ADD_K * V)
    pair_ids, pair_counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    first_counts = np.bincount(train[:-1], minlength=V).astype(np.float64)  # c(v.)

    prev, targets = val[:-1], val[1:]
    nll_unigram = -np.log(p1[targets])
    wanted = prev * V + targets
    at = np.minimum(np.searchsorted(pair_ids, wanted), len(pair_ids) - 1)
    pair = np.where(pair_ids[at] == wanted, pair_counts[at], 0).astype(np.float64)
    seen = first_counts[prev]
    p2 = np.where(seen > 0, LAMBDA * pair / np.maximum(seen, 1) + (1 - LAMBDA) * p1[targets], p1[targets])
    nll_bigram = -np.log(p2)

    floors = {}
    for name, nll in (("unigram", nll_unigram), ("bigram", nll_bigram)):
        nats_sum, byte_count = nats_and_bytes(nll, targets, byte_lengths)
        floors[name] = {"nats": float(nll.mean()),
                        "bpb": bits_per_byte(nats_sum, byte_count) if byte_count else None}
    floors.update(val_targets=int(len(targets)), val_bytes=int(byte_lengths[targets].sum()),
                  train_tokens=int(len(train)))
    return floors


def _cache_key(data_dir, manifest):
    """What the floors depend on: the manifest's bytes, every shard's name and size, the formula."""
    with open(os.path.join(data_dir, MANIFEST_NAME), "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    shards = {name: os.path.getsize(os.path.join(data_dir, name))
              for split in ("train", "val") for name in manifest["splits"].get(split, {}).get("shards", [])}
    return {"version": CACHE_VERSION, "manifest_sha256": manifest_sha, "shards": shards, "lambda": LAMBDA,
            "add_k": ADD_K}


def data_floors(data_dir, use_cache=True):
    """The unigram and bigram floors of the prepared folder data_dir's val split, counted on its train split
    (module docstring), with what they were computed from: {"unigram": {"nats", "bpb"}, "bigram": {...},
    "val_targets", "val_bytes", "train_tokens", "tokenizer", "formula", "key"}. Read from data_dir/floors.json
    when its key matches; else computed and written there (a folder that cannot be written to: computed
    every time, with a note). InputError for a folder without a finished prepare or without a val/train split."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise InputError(f"{data_dir}: no prepare manifest ({MANIFEST_NAME}): floors need a folder written by a "
                         "finished prepare (prepare_fineweb.py / prepare_owt.py), which names its tokenizer and splits")
    for split in ("val", "train"):
        if not manifest.get("splits", {}).get(split, {}).get("tokens"):
            raise InputError(f"{data_dir}: the {split} split is empty or missing ({MANIFEST_NAME}: splits "
                             f"{sorted(manifest.get('splits', {}))}); floors need train counts and val targets")
    key = _cache_key(data_dir, manifest)
    path = os.path.join(data_dir, FLOORS_NAME)
    if use_cache and os.path.isfile(path):
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached
        except (OSError, ValueError):
            pass  # unreadable: recomputed and rewritten below
    name, tokenizer_id, vocab_size = manifest_tokenizer(manifest)
    try:
        tokenizer = get_tokenizer(name)
    except (InputError, ImportError) as e:
        raise InputError(f"{data_dir}: its tokenizer {name!r} cannot be loaded, so its tokens' bytes are unknown: {e}") from e
    if tokenizer.tokenizer_id != tokenizer_id:
        raise InputError(f"{data_dir}: the prepare used the tokenizer {name!r} ({tokenizer_id}), but {name!r} now "
                         f"loads another one ({tokenizer.tokenizer_id})")
    floors = count_floors(_split_stream(data_dir, manifest, "train"), _split_stream(data_dir, manifest, "val"),
                          vocab_size or tokenizer.n_vocab, token_byte_lengths(tokenizer))
    floors.update(tokenizer=name, formula=FORMULA, key=key)
    try:
        write_json(path, floors, indent=2)
    except OSError as e:
        print(f"note: could not cache the floors in {path} ({e.strerror}); they are recomputed next time",
              file=sys.stderr)
    return floors


def floors_or_none(data_dir, max_train_tokens=None):
    """data_floors(data_dir), or None (with a note on stderr) where the folder has no finished prepare with train
    and val splits: for summaries and plots that show floors where there are some (e.g. a run's
    config["data_dir"] from its log). max_train_tokens: None as well (unless cached) when the train split is
    longer, so a training run on billions of tokens does not count them in memory at start-up (count those once
    with `python -m nanoshift.floors DIR`)."""
    try:
        manifest = read_manifest(data_dir)
        train_tokens = ((manifest or {}).get("splits", {}).get("train") or {}).get("tokens") or 0
        cached = os.path.isfile(os.path.join(data_dir, FLOORS_NAME))
        if max_train_tokens is not None and train_tokens > max_train_tokens and not cached:
            print(f"note: no n-gram floors at start-up for {data_dir}: its train split has {train_tokens:,} tokens "
                  f"(more than {max_train_tokens:,}); count them once with python -m nanoshift.floors {data_dir}",
                  file=sys.stderr)
            return None
        return data_floors(data_dir)
    except InputError as e:
        print(f"note: no n-gram floors for {data_dir}: {e}", file=sys.stderr)
        return None


def shards_floors(paths):
    """data_floors of the folder holding token shards paths (e.g. an eval's val shards), or None when they
    are not all in one prepared folder with train and val splits (llm.c shards, a hand-made folder)."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(folders) != 1:
        return None
    (folder,) = folders
    manifest = read_manifest(folder)
    if manifest is None or not all(manifest.get("splits", {}).get(s, {}).get("tokens") for s in ("train", "val")):
        return None
    return data_floors(folder)


def format_floors(floors):
    """One line per floor, for summaries: 'unigram floor: 6.480 nats/token, 2.930 bits/byte'."""
    return [f"{name} floor: {floors[name]['nats']:.3f} nats/token, {floors[name]['bpb']:.3f} bits/byte"
            for name in ("unigram", "bigram")]


if __name__ == "__main__":
    for folder in sys.argv[1:] or ["data/demo"]:
        result = data_floors(folder)
        print(f"{folder} ({result['tokenizer']}; {result['val_targets']:,} val targets, {result['val_bytes']:,} bytes; "
              f"counts from {result['train_tokens']:,} train tokens; {FORMULA}):")
        for line in format_floors(result):
            print("  " + line)
