"""seeds.py, the launcher of one config over several seeds: it reads out_dir and max_iters from config files and
overrides as train.py would, skips finished runs, resumes the others, survives a failed run and reports it; and
the premise of pairing runs by seed: one seed gives every residual mode the same initial weights and the same
data order.

The launcher's logic runs against a stand-in for train.py (a script with train.py's kind of command line, through
the real configurator) so that it costs no torch start-up per run; the real train.py under the launcher is
exercised end to end by tests/test_reproduce.py."""

import json
import os

import pytest
import torch

from nanoshift import checkpoint
import seeds
from conftest import TINY_GPT
from nanoshift.data import ShardLoader
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_TRAIN = f"""
import json, os, sys
sys.path.insert(0, {ROOT!r})
from nanoshift.configurator import configure_or_exit
c = configure_or_exit(dict(out_dir="out", max_iters=5, init_from="scratch", seed=1337, lr=0.1))
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if c["seed"] == int(os.environ.get("FAIL_SEED", -1)):
    sys.exit(3)
os.makedirs(c["out_dir"], exist_ok=True)
with open(os.path.join(c["out_dir"], "log.jsonl"), "a") as f:
    f.write(json.dumps({{"type": "end", "iter": c["max_iters"], "reason": "max_iters"}}) + "\\n")
"""


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """seeds.main with a stand-in train.py and a config file that sets out_dir; returns (run, calls)."""
    fake = tmp_path / "train.py"
    fake.write_text(FAKE_TRAIN)
    (tmp_path / "cfg.py").write_text("out_dir = 'runs/gate'\n")
    monkeypatch.setattr(seeds, "TRAIN", str(fake))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))

    def run(*argv):
        with pytest.raises(SystemExit) as stop:
            seeds.main(list(argv))
        calls = tmp_path / "calls.jsonl"
        made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
        calls.unlink(missing_ok=True)
        return stop.value.code, made
    return run


def end_row(folder, iters, reason="max_iters"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text(json.dumps({"type": "run", "iter": 0}) + "\n"
                                      + json.dumps({"type": "end", "iter": iters, "reason": reason}) + "\n")


def test_launcher_skips_finished_runs_resumes_the_rest_and_reports_failures(launcher, tmp_path, monkeypatch, capsys):
    end_row(tmp_path / "runs" / "gate-s1", 5)  # finished at its max_iters (nothing sets another): skipped
    end_row(tmp_path / "runs" / "gate-s2", 3, reason="SIGTERM")  # pre-empted: continued
    (tmp_path / "runs" / "gate-s2" / "ckpt.pt").write_bytes(b"")
    monkeypatch.setenv("FAIL_SEED", "3")
    code, calls = launcher("cfg.py", "--seeds", "1", "2", "3", "4", "--lr=0.5")
    assert code == 3  # the failed run's exit status, after the others ran
    assert calls == [["cfg.py", "--lr=0.5", f"--seed={s}", f"--out_dir=runs/gate-s{s}", "--init_from=auto"] for s in (2, 3, 4)]
    out, err = capsys.readouterr()
    assert "seed 1: runs/gate-s1 finished earlier, skipped" in out and "continuing runs/gate-s2" in out
    assert "| 1 | runs/gate-s1 | finished earlier |" in out and "| 2 | runs/gate-s2 | trained |" in out
    assert "| 3 | runs/gate-s3 | failed (exit 3) |" in out and "| 4 | runs/gate-s4 | trained |" in out
    assert "1 of 4 run(s) failed: seed(s) [3]" in err
    # a rerun asking for more iterations continues every run; --out_dir (last wins) moves them
    monkeypatch.delenv("FAIL_SEED")
    code, calls = launcher("cfg.py", "--seeds=1,2", "--max_iters=9")
    assert code == 0 and [c[-3:] for c in calls] == [[f"--seed={s}", f"--out_dir=runs/gate-s{s}", "--init_from=auto"]
                                                     for s in (1, 2)]
    code, calls = launcher("cfg.py", "--seeds=1,2", "--out_dir", "elsewhere/base")
    assert code == 0 and [c[-2] for c in calls] == ["--out_dir=elsewhere/base-s1", "--out_dir=elsewhere/base-s2"]
    (tmp_path / "more.py").write_text("exec(open('cfg.py').read())\nmax_iters = 7\n")  # config files that build on others
    code, calls = launcher("more.py", "--seeds=1", "--out_dir=elsewhere/base")
    assert code == 0 and calls == [["more.py", "--out_dir=elsewhere/base", "--seed=1", "--out_dir=elsewhere/base-s1",
                                    "--init_from=auto"]]  # ended at 5 < 7: continued


@pytest.mark.parametrize("argv,message", [
    (["cfg.py", "--seeds=1,2", "--seed=3"], "the launcher sets train.py's --seed"),
    (["cfg.py", "--seeds=1,1"], "seeds must be different ints"),
    (["--seeds=1,2", "--lr=0.2"], "no out_dir: set it in the config file or with --out_dir"),
    (["missing.py", "--seeds=1,2"], "cannot read config file missing.py: FileNotFoundError"),
    (["cfg.py", "--seeds=1,2", "--max_iter=3"], "unknown setting 'max_iter'"),  # train.py's refusal, once
])
def test_launcher_refuses_bad_settings(launcher, capfd, argv, message):
    code, calls = launcher(*argv)
    out, err = capfd.readouterr()  # capfd: train.py's own message comes from the child process
    assert code == 2 and calls == [] and message in err
    if "max_iter" in message:  # the first run was refused: the second is not started
        assert "| 2 | runs/gate-s2 | not started |" in out and "not starting them" in err


def test_one_seed_gives_every_mode_the_same_start_and_data_order(prose_shards):
    """train.py seeds torch with `seed` right before building the model, and its ShardLoader orders the data by
    `seed` alone; the cut (a buffer) and the layer and scalar gates (parameters made without random numbers,
    after every other module) leave the other weights' draws untouched. The token gate's projection draws
    numbers, so it shares only the data order."""
    def start(**mode):
        torch.manual_seed(7)
        return GPT(GPTConfig(**TINY_GPT, **mode)).state_dict()

    base = start()
    for mode in (dict(residual_mode="cut", cut_layer=-1), dict(residual_mode="gate", gate_mode="layer"),
                 dict(residual_mode="gate", gate_mode="scalar")):
        weights = start(**mode)
        assert all(torch.equal(weights[k], base[k]) for k in base), mode
        assert set(weights) - set(base) <= {"cut_alphas", "gate.logits"}
    token = start(residual_mode="gate", gate_mode="token")
    assert not torch.equal(token["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])

    def batches(seed):
        loader = ShardLoader(os.path.join(prose_shards, "*_train_*.bin"), 4, 16, seed=seed)
        return [loader.next_batch()[0] for _ in range(5)]

    assert all(torch.equal(a, b) for a, b in zip(batches(7), batches(7)))
    assert not all(torch.equal(a, b) for a, b in zip(batches(7), batches(8)))


@pytest.mark.parametrize("saved", ["ckpt.pt", "ckpt.dcp.json"])
def test_a_pretrained_run_with_a_checkpoint_is_resumed_not_restarted(launcher, tmp_path, saved):
    """init_from = pretrained weights: a seed whose out_dir holds DDP's ckpt.pt or FSDP's sharded-checkpoint
    pointer continues (--init_from=resume); a fresh one starts from the weights."""
    assert checkpoint.SHARDED_POINTER in seeds.CHECKPOINT_FILES  # the launcher's copy of the name stays in step
    end_row(tmp_path / "runs" / "gate-s1", 3, reason="SIGTERM")
    (tmp_path / "runs" / "gate-s1" / saved).write_text("")
    code, calls = launcher("cfg.py", "--seeds=1,2", "--init_from=gpt2")
    assert code == 0 and [c[-1] for c in calls] == ["--init_from=resume", "--init_from=gpt2"]
