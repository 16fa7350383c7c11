"""FSDP2 sharded training (train.py --parallelism=fsdp, issue #13) on CPU: torchrun with 2 gloo ranks.

1. FSDP 2-rank losses equal DDP 2-rank and 1-process losses over 20 steps, gpt2 and llama, token gate (with
   gradient accumulation both ways and activation checkpointing on); tolerance: rtol 1e-5 on losses, the
   DDP test's rtol 1e-3 / atol 2e-4 on the final weights.
2. Exact resume: stopped at step 10 by max_iters, then a kill -9 in the middle of a sharded save, then a
   SIGTERM mid-run, then on to 20 == straight to 20, bit for bit (dropout on, so every rank's RNG resumes too).
3. The kill -9 above: resume finds the last complete checkpoint and removes the half-written one.
4. The consolidated export is read by GPT.from_checkpoint, analyze.py and eval_benchmarks.py, and equals the
   sharded checkpoint's weights.
5. bench's table: what a rank holds (weights + gradients + AdamW, from the local shards) is <= 0.6 x DDP's.
Plus: another world size (2 ranks -> 1 plain process, a 1-rank group) resumes the same weights; bad settings
and an unresumable checkpoint fail before any work; a crafted DCP index is refused unexecuted.

The models are tiny (2 layers x 32, a 400-token BPE): a torchrun launch costs mostly its start-up, so every
run that needs no other starts at once (fixture `runs`), and the one-rank resume runs beside the chain.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import analyze
import bench
import eval_benchmarks
import export_checkpoint
from nanoshift.checkpoint import SHARDED_POINTER, TRAIN_STATE, check_dcp_metadata, load_checkpoint
from nanoshift.common import InputError
from conftest import TORCHRUN, bpe_prose_shards
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 128 tokens per step: 8 sequences in one process, 4 per rank with 2 ranks (2 x 2 with accumulation)
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=512",
        "--total_batch_tokens=128", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=3",
        "--lr_decay_iters=20", "--eval_interval=10", "--eval_tokens=512", "--log_interval=1", "--seed=7",
        "--dropout=0.0", "--track_alignment=False"]
TOKEN_GATE = ["--residual_mode=gate", "--gate_mode=token"]
LLAMA = ["--arch=llama", "--bias=False", "--n_kv_head=1", "--intermediate_size=64", "--tie_embeddings=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prose shards in a 400-token BPE (the model's vocabulary is 512): steps take milliseconds."""
    return bpe_prose_shards(tmp_path_factory.mktemp("fsdp_data"), 8000, 40_000)


def train_cmd(out_dir, data, *args, ranks=2):
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    return [*launcher, "train.py", f"--data_dir={data['shards']}", f"--tokenizer={data['tokenizer']}",
            f"--out_dir={out_dir}", *TINY, *args]


def start(out_dir, data, *args, ranks=2):
    return subprocess.Popen(train_cmd(out_dir, data, *args, ranks=ranks), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, expect=0):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def train(out_dir, data, *args, ranks=2):
    return finish(start(out_dir, data, *args, ranks=ranks))


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


def weights(path):
    return load_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)["model"]


def pointer(out_dir):
    with open(os.path.join(out_dir, SHARDED_POINTER)) as f:
        return json.load(f)


def sharded_dirs(out_dir):
    return sorted(name for name in os.listdir(out_dir) if name.endswith(".dcp"))

# the runs: every one that needs no other is started at once (a torchrun launch is mostly imports and waits for
# messages, so side by side they take about half the time they take one after the other)

# the resume chain's model: the layer gate (its logits are sharded: the logged alphas are gathered) and dropout
# (so every rank's RNG state has to resume too)
CHAIN = ["--batch_size=4", "--residual_mode=gate", "--gate_mode=layer", "--gate_lr_mult=10", "--dropout=0.1",
         "--parallelism=fsdp", "--max_iters=20"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """gpt2 and llama, 20 steps each three ways (1 process, DDP, FSDP). gpt2: FSDP with 2 accumulation
    micro-steps (weights kept gathered between them), alignment tracking on under DDP and FSDP. llama (untied
    embeddings): activation checkpointing under DDP and FSDP, FSDP re-sharding every micro-step and keeping
    only the final weights. And the resume chain's straight run to 20 and its first part, stopped at 10."""
    base = tmp_path_factory.mktemp("runs")
    specs = {
        "gpt2/one": (["--batch_size=8", *TOKEN_GATE], 1),
        "gpt2/ddp": (["--batch_size=4", *TOKEN_GATE, "--track_alignment=True", "--track_sequences=2"], 2),
        "gpt2/fsdp": (["--batch_size=2", *TOKEN_GATE, "--track_alignment=True", "--track_sequences=2",
                       "--parallelism=fsdp"], 2),
        "llama/one": (["--batch_size=8", *TOKEN_GATE, *LLAMA], 1),
        "llama/ddp": (["--batch_size=4", *TOKEN_GATE, *LLAMA, "--activation_checkpointing=True"], 2),
        "llama/fsdp": (["--batch_size=2", *TOKEN_GATE, *LLAMA, "--activation_checkpointing=True",
                        "--parallelism=fsdp", "--fsdp_reshard_micro_steps=True", "--save_optimizer_at_end=False"], 2),
        "chain/straight": (CHAIN, 2),
        "chain/stopped_at_10": ([*CHAIN[:-1], "--max_iters=10"], 2),
    }
    out = {name: str(base / name.replace("/", "_")) for name in specs}
    procs = [start(out[name], data, "--max_iters=20", *args, ranks=ranks) for name, (args, ranks) in specs.items()]
    for proc in procs:
        finish(proc)
    return out

# -----------------------------------------------------------------------------
# 1. FSDP == DDP == one process


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fsdp_losses_equal_ddp_and_one_process(runs, arch):
    one, ddp, fsdp = (runs[f"{arch}/{kind}"] for kind in ("one", "ddp", "fsdp"))
    run = rows(fsdp, "run")[0]
    assert run["world_size"] == 2 and run["grad_accum_steps"] == 2 and run["config"]["parallelism"] == "fsdp"
    reference = [row["loss"] for row in rows(one, "train")]
    assert len(reference) == 20 and reference[-1] < reference[0] - 1.0  # it learns
    for other in (ddp, fsdp):
        torch.testing.assert_close([row["loss"] for row in rows(other, "train")], reference, rtol=1e-5, atol=0)
        torch.testing.assert_close([row["grad_norm"] for row in rows(other, "train")],
                                   [row["grad_norm"] for row in rows(one, "train")], rtol=1e-4, atol=0)
        torch.testing.assert_close([row["val_loss"] for row in rows(other, "eval")],
                                   [row["val_loss"] for row in rows(one, "eval")], rtol=1e-5, atol=0)
        for name, value in weights(one).items():  # fsdp: the consolidated ckpt.pt written at the end
            torch.testing.assert_close(weights(other)[name], value, rtol=1e-3, atol=2e-4)
    if arch == "gpt2":  # alignment tracking under FSDP reads the same numbers as under DDP
        for a, b in zip(rows(ddp, "eval"), rows(fsdp, "eval"), strict=True):
            assert a["misalignment"] == pytest.approx(b["misalignment"], abs=1e-6)
            assert a["alignment"]["raw"]["topk_target"] == pytest.approx(b["alignment"]["raw"]["topk_target"], abs=1e-6)
        # the run's files: one sharded checkpoint (the last), its pointer, the export and best.pt (linked)
        assert sharded_dirs(fsdp) == ["ckpt-00000020.dcp"] and pointer(fsdp)["iter_num"] == 20
        assert os.path.samefile(os.path.join(fsdp, "best.pt"), os.path.join(fsdp, "ckpt.pt"))
    else:  # save_optimizer_at_end=False: the final weights only, nothing sharded left to resume
        assert sharded_dirs(fsdp) == [] and not os.path.exists(os.path.join(fsdp, SHARDED_POINTER))
        assert "optimizer" not in load_checkpoint(os.path.join(fsdp, "ckpt.pt"))

# -----------------------------------------------------------------------------
# 2. and 3. exact resume: max_iters, kill -9 mid-save, SIGTERM; and another world size


def job_pids(pid):
    """torchrun's pid and its workers' (torchrun starts each worker in a session of its own)."""
    pids, todo = [], [pid]
    while todo:
        pids.append(todo.pop())
        try:
            with open(f"/proc/{pids[-1]}/task/{pids[-1]}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except OSError:  # gone already
            pass
    return pids


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_9_during_a_sharded_save(out_dir, data):
    """Resume out_dir with a checkpoint at every step and SIGKILL the whole job (torchrun and both ranks) while
    a save is in progress: a directory newer than the pointer's exists. To catch that moment the job is frozen
    (SIGSTOP) whenever a newer directory shows up; if the pointer has not moved it is killed there, else let go
    on. Returns (the pointer at the kill, the files of the half-written directory)."""
    proc = subprocess.Popen(train_cmd(out_dir, data, *CHAIN, "--init_from=auto", "--eval_interval=1",
                                      "--save_best=False"),
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            committed = pointer(out_dir)
            newer = [d for d in sharded_dirs(out_dir) if int(d[5:13]) > committed["iter_num"]]
            if newer:
                pids = job_pids(proc.pid)
                signal_all(pids, signal.SIGSTOP)
                if pointer(out_dir) == committed:  # frozen mid-save: the pointer has not moved
                    signal_all(pids, signal.SIGKILL)
                    proc.wait()
                    return committed, sorted(os.listdir(os.path.join(out_dir, newer[0])))
                signal_all(pids, signal.SIGCONT)
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            signal_all(job_pids(proc.pid), signal.SIGKILL)
            proc.wait()
    raise AssertionError(f"the run ended (exit {proc.returncode}) before a save could be caught midway: "
                         f"{proc.stderr.read()[-2000:]}")


def sigterm_mid_run(out_dir, data):
    """Resume out_dir and send SIGTERM to torchrun (as SLURM does) once the resumed run has made a step."""
    runs_before = len(rows(out_dir, "run"))
    proc = subprocess.Popen(train_cmd(out_dir, data, *CHAIN, "--init_from=auto"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        with open(os.path.join(out_dir, "log.jsonl")) as f:  # as text: the last line may be half written
            log = f.read().split('"type": "run"')
        if len(log) - 1 > runs_before and '"type": "train"' in log[-1]:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert "stopped at iter" in stdout and "SIGTERM" in stdout, stderr[-3000:]  # torchrun itself exits 1


def test_fsdp_resume_is_exact_after_max_iters_kill_9_mid_save_and_sigterm_and_on_another_world_size(runs, data,
                                                                                                   tmp_path):
    straight, stopped_at_10 = runs["chain/straight"], runs["chain/stopped_at_10"]
    assert rows(stopped_at_10, "end")[-1]["reason"] == "max_iters" and pointer(stopped_at_10)["iter_num"] == 10
    rng = load_checkpoint(os.path.join(stopped_at_10, "ckpt-00000010.dcp", TRAIN_STATE))["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank's own dropout stream
    out, one_rank = str(tmp_path / "chain"), str(tmp_path / "one_rank")
    shutil.copytree(stopped_at_10, out)
    shutil.copytree(stopped_at_10, one_rank)
    # meanwhile: written by 2 ranks, resumed by one plain process (a 1-rank group): DCP reshards weights and AdamW
    resharded = start(one_rank, data, *CHAIN[:-1], "--max_iters=12", "--batch_size=8", "--init_from=resume", ranks=1)

    committed, half_written = kill_9_during_a_sharded_save(out, data)
    assert committed == pointer(out) and committed["iter_num"] >= 10
    assert TRAIN_STATE not in half_written  # written last, before the pointer moves
    complete = os.path.join(out, f"ckpt-{committed['iter_num']:08d}.dcp")
    assert {".metadata", TRAIN_STATE} <= set(os.listdir(complete))

    sigterm_mid_run(out, data)  # resumes the last complete checkpoint, and removes the half-written one
    end = rows(out, "end")[-1]
    assert end["reason"] == "SIGTERM" and committed["iter_num"] < end["iter"] < 20
    assert pointer(out)["iter_num"] == end["iter"] and sharded_dirs(out) == [f"ckpt-{end['iter']:08d}.dcp"]

    train(out, data, *CHAIN, "--init_from=resume")
    assert [row["iter"] for row in rows(out, "train")] == list(range(20))  # every step logged once
    for key in ("loss", "grad_norm", "alphas"):
        assert [row[key] for row in rows(out, "train")] == [row[key] for row in rows(straight, "train")], key
    for name, value in weights(straight).items():
        assert torch.equal(weights(out)[name], value), name
    # the layer gate's alphas, gathered from their shards for the log, are those of the final weights
    logits = weights(out)["gate.logits"]
    assert rows(out, "eval")[-1]["alphas"] == pytest.approx((1 - 0.5 * torch.softmax(logits, -1)).tolist(), abs=1e-6)

    stdout = finish(resharded)
    assert "a 1-rank process group" in stdout and "written by 2 rank(s), this run has 1" in stdout
    resumed_eval = [row for row in rows(one_rank, "eval") if row["iter"] == 10][-1]
    straight_eval = [row for row in rows(straight, "eval") if row["iter"] == 10][0]
    assert resumed_eval["val_loss"] == pytest.approx(straight_eval["val_loss"], rel=1e-6)  # the same weights
    assert pointer(one_rank)["iter_num"] == 12 and pointer(one_rank)["world_size"] == 1


# -----------------------------------------------------------------------------
# 4. the consolidated export


def test_the_consolidated_export_is_read_by_every_reader_and_equals_the_sharded_weights(runs, data, tmp_path,
                                                                                       capsys):
    fsdp = runs["gpt2/fsdp"]
    exported = export_checkpoint.run([fsdp, f"--out={tmp_path / 'exported.pt'}"])  # from the sharded files
    written = load_checkpoint(os.path.join(fsdp, "ckpt.pt"))  # gathered from the live model at the end
    assert written["iter_num"] == 20 and "optimizer" not in written
    for name, value in written["model"].items():
        assert torch.equal(weights(exported)[name], value), name
    model = GPT.from_checkpoint(os.path.join(fsdp, "ckpt.pt"))
    assert all(torch.equal(value, written["model"][name]) for name, value in model.state_dict().items())

    val = f"{data['shards']}/*_val_*.bin"
    analyze.main(["--ckpt", fsdp, f"--shards={val}", "--num_sequences=2", "--seq_len=16",
                  f"--out_dir={tmp_path / 'analysis'}", "--progress=False"])
    assert os.path.isfile(tmp_path / "analysis" / "metrics.json")
    eval_benchmarks.main(["--ckpt", fsdp, runs["gpt2/ddp"], "--benchmarks", "fineweb_edu",
                          f"--fineweb_edu_shards={val}", "--max_tokens=2000", f"--out_dir={tmp_path / 'eval'}",
                          "--progress=False"])
    with open(tmp_path / "eval" / "results.json") as f:
        scores = [models["fineweb_edu"] for models in json.load(f)["models"].values()]
    assert len(scores) == 2 and scores[0]["tokens"] == scores[1]["tokens"] > 0
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-4)  # the FSDP model is the DDP model


# -----------------------------------------------------------------------------
# 5. memory per rank (bench.py --section=fsdp's table)


def test_bench_table_fsdp_holds_at_most_0_6_of_ddp_per_rank(runs):
    ddp, fsdp = runs["gpt2/ddp"], runs["gpt2/fsdp"]
    table, ratio = bench.fsdp_comparison({"ddp": ddp, "fsdp": fsdp}, warmup_steps=2)
    assert ratio <= 0.6, table
    assert len(re.findall(r"^\| (ddp|fsdp) \| [01] \|", table, re.M)) == 4
    # the counts are the tensors' own: DDP's weights are 4 bytes x every parameter, FSDP's shards add up to them
    model_args = rows(ddp, "run")[0]["model_args"]
    n_params = GPT.from_checkpoint({"model": weights(ddp), "model_args": model_args}).num_params(non_embedding=False)
    memory = {name: rows(run, "end")[-1]["memory"] for name, run in (("ddp", ddp), ("fsdp", fsdp))}
    assert [m["params"] for m in memory["ddp"]] == [4 * n_params] * 2
    assert 4 * n_params <= sum(m["params"] for m in memory["fsdp"]) <= 4 * n_params * 1.01  # + padding of odd shards
    assert all(m["optimizer"] >= 2 * m["params"] for m in memory["fsdp"])  # AdamW: two moments per weight

def test_the_readme_memory_arithmetic_follows_from_the_parameter_counts():
    table = {(row[0], row[2]): row for row in bench.fsdp_memory_arithmetic(micro_batch=4, seq_len=2048)}
    gib = 2**30
    for model in ("124M", "1B", "3B", "7B"):
        n = table[(model, "DDP")][1]
        assert table[(model, "DDP")][3:6] == pytest.approx([4 * n / gib, 4 * n / gib, 8 * n / gib])
        for world in (8, 32):
            row = table[(model, f"FSDP, {world} GPUs")]
            assert row[3:6] == pytest.approx([4 * n / gib / world, 4 * n / gib / world, 8 * n / gib / world])
            assert row[9] < table[(model, "DDP")][9]
    assert table[("7B", "DDP")][1] == pytest.approx(6.66e9, rel=0.01)
    # the README's claims: DDP fits a 3B model in 80 GB only with activation checkpointing and a 7B one not at
    # all; FSDP on 8 GPUs trains the 7B one in ~21 GiB per rank
    ddp_3b = table[("3B", "DDP")]
    assert sum(ddp_3b[3:8]) * gib > 80e9 > ddp_3b[9] * gib
    assert table[("7B", "DDP")][9] * gib > 80e9 and 20 < table[("7B", "FSDP, 8 GPUs")][9] < 22

# -----------------------------------------------------------------------------
# settings, an unresumable checkpoint, the export's command line, a crafted checkpoint


def test_bad_settings_and_an_unresumable_checkpoint_fail_before_any_work(runs, data, tmp_path, capsys):
    cases = [  # (command, what the config error must say); a checkpoint of the other parallelism resumes
        (train_cmd(tmp_path / "a", data, "--parallelism=zero", ranks=1), "parallelism must be 'ddp' or 'fsdp'"),
        (train_cmd(runs["llama/fsdp"], data, "--init_from=auto", "--parallelism=fsdp", ranks=1),
         "a finished FSDP run's weights-only export): not resumable"),
    ]  # (tests/test_fsdp_meta.py: DDP -> FSDP -> DDP)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, _ in cases]  # side by side: they mostly wait on imports
    for proc, (cmd, message) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and stderr.startswith("config error:") and message in stderr, (cmd, stderr)
    assert not (tmp_path / "a").exists()
    # the export's command line: a run without sharded checkpoints is named, --help describes the settings
    with pytest.raises(InputError, match="holds no sharded checkpoint"):
        export_checkpoint.run([runs["gpt2/ddp"]])
    with pytest.raises(SystemExit) as e:
        export_checkpoint.run(["--help"])
    assert e.value.code == 0 and "--out " in capsys.readouterr().out


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_sharded_checkpoint_is_refused_and_never_runs(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs["gpt2/fsdp"], run)
    folder = os.path.join(run, "ckpt-00000020.dcp")
    check_dcp_metadata(folder)  # the real index passes
    marker = tmp_path / "PAYLOAD_RAN"
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(InputError, match=r"\.metadata: it holds a pickled posix\.system.*refused"):
        check_dcp_metadata(folder)
    with pytest.raises(InputError, match="posix.system"):
        export_checkpoint.run([run])
    assert not marker.exists()
