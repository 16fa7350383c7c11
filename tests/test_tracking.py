"""The shift during training (#14): the misalignment score's definition and depth invariance, and the
alignment metrics train.py logs at every eval: the same numbers as analyze.py on that checkpoint, with
1 and 2 ranks, and after a resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import analyze
from conftest import TORCHRUN
from nanoshift.lens import misalignment_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=3", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--total_batch_tokens=128", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=0",
        "--eval_tokens=512", "--log_interval=1", "--seed=7", "--track_sequences=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out, data, *args, launcher=None):
    cmd = (launcher or [sys.executable]) + ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [row for row in map(json.loads, open(os.path.join(out, "log.jsonl"))) if row["type"] == "eval"]


def test_misalignment_score_is_the_mean_normalised_first_win_depth():
    hist, never, layers = [3, 0, 5, 2], 4, 3  # first-win layers 0..3 of a 3-block model, 4 tokens never
    tokens = [0] * 3 + [2] * 5 + [3] * 2  # the same, token by token
    expected = (sum(t / layers for t in tokens) + never * 1.0) / (len(tokens) + never)
    assert misalignment_score(hist, never, layers) == pytest.approx(expected, abs=1e-15)
    assert misalignment_score([0, 0, 0], 0, 2) is None  # no position to measure
    assert misalignment_score([7, 0, 0], 0, 2) == 0.0 and misalignment_score([0, 0, 0], 7, 2) == 1.0


def test_misalignment_score_does_not_depend_on_depth_for_stretched_copies():
    shallow = [4, 1, 6, 2, 0, 3, 5]  # first-win histogram of a 6-block model (layers 0..6)
    for factor in (2, 3, 5):
        stretched = [0] * (6 * factor + 1)  # each layer's behaviour spread over `factor` layers
        for layer, count in enumerate(shallow):
            stretched[layer * factor] = count
        assert misalignment_score(stretched, 7, 6 * factor) == pytest.approx(misalignment_score(shallow, 7, 6),
                                                                            abs=1e-15)


@pytest.fixture(scope="module")
def tracked_run(prose_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tracked"))
    evals = train(out, prose_shards, "--max_iters=4", "--eval_interval=4")
    return out, evals


@pytest.mark.parametrize("space", ["raw", "normed"])
def test_logged_metrics_equal_analyze_on_the_checkpoint_exactly(tracked_run, prose_shards, tmp_path, space):
    out, evals = tracked_run
    logged = evals[-1]
    assert logged["iter"] == 4 and logged["alignment"]["windows"] == 3 and logged["alignment"]["tokens"] == 3 * 32
    analyze.main(["--ckpt", out, "--shards", f"{prose_shards}/*_val_*.bin", "--windows=first", "--num_sequences=3",
                  "--seq_len=32", "--batch_size=1", f"--space={space}", "--threads=1", "--progress=False",
                  f"--out_dir={tmp_path / 'a'}", "--plots", "topk"])
    (result,) = json.load(open(tmp_path / "a" / "metrics.json"))["models"]
    tracked = logged["alignment"][space]
    for name in ("topk_input", "topk_target", "cos_input", "cos_target", "projection"):
        assert tracked[name] == [row[name] for row in result["layers"]], name  # exactly: same code, same numbers
    for name in ("topk_crossing", "cosine_crossing", "projection_half", "first_win_median", "never_fraction"):
        assert tracked[name] == result["shift_depth"][name], name
    assert logged["misalignment"] == logged["alignment"]["misalignment"] == result["misalignment"]
    assert 0 <= result["misalignment"] <= 1


def test_logged_metrics_do_not_depend_on_the_number_of_ranks(tracked_run, prose_shards, tmp_path):
    _, single = tracked_run
    two = train(str(tmp_path / "ddp"), prose_shards, "--max_iters=4", "--eval_interval=4", "--batch_size=2",
                launcher=TORCHRUN)  # 3 windows over 2 ranks: rank 0 measures 2, rank 1 one
    assert two[0]["iter"] == single[0]["iter"] == 0  # the same initial weights: the numbers must be identical
    assert two[0]["alignment"] == single[0]["alignment"]
    # after training the weights differ in the last bits (gradients all-reduced in another order)
    assert two[-1]["misalignment"] == pytest.approx(single[-1]["misalignment"], abs=0.05)


def test_logged_metrics_after_a_resume_equal_an_uninterrupted_run(prose_shards, tmp_path):
    full = train(str(tmp_path / "full"), prose_shards, "--max_iters=6", "--eval_interval=2")
    stopped = str(tmp_path / "stopped")
    train(stopped, prose_shards, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=6")
    resumed = train(stopped, prose_shards, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    assert [r["iter"] for r in resumed] == [r["iter"] for r in full] == [0, 2, 4, 6]
    assert [r["alignment"] for r in resumed] == [r["alignment"] for r in full]


def test_tracking_can_be_switched_off_and_too_many_windows_is_a_setting_error(prose_shards, tmp_path):
    evals = train(str(tmp_path / "off"), prose_shards, "--max_iters=1", "--track_alignment=False")
    assert "alignment" not in evals[0] and "misalignment" not in evals[0]
    result = subprocess.run([sys.executable, "train.py", f"--data_dir={prose_shards}", f"--out_dir={tmp_path / 'x'}",
                             *TINY, "--track_sequences=100000"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2 and "config error: track_sequences=100000" in result.stderr
    assert not os.path.exists(tmp_path / "x")
    shutil.rmtree(tmp_path / "off")
