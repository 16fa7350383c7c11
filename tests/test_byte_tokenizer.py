"""The byte-level tokenizer ('bytes': ids 0..255 the UTF-8 bytes, 256 the end of text): its interface, a prepare
whose shards decode back to the text, a tiny model that trains on them in a plain loop, the readers (lm.load_lm
from a checkpoint's record, eval_benchmarks, analyze) using it; and training on llm.c-style shards of a small
custom vocabulary (no manifest)."""
import json
import os

import numpy as np
import pytest
import torch

import analyze
import eval_benchmarks as eb
from conftest import DOCUMENTS, write_checkpoint
from model import GPT, GPTConfig
from nanoshift.data import (BYTES_NAME, ShardLoader, get_tokenizer, manifest_tokenizer, read_manifest, read_shard,
                            shards_tokenizer, write_shard)
from nanoshift.lm import load_lm
from nanoshift.prepare import first_tokens_split, prepare_shards

TEXTS = [d for d in DOCUMENTS if d and not d.isspace()]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def test_bytes_tokenizer_interface():
    enc = get_tokenizer("bytes")
    assert enc is get_tokenizer(BYTES_NAME)  # cached
    assert (enc.name, enc.tokenizer_id, enc.n_vocab, enc.eot_token, enc.doc_separator, tuple(enc.bos_prefix)) == \
        ("bytes", "bytes", 257, 256, 256, ())
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text
    assert enc.encode_ordinary("<|endoftext|>") == list(b"<|endoftext|>")  # special-token text stays text
    assert enc.decode([256, 104, 105, 256, 300]) == "hi"  # separators and ids beyond the bytes are not text
    assert enc.decode(list("é".encode())[:1]) == "\ufffd"  # a cut character shows as U+FFFD


def train_steps(pattern, vocab_size, steps=30, seed=0):
    """A plain training loop: ShardLoader batches into a tiny GPT; returns (model, first loss, last loss)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **TINY))
    loader = ShardLoader(pattern, batch_size=4, seq_len=32, seed=seed, vocab_size=vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        x, y = loader.next_batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), np.mean(losses[:3]), np.mean(losses[-3:])


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bytes_data"))
    prepare_shards(TEXTS * 3, folder, "txt", first_tokens_split(600), shard_tokens=1500, progress=False,
                   tokenizer="bytes")
    return folder


def test_prepare_with_bytes_decodes_back_to_the_text(byte_data):
    manifest = read_manifest(byte_data)
    assert manifest_tokenizer(manifest) == ("bytes", "bytes", 257) and manifest["token_bytes"] == 2
    stream = np.concatenate([read_shard(os.path.join(byte_data, name)) for split in ("val", "train")
                             for name in manifest["splits"][split]["shards"]])
    assert stream.max() <= 256 and (stream == 256).sum() == len(TEXTS) * 3  # one separator a document
    pieces = np.split(stream, np.flatnonzero(stream == 256))[1:]
    assert [bytes(p[1:].astype(np.uint8)).decode() for p in pieces] == TEXTS * 3
    assert manifest["splits"]["val"]["bytes"] + manifest["splits"]["train"]["bytes"] == \
        3 * sum(len(t.encode()) for t in TEXTS)
    assert shards_tokenizer([os.path.join(byte_data, "txt_val_000000.bin")]) == ("bytes", "bytes")


def test_a_tiny_model_trains_on_byte_shards_and_the_readers_use_its_tokenizer(byte_data, tmp_path):
    model, first, last = train_steps(os.path.join(byte_data, "txt_train_*.bin"), vocab_size=320)
    assert last < first - 1.0  # it learns (from ~ln 257 = 5.5 nats)
    # a checkpoint records its tokenizer as train.py does; the readers load 'bytes' by name
    run = write_checkpoint(model, tmp_path / "bytes-run",
                           tokenizer={"name": "bytes", "id": "bytes", "vocab_size": 257})
    lm = load_lm(ckpt=run)
    assert lm.tokenizer_id == "bytes" and lm.encode("hé") == [104, 195, 169] and lm.doc_separator == [256]
    out = tmp_path / "eval"
    eb.run(dict(eb.DEFAULTS, ckpt=[run], benchmarks=["demo"], demo_shards=[os.path.join(byte_data, "txt_val_*.bin")],
                context=32, misalignment_windows=2, progress=False, out_dir=str(out)))
    metrics = json.loads((out / "results.json").read_text())["models"]["bytes-run"]["demo"]
    # one byte a token: bits per byte is the loss of the byte targets in bits
    assert metrics["bytes"] == metrics["tokens"] - np.count_nonzero(
        read_shard(os.path.join(byte_data, "txt_val_000000.bin"))[1:metrics["tokens"] + 1] == 256)
    assert 0 < metrics["bpb"] < 8
    analyze.main(["--ckpt", run, "--shards", os.path.join(byte_data, "txt_val_*.bin"), "--num_sequences=2",
                  "--seq_len=16", "--plots", "topk", "--progress=False", f"--out_dir={tmp_path / 'analysis'}"])
    assert os.path.isfile(tmp_path / "analysis" / "metrics.json")


def test_training_on_llmc_shards_of_a_small_custom_vocabulary(tmp_path):
    # llm.c-style shards (no manifest) of a 50-id vocabulary: a repeating pattern a model can learn
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 50, size=40)
    write_shard(str(tmp_path / "custom_train_000000.bin"), np.tile(pattern, 200).astype(np.uint16))
    assert read_manifest(str(tmp_path)) is None
    model, first, last = train_steps(str(tmp_path / "custom_train_*.bin"), vocab_size=64)
    assert last < first - 1.0
    with pytest.raises(Exception, match="is >= vocab_size=32"):  # the loader checks every batch
        ShardLoader(str(tmp_path / "custom_train_*.bin"), batch_size=4, seq_len=32, vocab_size=32).next_batch()


def test_a_byte_model_decodes_its_generated_ids_as_text():
    from nanoshift.lm import OurGPT

    lm = OurGPT(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=320)), "bytes-model")
    lm.text_tokenizer = get_tokenizer("bytes")
    assert lm.decode_text(list("café".encode()) + [256, 300]) == "café"  # end of text and padding ids dropped
