"""Issue #23's scalar residual variants in model.py (lambdas, rezero, layerscale, deepnorm), on both archs: each
formula against the same sums written out here from the model's own sublayers and weights, each initial property,
the optimizer groups and lr rules, the attenuation ramp (a = 0 is the plain model bit for bit, or a clear
refusal), bad settings, and a short train.main run per variant (alignment tracking, alphas logged) followed by
analyze.main on its checkpoint; deepnorm and rezero under FSDP (a 1-rank group, in-process).

    python -m pytest -q -n 0 tests/test_variants_scalar.py
"""

import glob
import json
import math
import os

import pytest
import torch

import analyze
import train
from model import (GPT, RESIDUALS, DeepNorm, GPTConfig, Lambdas, LayerScale, initial_alphas, residual_examples,
                   residual_label, residual_settings, rope_cos_sin)
from nanoshift.common import SettingError

TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=64)
ARCHS = {"gpt2": dict(), "llama": dict(arch="llama", n_head=4, n_kv_head=2, bias=False, tie_embeddings=False)}
# every example of these variants (what bench.py times), each with what the ramp does with it
VARIANTS = {
    "lambdas": dict(residual_mode="lambdas"),
    "rezero": dict(residual_mode="rezero", rezero_norm=True),
    "rezero-no-norm": dict(residual_mode="rezero", rezero_norm=False),
    "layerscale": dict(residual_mode="layerscale"),
    "deepnorm": dict(residual_mode="deepnorm"),
}
RAMPS = ("lambdas", "rezero", "layerscale")  # the others refuse a < 1


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def build(arch, variant, seed=0, **more):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **ARCHS[arch]}, **VARIANTS[variant], **more)).eval()


def nudge(model, seed=3):
    """Move the variant's own parameters off their init (differently per entry), so a formula that mixes up
    layers or channels shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.residual.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def embeddings_and_rope(model, idx):
    """The trunk's input by hand: token (+ position) embeddings; rotary tables for llama."""
    T = idx.shape[1]
    wte = model.transformer.wte.weight
    if model.config.arch == "gpt2":
        return wte[idx] + model.transformer.wpe.weight[:T], None
    return wte[idx], rope_cos_sin(model.config, T)


def plain_twin(model):
    """The plain model with the variant's weights (all but its own parameters)."""
    cfg = {**model.config.to_dict(), "residual_mode": "none"}
    plain = GPT(GPTConfig(**cfg)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in model.residual_state_keys()})
    return plain


def check_states(model, idx, states, mids):
    """The model's hidden states, mid-block states and logits equal the hand-computed ones."""
    with torch.no_grad():
        resid, got_mids = model.hidden_states(idx, mid=True)
        logits, _ = model(idx, idx)
        expected_logits = model.lm_head(model.transformer.ln_f(states[-1]))
    assert len(resid) == len(states) == model.config.n_layer + 1 and len(got_mids) == len(mids)
    for l, (a, b) in enumerate(zip(resid, states)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"state {l}")
    for l, (a, b) in enumerate(zip(got_mids, mids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"mid {l}")
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)


# ---- the formulas, written out ----

@pytest.mark.parametrize("arch", list(ARCHS))
def test_lambdas_mix_the_stream_and_the_embeddings_before_every_block(arch):
    model = build(arch, "lambdas")
    nudge(model)
    idx = tokens()
    x0, rope = embeddings_and_rope(model, idx)
    r, c = model.lambdas.resid.detach(), model.lambdas.x0.detach()
    x, states, mids = x0, [x0], []
    with torch.no_grad():
        for l, block in enumerate(model.transformer.h):
            h = r[l] * x + c[l] * x0  # x = resid_λ_l x + x0_λ_l x0, then the plain pre-norm block
            mid = h + block.attn(block.ln_1(h), rope)
            x = mid + block.mlp(block.ln_2(mid))
            states.append(x)
            mids.append(mid)
    check_states(model, idx, states, mids)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", ["rezero", "rezero-no-norm"])
def test_rezero_scales_each_sublayer_update_by_the_layers_alpha(arch, variant):
    model = build(arch, variant)
    nudge(model)
    idx = tokens()
    x, rope = embeddings_and_rope(model, idx)
    alpha, norm = model.rezero.alpha.detach(), model.config.rezero_norm
    states, mids = [x], []
    with torch.no_grad():
        for l, block in enumerate(model.transformer.h):
            mid = x + alpha[l] * block.attn(block.ln_1(x) if norm else x, rope)
            x = mid + alpha[l] * block.mlp(block.ln_2(mid) if norm else mid)
            states.append(x)
            mids.append(mid)
    check_states(model, idx, states, mids)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layerscale_scales_each_sublayer_update_per_channel(arch):
    model = build(arch, "layerscale")
    nudge(model)
    idx = tokens()
    x, rope = embeddings_and_rope(model, idx)
    ls = model.layerscale
    states, mids = [x], []
    with torch.no_grad():
        for l, block in enumerate(model.transformer.h):
            attn_out = block.attn(block.ln_1(x), rope)
            mid = x + attn_out * ls.attn_scale[l].view(1, 1, -1)  # diag(λ) F: channel c times λ[c]
            mlp_out = block.mlp(block.ln_2(mid))
            x = mid + mlp_out * ls.mlp_scale[l].view(1, 1, -1)
            states.append(x)
            mids.append(mid)
    check_states(model, idx, states, mids)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_deepnorm_is_post_ln_with_the_residual_weighted_by_alpha(arch):
    model = build(arch, "deepnorm")
    idx = tokens()
    x, rope = embeddings_and_rope(model, idx)
    alpha = (2 * 3) ** 0.25  # N = 3 blocks
    states, mids = [x], []
    with torch.no_grad():
        for block in model.transformer.h:
            mid = block.ln_1(alpha * x + block.attn(x, rope))  # no pre-norm: F reads the normed state
            x = block.ln_2(alpha * mid + block.mlp(mid))
            states.append(x)
            mids.append(mid)
    check_states(model, idx, states, mids)
    for state in states[1:]:  # what the lens reads: post-LN states, unit scale at every depth
        if arch == "gpt2":
            assert state.mean(-1).abs().max() < 1e-5
        torch.testing.assert_close(state.pow(2).mean(-1), torch.ones(state.shape[:-1]), rtol=1e-3, atol=1e-3)


# ---- the initial properties ----

@pytest.mark.parametrize("n_layer, resid, x0", [(3, [1.15, 1.10, 1.05], [0.20, 0.125, 0.05]), (1, [1.15], [0.20]),
                                                 (12, None, None)])
def test_lambdas_start_from_nanochats_schedule(n_layer, resid, x0):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_layer": n_layer}, residual_mode="lambdas"))
    got_resid, got_x0 = model.lambdas.resid.tolist(), model.lambdas.x0.tolist()
    if resid is not None:
        assert got_resid == pytest.approx(resid) and got_x0 == pytest.approx(x0)
    assert got_resid[0] == pytest.approx(1.15) and got_resid[-1] == pytest.approx(1.05 if n_layer > 1 else 1.15)
    assert got_x0[0] == pytest.approx(0.20) and got_x0[-1] == pytest.approx(0.05 if n_layer > 1 else 0.20)
    assert all(a > b for a, b in zip(got_resid, got_resid[1:])) and all(a > b for a, b in zip(got_x0, got_x0[1:]))
    assert model.residual_alphas() == pytest.approx(initial_alphas(model.config))
    assert model.residual_alphas() == pytest.approx(got_resid)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", ["rezero", "rezero-no-norm"])
def test_rezero_at_alpha_0_is_the_embedding_path(arch, variant):
    model = build(arch, variant)
    assert model.residual_alphas() == [0.0] * 3 == initial_alphas(model.config)
    idx = tokens()
    emb, _ = embeddings_and_rope(model, idx)
    with torch.no_grad():
        resid, mids = model.hidden_states(idx, mid=True)
        logits, _ = model(idx, idx)
        assert all(torch.equal(state, emb) for state in resid + mids)  # every update is scaled away
        assert torch.equal(logits, model.lm_head(model.transformer.ln_f(emb)))
    # but the gradient reaches alpha (through the updates the blocks would add)
    _, loss = model.train()(idx, tokens(seed=2))
    loss.backward()
    assert model.rezero.alpha.grad.abs().min() > 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layerscale_starts_near_the_identity(arch):
    model = build(arch, "layerscale")
    assert torch.equal(model.layerscale.attn_scale, torch.full((3, 16), 0.1))  # CaiT at depth <= 18
    assert torch.equal(model.layerscale.mlp_scale, torch.full((3, 16), 0.1))
    assert model.residual_alphas() == pytest.approx([0.1] * 3) and initial_alphas(model.config) == [0.1] * 3
    idx = tokens()
    plain = plain_twin(model)
    with torch.no_grad():
        resid, _ = model.hidden_states(idx)
        plain_resid, _ = plain.hidden_states(idx)
        update, plain_update = resid[1] - resid[0], plain_resid[1] - plain_resid[0]
        assert update.norm() < 0.15 * plain_update.norm()  # about a tenth of the plain block's update
        tiny = build(arch, "layerscale", layerscale_init=1e-6)
        resid, _ = tiny.hidden_states(idx)
        torch.testing.assert_close(resid[-1], resid[0], rtol=0, atol=1e-6)  # 1e-6: the identity, nearly


def test_layerscale_init_follows_cait_by_depth_or_the_setting():
    assert [LayerScale.init_value({"n_layer": n}) for n in (1, 18, 19, 24, 25, 48)] == [0.1, 0.1, 1e-5, 1e-5, 1e-6,
                                                                                      1e-6]
    assert LayerScale.init_value({"n_layer": 36, "layerscale_init": 0.5}) == 0.5
    assert initial_alphas({"residual_mode": "layerscale", "n_layer": 2, "layerscale_init": 1e-4}) == [1e-4] * 2
    torch.manual_seed(0)
    deep = GPT(GPTConfig(n_layer=19, n_head=2, n_embd=8, block_size=8, vocab_size=32, residual_mode="layerscale"))
    assert deep.residual_alphas() == pytest.approx([1e-5] * 19)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_deepnorm_initialises_by_the_papers_gains(arch):
    """Xavier normal, gain beta = (8N)^(-1/4) for the value, output and feed-forward weights, 1 for query and key;
    measured as the sample std of each weight (64-wide blocks: thousands of draws per weight)."""
    shape = dict(n_layer=4, n_head=4, n_embd=64, block_size=16, vocab_size=64)
    extra = dict(ARCHS[arch], n_head=4, n_kv_head=2) if arch == "llama" else {}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, **extra}, residual_mode="deepnorm"))
    alpha, beta = DeepNorm.constants(4)
    assert alpha == pytest.approx(8 ** 0.25) and beta == pytest.approx(32 ** -0.25)
    assert model.residual_alphas() == pytest.approx([alpha] * 4) and initial_alphas(model.config) is None

    def xavier(w, gain):
        fan_out, fan_in = w.shape
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    for block in model.transformer.h:
        if arch == "gpt2":
            q, k, v = block.attn.c_attn.weight.detach().split(64, dim=0)
            gains = [(q, 1.0), (k, 1.0), (v, beta), (block.attn.c_proj.weight, beta), (block.mlp.c_fc.weight, beta),
                     (block.mlp.c_proj.weight, beta)]
            assert torch.equal(block.attn.c_attn.bias, torch.zeros(192))
        else:
            a, m = block.attn, block.mlp
            gains = [(a.q_proj.weight, 1.0), (a.k_proj.weight, 1.0), (a.v_proj.weight, beta), (a.o_proj.weight, beta),
                     (m.gate_proj.weight, beta), (m.up_proj.weight, beta), (m.down_proj.weight, beta)]
        for w, gain in gains:
            assert w.detach().std().item() == pytest.approx(xavier(w, gain), rel=0.1), (tuple(w.shape), gain)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)  # embeddings as GPT's


# ---- optimizer groups and lr rules ----

def groups_of(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"], g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variants_parameters_are_in_their_own_undecayed_groups(arch, variant):
    model = build(arch, variant)
    lr_mults = {"lambdas_lr_mult": 10.0, "rezero_lr_mult": 20.0, "layerscale_lr_mult": 30.0, "gate_lr_mult": 2.0}
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", lr_mults)
    groups = groups_of(model, opt)
    own = groups[2:]
    if variant == "lambdas":
        assert own == [(["lambdas.x0"], 0.0, pytest.approx(1e-2)), (["lambdas.resid"], 0.0, pytest.approx(1e-4))]
    elif variant.startswith("rezero"):
        assert own == [(["rezero.alpha"], 0.0, pytest.approx(2e-2))]
    elif variant == "layerscale":
        assert own == [(["layerscale.attn_scale", "layerscale.mlp_scale"], 0.0, pytest.approx(3e-2))]
    else:
        assert own == [] and list(model.residual.parameters()) == []  # deepnorm's alpha is a constant
    in_groups = [n for names, _, _ in groups for n in names]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(in_groups + frozen) == sorted(n for n, _ in model.named_parameters())  # each once
    if variant == "rezero-no-norm":  # the unused pre-norms are frozen: no gradient DDP would wait for
        assert sorted(frozen) == sorted(f"transformer.h.{l}.{ln}.{w}" for l in range(3) for ln in ("ln_1", "ln_2")
                                        for w in (("weight", "bias") if arch == "gpt2" else ("weight",)))
    else:
        assert frozen == []
    _, loss = model.train()(tokens(), tokens(seed=2))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_registry_knows_their_settings_labels_and_examples():
    assert [name for name in RESIDUALS if name in ("lambdas", "rezero", "layerscale", "deepnorm")] == [
        "lambdas", "rezero", "layerscale", "deepnorm"]
    settings = residual_settings()
    assert settings["lambdas_lr_mult"] == ("lambdas",) and settings["rezero_norm"] == ("rezero",)
    assert settings["rezero_lr_mult"] == ("rezero",) and settings["layerscale_init"] == ("layerscale",)
    assert settings["layerscale_lr_mult"] == ("layerscale",)
    examples = residual_examples()
    for kw in VARIANTS.values():
        assert examples[residual_label(kw)] == kw  # bench.py times each
    assert residual_label({"residual_mode": "layerscale", "layerscale_init": 0.01}) == "layerscale, init 0.01"
    assert residual_label({"residual_mode": "rezero"}) == "rezero"  # a log without the field: its default
    assert train.DEFAULTS["rezero_norm"] is True and train.DEFAULTS["layerscale_init"] is None
    assert all(train.DEFAULTS[k] == 1.0 for k in ("lambdas_lr_mult", "rezero_lr_mult", "layerscale_lr_mult"))
    assert Lambdas.RESID_LR_RATIO == 0.01


@pytest.mark.parametrize("bad, needle", [
    (dict(residual_mode="rezero", rezero_norm="no"), "rezero_norm must be True or False"),
    (dict(residual_mode="none", rezero_norm=1), "rezero_norm must be True or False"),  # checked in every mode
    (dict(residual_mode="layerscale", layerscale_init=0.0), "layerscale_init must be None"),
    (dict(residual_mode="layerscale", layerscale_init=-0.1), "layerscale_init must be None"),
    (dict(residual_mode="layerscale", layerscale_init=True), "layerscale_init must be None"),
    (dict(residual_mode="layerscale", layerscale_init=float("nan")), "layerscale_init must be None"),
    (dict(residual_mode="layerscale", layerscale_init="0.1"), "layerscale_init must be None"),
])
def test_bad_settings_are_refused_by_name(bad, needle):
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**TINY, **bad)


# ---- the attenuation ramp ----

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", RAMPS)
def test_the_ramp_at_0_is_the_plain_model_bit_for_bit(arch, variant):
    model = build(arch, variant)
    nudge(model)
    plain = plain_twin(model)
    idx, targets = tokens(), tokens(seed=2)
    configured = model.residual_alphas()
    with torch.no_grad():
        at_full = model(idx, targets)[0]
        model.set_attenuation(0.0)
        assert model.residual_alphas() == [1.0] * 3
        assert torch.equal(model(idx, targets)[0], plain(idx, targets)[0])
        (resid, mids), (plain_resid, plain_mids) = model.hidden_states(idx, True), plain.hidden_states(idx, True)
        assert all(torch.equal(a, b) for a, b in zip(resid + mids, plain_resid + plain_mids, strict=True))
        assert not torch.allclose(at_full, plain(idx, targets)[0])
        model.set_attenuation(0.5)  # mid-ramp: every scale half way to 1 (logged the same way)
        assert model.residual_alphas() == pytest.approx([1 - 0.5 * (1 - a) for a in configured])
        mid_ramp = model(idx, targets)[0]
        assert not torch.allclose(mid_ramp, at_full) and not torch.allclose(mid_ramp, plain(idx, targets)[0])
    # the ramp's gradient still reaches the variant's parameters
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.residual.parameters())


@pytest.mark.parametrize("variant, needle", [("deepnorm", "residual_mode='deepnorm' has no attenuation ramp"),
                                             ("rezero-no-norm", "rezero_norm=False has no attenuation ramp")])
def test_variants_without_a_plain_model_refuse_the_ramp(variant, needle, tmp_path):
    model = build("gpt2", variant)
    for a in (0.0, 0.5, 0.999):
        with pytest.raises(SettingError, match=needle) as err:
            model.set_attenuation(a)
        assert "attenuation_warmup_iters" in str(err.value)
    assert model.residual_alphas() == model.residual.alpha_values()  # nothing changed
    model.set_attenuation(1.0)  # the variant as configured is fine
    # a checkpoint of a ramped run cannot be loaded as it was at that step either
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict(), "iter_num": 2,
                "config": {"attenuation_warmup_iters": 10}}, tmp_path / "ckpt.pt")
    with pytest.raises(SettingError, match=needle):
        GPT.from_checkpoint(tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint({"model": model.state_dict(), "model_args": model.config.to_dict(), "iter_num": 2})
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx, idx)[0], model(idx, idx)[0])


def test_train_refuses_the_ramp_for_deepnorm_before_any_work(prose_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # with the other settings checks: exit 2, nothing written
        train.main([*train_args(prose_shards, tmp_path / "ramp", "deepnorm"), "--attenuation_warmup_iters=4"])
    assert exit_info.value.code == 2 and "deepnorm' has no attenuation ramp" in capsys.readouterr().err
    assert not (tmp_path / "ramp").exists()


# ---- wiring inside the block: activation checkpointing recomputes it ----

@pytest.mark.parametrize("variant", ["rezero", "layerscale", "deepnorm"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    grads = []
    for on in (False, True):
        model = build("llama", variant)
        nudge(model)
        model.train().set_activation_checkpointing(on)
        _, loss = model(tokens(), tokens(seed=2))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads))


# ---- through train.py and analyze.py ----

def train_args(data, out, variant, *more):
    kw = VARIANTS[variant]
    return [f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=4", "--total_batch_tokens=128", "--warmup_iters=0",
            "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=3", "--eval_tokens=256", "--max_iters=3",
            "--threads=1", "--track_sequences=2", *[f"--{k}={v}" for k, v in kw.items()], *more]


LR_MULTS = {"lambdas": "--lambdas_lr_mult=100", "rezero": "--rezero_lr_mult=10", "layerscale": "--layerscale_lr_mult=10"}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_with_tracking_and_analyses(variant, arch, prose_shards, tmp_path, capsys):
    out = tmp_path / variant
    llama = ["--arch=llama", "--bias=False", "--tie_embeddings=False"] if arch == "llama" else []
    lr_mult = [LR_MULTS[mode]] if (mode := VARIANTS[variant]["residual_mode"]) in LR_MULTS else []
    state = train.main(train_args(prose_shards, out, variant, *llama, *lr_mult))
    assert state.iter_num == 3 and state.raw_model.config.residual_mode == mode
    with open(out / "log.jsonl") as f:
        rows = list(map(json.loads, f))
    evals = [r for r in rows if r["type"] == "eval"]
    start = initial_alphas({**VARIANTS[variant], "n_layer": 2})
    if variant == "deepnorm":
        assert start is None and all(r["alphas"] == pytest.approx([4 ** 0.25] * 2) for r in evals)
    else:
        assert evals[0]["alphas"] == pytest.approx(start, abs=1e-6)
        assert evals[-1]["alphas"] != pytest.approx(start, abs=1e-4)  # learned, and logged
    assert all(math.isfinite(r["loss"]) for r in rows if r["type"] == "train")
    assert evals[-1]["alignment"]["misalignment"] is not None  # tracked
    assert "has no effect" not in capsys.readouterr().err  # its lr multiplier acts in this mode

    val = glob.glob(f"{prose_shards}/*_val_*.bin")[0]
    analyze.main(["--ckpt", str(out), "--shards", val, "--num_sequences=2", "--seq_len=32", "--batch_size=2",
                  f"--out_dir={tmp_path / 'analysis'}", "--progress=False", "--log", str(out / "log.jsonl")])
    with open(tmp_path / "analysis" / "metrics.json") as f:
        metrics = json.dumps(json.load(f))
    assert mode in metrics
    assert os.path.exists(tmp_path / "analysis" / "alphas.png")


@pytest.mark.parametrize("variant, arch", [("deepnorm", "llama"), ("lambdas", "gpt2"), ("layerscale", "gpt2"),
                                           ("rezero-no-norm", "gpt2")])
def test_fsdp_one_rank_trains_each_wiring(variant, arch, prose_shards, tmp_path):
    """FSDP shards each block and gathers it in its forward: the variants that call the sublayers themselves run
    inside Block.forward, so the weights are there (and activation checkpointing recomputes them); the variant's
    own parameters live in the root unit and are gathered for logging (a DTensor between steps)."""
    out = tmp_path / "fsdp"
    llama = ["--arch=llama", "--bias=False", "--tie_embeddings=False", "--activation_checkpointing=True"] \
        if arch == "llama" else []
    lr_mult = [LR_MULTS[m]] if (m := VARIANTS[variant]["residual_mode"]) in LR_MULTS else []
    state = train.main(train_args(prose_shards, out, variant, "--parallelism=fsdp", *llama, *lr_mult))
    assert state.iter_num == 3
    with open(out / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    assert len(evals) == 2 and all(len(r["alphas"]) == 2 for r in evals)
    assert evals[-1]["alignment"]["misalignment"] is not None
    if variant != "deepnorm":
        assert evals[-1]["alphas"] != pytest.approx(evals[0]["alphas"], abs=1e-4)
    loaded = GPT.from_checkpoint(str(out / "ckpt.pt"))  # the consolidated weights load as the plain class does
    assert loaded.config.residual_mode == VARIANTS[variant]["residual_mode"]
    assert loaded.residual_alphas() == pytest.approx(evals[-1]["alphas"], abs=1e-6)


def test_a_lambdas_run_resumes_exactly_with_its_two_lr_groups(prose_shards, tmp_path):
    """lambdas is the one variant with two optimizer groups of its own: a resume must put each one's AdamW
    moments and lr back (the same weights as a run never stopped)."""
    common = ["--eval_interval=2", "--lr_decay_iters=4", "--lambdas_lr_mult=100", "--dropout=0.1"]
    straight = train.main([*train_args(prose_shards, tmp_path / "straight", "lambdas", *common), "--max_iters=4"])
    train.main([*train_args(prose_shards, tmp_path / "stopped", "lambdas", *common), "--max_iters=2"])
    resumed = train.main([*train_args(prose_shards, tmp_path / "stopped", "lambdas", *common), "--max_iters=4",
                          "--init_from=resume"])
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lambdas.resid"], torch.tensor(Lambdas.init_schedule(2)[0]))  # it trained
    groups = resumed.optimizer.param_groups
    assert [g["lr_mult"] for g in groups[2:]] == [100.0, pytest.approx(1.0)]
