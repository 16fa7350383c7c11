"""bench.py --section=recipe at a tiny scale: the reference row trains as configured, every other candidate for
the same training time (measured by a probe run), each row's numbers come from its train.py log and the floors
of its data; bad budgets and unknown data are refused. The recipe configs themselves resolve and name a vocabulary
their data has.

    python -m pytest -q -n 0 tests/test_recipe.py
"""

import math
import os

import pytest

import bench
from conftest import pydoc_documents
from nanoshift.common import SettingError
from nanoshift.floors import data_floors
from nanoshift.prepare import first_tokens_split, prepare_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--total_batch_tokens=32",
        "--warmup_iters=1", "--eval_interval=6", "--threads=1"]


@pytest.fixture(scope="module")
def byte_prose(tmp_path_factory):
    """Python's language reference as byte tokens: a finished prepare with a ~20k-byte val split."""
    out = str(tmp_path_factory.mktemp("recipe_bytes"))
    prepare_shards(pydoc_documents(), out, "pydoc", first_tokens_split(20000), shard_tokens=200_000, progress=False,
                   tokenizer="bytes")
    return out


def test_two_candidates_side_by_side_at_the_reference_time(byte_prose, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    candidates = {
        "reference": ["config/recipe_nanogpt.py", f"--data_dir={byte_prose}", *TINY, "--max_iters=12",
                      "--lr_decay_iters=12"],
        "candidate": ["config/recipe_bytes.py", f"--data_dir={byte_prose}", *TINY],
    }
    rows = bench.bench_recipe(seconds=0, candidates=candidates, reference="reference", eval_bytes=4096, probe_steps=3)
    out = capsys.readouterr().out
    reference, candidate = rows
    assert (reference["label"], candidate["label"]) == ("reference", "candidate")
    assert reference["steps"] == 12 and reference["tokens"] == 12 * 32  # trained as configured
    assert candidate["steps"] >= 2 and candidate["tokens"] == candidate["steps"] * 32
    floors = data_floors(byte_prose)
    for row in rows:
        assert row["tokenizer"] == "bytes" and row["threads"] == 1 and row["eval_tokens"] >= 4096
        assert 0 < row["train_s"] < row["wall_s"] and math.isfinite(row["val_bpb"])
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2), rel=0.05)  # bytes: nats/token ~ nats/byte
        assert row["below_bigram"] == pytest.approx(floors["bigram"]["bpb"] - row["val_bpb"])
    # the table: one line per candidate, then the floors of the data they read as reference rows
    assert "| reference | bytes |" in out and "| candidate | bytes |" in out
    assert f"bigram floor of {byte_prose} (counted on its train split) | bytes |" in out
    assert f"{floors['bigram']['bpb']:.4f} | +0.000 |" in out
    assert "after equal training time (the reference's training time each" in out


def test_bad_budgets_and_unknown_data_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SettingError, match="no reference row is among the candidates"):
        bench.bench_recipe(seconds=0, candidates={"a": ["config/recipe_bytes.py"]}, reference="reference")
    with pytest.raises(SettingError, match="need seconds >= 0"):
        bench.bench_recipe(seconds=-1)
    with pytest.raises(SettingError, match="holds no finished prepare, and bench.py does not know how to make it"):
        bench.bench_recipe(seconds=1, candidates={"a": ["config/recipe_bytes.py", f"--data_dir={tmp_path}"]})


def test_the_recipe_configs_resolve_to_their_data_and_vocabulary(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs exec config/recipe_bytes.py by its path from the root
    settings = {label: bench._recipe_settings(args) for label, args in bench.RECIPE_CANDIDATES.items()}
    vocab = {"data/demo_bytes": ("bytes", 257), "data/repro": ("data/repro-tokenizer", 4096), "data/demo": ("gpt2", 50304)}
    for label, c in settings.items():
        assert (c["tokenizer"], c["vocab_size"]) == vocab[c["data_dir"]], label
        assert c["data_dir"] in bench.RECIPE_PREPARE and c["device"] == "cpu"
    ref = settings[bench.RECIPE_REFERENCE]  # nanoGPT's README laptop command, as documented
    assert (ref["n_layer"], ref["n_head"], ref["n_embd"], ref["block_size"], ref["batch_size"], ref["max_iters"]) == (
        4, 4, 128, 64, 12, 2000)
    assert (ref["learning_rate"], ref["min_lr"], ref["warmup_iters"], ref["lr_decay_iters"], ref["beta2"],
            ref["dropout"], ref["total_batch_tokens"]) == (1e-3, 1e-4, 100, 2000, 0.99, 0.0, 768)
    assert {c["threads"] for c in settings.values()} == {1, 2}  # one thread against two
