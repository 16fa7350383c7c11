"""Nothing lost, nothing executed: train.py and the checkpoint readers under faults and bad input.

Every case asserts the exit status, that the message names the setting or file, and that no earlier
file was changed or lost: a NaN never reaches a checkpoint, a new run never destroys an old one, a kill -9
at any moment leaves a checkpoint that resumes to the uninterrupted result, a full disk leaves the old
checkpoint and no temporary file, and a pickled payload is refused by every entry point without running.
"""
import glob
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import analyze
import eval_benchmarks
from nanoshift.checkpoint import load_checkpoint
from nanoshift.common import InputError
from nanoshift.data import read_shard, write_shard
from conftest import tiny_gpt, write_checkpoint
from nanoshift.lm import load_lm
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--total_batch_tokens=256", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=0",
        "--eval_interval=1000", "--eval_tokens=1024", "--log_interval=1", "--dropout=0.0", "--seed=7",
        "--track_alignment=False"]  # alignment tracking has its own tests (test_tracking.py); here it only costs time
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(out_dir, data, *args):
    return [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out_dir}", *TINY, *args]


def train(out_dir, data, *args, expect=0, **kw):
    result = subprocess.run(train_cmd(out_dir, data, *args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300, **kw)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def digests(folder):
    """sha256 of every file in folder (names relative to it)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(prose_shards, tmp_path_factory):
    """A finished 4-step run with ckpt.pt, best.pt and log.jsonl."""
    out = str(tmp_path_factory.mktemp("finished"))
    train(out, prose_shards, "--max_iters=4", "--eval_interval=2")
    assert {"ckpt.pt", "best.pt", "log.jsonl"} <= set(os.listdir(out))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)

# -----------------------------------------------------------------------------
# a NaN never reaches a checkpoint


def test_nonfinite_val_loss_is_never_saved_and_the_message_names_the_good_file(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digests(out)
    # lr 1e30: step 4's loss is still finite, but it leaves inf weights: the eval at iter 5 sees a NaN val loss
    result = train(out, prose_shards, "--max_iters=8", "--eval_interval=1", "--init_from=resume",
                   "--learning_rate=1e30", expect=1)
    line = one_error_line(result)
    assert "val loss is nan at iter 5" in line and f"last good checkpoint is {out}/ckpt.pt (iter 4)" in line
    after = digests(out)
    assert {k: after[k] for k in ("ckpt.pt", "best.pt")} == {k: before[k] for k in ("ckpt.pt", "best.pt")}
    end = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][-1]
    assert end["type"] == "end" and end["reason"] == "nonfinite_loss" and end["loss"] == "nan"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(os.path.join(out, "ckpt.pt"))["model"].values())

# -----------------------------------------------------------------------------
# a new run never destroys an old one


def test_scratch_into_a_finished_run_is_refused_and_changes_nothing(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digests(out)
    for init in ("scratch", "gpt2"):
        line = one_error_line(train(out, prose_shards, "--max_iters=4", f"--init_from={init}", expect=2))
        assert line.startswith("config error:") and "--overwrite=True" in line and "ckpt.pt" in line
    assert digests(out) == before


def corrupt_data(prose_shards, folder, token=60000):
    """The prose shards without their manifest (llm.c-style), the val shard's first token set to `token`:
    an id no GPT-2 model has, as a shard from another tool or a damaged file can hold."""
    shutil.copytree(prose_shards, folder)
    os.remove(os.path.join(folder, "_done.json"))
    (val,) = glob.glob(os.path.join(folder, "*_val_*.bin"))
    tokens = np.array(read_shard(val))
    tokens[0] = token
    write_shard(val, tokens)
    return str(folder), val


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digests(out)
    # a new run that dies at its first eval (a token outside the vocabulary), after it started its log
    data, val = corrupt_data(prose_shards, tmp_path / "data")
    result = train(out, data, "--max_iters=4", "--overwrite=True", "--require_manifest=False", expect=1)
    assert f"{val}: token 60000 at position 0 is >= vocab_size=50304" in one_error_line(result)
    assert {k: v for k, v in digests(out).items() if k != "log.jsonl.new"} == before
    # the same with a good run: its first checkpoint replaces the old run's files
    train(out, prose_shards, "--max_iters=2", "--eval_interval=2", "--overwrite=True", "--seed=8")
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["type"] for r in rows].count("run") == 1 and rows[0]["config"]["seed"] == 8
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 2 and "log.jsonl.new" not in os.listdir(out)
    assert load_checkpoint(os.path.join(out, "best.pt"))["iter_num"] == 2


def test_a_warning_names_settings_that_do_nothing_in_the_chosen_mode(prose_shards, tmp_path):
    result = train(str(tmp_path / "run"), prose_shards, "--max_iters=1", "--cut_alpha=0.3", "--gate_mode=token")
    assert "warning: cut_alpha=0.3 has no effect with residual_mode='none'" in result.stderr
    assert "warning: gate_mode='token' has no effect with residual_mode='none'" in result.stderr

# -----------------------------------------------------------------------------
# bad data


def test_unfinished_prepare_is_refused_with_how_to_finish_it(prose_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prose_shards, data)
    os.remove(data / "_done.json")
    line = one_error_line(train(str(tmp_path / "run"), data, "--max_iters=1", expect=1))
    assert f"data_dir='{data}' has no _done.json" in line and "prepare" in line and "--require_manifest=False" in line
    assert not (tmp_path / "run").exists()
    train(str(tmp_path / "run"), data, "--max_iters=1", "--require_manifest=False")  # llm.c-style shards


def test_token_ids_outside_the_vocabulary_are_named_not_an_index_error(prose_shards, tmp_path):
    line = one_error_line(train(str(tmp_path / "a"), prose_shards, "--vocab_size=1000", expect=2))
    assert "tokenizer 'gpt2' has 50,257 ids" in line and "vocab_size is 1,000" in line  # caught before any work
    data, val = corrupt_data(prose_shards, tmp_path / "data")
    line = one_error_line(train(str(tmp_path / "b"), data, "--require_manifest=False", expect=1))
    assert f"{val}: token 60000 at position 0 is >= vocab_size=50304" in line

# -----------------------------------------------------------------------------
# broken files on resume


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_broken_ckpt_on_resume_is_one_line_suggesting_an_intact_best_pt(finished, prose_shards, tmp_path, damage):
    out = copy_run(finished, tmp_path / "run")
    path = os.path.join(out, "ckpt.pt")
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": content[:len(content) // 2], "empty": b"", "garbage": b"\x00junk" * 100}[damage])
    before = digests(out)
    line = one_error_line(train(out, prose_shards, "--max_iters=8", "--init_from=resume", expect=1))
    assert f"{path} is not a readable checkpoint" in line and "best.pt is intact (iter" in line
    assert digests(out) == before


def test_torn_last_log_line_is_tolerated_on_resume(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"type": "train", "iter": 4, "lo')  # a crash mid-write
    result = train(out, prose_shards, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    assert "torn last line" in result.stderr
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["iter"] for r in rows if r["type"] == "train"] == list(range(6))


def test_out_dir_that_cannot_be_a_folder_fails_before_any_work(prose_shards, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "run"):
        line = one_error_line(train(str(out), prose_shards, "--max_iters=1", expect=2))
        assert line.startswith("config error: out_dir=") and str(out) in line
    run = write_checkpoint(tiny_gpt(), tmp_path / "model")
    with pytest.raises(SystemExit) as e:
        analyze.main(["--ckpt", run, f"--shards={prose_shards}/*_val_*.bin", "--num_sequences=1", "--seq_len=8",
                      f"--out_dir={blocker}", "--progress=False"])
    assert e.value.code == 2 and f"out_dir='{blocker}' is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # before any model is evaluated, not after
        eval_benchmarks.main(["--ckpt", run, "--benchmarks", "fineweb_edu", f"--fineweb_edu_shards={prose_shards}/*_val_*",
                              f"--out_dir={blocker / 'eval'}", "--progress=False"])
    assert e.value.code == 2 and "cannot be created" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_disk_full_while_saving_leaves_the_old_checkpoint_and_no_temporary_file(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digests(out)
    size = os.path.getsize(os.path.join(out, "ckpt.pt"))

    def small_disk():  # writes past size // 2 bytes fail with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    result = train(out, prose_shards, "--max_iters=6", "--eval_interval=2", "--init_from=resume", expect=1,
                   preexec_fn=small_disk)
    line = one_error_line(result)
    assert f"could not write a checkpoint in {out}" in line and f"{out}/ckpt.pt (iter 4) is unchanged" in line
    after = digests(out)
    assert after["ckpt.pt"] == before["ckpt.pt"] and after["best.pt"] == before["best.pt"]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]

# -----------------------------------------------------------------------------
# kill -9 at random moments


def test_kill_9_at_random_moments_always_resumes_to_the_uninterrupted_weights(prose_shards, tmp_path):
    # a checkpoint every step (~0.3 s each, mostly fsync), so many kills land mid-save
    args = ["--max_iters=12", "--eval_interval=1", "--dropout=0.1", "--save_best=False", "--n_embd=16"]
    reference = str(tmp_path / "reference")
    train(reference, prose_shards, *args)
    out = str(tmp_path / "killed")
    log = os.path.join(out, "log.jsonl")
    log_size = lambda: sum(os.path.getsize(p) for p in (log, log + ".new") if os.path.exists(p))
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        size = log_size()
        proc = subprocess.Popen(train_cmd(out, prose_shards, *args, "--init_from=auto"), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.time()
        while time.time() - start < 60 and log_size() == size and proc.poll() is None:
            time.sleep(0.005)  # until the run writes its first row: training has started
        time.sleep(rng.uniform(0.0, 0.6))  # then a random moment: a step, an eval, or mid-save
        if proc.poll() is not None:  # it finished first: the chain starts again from scratch
            assert proc.returncode == 0, proc.stderr.read()
            shutil.rmtree(out)
            continue
        proc.kill()
        proc.wait()
        kills += 1
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            load_checkpoint(os.path.join(out, "ckpt.pt"))  # whole, whatever the moment of the kill
    train(out, prose_shards, *args, "--init_from=auto")
    a, b = load_checkpoint(os.path.join(reference, "ckpt.pt")), load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 12
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    iters = [row["iter"] for row in map(json.loads, open(log)) if row["type"] == "train"]
    assert iters == list(range(12))  # every step logged once, whatever was redone
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]  # a killed save's file is cleaned up

# -----------------------------------------------------------------------------
# nothing executed: a pickled payload is refused everywhere


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_is_refused_by_every_reader_and_never_runs(prose_shards, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    run = write_checkpoint(tiny_gpt(), tmp_path / "evil")
    state = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    torch.save(dict(state, optimizer=Payload(marker)), os.path.join(run, "ckpt.pt"))
    path = os.path.join(run, "ckpt.pt")

    for read in (load_checkpoint, GPT.from_checkpoint, lambda p: load_lm(ckpt=p)):
        with pytest.raises(InputError, match=r"pickled Python objects \(posix.system\).*convert_checkpoint.py"):
            read(path)
    with pytest.raises(SystemExit) as e:
        analyze.main(["--ckpt", run, f"--shards={prose_shards}/*_val_*.bin", "--num_sequences=1", "--seq_len=8",
                      f"--out_dir={tmp_path / 'a'}", "--progress=False"])
    assert e.value.code == 1 and "posix.system" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_benchmarks.main(["--ckpt", run, "--benchmarks", "fineweb_edu", f"--fineweb_edu_shards={prose_shards}/*_val_*",
                              f"--out_dir={tmp_path / 'e'}", "--progress=False"])
    assert e.value.code == 1 and "posix.system" in capsys.readouterr().err
    line = one_error_line(train(run, prose_shards, "--init_from=resume", expect=1))
    assert "posix.system" in line and path in line
    assert not marker.exists()


def test_an_old_checkpoint_is_refused_then_converted_once_on_request(finished, prose_shards, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    path = os.path.join(out, "ckpt.pt")
    old = load_checkpoint(path)  # written the way nanoshift did before: the numpy RNG state as numpy objects,
    old["rng"] = [dict(r, numpy=np.random.get_state()) for r in old["rng"]]  # and without the later fields
    newer = ("arch", "n_kv_head", "intermediate_size", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings")
    old["model_args"] = {k: v for k, v in old["model_args"].items() if k not in newer}
    old.pop("tokenizer", None)
    torch.save(old, path)
    line = one_error_line(train(out, prose_shards, "--max_iters=6", "--init_from=resume", expect=1))
    assert "numpy" in line and f"python convert_checkpoint.py {path} --trust" in line
    refused = subprocess.run([sys.executable, "convert_checkpoint.py", path], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--trust" in refused.stderr
    converted = subprocess.run([sys.executable, "convert_checkpoint.py", path, "--trust"], cwd=ROOT,
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    assert os.path.exists(path + ".orig")
    train(out, prose_shards, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    assert load_checkpoint(path)["iter_num"] == 6
