"""floors.py: the unigram and bigram floors of a prepared folder equal a direct count on a hand-made corpus (GPT-2
tokens and raw bytes, several shards a split), are cached in floors.json until the data changes, agree with the
manifest's byte count, and bad folders are clear errors."""
import collections
import json
import math
import os

import numpy as np
import pytest

from conftest import DOCUMENTS
from nanoshift import floors as fl
from nanoshift.common import InputError
from nanoshift.data import get_tokenizer, read_manifest, read_shard, token_byte_lengths, write_shard
from nanoshift.prepare import first_tokens_split, prepare_shards

TEXTS = [d for d in DOCUMENTS if d and not d.isspace()]


def split_stream(folder, split):
    names = read_manifest(folder)["splits"][split]["shards"]
    return [int(t) for name in names for t in read_shard(os.path.join(folder, name))]


def token_bytes(enc, w):
    """A token's bytes by hand: GPT-2's exact bytes of the token alone; a byte id is one byte; separators none."""
    if w == enc.eot_token:
        return 0
    return len(enc.decode_single_token_bytes(w)) if enc.name == "gpt2" else 1


def direct_floors(train, val, vocab, enc):
    """The docstring's formulas with Python counters and loops, bytes by decoding each target alone."""
    uni = collections.Counter(train)
    pairs = collections.Counter(zip(train, train[1:]))
    first = collections.Counter(train[:-1])
    p1 = lambda w: (uni[w] + 1) / (len(train) + vocab)
    out = {}
    for name in ("unigram", "bigram"):
        nll = []
        for v, w in zip(val, val[1:]):
            p = p1(w) if name == "unigram" or first[v] == 0 else 0.7 * pairs[(v, w)] / first[v] + 0.3 * p1(w)
            nll.append(-math.log(p))
        nbytes = [token_bytes(enc, w) for w in val[1:]]
        kept = sum(n for n, b in zip(nll, nbytes) if b > 0)
        out[name] = {"nats": sum(nll) / len(nll), "bpb": kept / (math.log(2) * sum(nbytes))}
    out["val_bytes"] = sum(nbytes)
    return out


@pytest.mark.parametrize("tokenizer", ["gpt2", "bytes"])
def test_floors_equal_a_direct_count(tmp_path, tokenizer):
    enc = get_tokenizer(tokenizer)
    folder = str(tmp_path / tokenizer)
    # small shards: both splits span several files, so pairs across shard boundaries count
    prepare_shards(TEXTS * 2, folder, "hand", first_tokens_split(150), shard_tokens=97, progress=False,
                   tokenizer=tokenizer)
    manifest = read_manifest(folder)
    assert len(manifest["splits"]["train"]["shards"]) > 2 and len(manifest["splits"]["val"]["shards"]) > 1
    train, val = split_stream(folder, "train"), split_stream(folder, "val")
    expected = direct_floors(train, val, enc.n_vocab, enc)
    got = fl.data_floors(folder)
    for name in ("unigram", "bigram"):
        assert got[name]["nats"] == pytest.approx(expected[name]["nats"], rel=1e-9)
        assert got[name]["bpb"] == pytest.approx(expected[name]["bpb"], rel=1e-9)
    assert got["bigram"]["nats"] < got["unigram"]["nats"]  # repeated text: pairs predict better
    assert got["val_targets"] == len(val) - 1 and got["train_tokens"] == len(train)
    # the manifest's byte count of the val split is the same count (the first token is a 0-byte separator)
    # and the text's own UTF-8 length
    val_docs = TEXTS[:manifest["splits"]["val"]["documents"]]
    assert got["val_bytes"] == expected["val_bytes"] == manifest["splits"]["val"]["bytes"] == \
        sum(len(d.encode()) for d in val_docs)
    assert manifest["splits"]["train"]["bytes"] == int(token_byte_lengths(enc)[np.array(train)].sum())


def test_floors_are_cached_until_the_data_changes(tmp_path, monkeypatch):
    folder = str(tmp_path / "data")
    prepare_shards(TEXTS, folder, "hand", first_tokens_split(100), shard_tokens=10_000, progress=False)
    first = fl.data_floors(folder)
    cached = json.loads(open(os.path.join(folder, fl.FLOORS_NAME)).read())
    assert cached["bigram"] == first["bigram"] and cached["formula"] == fl.FORMULA

    def no_counting(*args):
        raise AssertionError("counted again")
    monkeypatch.setattr(fl, "count_floors", no_counting)
    assert fl.data_floors(folder) == first  # read from floors.json
    monkeypatch.undo()
    # a re-prepare of other text: new shards and manifest, so the cache no longer applies
    prepare_shards(TEXTS[::-1], folder, "hand", first_tokens_split(100), shard_tokens=10_000, progress=False,
                   overwrite=True, settings={"order": "reversed"})
    again = fl.data_floors(folder)
    assert again["key"] != first["key"] and again["unigram"] != first["unigram"]


def test_a_folder_without_a_manifest_is_a_clear_error(tmp_path):
    write_shard(str(tmp_path / "llmc_val_000000.bin"), np.arange(10, dtype=np.uint16))  # llm.c-style: no manifest
    with pytest.raises(InputError, match="no prepare manifest"):
        fl.data_floors(str(tmp_path))
    assert fl.shards_floors([str(tmp_path / "llmc_val_000000.bin")]) is None  # eval: no floors, no error


def test_a_prepare_without_a_val_split_is_a_clear_error(tmp_path):
    folder = str(tmp_path / "noval")
    prepare_shards(TEXTS, folder, "hand", first_tokens_split(0), shard_tokens=10_000, progress=False)
    with pytest.raises(InputError, match="val split is empty or missing"):
        fl.data_floors(folder)
    with pytest.raises(InputError, match="val split holds 1 token"):
        fl.count_floors([1, 2, 3], [5], 10, np.ones(10, dtype=np.int64))
    with pytest.raises(InputError, match="outside the vocabulary"):
        fl.count_floors([1, 2, 30], [5, 6], 10, np.ones(10, dtype=np.int64))


def test_reference_lines_for_training_curve_plots():
    floors = {"unigram": {"nats": 6.5, "bpb": 2.9}, "bigram": {"nats": 5.1, "bpb": 2.3}}
    assert fl.reference_lines(floors) == [(2.9, "unigram floor (2.900 bits/byte)", ":"),
                                          (2.3, "bigram floor (2.300 bits/byte)", "--")]
    assert [v for v, _, _ in fl.reference_lines(floors, "nats")] == [6.5, 5.1]
    with pytest.raises(ValueError, match="unit"):
        fl.reference_lines(floors, "bits")
    assert fl.reference_lines(None) == []
