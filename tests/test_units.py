"""Bits per byte: the per-token byte table equals a hand count (encode, decode each token, count its bytes) for
every tokenizer; bits_per_byte is the one formula; eval_benchmarks' bits per byte of a tiny model equals a hand
computation from its tokens and bytes, WikiText's byte count is the text's own, and the table labels a model
above the bigram floor."""
import json
import math
import os

import numpy as np
import pytest
import torch

import eval_benchmarks as eb
from conftest import DOCUMENTS, save_tiny_tokenizer, tiny_gpt, write_checkpoint
from nanoshift.data import EOT_TOKEN, get_tokenizer, token_byte_lengths
from nanoshift.floors import bits_per_byte, floor_label, nats_and_bytes
from nanoshift.lm import OurGPT
from nanoshift.prepare import first_tokens_split, prepare_shards

TEXTS = [d for d in DOCUMENTS if d and not d.isspace()]


def hand_bytes(enc, ids):
    """Bytes of each token counted by decoding it alone (tiktoken: its exact bytes; others: through decode)."""
    if hasattr(enc, "decode_single_token_bytes"):
        return [0 if i == EOT_TOKEN else len(enc.decode_single_token_bytes(i)) for i in ids]
    return [len(enc.decode([i]).encode("utf-8")) for i in ids]


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_byte_table_equals_a_hand_count_and_the_text_length(name):
    enc = get_tokenizer(name)
    table = token_byte_lengths(enc)
    assert table.shape == (enc.n_vocab,) and table[enc.doc_separator] == 0
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        if name == "gpt2":
            assert [int(table[i]) for i in ids] == hand_bytes(enc, ids)
        assert int(table[ids].sum()) == len(text.encode("utf-8"))


def test_byte_table_of_an_hf_byte_level_bpe_counts_the_text(tmp_path):
    enc = get_tokenizer(save_tiny_tokenizer(tmp_path / "bpe"))
    table = token_byte_lengths(enc)
    assert table[enc.doc_separator] == 0 and table[enc.eot_token] == 0  # <s>, </s>: special, 0 bytes
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text[:30]
    # a token that is a whole ASCII word decodes alone to its own bytes
    word = enc.encode_ordinary(" the")
    assert len(word) == 1 and table[word[0]] == 4 == len(enc.decode(word).encode())


def test_byte_table_is_cached_and_read_only():
    first, again = token_byte_lengths("gpt2"), token_byte_lengths(get_tokenizer())
    assert first is again
    with pytest.raises(ValueError):
        first[0] = 7


def test_bits_per_byte_is_nats_over_ln2_bytes():
    assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)
    assert bits_per_byte(3.0, 4) == pytest.approx(3.0 / (math.log(2) * 4))
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)
    # targets of 0 bytes (the separator) count in neither sum
    table = token_byte_lengths("gpt2")
    nats, nbytes = nats_and_bytes([1.0, 5.0, 2.0], [464, EOT_TOKEN, 3290], table)
    assert (nats, nbytes) == (3.0, int(table[464] + table[3290]))


def test_eval_bits_per_byte_equals_a_hand_computation_from_tokens_and_bytes():
    enc = get_tokenizer()
    text = TEXTS[0]
    seq = np.array([EOT_TOKEN] + enc.encode_ordinary(text), dtype=np.int64)[:32]  # one window of block 32
    lm = OurGPT(tiny_gpt(seed=3), "tiny")
    with torch.no_grad():
        logp = torch.log_softmax(lm.logits(torch.from_numpy(seq[:-1])[None])[0].double(), -1)
    nll = -logp[torch.arange(len(seq) - 1), torch.from_numpy(seq[1:])].numpy()
    per_token = hand_bytes(enc, seq[1:].tolist())
    kept = np.array(per_token) > 0
    expected = nll[kept].sum() / (math.log(2) * sum(per_token))
    got = eb.evaluate(lm, seq, context=32, stride=32, byte_lengths=token_byte_lengths(enc))
    assert got["bytes"] == sum(per_token) == len(enc.decode(seq[1:].tolist()).encode())
    assert got["bpb"] == pytest.approx(expected, rel=1e-5)
    assert "bpb" not in eb.evaluate(lm, seq, context=32, stride=32)  # only with a byte table
    # the split-half numbers: the first and the second half of the 31 targets (15 and 16), each on its own
    per_token, nll = np.array(per_token), np.asarray(nll)
    halves = [nll[a:b][per_token[a:b] > 0].sum() / (math.log(2) * per_token[a:b].sum()) for a, b in ((0, 15), (15, 31))]
    assert got["bpb_halves"] == pytest.approx(halves, rel=1e-5)
    both = (halves[0] * per_token[:15].sum() + halves[1] * per_token[15:].sum()) / per_token.sum()
    assert both == pytest.approx(expected, rel=1e-9)  # the halves partition the targets


def test_wikitext_byte_count_is_the_text_bytes(tmp_path):
    raw = tmp_path / "wiki.txt"
    raw.write_text(" = Café = \n\n The naïve café opened in 1905 ; 日本語 too .\n = Second = \n It closed .\n",
                   encoding="utf-8")
    run = write_checkpoint(tiny_gpt(), tmp_path / "run")
    results = eb.run(dict(eb.DEFAULTS, ckpt=[run], benchmarks=["wikitext2"], wikitext2_files=[str(raw)], context=32,
                          misalignment_windows=0, progress=False, out_dir=str(tmp_path / "eval")))
    metrics = results["models"]["run"]["wikitext2"]
    assert metrics["bytes"] == metrics["text_bytes"] == len(raw.read_text(encoding="utf-8").replace(
        "\n\n", "\n").encode())  # the articles keep every non-blank line and its newline
    assert metrics["bpb"] == pytest.approx(metrics["loss"] * metrics["tokens"] / (math.log(2) * metrics["bytes"]),
                                           rel=0.2)  # 2 separators of ~60 targets are left out of the nats
    assert "| WikiText-2 | loss |" in (tmp_path / "eval" / "results.md").read_text()
    assert "|  | bits per byte |" in (tmp_path / "eval" / "results.md").read_text()


def test_table_labels_a_model_above_the_bigram_floor_and_shows_the_floor_rows():
    floors = {"unigram": {"nats": 6.5, "bpb": 2.9}, "bigram": {"nats": 5.1, "bpb": 2.3}}
    good = {"loss": 4.0, "ppl": math.exp(4.0), "acc": 30.0, "bpb": 2.1, "bytes": 900, "tokens": 300,
            "floor_label": floor_label(2.1, floors)}
    bad = dict(good, bpb=2.5, floor_label=floor_label(2.5, floors))
    table = eb.format_table({"good": {"demo": good}, "bad": {"demo": bad}}, {"demo": floors})
    lines = table.splitlines()
    assert "| Demo (Shakespeare val) | loss | 4.0000 | 4.0000 |" in lines
    assert "|  | bits per byte | 2.1000 | 2.5000 (above bigram floor) |" in lines
    assert "|  | bytes scored | 900 | 900 |" in lines
    assert "|  | unigram floor of the val split (nats / bits per byte) | 6.5000 / 2.9000 | 6.5000 / 2.9000 |" in lines
    assert "|  | bigram floor of the val split (nats / bits per byte) | 5.1000 / 2.3000 | 5.1000 / 2.3000 |" in lines
    assert floor_label(3.0, floors) == "above bigram floor and unigram floor"
    assert floor_label(2.3, floors) == "" and floor_label(None, floors) == "" and floor_label(2.5, None) == ""


def test_eval_on_prepared_shards_writes_floors_and_labels_an_untrained_model(tmp_path):
    data = tmp_path / "data"
    prepare_shards(TEXTS * 3, str(data), "mine", first_tokens_split(200), shard_tokens=400, progress=False)
    run = write_checkpoint(tiny_gpt(), tmp_path / "run")
    out = tmp_path / "eval"
    eb.run(dict(eb.DEFAULTS, ckpt=[run], benchmarks=["demo"], demo_shards=[str(data / "mine_val_*.bin")], context=32,
                misalignment_windows=0, progress=False, out_dir=str(out)))
    results = json.loads((out / "results.json").read_text())
    floors = results["floors"]["demo"]
    metrics = results["models"]["run"]["demo"]
    assert floors["bigram"]["bpb"] < floors["unigram"]["bpb"]
    assert metrics["bpb"] > floors["unigram"]["bpb"]  # random weights: worse than counting
    assert metrics["floor_label"] == "above bigram floor and unigram floor"
    table = (out / "results.md").read_text()
    assert "(above bigram floor and unigram floor)" in table and "bigram floor of the val split" in table
    assert os.path.isfile(data / "floors.json")


def save_sentencepiece_style_tokenizer(folder):
    """A Llama-2-like HF tokenizer: '\u2581' for spaces and a dummy one before the text, <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import pydoc_documents
    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    first = Tokenizer(models.BPE(unk_token="<unk>"))
    first.normalizer = normalizer
    first.train_from_iterator(pydoc_documents(), trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                                      special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(first.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # the byte-fallback pieces are ordinary vocabulary entries, as in Llama-2
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(folder))
    return str(folder)


def test_byte_table_of_a_sentencepiece_style_tokenizer_counts_its_dummy_space(tmp_path):
    enc = get_tokenizer(save_sentencepiece_style_tokenizer(tmp_path / "sp"))
    table = token_byte_lengths(enc)
    assert table[enc.hf.convert_tokens_to_ids("<0x0A>")] == 1 and table[enc.doc_separator] == 0
    for text in TEXTS:  # every byte of the text, plus the one dummy space before its first word
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text and int(table[ids].sum()) == len(text.encode("utf-8")) + 1
