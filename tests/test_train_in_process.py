"""train.py as importable pieces: train.main(argv) runs a whole run in this process (no subprocess), the run's
facts are derived without rebinding a setting, a pretrained model with max_iters=0 becomes a step-0 checkpoint,
and a tokenizer override on resume is refused."""

import json
import math
import os

import pytest
import torch

import train
from conftest import pydoc_documents
from model import GPT
from nanoshift.checkpoint import load_checkpoint
from nanoshift.data import get_tokenizer
from nanoshift.prepare import first_tokens_split, prepare_shards
from nanoshift.run import RunFacts
from nanoshift.training import FSDP_FLOAT16, lr_at

TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--total_batch_tokens=128", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=0", "--eval_interval=2",
        "--eval_tokens=256", "--log_interval=1", "--track_alignment=False", "--threads=1"]


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


def test_train_main_runs_in_process_and_keeps_the_settings_as_given(prose_shards, tmp_path):
    out = tmp_path / "run"
    state = train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *TINY, "--max_iters=4", "--init_from=auto"])
    assert state.iter_num == 4
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["config"]["init_from"] == "auto"  # the setting as given; the resolved choice is in the log
    assert rows(out, "run")[0]["init_from"] == "scratch"
    assert [r["iter"] for r in rows(out, "eval")] == [0, 2, 4]
    assert rows(out, "eval")[-1]["val_loss"] < rows(out, "eval")[0]["val_loss"]
    # and again: 'auto' now resumes the finished run, which has nothing left to do
    again = train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *TINY, "--max_iters=4", "--init_from=auto"])
    assert again.iter_num == 4 and rows(out, "run")[-1]["init_from"] == "resume"


def test_run_facts_resolve_auto_without_touching_the_settings(tmp_path):
    settings = dict(train.DEFAULTS, out_dir=str(tmp_path), device="cpu", batch_size=4, block_size=32,
                    total_batch_tokens=256)
    facts = RunFacts.from_settings(settings, FSDP_FLOAT16)
    assert (facts.init_from, facts.dtype, facts.world_size, facts.grad_accum_steps) == ("scratch", "float32", 1, 2)
    assert settings["init_from"] == "scratch" and settings["dtype"] == "auto"  # unchanged
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        RunFacts.from_settings(dict(settings, total_batch_tokens=100), FSDP_FLOAT16)


def test_the_schedule_warms_up_then_reaches_min_lr():
    c = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    assert lr_at(0, c) == pytest.approx(1 / 11) and lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(100, c) == 0.1 and lr_at(55, c) == pytest.approx(0.55)
    wsd = dict(c, lr_schedule="wsd", wsd_decay_frac=0.2)
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.55)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama


def test_a_pretrained_model_with_max_iters_0_becomes_a_step_0_checkpoint(llama, tmp_path):
    hf_dir, hf, data = llama
    out = tmp_path / "step0"
    # no --warmup_iters=0 needed: a run that trains nothing has no schedule to fit
    args = [a for a in TINY if not a.startswith("--warmup_iters")]
    train.main([f"--data_dir={data}", f"--out_dir={out}", *args, f"--init_from={hf_dir}", "--max_iters=0",
                "--residual_mode=gate", "--attenuation_warmup_iters=100"])
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == 0 and ckpt["weights_from"] == hf_dir
    model = GPT.from_checkpoint(str(out / "ckpt.pt")).eval()  # the gate at its initial state, ramp at 0
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(x, x)
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # step 0 is the pretrained model
    assert os.path.isdir(out / "tokenizer")  # and its tokenizer travels with it


def test_a_tokenizer_override_on_resume_is_refused(llama, prose_shards, tmp_path, capsys):
    hf_dir, _, _ = llama
    out = tmp_path / "run"
    train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *TINY, "--max_iters=2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *TINY, "--max_iters=4", "--init_from=resume",
                    f"--tokenizer={hf_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"tokenizer={hf_dir!r}" in err and "'gpt2'" in err and "keeps its tokenizer" in err


def test_the_logged_val_bpb_equals_a_hand_count_of_the_targets_bytes(prose_shards, tmp_path):
    import glob

    import torch.nn.functional as F

    from nanoshift.data import ShardLoader

    out = tmp_path / "run"
    train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *TINY, "--max_iters=2"])
    logged = rows(out, "eval")[-1]
    model = GPT.from_checkpoint(str(out / "ckpt.pt")).eval()
    enc = get_tokenizer("gpt2")  # tiktoken's GPT-2 BPE, built from the project's offline files
    loader = ShardLoader(glob.glob(os.path.join(prose_shards, "*_val_*.bin"))[0], 4, 32, 0, 1, 0, shuffle=False)
    nats = nbytes = 0.0
    with torch.no_grad():
        for _ in range(256 // 128):  # eval_tokens / tokens per batch
            x, y = loader.next_batch()
            logits, _ = model(x, y)
            nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
            for loss, target in zip(nll.tolist(), y.view(-1).tolist()):
                size = 0 if target == 50256 else len(enc.decode_single_token_bytes(target))  # <|endoftext|>: no text
                nats += loss if size else 0.0
                nbytes += size
    assert logged["val_bpb"] == pytest.approx(nats / (nbytes * math.log(2)), rel=1e-5)
    assert rows(out, "run")[0]["floors"]["bigram"]["bpb"] > 0  # the data's floors, for the log's readers


def test_a_byte_level_model_trains_checkpoints_and_reports_bits_per_byte(tmp_path):
    data = tmp_path / "bytes"
    prepare_shards(pydoc_documents()[:20], str(data), "pydoc", first_tokens_split(4000), shard_tokens=100_000,
                   progress=False, tokenizer="bytes")
    out = tmp_path / "run"
    train.main([f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--tokenizer=bytes",
                "--vocab_size=320"])
    assert load_checkpoint(str(out / "ckpt.pt"))["tokenizer"]["name"] == "bytes"
    # one byte per target (no separators inside these windows' targets but the documents' ends): bpb ~ nats / ln 2
    last = rows(out, "eval")[-1]
    assert 0 < last["val_bpb"] and last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2), rel=0.05)
