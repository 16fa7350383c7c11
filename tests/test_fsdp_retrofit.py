"""FSDP retrofits loaded shard by shard (issue #25): train.py --parallelism=fsdp --init_from=<HF directory>.

    python -m pytest -q -n 0 tests/test_fsdp_retrofit.py

training.build_model builds a retrofit from safetensors weights on the meta device (from the HF config alone:
hf.pretrained_config), and parallel.shard loads it one tensor at a time, each rank keeping its shard
(parallel.load_pretrained_shards). Checked against the whole-model path (hf.from_pretrained):
1. tiny HF GPT-2 and Llama models (tied, untied, in several safetensors files with an index), with no residual
   variant, the token gate and the value residual (a buffer): the same weights, logits and RNG state after, bit
   for bit, in a 1-rank group and on 2 gloo ranks; the model is on the meta device until sharded and
   from_pretrained is never called; every registered residual variant in a 1-rank group;
2. memory: on 2 ranks, no rank's peak RSS grows by the whole float32 model (67M parameters);
3. .bin weights, a hub name and a variant whose initial values are random fall back to the whole build with a
   note (and load correctly);
4. what from_pretrained refuses (an unsupported config field) is refused with the same message, and weights the
   directory lacks or holds in another shape are named.
"""
import os
import subprocess
import sys

import pytest

from conftest import TORCHRUN
import torch
import torch.distributed as dist

from model import RESIDUALS, GPT, GPTConfig, residual_config_keys, residual_examples
from nanoshift import checkpoint, hf, parallel, training
from nanoshift.common import SettingError
from nanoshift.run import RunFacts

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
MODES = {"none": {}, "token gate": dict(residual_mode="gate", gate_mode="token"),
         "value residual": dict(residual_mode="value_residual")}  # a buffer of the variant's own (lambdas)


def moved_off_init(model):
    """Every weight moved away from its init (norm weights included), so a weight read wrong shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(kind, folder):
    """A tiny HF model of this kind saved with save_pretrained (safetensors); dims that do not split evenly over
    2 ranks (37 vocabulary rows, 3 layers, 12 MLP rows)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=3, n_head=2, n_embd=10, vocab_size=37, n_positions=16, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3, intermediate_size=12,
            vocab_size=37, max_position_embeddings=16, tie_word_embeddings=kind == "llama tied",
            bos_token_id=0, eos_token_id=0))
    # the untied Llama in several files (model.safetensors.index.json names each tensor's file)
    moved_off_init(model).save_pretrained(folder, **({"max_shard_size": "1KB"} if kind == "llama untied" else {}))
    return str(folder)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {kind: save_hf(kind, tmp_path_factory.mktemp(kind.replace(" ", "_")))
            for kind in ("gpt2", "llama tied", "llama untied")}
    assert os.path.isfile(os.path.join(dirs["llama untied"], "model.safetensors.index.json"))
    return dirs


def fsdp_facts(init_from, rank=0, world_size=1):
    return RunFacts(init_from=init_from, torchrun=world_size > 1, distributed=True, fsdp=True, rank=rank,
                    local_rank=rank, world_size=world_size, device="cpu", device_type="cpu", dtype="float32",
                    use_compile=False, grad_accum_steps=1, micro_tokens=0)


def settings(**overrides):
    """The settings build_model reads for a retrofit: the residual ones, at GPTConfig's defaults."""
    return {**{k: GPTConfig.__dataclass_fields__[k].default for k in residual_config_keys()}, **overrides}


def retrofit(facts, seed=7, **mode):
    """train.py's order: the seed, build_model, (the process group), place; returns (model, built_on_meta)."""
    torch.manual_seed(seed + facts.rank)
    model = training.build_model(settings(**mode), facts, {}, None)
    on_meta = parallel.is_meta(model)
    parallel.place(model, facts, scratch=False, seed=seed)
    return model, on_meta


def whole(folder, seed=7, **mode):
    """The whole-model path (what DDP runs, and fsdp before): from_pretrained after the same seed, and the RNG
    state it leaves."""
    torch.manual_seed(seed)
    model = hf.from_pretrained(folder, **mode)
    return model, torch.get_rng_state()


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def assert_same_model(sharded, expected, label):
    got = checkpoint.full_model_state(sharded)
    for key, value in expected.state_dict().items():
        if key != "attenuation":
            assert torch.equal(got[key], value), (label, key)
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = sharded.eval()(idx, idx)
        expected_logits, _ = expected.eval()(idx, idx)
    assert torch.equal(logits, expected_logits), label

# -----------------------------------------------------------------------------
# 1. shard by shard == from_pretrained


@pytest.mark.parametrize("kind", ["gpt2", "llama tied", "llama untied"])
def test_a_safetensors_retrofit_is_built_on_meta_and_loads_shard_by_shard_exactly_as_from_pretrained(
        hf_dirs, one_rank_group, monkeypatch, capsys, kind):
    folder = hf_dirs[kind]
    for label, mode in MODES.items():
        expected, rng_after = whole(folder, **mode)
        with monkeypatch.context() as m:
            m.setattr(training, "from_pretrained", lambda *a, **k: pytest.fail("built the whole model"))
            model, on_meta = retrofit(fsdp_facts(folder), **mode)
        assert on_meta, label
        assert model.config == expected.config, label
        assert_same_model(model, expected, label)
        assert torch.equal(torch.get_rng_state(), rng_after), label  # dropout then draws what it draws under DDP
        assert float(model.attenuation) == 1.0 and model.residual_alphas() == expected.residual_alphas()
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["gpt2", "llama untied"])
def test_every_registered_residual_variant_loads_shard_by_shard_as_from_pretrained_gives_it(hf_dirs, one_rank_group,
                                                                                           capsys, kind):
    unreplayable = []
    for label, mode in residual_examples().items():
        expected, rng_after = whole(hf_dirs[kind], **mode)
        model, on_meta = retrofit(fsdp_facts(hf_dirs[kind]), **mode)
        assert on_meta, label
        assert_same_model(model, expected, label)
        # where the replay cannot draw what GPT(config) draws (deepnorm's xavier init of the blocks), only the RNG
        # differs (and shard says so)
        assert torch.equal(torch.get_rng_state(), rng_after) == parallel.replay_is_exact(model.config), label
        if not parallel.replay_is_exact(model.config):
            unreplayable.append(model.config.residual_mode)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert [note for note in notes if "dropout draws other masks" in note] == [
        f"note: residual_mode={mode!r}: the random draws of the whole-model build cannot be replayed, so dropout "
        f"draws other masks than a DDP retrofit's" for mode in unreplayable]


def two_rank_worker(out_dir, folders):
    """Under torchrun: each HF model retrofitted with the token gate on 2 ranks; rank 0 saves the gathered
    weights, every rank its RNG state."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for folder in folders:
        model, on_meta = retrofit(fsdp_facts(folder, rank, 2), **MODES["token gate"])
        assert on_meta
        # every rank holds only its part of each sharded weight
        assert all(parallel.local(p).numel() < p.numel() for p in model.parameters() if p.shape[0] > 1)
        result[folder] = {"weights": checkpoint.full_model_state(model), "rng": torch.get_rng_state()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_on_two_ranks_each_rank_loads_its_shards_and_the_gathered_model_is_from_pretrained(hf_dirs, tmp_path):
    folders = list(hf_dirs.values())
    result = subprocess.run([*TORCHRUN, __file__, str(tmp_path), *folders], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for folder in folders:
        expected, rng_rank0 = whole(folder, seed=7, **MODES["token gate"])
        _, rng_rank1 = whole(folder, seed=8, **MODES["token gate"])  # rank 1 was seeded seed + 1, as in train.py
        for key, value in expected.state_dict().items():
            if key != "attenuation":
                assert torch.equal(ranks[0][folder]["weights"][key], value), (folder, key)
        assert torch.equal(ranks[0][folder]["rng"], rng_rank0) and torch.equal(ranks[1][folder]["rng"], rng_rank1)

# -----------------------------------------------------------------------------
# 2. no rank holds the whole model


def peak_rss_worker(out_dir, folder):
    """Under torchrun: the peak RSS a retrofit adds on each rank (VmHWM after, minus VmHWM before; a tiny meta
    model is built first, so the one-time cost of the first meta-device build is not counted)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with torch.device("meta"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, vocab_size=8, block_size=4))
    before = peak_rss_kib()
    model, on_meta = retrofit(fsdp_facts(folder, rank, 2))
    grown = peak_rss_kib() - before
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out_dir, f"rss{rank}.txt"), "w") as f:
        f.write(f"{grown} {n_params} {int(on_meta)}")
    dist.barrier()
    dist.destroy_process_group()


def peak_rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_no_rank_s_peak_rss_grows_by_the_whole_float32_model(tmp_path):
    # 20 blocks x 512 wide, an 8000-token vocabulary: 67M parameters, 256 MiB in float32, the largest tensor 16 MiB
    folder = str(tmp_path / "gpt2")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=20, n_head=8, n_embd=512, vocab_size=8000, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(folder)
    # large buffers mapped on their own, so that a freed one leaves RSS (docs/sharded-training.md)
    result = subprocess.run([*TORCHRUN, __file__, "--peak_rss", str(tmp_path), folder], cwd=ROOT, capture_output=True,
                            env={**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        grown_kib, n_params, on_meta = map(int, (tmp_path / f"rss{rank}.txt").read_text().split())
        full_kib = 4 * n_params / 1024
        print(f"rank {rank}: peak RSS grew {grown_kib / 1024:,.0f} MiB, float32 model {full_kib / 1024:,.0f} MiB")
        # its half of the weights, one full tensor at a time (read, or replayed to advance the RNG) and ~14 MiB
        # of imports and meta-device modules: 0.64x measured (built whole, then sharded: 2.3x)
        assert on_meta and grown_kib < 0.75 * full_kib, (rank, grown_kib, full_kib)

# -----------------------------------------------------------------------------
# 3. the fallbacks: built whole, with a note


def test_bin_weights_fall_back_to_the_whole_build_with_a_note(hf_dirs, tmp_path, one_rank_group, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = hf_dirs["llama tied"]
    torch.save(safetensors_torch.load_file(os.path.join(source, "model.safetensors")), bin_dir / "pytorch_model.bin")
    for name in ("config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(source, name)):
            (bin_dir / name).write_bytes(open(os.path.join(source, name), "rb").read())
    assert hf.safetensors_files(str(bin_dir)) is None
    model, on_meta = retrofit(fsdp_facts(str(bin_dir)), **MODES["token gate"])
    out = capsys.readouterr().out
    assert not on_meta
    assert "no .safetensors weights" in out and "every rank builds the whole float32 model" in out
    expected, _ = whole(source, **MODES["token gate"])
    assert_same_model(model, expected, "bin")


def test_a_hub_name_is_built_whole():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=37, block_size=8)
    assert "no .safetensors weights" in parallel.retrofit_builds_whole("gpt2", config)


def test_a_variant_with_random_initial_values_falls_back_to_the_whole_build(hf_dirs, one_rank_group, monkeypatch,
                                                                            capsys):
    draws_in_init = RESIDUALS["gate"].__init__

    def init_with_random_logits(self, cfg):  # logits that start random: from_pretrained's depend on its draws
        draws_in_init(self, cfg)
        with torch.no_grad():
            self.logits.normal_()

    monkeypatch.setattr(RESIDUALS["gate"], "__init__", init_with_random_logits)
    folder = hf_dirs["gpt2"]
    model, on_meta = retrofit(fsdp_facts(folder), residual_mode="gate", gate_mode="layer")
    assert not on_meta
    assert "starts from random values of its own" in capsys.readouterr().out
    expected, _ = whole(folder, residual_mode="gate", gate_mode="layer")
    assert_same_model(model, expected, "random gate")

# -----------------------------------------------------------------------------
# 4. bad input: the same refusals


def test_an_unsupported_config_field_is_refused_with_from_pretrained_s_message(tmp_path):
    torch.manual_seed(0)
    folder = str(tmp_path / "biased")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=12, vocab_size=37,
        attention_bias=True)).save_pretrained(folder)
    with pytest.raises(ValueError) as plain:
        hf.from_pretrained(folder)
    assert "attention_bias=True is not supported" in str(plain.value)
    with pytest.raises(SettingError) as sharded:
        training.build_model(settings(), fsdp_facts(folder), {}, None)
    assert str(sharded.value) == f"init_from={folder!r}: {plain.value}"


def test_a_missing_or_misshapen_weight_is_named_before_any_tensor_is_read(hf_dirs, tmp_path):
    source = hf_dirs["llama untied"]
    config = hf.pretrained_config(source)
    weights = {}
    for file in sorted({f for f in hf.safetensors_files(source).values()}):
        weights.update(safetensors_torch.load_file(file))
    for name, change in [("missing", lambda w: w.pop("model.norm.weight")),
                         ("misshapen", lambda w: w.update({"lm_head.weight": torch.zeros(36, 8)}))]:
        broken = tmp_path / name
        broken.mkdir()
        changed = dict(weights)
        change(changed)
        safetensors_torch.save_file(changed, str(broken / "model.safetensors"))
        with torch.device("meta"):
            model = GPT(config)
        with pytest.raises(ValueError) as err:
            next(hf.pretrained_tensors(str(broken), model))
        assert str(broken) in str(err.value)
        assert ("weights missing for ['transformer.ln_f.weight']" if name == "missing" else
                "lm_head.weight has shape (36, 8), expected (37, 8)") in str(err.value)


if __name__ == "__main__":
    if sys.argv[1] == "--peak_rss":
        peak_rss_worker(*sys.argv[2:])
    else:
        two_rank_worker(sys.argv[1], sys.argv[2:])
