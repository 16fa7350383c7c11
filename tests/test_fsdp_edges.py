"""FSDP's remaining edges (issue #25's loose ends) and DDP with the attenuation ramp: --overwrite over a sharded run,
a pretrained (retrofit) start under FSDP, a full disk during a sharded save, and 2 DDP ranks with the ramp equal
to one process. FSDP runs here use the 1-rank process group (`--parallelism=fsdp` without torchrun), in-process
where nothing has to be killed: the sharded code paths and checkpoints are the same as with many ranks."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import train
from nanoshift.checkpoint import SHARDED_POINTER, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=512",
        "--batch_size=8", "--total_batch_tokens=128", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=0",
        "--eval_interval=2", "--eval_tokens=256", "--log_interval=1", "--seed=7", "--track_alignment=False",
        "--threads=1"]


@pytest.fixture(scope="module")
def data(tiny_llama):
    """A tiny Llama with its own 400-token BPE, and prose shards in that BPE."""
    hf_dir, hf, shards = tiny_llama
    return {"shards": shards, "hf_dir": hf_dir, "hf": hf}


def args(data, out_dir, *more):
    return [f"--data_dir={data['shards']}", f"--tokenizer={data['hf_dir']}", f"--out_dir={out_dir}", *TINY, *more]


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


def sharded_dirs(out_dir):
    return sorted(name for name in os.listdir(out_dir) if name.endswith(".dcp"))


def test_overwrite_replaces_a_sharded_run_only_once_the_new_one_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    train.main(args(data, out, "--parallelism=fsdp", "--max_iters=4", "--seed=1"))
    old_dirs = sharded_dirs(out)
    assert old_dirs and rows(out, "run")[0]["config"]["seed"] == 1
    train.main(args(data, out, "--parallelism=fsdp", "--max_iters=2", "--seed=2", "--overwrite=True"))
    with open(out / SHARDED_POINTER) as f:
        pointer = json.load(f)
    assert pointer["iter_num"] == 2 and sharded_dirs(out) == [pointer["dir"].split("/")[-1]]
    assert [r["config"]["seed"] for r in rows(out, "run")] == [2]  # the old run's log is gone with it
    assert not os.path.exists(out / "log.jsonl.new")
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 2  # the final consolidated weights are the new run's


def test_a_pretrained_start_under_fsdp_equals_the_same_start_without_it(data, tmp_path):
    common = ["--max_iters=2", f"--init_from={data['hf_dir']}", "--residual_mode=gate", "--attenuation_warmup_iters=4"]
    train.main(args(data, tmp_path / "ddp", *common))
    train.main(args(data, tmp_path / "fsdp", *common, "--parallelism=fsdp"))
    ddp, fsdp = rows(tmp_path / "ddp", "eval"), rows(tmp_path / "fsdp", "eval")
    assert ddp[0]["val_loss"] == pytest.approx(fsdp[0]["val_loss"], rel=1e-6)  # step 0: the pretrained model
    assert [r["loss"] for r in rows(tmp_path / "ddp", "train")] == pytest.approx(
        [r["loss"] for r in rows(tmp_path / "fsdp", "train")], rel=1e-5)
    a, b = (load_checkpoint(str(tmp_path / name / "ckpt.pt"))["model"] for name in ("ddp", "fsdp"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    train.main(args(data, out, "--parallelism=fsdp", "--max_iters=2"))
    before = sharded_dirs(out)
    with open(out / SHARDED_POINTER) as f:
        pointer_before = f.read()

    def small_disk():  # writes past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    result = subprocess.run([sys.executable, "train.py", *args(data, out, "--parallelism=fsdp", "--max_iters=4",
                                                                "--init_from=resume")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"could not write a checkpoint in {out}" in errors[0] and "(iter 2) is unchanged" in errors[0]
    with open(out / SHARDED_POINTER) as f:
        assert f.read() == pointer_before  # the pointer still names the last complete checkpoint
    resumed = subprocess.run([sys.executable, "train.py", *args(data, out, "--parallelism=fsdp", "--max_iters=4",
                                                                 "--init_from=resume")],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert set(before) - set(sharded_dirs(out)) == set(before)  # the old complete one was replaced, no leftovers


def test_ddp_with_the_attenuation_ramp_equals_one_process(data, tmp_path):
    ramp = ["--max_iters=6", "--residual_mode=gate", "--gate_mode=layer", "--attenuation_warmup_iters=4",
            "--gate_lr_mult=10"]
    train.main(args(data, tmp_path / "one", *ramp))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "train.py", *args(data, tmp_path / "ddp", *ramp, "--batch_size=4")], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, ddp = rows(tmp_path / "one", "train"), rows(tmp_path / "ddp", "train")
    assert [r["attenuation"] for r in ddp] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # the ramp, step by step
    assert [r["attenuation"] for r in one] == [r["attenuation"] for r in ddp]
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in ddp], rel=1e-5)
    for a, b in zip(one, ddp):
        assert a["alphas"] == pytest.approx(b["alphas"], rel=1e-5)
