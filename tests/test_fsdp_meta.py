"""Meta-device FSDP init and resume across parallelisms (issue #25), on CPU.

    python -m pytest -q -n 0 tests/test_fsdp_meta.py

1. Meta init: a model built on the meta device, sharded, materialised and replayed shard by shard
   (parallel.shard) holds exactly GPT(config)'s weights from rank 0's seed, and leaves every rank's RNG where
   its own GPT(config) from seed + rank would: every registered residual variant in a 1-rank group, and
   gpt2 / llama with the layer and token gates (dims that do not split evenly) on 2 gloo ranks; whole tensors
   and tensors replayed in chunks; a variant the replay cannot reproduce falls back to the whole build.
2. Memory: a ~150M-parameter model under torchrun (2 ranks, eval_only): no rank's peak RSS grows by the full
   model's float32 bytes over a tiny model's run.
3. Conversions are lossless: a DDP checkpoint loaded into a sharded model and optimizer, and a sharded
   checkpoint read back whole into a plain one, hold the same weights and AdamW moments bit for bit.
4. DDP -> FSDP -> DDP (2 + 2 + 2 steps, 2 gloo ranks each, dropout on) continues a straight 6-step DDP run:
   losses rtol 1e-5; and the settings checks resume either format, newest first.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import TORCHRUN, bpe_prose_shards
from model import GPT, RESIDUALS, GPTConfig, residual_examples
from nanoshift import checkpoint, parallel
from nanoshift.common import SettingError
from nanoshift.run import RunFacts
from nanoshift.training import check_resume_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# dims that do not split evenly over 2 ranks (37 vocabulary rows, 3 layers of gate logits, 3 gate rows ...)
CONFIGS = {
    "gpt2_layer_gate": dict(n_layer=3, n_head=2, n_embd=10, vocab_size=37, block_size=8, residual_mode="gate",
                            gate_mode="layer"),
    "gpt2_token_gate": dict(n_layer=3, n_head=2, n_embd=10, vocab_size=37, block_size=8, residual_mode="gate",
                            gate_mode="token"),
    "llama_token_gate": dict(arch="llama", bias=False, n_layer=3, n_head=4, n_kv_head=2, n_embd=24,
                             intermediate_size=20, vocab_size=37, block_size=8, tie_embeddings=False,
                             residual_mode="gate", gate_mode="token"),
    "llama_layer_gate_tied": dict(arch="llama", bias=False, n_layer=2, n_head=2, n_embd=8, vocab_size=37,
                                  block_size=8, residual_mode="gate", gate_mode="layer"),
}


def fsdp_facts(rank=0, world_size=1):
    return RunFacts(init_from="scratch", torchrun=world_size > 1, distributed=True, fsdp=True, rank=rank,
                    local_rank=rank, world_size=world_size, device="cpu", device_type="cpu", dtype="float32",
                    use_compile=False, grad_accum_steps=1, micro_tokens=0)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield fsdp_facts()
    dist.destroy_process_group()


def meta_init(config, facts, seed):
    """train.py's fsdp scratch path: torch.manual_seed(seed + rank), a meta model, shard + replay."""
    torch.manual_seed(seed + facts.rank)
    with torch.device("meta"):
        model = GPT(config)
    parallel.shard(model, facts, scratch=True, seed=seed)
    return model


def plain_init(config, seed):
    """DDP's init: GPT(config) after torch.manual_seed(seed); and the RNG state it leaves."""
    torch.manual_seed(seed)
    model = GPT(config)
    return model, torch.get_rng_state()

# -----------------------------------------------------------------------------
# 1. meta init == plain init


def all_variant_configs():
    for arch in ("gpt2", "llama"):
        for label, settings in residual_examples().items():
            extra = dict(bias=False, tie_embeddings=False) if arch == "llama" else {}
            yield f"{arch}, {label}", dict(arch=arch, n_layer=3, n_head=2, n_embd=8, vocab_size=37, block_size=8,
                                           **settings, **extra)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_replay_reproduces_gpt_init_for_gpt2_and_llama_with_the_layer_and_token_gates(name):
    assert parallel.replay_is_exact(GPTConfig(**CONFIGS[name]))


@pytest.mark.parametrize("chunk", [None, 48])
def test_meta_init_in_a_one_rank_group_equals_the_plain_init_for_every_residual_variant(one_rank_group, monkeypatch,
                                                                                       chunk):
    if chunk:  # every tensor over 48 elements replayed 48 at a time (a 1B model's: 4M at a time)
        monkeypatch.setattr(parallel, "CHUNK_NUMEL", chunk)
    for label, args in [*CONFIGS.items(), *all_variant_configs()]:
        config = GPTConfig(**args)
        expected, rng_after = plain_init(config, seed=11)
        model = meta_init(config, one_rank_group, seed=11)
        got = {k: parallel.local(v) for k, v in model.state_dict().items()}
        for key, value in expected.state_dict().items():
            assert torch.equal(got[key], value), (label, key)
        assert torch.equal(torch.get_rng_state(), rng_after), label  # dropout draws what it draws under DDP
        assert float(model.attenuation) == 1.0 and model.residual_alphas() == expected.residual_alphas()


def test_a_variant_the_replay_cannot_reproduce_falls_back_to_building_the_model_whole(one_rank_group, monkeypatch):
    config = GPTConfig(**CONFIGS["gpt2_layer_gate"])
    draws_in_init = RESIDUALS["gate"].__init__

    def init_with_a_draw(self, cfg):  # a variant that draws a random number of its own while it is built
        draws_in_init(self, cfg)
        torch.rand(1)

    monkeypatch.setattr(RESIDUALS["gate"], "__init__", init_with_a_draw)
    assert not parallel.replay_is_exact(config)
    expected, rng_after = plain_init(config, seed=3)  # its init, with the extra draw
    model = meta_init(config, one_rank_group, seed=3)
    for key, value in expected.state_dict().items():
        assert torch.equal(parallel.local(model.state_dict()[key]), value), key
    assert torch.equal(torch.get_rng_state(), rng_after)


def two_rank_worker(out_dir):
    """Under torchrun: every CONFIGS model meta-initialised on 2 ranks; rank 0 saves the gathered weights, every
    rank its RNG state."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    facts = fsdp_facts(rank, 2)
    result = {}
    for i, (name, args) in enumerate(CONFIGS.items()):
        parallel.CHUNK_NUMEL = 48 if i % 2 else 2**22  # half of them replayed in chunks (shards cut through them)
        model = meta_init(GPTConfig(**args), facts, seed=5)
        assert all(parallel.local(p).numel() < p.numel() for p in model.parameters() if p.shape[0] > 1)
        result[name] = {"weights": checkpoint.full_model_state(model), "rng": torch.get_rng_state()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_meta_init_on_two_ranks_equals_rank_0s_plain_init_and_keeps_each_ranks_rng(tmp_path):
    result = subprocess.run([*TORCHRUN, __file__, str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, args in CONFIGS.items():
        config = GPTConfig(**args)
        expected, rng_rank0 = plain_init(config, seed=5)
        _, rng_rank1 = plain_init(config, seed=6)
        got = ranks[0][name]["weights"]
        for key, value in expected.state_dict().items():
            if key != "attenuation":
                assert torch.equal(got[key], value), (name, key)
        assert torch.equal(ranks[0][name]["rng"], rng_rank0) and torch.equal(ranks[1][name]["rng"], rng_rank1)

# -----------------------------------------------------------------------------
# 2. no rank holds the whole float32 model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bpe_prose_shards(tmp_path_factory.mktemp("meta_data"), 4000, 20_000)


def train_cmd(out_dir, data, *args, ranks=2):
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    return [*launcher, "train.py", f"--data_dir={data['shards']}", f"--tokenizer={data['tokenizer']}",
            f"--out_dir={out_dir}", "--device=cpu", "--block_size=16", "--vocab_size=512", "--log_interval=1",
            "--track_alignment=False", "--seed=7", *args]


def run_all(commands, env=ENV):
    """Start the commands side by side (a torchrun launch mostly waits), then check each one finished."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, f"{proc.args}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return [stdout for stdout, _ in outputs]


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_no_rank_peak_rss_reaches_the_full_float32_model(data, tmp_path):
    # 48 blocks x 512 wide: 151M parameters, 604 MB in float32 (narrow blocks: the eval's gathered block is
    # small next to them); a tiny model measures the process's baseline (imports, the data, the process group)
    big = ["--n_layer=48", "--n_head=8", "--n_embd=512"]
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32"]
    common = ["--parallelism=fsdp", "--eval_only=True", "--batch_size=1", "--total_batch_tokens=32",
              "--eval_tokens=32"]
    # glibc keeps the heap pages of freed buffers (here: each block's all-gathered weights in the eval's forward,
    # about the whole model's worth over 48 blocks) unless large ones are mapped on their own: a fixed mmap
    # threshold returns them, so the peak shows what the process holds (docs/sharded-training.md)
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run_all([train_cmd(tmp_path / "big", data, *big, *common), train_cmd(tmp_path / "tiny", data, *tiny, *common)],
            env)
    n_params = rows(tmp_path / "big", "run")[0]["n_params"]
    assert n_params > 150e6
    full_mib = 4 * n_params / 2**20
    baseline = [m["max_rss_mib"] for m in rows(tmp_path / "tiny", "end")[0]["memory"]]
    peaks = [m["max_rss_mib"] for m in rows(tmp_path / "big", "end")[0]["memory"]]
    for rank, (peak, base) in enumerate(zip(peaks, baseline)):
        print(f"rank {rank}: peak RSS {peak:,.0f} MiB, tiny run's {base:,.0f} MiB, float32 model {full_mib:,.0f} MiB")
        # what building, sharding and one eval added: its half of the weights, one module replayed at a time,
        # the gathered blocks of the forward pass; the old path (build whole, then shard) added >= 1.5x full_mib
        assert peak - base < 0.75 * full_mib, (rank, peak, base, full_mib)

# -----------------------------------------------------------------------------
# 3. the conversions are lossless


def trained_plain(config, seed=0):
    """A plain model and AdamW after two steps (so the moments are not zero)."""
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    x = torch.randint(0, config.vocab_size, (2, 8))
    for _ in range(2):
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("name", ["gpt2_token_gate", "llama_layer_gate_tied", "llama_token_gate"])
def test_ddp_checkpoint_into_fsdp_and_sharded_checkpoint_into_ddp_are_bit_exact(one_rank_group, tmp_path, name):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    config = GPTConfig(**CONFIGS[name])
    plain, plain_opt = trained_plain(config)
    ckpt = {"model": plain.state_dict(), "optimizer": plain_opt.state_dict()}
    checkpoint.save_checkpoint(ckpt, str(tmp_path / "ckpt.pt"))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"), mmap=True)  # as load_resume reads it under fsdp

    # DDP ckpt.pt -> a meta model, sharded, loaded shard by shard
    torch.manual_seed(0)
    with torch.device("meta"):
        sharded = GPT(config)
    parallel.shard(sharded, one_rank_group, scratch=False)
    sharded_opt = sharded.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    parallel.load_resumed(sharded, sharded_opt, ckpt, str(tmp_path / "ckpt.pt"), one_rank_group)
    weights = checkpoint.full_model_state(sharded)
    for key, value in plain.state_dict().items():
        assert torch.equal(weights[key], value), key
    moments = get_optimizer_state_dict(sharded, sharded_opt, options=StateDictOptions(full_state_dict=True))
    names = checkpoint.optimizer_param_names(plain, plain_opt)
    for i, state in plain_opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(moments["state"][names[i]][key], value), (names[i], key)

    # -> a sharded checkpoint -> read whole into a plain model and optimizer (what a DDP resume does)
    state = {"iter_num": 2, "world_size": 1}
    checkpoint.save_sharded(str(tmp_path), "ckpt-00000002.dcp", sharded, sharded_opt, state, master=True)
    whole, by_name = checkpoint.read_sharded_whole(str(tmp_path / "ckpt-00000002.dcp"))
    torch.manual_seed(1)
    fresh = GPT(config)
    fresh_opt = fresh.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    if config.tie_embeddings:
        whole["lm_head.weight"] = whole["transformer.wte.weight"]  # load_resume adds a tied parameter's other name
    fresh.load_state_dict(whole)
    ddp = RunFacts.single_process()
    parallel.load_resumed(fresh, fresh_opt, {"optimizer_by_name": by_name}, str(tmp_path / "ckpt-00000002.dcp"), ddp)
    for key, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh_opt.state_dict()["state"].keys() == plain_opt.state_dict()["state"].keys()
    for i, state in plain_opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh_opt.state_dict()["state"][i][key], value), (names[i], key)

# -----------------------------------------------------------------------------
# 4. DDP -> FSDP -> DDP == DDP straight


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--batch_size=2", "--total_batch_tokens=64",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2", "--lr_decay_iters=6", "--eval_interval=2",
        "--eval_tokens=64", "--dropout=0.1", "--residual_mode=gate", "--gate_mode=layer", "--gate_lr_mult=10"]


def test_ddp_then_fsdp_then_ddp_continues_a_straight_ddp_run(data, tmp_path):
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    run_all([train_cmd(straight, data, *TINY, "--max_iters=6"), train_cmd(chain, data, *TINY, "--max_iters=2")])
    assert rows(chain, "end")[0]["iter"] == 2 and not os.path.exists(chain / checkpoint.SHARDED_POINTER)
    run_all([train_cmd(chain, data, *TINY, "--max_iters=4", "--init_from=resume", "--parallelism=fsdp")])
    assert json.loads((chain / checkpoint.SHARDED_POINTER).read_text())["iter_num"] == 4
    assert checkpoint.load_checkpoint(str(chain / "ckpt.pt"))["iter_num"] == 4  # the FSDP run's final export
    run_all([train_cmd(chain, data, *TINY, "--max_iters=6", "--init_from=resume", "--parallelism=ddp")])
    straight_losses = [r["loss"] for r in rows(straight, "train")]
    chain_losses = [r["loss"] for r in rows(chain, "train")]
    assert [r["iter"] for r in rows(chain, "train")] == list(range(6))  # the log keeps each leg's rows
    torch.testing.assert_close(chain_losses, straight_losses, rtol=1e-5, atol=0)
    torch.testing.assert_close([r["val_loss"] for r in rows(chain, "eval")],
                               [r["val_loss"] for r in rows(straight, "eval")], rtol=1e-5, atol=0)
    assert rows(chain, "run")[-1]["config"]["parallelism"] == "ddp"
    final, reference = (checkpoint.load_checkpoint(str(d / "ckpt.pt")) for d in (chain, straight))
    assert final["iter_num"] == 6 and final["best_val_loss"] == pytest.approx(reference["best_val_loss"], rel=1e-5)
    for key, value in reference["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=1e-3, atol=2e-4)  # test_fsdp.py's bound


def test_resume_picks_the_newest_resumable_checkpoint_of_either_parallelism(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    settings = dict(out_dir=str(out), init_from="resume", overwrite=False, eval_only=False, parallelism="fsdp")
    with pytest.raises(SettingError, match="nothing to resume"):
        check_resume_settings(settings)
    checkpoint.save_checkpoint({"model": {}, "iter_num": 4}, str(out / "ckpt.pt"))  # weights only
    with pytest.raises(SettingError, match="holds weights only"):
        check_resume_settings(settings)
    checkpoint.save_checkpoint({"model": {}, "optimizer": {}, "iter_num": 4}, str(out / "ckpt.pt"))
    check_resume_settings(settings)  # a DDP checkpoint resumes as fsdp
    assert checkpoint.resume_source(str(out), fsdp=True) == ("whole", str(out / "ckpt.pt"))
    shard_dir = out / "ckpt-00000006.dcp"
    shard_dir.mkdir()
    checkpoint.save_checkpoint({"iter_num": 6}, str(shard_dir / checkpoint.TRAIN_STATE))
    (out / checkpoint.SHARDED_POINTER).write_text(json.dumps({"dir": shard_dir.name, "iter_num": 6, "world_size": 2}))
    for fsdp in (True, False):  # the newer one, whichever parallelism runs
        assert checkpoint.resume_source(str(out), fsdp) == ("sharded", str(shard_dir))
    checkpoint.save_checkpoint({"model": {}, "optimizer": {}, "iter_num": 6}, str(out / "ckpt.pt"))
    assert checkpoint.resume_source(str(out), fsdp=True)[0] == "sharded"  # a tie: the running parallelism's own
    assert checkpoint.resume_source(str(out), fsdp=False)[0] == "whole"
    settings.update(init_from="scratch")
    with pytest.raises(SettingError, match="already holds a run"):
        check_resume_settings(settings)
    shutil.rmtree(out)


if __name__ == "__main__":
    two_rank_worker(sys.argv[1])
