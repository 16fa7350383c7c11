"""train.py end to end on CPU, as subprocesses on real text shards.

Loss goes down; torchrun with 2 ranks == one process with the same global batch; gradient
accumulation == one big batch; stop + resume == uninterrupted (dropout on); SIGTERM writes a
checkpoint that resumes; a NaN loss stops the run and keeps the last good checkpoint; bad settings
fail before any work; the gate's alphas are logged and move.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoshift.checkpoint import load_checkpoint
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 layers, 32 wide, 32 tokens: a step takes milliseconds. Each optimizer step reads 256 tokens.
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--total_batch_tokens=256", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=3",
        "--eval_interval=1000", "--eval_tokens=1024", "--log_interval=1", "--dropout=0.0", "--seed=7",
        "--track_alignment=False"]  # alignment tracking has its own tests (test_tracking.py)

# one thread per run: tiny matmuls gain little from a second one, and on a busy 2-core machine two
# threads per process spin against each other (2-3x slower); torchrun sets the same for its ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def text_data(prose_shards):
    return prose_shards


def train(out_dir, data, *args, launcher=(), expect=0):
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += ["train.py", f"--data_dir={data}", f"--out_dir={out_dir}", *TINY, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def log_rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


def losses(out_dir):
    return [row["loss"] for row in log_rows(out_dir, "train")]


def load(out_dir):
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))  # weights-only, as every reader loads it


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def reference(text_data, tmp_path_factory):
    """One process, 8 sequences per step, 20 steps: what the DDP and accumulation runs must reproduce."""
    out = str(tmp_path_factory.mktemp("reference"))
    train(out, text_data, "--max_iters=20", "--eval_interval=20")
    return out


def test_loss_goes_down_on_real_text(reference):
    evals = log_rows(reference, "eval")
    assert [row["iter"] for row in evals] == [0, 20]
    assert evals[0]["val_loss"] > 10.5  # ln(50304) ~ 10.8: untrained
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0
    train_losses = losses(reference)
    assert len(train_losses) == 20
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 3.0
    ckpt = load(reference)
    assert ckpt["iter_num"] == 20 and ckpt["model_args"]["n_layer"] == 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model = GPT.from_checkpoint(os.path.join(reference, "ckpt.pt"))  # what analyze.py / eval_benchmarks.py load
    assert all(torch.equal(value, ckpt["model"][name]) for name, value in model.state_dict().items())


def test_torchrun_two_ranks_match_one_process(reference, text_data, tmp_path):
    # 2 ranks x 4 sequences vs 1 process x 8: the same 256 tokens per step. If the ranks read the same
    # rows (or not the rows the single process reads) the mean loss would differ from the first step on.
    out = str(tmp_path / "ddp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train(out, text_data, "--max_iters=20", "--eval_interval=20", "--batch_size=4", launcher=launcher)
    run = log_rows(out, "run")[0]
    assert run["world_size"] == 2 and run["grad_accum_steps"] == 1
    torch.testing.assert_close(losses(out), losses(reference), rtol=1e-4, atol=0)
    torch.testing.assert_close(log_rows(out, "eval")[-1]["val_loss"], log_rows(reference, "eval")[-1]["val_loss"],
                               rtol=1e-4, atol=0)
    for name, value in load(reference)["model"].items():
        torch.testing.assert_close(load(out)["model"][name], value, rtol=1e-3, atol=2e-4)


def test_gradient_accumulation_matches_one_big_batch(reference, text_data, tmp_path):
    out = str(tmp_path / "accum")
    train(out, text_data, "--max_iters=20", "--eval_interval=20", "--batch_size=2")  # 4 micro-steps of 2
    assert log_rows(out, "run")[0]["grad_accum_steps"] == 4
    torch.testing.assert_close(losses(out), losses(reference), rtol=1e-4, atol=0)
    for name, value in load(reference)["model"].items():
        torch.testing.assert_close(load(out)["model"][name], value, rtol=1e-3, atol=2e-4)


RESUME = ["--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]  # dropout: the RNG state must resume too


@pytest.fixture(scope="module")
def stopped_at_4(text_data, tmp_path_factory):
    """The first half of an 8-step schedule: stopped after 4 steps, ckpt.pt at iter 4."""
    out = str(tmp_path_factory.mktemp("stopped_at_4"))
    train(out, text_data, *RESUME, "--max_iters=4")
    return out


def test_resume_is_exact(stopped_at_4, text_data, tmp_path):
    full = str(tmp_path / "full")
    train(full, text_data, *RESUME, "--max_iters=8")
    resumed = str(tmp_path / "resumed")
    shutil.copytree(stopped_at_4, resumed)
    train(resumed, text_data, *RESUME, "--max_iters=8", "--init_from=resume")

    assert [row["iter"] for row in log_rows(resumed, "train")] == list(range(8))  # appended, no duplicates
    assert [row["iter"] for row in log_rows(resumed, "eval")] == [0, 4, 8]
    assert [row["type"] for row in log_rows(resumed, "run")] == ["run", "run"]
    for kind, keys in (("train", ("iter", "loss", "lr", "grad_norm")), ("eval", ("iter", "val_loss"))):
        assert ([[row[k] for k in keys] for row in log_rows(resumed, kind)]
                == [[row[k] for k in keys] for row in log_rows(full, kind)])
    a, b = load(full), load(resumed)
    assert a["iter_num"] == b["iter_num"] == 8 and a["loader"] == b["loader"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])


def test_resume_rejects_different_model_settings(stopped_at_4, text_data, tmp_path):
    out = str(tmp_path / "other")
    shutil.copytree(stopped_at_4, out)
    result = train(out, text_data, *RESUME, "--max_iters=8", "--init_from=resume", "--n_embd=64", expect=2)
    assert "n_embd=32 (now 64)" in result.stderr


def test_finetune_from_a_local_hf_gpt2_and_resume(text_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = str(tmp_path / "hf-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    out = str(tmp_path / "finetune")
    train(out, text_data, f"--init_from={hf_dir}", "--residual_mode=gate", "--max_iters=4")
    args = load(out)["model_args"]
    assert (args["n_layer"], args["n_embd"], args["vocab_size"], args["residual_mode"]) == (3, 32, 50257, "gate")
    assert len(log_rows(out, "train")[0]["alphas"]) == 3
    # requeued with the same command line: the shape settings (n_layer=2 in TINY) are the weights', not these
    train(out, text_data, "--init_from=auto", "--residual_mode=gate", "--max_iters=6")
    assert load(out)["iter_num"] == 6 and load(out)["weights_from"] == hf_dir


def test_sigterm_checkpoints_and_resumes(text_data, tmp_path):
    out = str(tmp_path / "sigterm")
    cmd = [sys.executable, "train.py", f"--data_dir={text_data}", f"--out_dir={out}", *TINY, "--max_iters=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log_path):
            with open(log_path) as f:  # counted as text: the last line may be half written
                if f.read().count('"type": "train"') >= 3:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    stopped = load(out)["iter_num"]
    assert stopped >= 3
    end = log_rows(out, "end")[-1]
    assert end["reason"] == "SIGTERM" and end["iter"] == stopped
    assert len(log_rows(out, "train")) == stopped  # every finished step logged, none after the checkpoint

    train(out, text_data, f"--max_iters={stopped + 2}", "--init_from=resume")
    assert [row["iter"] for row in log_rows(out, "train")] == list(range(stopped + 2))
    assert load(out)["iter_num"] == stopped + 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(stopped_at_4, text_data, tmp_path):
    out = str(tmp_path / "nan")
    shutil.copytree(stopped_at_4, out)
    before = file_digest(os.path.join(out, "ckpt.pt"))
    # a natural cause: the learning rate of a typo (AdamW moves every weight by ~lr per step)
    result = train(out, text_data, *RESUME, "--max_iters=8", "--init_from=resume", "--learning_rate=1e30",
                   expect=1)
    end = log_rows(out, "end")[-1]
    assert end["reason"] == "nonfinite_loss" and end["loss"] in ("nan", "inf")
    assert f"train loss is {end['loss']} at iter {end['iter']}" in result.stderr
    assert end["iter"] > 4 and "ckpt.pt" in result.stderr
    assert file_digest(os.path.join(out, "ckpt.pt")) == before
    assert all(torch.isfinite(v).all() for v in load(out)["model"].values())


@pytest.mark.parametrize("args, named", [
    (["--no_such_setting=1"], "no_such_setting"),
    (["--total_batch_tokens=1000"], "total_batch_tokens"),
    (["--residual_mode=cut", "--cut_alpha=0"], "cut_alpha"),
    (["--init_from=gpt9"], "init_from"),
    (["--warmup_iters=50", "--max_iters=20"], "warmup_iters"),
])
def test_bad_setting_fails_before_any_work(args, named, text_data, tmp_path):
    out = tmp_path / "never"
    result = train(str(out), text_data, *args, expect=2)
    assert "config error" in result.stderr and named in result.stderr
    assert not out.exists()  # nothing written: it failed before the run started


@pytest.mark.parametrize("gate_mode", ["layer", "token"])
def test_gate_alphas_are_logged_and_move(gate_mode, text_data, tmp_path):
    out = str(tmp_path / gate_mode)
    train(out, text_data, "--max_iters=10", "--residual_mode=gate", f"--gate_mode={gate_mode}",
          "--gate_alpha_min=0.5", "--gate_lr_mult=10")
    rows = log_rows(out, "train") + log_rows(out, "eval")
    assert len(rows) == 10 + 2
    for row in rows:
        assert len(row["alphas"]) == 2
        # the softmax gate spends a fixed budget: sum_l (1 - alpha_l) = 1 - gate_alpha_min
        assert sum(1 - a for a in row["alphas"]) == pytest.approx(0.5, abs=1e-5)
    first, last = log_rows(out, "train")[0]["alphas"], log_rows(out, "train")[-1]["alphas"]
    assert first == pytest.approx([0.75, 0.75], abs=1e-6)  # uniform at init
    assert max(abs(a - b) for a, b in zip(first, last)) > 0.01
