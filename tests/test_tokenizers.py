"""Tokenizers other than GPT-2 (tiny HF tokenizers built offline), the version-2 shard format for
vocabularies above 65,536, byte-identical version-1 shards, and train.py refusing data of another
tokenizer than the model's."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DOCUMENTS, pydoc_documents, save_tiny_tokenizer
from nanoshift.data import (EOT_TOKEN, HEADER_INTS, SHARD_MAGIC, ShardError, ShardLoader, get_tokenizer, read_manifest,
                  read_shard, shard_info, validate_shard, write_shard)
from nanoshift.prepare import first_tokens_split, prepare_shards

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WIDE_WORDS = [f"w{i}" for i in range(70_000)]  # 70,003 ids with the specials: above 65,536


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("wide"), words=WIDE_WORDS)


def expected_stream(enc, documents):
    ids = []
    for doc in documents:
        if doc and not doc.isspace():
            ids += [enc.doc_separator] + enc.encode_ordinary(doc)
    return ids


def shard_tokens(folder, split):
    manifest = read_manifest(folder)
    return np.concatenate([read_shard(os.path.join(folder, name)) for name in manifest["splits"][split]["shards"]])


def test_gpt2_is_the_default_and_has_the_interface():
    enc = get_tokenizer()
    assert get_tokenizer("gpt2") is enc
    assert (enc.name, enc.tokenizer_id, enc.n_vocab, enc.eot_token) == ("gpt2", "gpt2", 50257, EOT_TOKEN)
    assert enc.doc_separator == EOT_TOKEN and list(enc.bos_prefix) == []
    assert enc.encode_ordinary("Hello world <|endoftext|>")[:2] == [15496, 995]
    assert EOT_TOKEN not in enc.encode_ordinary("<|endoftext|>")  # special-token text stays text


def test_hf_tokenizer_interface(bpe_dir, tmp_path):
    enc = get_tokenizer(bpe_dir)
    bos, eos = enc.hf.bos_token_id, enc.hf.eos_token_id
    assert (enc.name, enc.n_vocab, enc.eot_token, enc.doc_separator) == (bpe_dir, 400, eos, bos)
    assert list(enc.bos_prefix) == [bos] and bos != eos
    text = "The for statement iterates over the elements of a sequence.\n"
    ids = enc.encode_ordinary(text)
    assert bos not in ids and enc.decode(ids) == text and len(ids) < len(text) / 2  # merges learned
    assert eos not in enc.encode_ordinary("a </s> b") and enc.decode(enc.encode_ordinary("a </s> b")) == "a </s> b"
    # the identity: a copy elsewhere is the same tokenizer; another vocabulary is another one
    copy = shutil.copytree(bpe_dir, tmp_path / "copy")
    assert get_tokenizer(str(copy)).tokenizer_id == enc.tokenizer_id and enc.tokenizer_id.startswith("hf-sha256:")
    other = get_tokenizer(save_tiny_tokenizer(tmp_path / "other", vocab_size=300))
    assert other.tokenizer_id != enc.tokenizer_id
    # no BOS: documents are separated by the EOS
    no_bos = get_tokenizer(save_tiny_tokenizer(tmp_path / "no_bos", bos=False))
    assert no_bos.doc_separator == no_bos.hf.eos_token_id is not None and list(no_bos.bos_prefix) == []


def test_missing_hf_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="could not load the tokenizer") as info:
        get_tokenizer(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)


def test_prepare_with_an_hf_tokenizer_reads_back_token_for_token(bpe_dir, tmp_path):
    enc = get_tokenizer(bpe_dir)
    documents = pydoc_documents()[:12] + DOCUMENTS
    one = prepare_shards(documents, str(tmp_path / "one"), "toy", first_tokens_split(500), shard_tokens=3000,
                         progress=False, tokenizer=bpe_dir)
    expected = expected_stream(enc, documents)
    got = np.concatenate([shard_tokens(tmp_path / "one", "val"), shard_tokens(tmp_path / "one", "train")])
    assert got.dtype == np.uint16 and got.tolist() == expected
    assert (one["tokenizer"], one["tokenizer_id"], one["vocab_size"], one["token_bytes"]) == (
        bpe_dir, enc.tokenizer_id, 400, 2)
    assert one["settings"]["tokenizer"] == bpe_dir
    first = os.path.join(tmp_path / "one", one["splits"]["train"]["shards"][0])
    assert shard_info(first) == (3000, 2)
    assert list(np.fromfile(first, dtype="<i4", count=3)) == [SHARD_MAGIC, 1, 3000]  # llm.c's version 1
    # forked pool workers give the same bytes as one process
    prepare_shards(documents, str(tmp_path / "two"), "toy", first_tokens_split(500), shard_tokens=3000,
                   progress=False, tokenizer=bpe_dir, num_proc=2, chunk_chars=2000)
    for name in sorted(os.listdir(tmp_path / "one")):
        if name.endswith(".bin"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_vocabulary_above_65536_gives_uint32_shards_read_token_for_token(wide_dir, tmp_path):
    enc = get_tokenizer(wide_dir)
    assert enc.n_vocab == 70_003
    rng = np.random.default_rng(0)
    documents = [" ".join(WIDE_WORDS[i] for i in rng.integers(0, 70_000, size=n)) for n in (300, 50, 700, 1)]
    documents[0] += " w69999 w65535 w65533 w0"  # ids 70002, 65538, 65536, 3
    manifest = prepare_shards(documents, str(tmp_path / "wide"), "wide", first_tokens_split(0), shard_tokens=400,
                              progress=False, tokenizer=wide_dir)
    assert manifest["token_bytes"] == 4 and manifest["vocab_size"] == 70_003
    got = shard_tokens(tmp_path / "wide", "train")
    expected = expected_stream(enc, documents)
    assert got.dtype == np.uint32 and got.tolist() == expected
    assert max(expected) == 70_002 and {65_536, 65_538} <= set(expected)
    path = os.path.join(tmp_path / "wide", manifest["splits"]["train"]["shards"][0])
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert list(header[:4]) == [SHARD_MAGIC, 2, 400, 4] and not header[4:].any()
    assert os.path.getsize(path) == 4 * HEADER_INTS + 4 * 400
    assert validate_shard(path, vocab_size=70_003) == 400
    with pytest.raises(ShardError, match=r"is >= vocab size 65536"):
        validate_shard(path, vocab_size=65_536)
    loader = ShardLoader(os.path.join(tmp_path / "wide", "*_train_*.bin"), 2, 16, shuffle=False)
    x, y = loader.next_batch()
    assert x.flatten().tolist() == expected[:32] and y.flatten().tolist() == expected[1:33]


def test_version_1_shards_stay_byte_identical_and_version_2_is_checked(tmp_path):
    tokens = np.array([EOT_TOKEN, 15496, 995, 0, 65535], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, 5)
    assert (tmp_path / "a.bin").read_bytes() == header.tobytes() + tokens.astype("<u2").tobytes()
    with pytest.raises(ValueError, match="do not fit in 16-bit"):
        write_shard(tmp_path / "b.bin", [65536])
    write_shard(tmp_path / "c.bin", [65536, 7], token_bytes=4)
    assert read_shard(tmp_path / "c.bin").tolist() == [65536, 7]
    raw = bytearray((tmp_path / "c.bin").read_bytes())
    raw[12:16] = np.int32(3).tobytes()  # 3 bytes per token
    (tmp_path / "c.bin").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="3 bytes per token"):
        read_shard(tmp_path / "c.bin")


def test_prepare_script_takes_the_tokenizer_setting(bpe_dir, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, doc in enumerate(DOCUMENTS):
        (texts / f"{i}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "prepare_fineweb.py", f"--data_files={texts}/*.txt", f"--out_dir={out}", "--val_tokens=0",
           "--num_proc=1", "--no_progress", f"--tokenizer={bpe_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(out / "_done.json") as f:
        manifest = json.load(f)
    assert manifest["tokenizer"] == bpe_dir and manifest["vocab_size"] == 400
    bad = subprocess.run(cmd[:-1] + [f"--tokenizer={tmp_path}/no_such_tokenizer", f"--out_dir={tmp_path}/never"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tokenizer=" in bad.stderr and "no_such_tokenizer" in bad.stderr
    assert not (tmp_path / "never").exists()


def test_train_refuses_shards_of_another_tokenizer(bpe_dir, tmp_path):
    data = str(tmp_path / "data")
    prepare_shards(pydoc_documents()[:20], data, "toy", first_tokens_split(2000), shard_tokens=20_000,
                   progress=False, tokenizer=bpe_dir)
    cmd = [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--device=cpu",
           "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
           "--total_batch_tokens=32", "--warmup_iters=0", "--max_iters=1", "--eval_tokens=32"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "tokenizer mismatch" in result.stderr and bpe_dir in result.stderr and "'gpt2'" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "out", "ckpt.pt"))
    # the model's own tokenizer: trains, and the checkpoint records it
    ok = subprocess.run(cmd + [f"--tokenizer={bpe_dir}", "--vocab_size=400"], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    import torch
    ckpt = torch.load(os.path.join(tmp_path, "out", "ckpt.pt"), weights_only=True)
    assert ckpt["tokenizer"] == {"name": bpe_dir, "id": get_tokenizer(bpe_dir).tokenizer_id, "vocab_size": 400}
    assert os.path.isfile(os.path.join(tmp_path, "out", "tokenizer", "tokenizer.json"))
    # a model whose vocabulary cannot hold the tokenizer's ids
    small = subprocess.run(cmd + [f"--tokenizer={bpe_dir}", "--vocab_size=300", f"--out_dir={tmp_path}/small"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert small.returncode == 2 and "vocab_size is 300" in small.stderr


def test_a_hub_name_that_cannot_be_loaded_is_a_setting_error(prose_shards, tmp_path):
    cmd = [sys.executable, "train.py", f"--data_dir={prose_shards}", f"--out_dir={tmp_path}/never", "--device=cpu",
           "--init_from=no-such-org/no-such-model", "--block_size=16", "--batch_size=2", "--total_batch_tokens=32",
           "--warmup_iters=0", "--max_iters=1"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "init_from='no-such-org/no-such-model'" in result.stderr, result.stderr
    assert not (tmp_path / "never").exists()
