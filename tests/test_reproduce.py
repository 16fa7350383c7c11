"""reproduce.py: its smoke version runs every step for real (seeds.py and train.py for the three modes, eval_benchmarks.py
and analyze.py on the groups, the report) in about half a minute; the report says what the paired differences mean;
the BPE it fits is a deterministic tokenizer that the rest of nanoshift reads."""

import json
import os

import pytest

import reproduce
from conftest import pydoc_documents
from nanoshift.data import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_reproduction_runs_every_step_into_results(prose_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the steps are the command lines of the repository's scripts and configs
    out = tmp_path / "repro"
    reproduce.main(["--smoke", f"--data_dir={prose_shards}", f"--out={out}"])
    assert "prepare: " in capsys.readouterr().out  # the data_dir holds a finished prepare: nothing downloaded
    for mode in reproduce.MODES:  # real train.py runs through seeds.py: seed 1 of each mode, to max_iters
        rows = [json.loads(line) for line in (out / f"{mode}-s1" / "log.jsonl").read_text().splitlines()]
        assert rows[0]["config"]["seed"] == 1 and (rows[-1]["type"], rows[-1]["iter"], rows[-1]["reason"]) == (
            "end", 4, "max_iters")
    results = json.loads((out / "results.json").read_text())
    assert {label: g["seeds"] for label, g in results["eval"]["groups"].items()} == {m: [1] for m in reproduce.MODES}
    assert set(results["eval"]["differences"]["groups"]) == {"cut", "gate"}  # paired by the checkpoints' seeds
    assert set(results["analysis"]["groups"]) == set(reproduce.MODES) and "train gate (1 seed)" in results["seconds"]
    text = (out / "results.md").read_text()
    assert "the smoke version" in text and "- (no interval or test: a comparison needs 2 or more seeds)" in text
    assert "| benchmark | metric | baseline (n=1) | cut (n=1) | gate (n=1) |" in text
    assert "| number | baseline (n=1) | cut (n=1) | gate (n=1) |" in text and "(1 seed: no interval)" in text
    # bits per byte next to the loss, and the floors of the val split with the groups above the bigram one named
    assert "|  | bits per byte |" in text
    floors = results["eval"]["floors"]["demo"]
    assert floors["bigram"]["bpb"] < floors["unigram"]["bpb"]
    assert "- Floors of the val split (counted on its train split, floors.py): unigram floor: " in text
    assert "Mean bits per byte above the bigram floor (worse than counting token pairs): baseline, cut, gate." in text
    for name in ("topk", "cosine_projection", "lens", "shift_depth", "alphas", "shift_training", "target_match_by_step"):
        assert (out / "analysis" / f"{name}.png").stat().st_size > 0
    assert {f"train_{m}.log" for m in reproduce.MODES} | {"eval.log", "analyze.log"} <= set(os.listdir(out / "logs"))


def test_the_report_says_whether_a_difference_is_inside_the_noise():
    def diff(mean, lo, hi, p):
        return {"demo": {"loss": {"n": 5, "mean": mean, "ci95": [lo, hi], "p_value": p, "significant": p < 0.05}}}

    results = {"differences": {"baseline": "baseline", "groups": {"cut": diff(0.004, -0.006, 0.014, 0.31),
                                                                  "gate": diff(-0.021, -0.03, -0.012, 0.0004)}}}
    assert reproduce.verdict(results) == [
        "- cut − baseline, val loss: +0.0040 nats (95% CI [-0.0060, +0.0140], p = 0.310, 5 seeds): no significant "
        "difference from the baseline (the interval contains 0).",
        "- gate − baseline, val loss: -0.0210 nats (95% CI [-0.0300, -0.0120], p < 0.001, 5 seeds): lower than the "
        "baseline's (significant at 5%)."]


def test_the_report_states_the_floors_and_names_groups_above_the_bigram_floor():
    floors = {"unigram": {"nats": 6.48, "bpb": 2.93}, "bigram": {"nats": 5.08, "bpb": 2.30}}
    groups = {"baseline": {"metrics": {"demo": {"bpb": {"mean": 2.41}}}},
              "gate": {"metrics": {"demo": {"bpb": {"mean": 2.12}}}}}
    assert reproduce.floor_lines({"groups": groups, "floors": {"demo": floors}}) == [
        "- Floors of the val split (counted on its train split, floors.py): unigram floor: 6.480 nats/token, 2.930 "
        "bits/byte; bigram floor: 5.080 nats/token, 2.300 bits/byte. Mean bits per byte above the bigram floor "
        "(worse than counting token pairs): baseline."]
    assert reproduce.floor_lines({"groups": groups}) == []


def test_the_fitted_bpe_is_deterministic_and_reads_like_any_tokenizer(tmp_path):
    texts = []
    for i, doc in enumerate(pydoc_documents()[:30]):
        (tmp_path / f"{i}.txt").write_text(doc)
        texts.append(str(tmp_path / f"{i}.txt"))
    first = reproduce.fit_tokenizer(texts, str(tmp_path / "a"), 384)
    second = reproduce.fit_tokenizer(texts, str(tmp_path / "b"), 384)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    tok = get_tokenizer(first)
    assert tok.n_vocab == 384 and tok.bos_prefix == () and tok.doc_separator == tok.hf.convert_tokens_to_ids("<|endoftext|>")
    text = "The with statement, 3 × 4 and <|endoftext|> as plain text."
    assert tok.decode(tok.encode_ordinary(text)) == text and get_tokenizer(second).tokenizer_id == tok.tokenizer_id
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_bad_settings_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--steps=train,plot", f"--out={tmp_path}"])
    assert e.value.code == 2 and "unknown step(s) ['plot']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--smoke", f"--data_dir={tmp_path / 'nothing'}", f"--out={tmp_path}"])
    assert e.value.code == 2 and "--smoke prepares nothing" in capsys.readouterr().err
