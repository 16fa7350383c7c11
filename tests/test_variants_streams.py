"""Issue #23's residual variants that change what flows between the blocks (model.py): value residual (ResFormer),
hyper-connections (HC, and mHC with Sinkhorn) and denseformer, on both archs. For each: its formula against the
math written out by hand with the model's own weights (parameters moved off their init, so a wrong formula
shows), its initial property (the plain model, bit for bit where the form allows), its parameters in their own
optimizer group without weight decay, the attenuation ramp (a = 0: the plain model bit for bit), activation
checkpointing, bad settings, an HF Llama imported into each (a retrofit), and a short train.main run with alignment
tracking, analyze.main on its checkpoint and a 1-rank FSDP run equal to one process.

    python -m pytest -q -n 0 tests/test_variants_streams.py
"""

import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import analyze
import train
from conftest import save_tiny_llama
from model import GPT, GPTConfig, initial_alphas, residual_examples, residual_label, rope_cos_sin
from nanoshift.hf import from_pretrained

TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=64)
ARCHS = {"gpt2": dict(), "llama": dict(arch="llama", n_head=4, n_kv_head=2, bias=False, tie_embeddings=False)}
VARIANTS = {  # the settings each test runs: every example, and the fixed value mix
    "value-learned": dict(residual_mode="value_residual", value_residual_learned=True),
    "value-fixed": dict(residual_mode="value_residual", value_residual_learned=False),
    "hc": dict(residual_mode="hyper_connections", hc_streams=3, hc_sinkhorn_iters=0),
    "mhc": dict(residual_mode="hyper_connections", hc_streams=3, hc_sinkhorn_iters=7),
    "denseformer": dict(residual_mode="denseformer"),
}


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def build(arch, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **ARCHS[arch], **kw})).eval()


def plain_twin(model):
    """The plain model with model's own weights (all but the variant's parameters)."""
    plain = GPT(GPTConfig(**{**model.config.to_dict(), "residual_mode": "none"})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in model.residual_state_keys()})
    return plain


def nudge(model, scale=0.3):
    """Move the variant's own parameters off their init, the same way every time."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.residual.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def run_all(model, idx):
    """(logits for every position, resid states, mid states)."""
    with torch.no_grad():
        logits, _ = model(idx, idx)
        resid, mids = model.hidden_states(idx, mid=True)
    return logits, resid, mids


def assert_bit_for_bit(model, other, idx):
    """The same logits, residual states and mid-block states, bit for bit."""
    (logits, resid, mids), (other_logits, other_resid, other_mids) = run_all(model, idx), run_all(other, idx)
    assert torch.equal(logits, other_logits)
    assert len(resid) == len(other_resid) and all(torch.equal(a, b) for a, b in zip(resid, other_resid))
    assert len(mids) == len(other_mids) and all(torch.equal(a, b) for a, b in zip(mids, other_mids))


# ---- the math by hand ----

def embeddings(model, idx):
    tr = model.transformer
    if model.config.arch == "gpt2":
        return tr.wte(idx) + tr.wpe(torch.arange(idx.size(1)))
    return tr.wte(idx)


def rope_of(model, T):
    return None if model.config.arch == "gpt2" else rope_cos_sin(model.config, T)


def logits_of(model, x):
    return model.lm_head(model.transformer.ln_f(x))


def attention_by_hand(attn, x, rope, mix=None):
    """(output, own values) of a block's attention from its weight matrices, softmax written out; mix =
    (v_first, w_own, w_first) uses w_own * V + w_first * v_first as the values (ResFormer)."""
    B, T, C = x.shape
    if hasattr(attn, "c_attn"):  # gpt2
        heads = kv_heads = attn.n_head
        q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=-1)
        out_w, out_b = attn.c_proj.weight, attn.c_proj.bias
    else:
        heads, kv_heads = attn.n_head, attn.n_kv_head
        q, k, v = x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T
        out_w, out_b = attn.o_proj.weight, None
    hd = C // heads
    q = q.view(B, T, heads, hd).transpose(1, 2)
    k = k.view(B, T, kv_heads, hd).transpose(1, 2)
    v = v.view(B, T, kv_heads, hd).transpose(1, 2)
    if rope is not None:  # rotate_half by hand: (x1, x2) -> (-x2, x1)
        cos, sin = rope
        turn = lambda t: torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), dim=-1)  # noqa: E731
        q, k = q * cos + turn(q) * sin, k * cos + turn(k) * sin
    own = v
    if mix is not None and mix[0] is not None:
        v_first, w_own, w_first = mix
        v = w_own * v + w_first * v_first
    k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ out_w.T
    return (y if out_b is None else y + out_b), own


def block_by_hand(block, x, rope, mix=None):
    """(output, mid, own values) of a pre-norm block: mid = x + attn(ln_1 x), output = mid + mlp(ln_2 mid)."""
    attn_out, own = attention_by_hand(block.attn, block.ln_1(x), rope, mix)
    mid = x + attn_out
    return mid + block.mlp(block.ln_2(mid)), mid, own


def sinkhorn_by_hand(logits, iters):
    m = logits.exp()
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)  # rows
        m = m / m.sum(dim=-2, keepdim=True)  # columns
    return m


# ---- value residual ----

@pytest.mark.parametrize("arch", list(ARCHS))
def test_value_residual_mixes_every_later_layers_values_with_the_first_layers(arch):
    m = build(arch, **VARIANTS["value-learned"])
    nudge(m)
    idx = tokens()
    lambdas = m.value_residual.lambdas.detach()
    with torch.no_grad():
        rope = rope_of(m, idx.size(1))
        x = embeddings(m, idx)
        states, mids, v_first = [x], [], None
        for l, block in enumerate(m.transformer.h):
            mix = None if l == 0 else (v_first, lambdas[l - 1, 0], lambdas[l - 1, 1])
            x, mid, own = block_by_hand(block, x, rope, mix)
            if l == 0:
                v_first = own  # layer 0's values, from layer 0's own input
            states.append(x)
            mids.append(mid)
        want = logits_of(m, x)
    logits, resid, got_mids = run_all(m, idx)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(resid + got_mids, states + mids, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert m.residual_alphas() == [1.0] + lambdas[:, 0].tolist()  # λ_own per layer, layer 0 keeps its own


@pytest.mark.parametrize("arch", list(ARCHS))
def test_value_residual_at_lambdas_1_0_is_the_plain_model_and_at_its_init_is_not(arch):
    m = build(arch, **VARIANTS["value-learned"])
    plain = plain_twin(m)
    idx = tokens()
    assert torch.equal(m.value_residual.lambdas, torch.full((2, 2), 0.5))  # ResFormer's 0.5 / 0.5
    assert m.residual_alphas() == initial_alphas(m.config) == [1.0, 0.5, 0.5]
    assert not torch.allclose(run_all(m, idx)[0], run_all(plain, idx)[0], atol=1e-4)
    with torch.no_grad():
        m.value_residual.lambdas.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert_bit_for_bit(m, plain, idx)


def test_fixed_value_residual_has_no_parameters_and_keeps_checkpoints_plain():
    m = build("gpt2", **VARIANTS["value-fixed"])
    assert list(m.value_residual.parameters()) == [] and m.residual_state_keys() == set()
    assert set(m.state_dict()) == set(plain_twin(m).state_dict())
    assert m.residual_alphas() == [1.0, 0.5, 0.5] and initial_alphas(m.config) is None  # not learned
    assert residual_label(m.config) == "value residual, lambdas 0.5/0.5"
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert len(opt.param_groups) == 2  # decay / no decay: nothing of its own




# ---- hyper-connections ----

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("form", ["hc", "mhc"])
def test_hyper_connections_match_the_stream_formula_by_hand(arch, form):
    m = build(arch, **VARIANTS[form])
    nudge(m)
    idx = tokens()
    hc, n = m.hyper_connections, 3
    read, write = hc.read.detach(), hc.write.detach()
    R = sinkhorn_by_hand(hc.mix.detach(), 7) if form == "mhc" else hc.mix.detach()
    with torch.no_grad():
        rope = rope_of(m, idx.size(1))
        x0 = embeddings(m, idx)
        H = [x0] + [torch.zeros_like(x0)] * (n - 1)  # stream 0 holds the embeddings
        states, mids = [x0], []
        for l, block in enumerate(m.transformer.h):
            h = sum(read[l, j] * H[j] for j in range(n))
            out, mid, _ = block_by_hand(block, h, rope)
            update = out - h
            beta = sum(write[l, i] for i in range(n))
            mids.append(sum(H) + beta * (mid - h))  # the sum had the block written its attention update alone
            H = [sum(R[l, j, i] * H[j] for j in range(n)) + write[l, i] * update for i in range(n)]
            states.append(sum(H))  # the lens reads the streams' sum
        want = logits_of(m, sum(H))  # and so does the final norm
    logits, resid, got_mids = run_all(m, idx)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    for got, ref in zip(resid + got_mids, states + mids, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    carry = (R.sum(dim=(-2, -1)) / n).tolist()  # the alphas: the carry of the streams' sum
    assert m.residual_alphas() == pytest.approx(carry, abs=1e-6)
    if form == "mhc":
        assert (R >= 0).all()
        torch.testing.assert_close(R.sum(-1), torch.ones(3, n), atol=1e-3, rtol=0)  # rows (converging)
        torch.testing.assert_close(R.sum(-2), torch.ones(3, n))  # columns (exact after the last round)
        assert carry == pytest.approx([1.0] * 3, abs=1e-3)  # doubly stochastic: the sum is carried whole
    else:
        assert carry != pytest.approx([1.0] * 3, abs=1e-2)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_plain_hyper_connections_at_init_are_the_plain_model_bit_for_bit(arch):
    m = build(arch, **VARIANTS["hc"])
    hc = m.hyper_connections
    assert torch.equal(hc.read, torch.tensor([[1.0, 0, 0]] * 3)) and torch.equal(hc.write, hc.read)
    assert torch.equal(hc.mix, torch.eye(3).expand(3, 3, 3))
    plain = plain_twin(m)
    idx = tokens()
    assert_bit_for_bit(m, plain, idx)
    assert m.residual_alphas() == initial_alphas(m.config) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mhc_at_init_is_the_plain_model_to_within_its_off_diagonal_mass(arch):
    m = build(arch, **VARIANTS["mhc"])
    R = sinkhorn_by_hand(m.hyper_connections.mix.detach(), 7)
    off = R - torch.diag_embed(R.diagonal(dim1=-2, dim2=-1))
    assert 0 < off.max() < 1e-3 and (R.diagonal(dim1=-2, dim2=-1) > 0.999).all()  # near I, not I
    plain = plain_twin(m)
    idx = tokens()
    got, want = run_all(m, idx)[0], run_all(plain, idx)[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert not torch.equal(got, want)
    assert m.residual_alphas() == pytest.approx([1.0] * 3) and initial_alphas(m.config) is None  # 1, not learned


# ---- denseformer ----

@pytest.mark.parametrize("arch", list(ARCHS))
def test_denseformer_averages_the_embeddings_and_every_block_output(arch):
    m = build(arch, residual_mode="denseformer")
    nudge(m)
    idx = tokens()
    w = m.denseformer.weights.detach()
    with torch.no_grad():
        rope = rope_of(m, idx.size(1))
        x = embeddings(m, idx)
        outputs, states, mids = [x], [x], []
        for l, block in enumerate(m.transformer.h):
            out, mid, _ = block_by_hand(block, x, rope)
            outputs.append(out)
            x = sum(w[l, j] * outputs[j] for j in range(l + 2))  # embeddings, block outputs 1 .. l + 1
            states.append(x)
            mids.append(mid)
        want = logits_of(m, x)
    logits, resid, got_mids = run_all(m, idx)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    for got, ref in zip(resid + got_mids, states + mids, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert m.residual_alphas() == w.diagonal(offset=1).tolist()  # the weight on the block's own output


@pytest.mark.parametrize("arch", list(ARCHS))
def test_denseformer_at_init_is_the_plain_model_bit_for_bit(arch):
    m = build(arch, residual_mode="denseformer")
    assert torch.equal(m.denseformer.weights, torch.eye(4)[1:])  # w_l,l+1 = 1, the rest 0
    plain = plain_twin(m)
    idx = tokens()
    assert_bit_for_bit(m, plain, idx)
    assert m.residual_alphas() == initial_alphas(m.config) == [1.0, 1.0, 1.0]


# ---- every variant: the ramp, the optimizer, the settings ----

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attenuation_0_is_the_plain_model_bit_for_bit_and_the_ramp_moves_the_alphas(arch, variant):
    m = build(arch, **VARIANTS[variant])
    nudge(m)
    plain = plain_twin(m)
    idx = tokens()
    full = m.residual_alphas()
    m.set_attenuation(0.0)
    assert_bit_for_bit(m, plain, idx)
    assert m.residual_alphas() == [1.0] * 3
    m.set_attenuation(0.5)
    assert m.residual_alphas() == pytest.approx([1 - 0.5 * (1 - a) for a in full])
    half = run_all(m, idx)[0]
    assert not torch.allclose(half, run_all(plain, idx)[0], atol=1e-5)
    m.set_attenuation(1.0)
    assert not torch.allclose(half, run_all(m, idx)[0], atol=1e-5)


@pytest.mark.parametrize("variant", ["value-learned", "hc", "mhc", "denseformer"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    idx, targets = tokens(), tokens(seed=2)
    grads = []
    for recompute in (False, True):
        m = build("llama", **VARIANTS[variant]).train()
        nudge(m)
        m.set_activation_checkpointing(recompute)
        m(idx, targets)[1].backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads[1][-1].abs().sum() > 0  # the variant's own parameters (last) got gradients through the recompute


@pytest.mark.parametrize("variant", ["value-learned", "hc", "mhc", "denseformer"])
def test_the_variants_parameters_train_in_their_own_group_without_weight_decay(variant):
    m = build("llama", **VARIANTS[variant]).train()
    own = list(m.residual.parameters())
    assert own and {f"{m.config.residual_mode}.{n}" for n, _ in m.residual.named_parameters()} == (
        m.residual_state_keys())
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    (group,) = [g for g in opt.param_groups if any(p is own[0] for p in g["params"])]
    assert group["params"] == own and group["weight_decay"] == 0.0 and group["lr"] == pytest.approx(1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    before = [p.detach().clone() for p in own]
    _, loss = m(tokens(), tokens(seed=2))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)  # every parameter gets a gradient
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, own))


@pytest.mark.parametrize("kw, needle", [
    (dict(hc_streams=0), "hc_streams must be an int >= 1, got 0"),
    (dict(hc_streams=2.0), "hc_streams must be an int >= 1, got 2.0"),
    (dict(hc_sinkhorn_iters=-1), "hc_sinkhorn_iters must be an int >= 0, got -1"),
    (dict(hc_sinkhorn_iters=True), "hc_sinkhorn_iters must be an int >= 0, got True"),
    (dict(value_residual_learned="yes"), "value_residual_learned must be True or False, got 'yes'"),
    (dict(residual_mode="value_residual", n_layer=1), "needs n_layer >= 2"),
])
def test_bad_settings_are_refused_naming_the_setting(kw, needle):
    with pytest.raises(ValueError, match="GPTConfig: ") as err:
        GPTConfig(**{**TINY, **kw})
    assert needle in str(err.value)


def test_one_stream_and_one_layer_edge_cases_build_and_run():
    for kw in (dict(residual_mode="hyper_connections", hc_streams=1), dict(residual_mode="denseformer", n_layer=1)):
        m = GPT(GPTConfig(**{**TINY, **kw}))
        assert torch.equal(run_all(m, tokens())[0], run_all(plain_twin(m), tokens())[0])
    GPTConfig(**{**TINY, "n_layer": 1})  # value_residual's n_layer check is for its own mode only


def test_examples_and_labels():
    examples = {label: kw for label, kw in residual_examples().items()
                if kw["residual_mode"] in ("value_residual", "hyper_connections", "denseformer")}
    assert examples == {
        "value residual, learned lambdas": dict(residual_mode="value_residual", value_residual_learned=True),
        "hyper-connections, 4 streams (HC)": dict(residual_mode="hyper_connections", hc_streams=4,
                                                  hc_sinkhorn_iters=0),
        "hyper-connections, 4 streams (mHC, sinkhorn 20)": dict(residual_mode="hyper_connections", hc_streams=4,
                                                                hc_sinkhorn_iters=20),
        "denseformer": dict(residual_mode="denseformer")}
    assert residual_label({"residual_mode": "hyper_connections"}) == "hyper-connections, 4 streams (HC)"  # defaults
    assert initial_alphas({"residual_mode": "value_residual", "n_layer": 4}) == [1.0, 0.5, 0.5, 0.5]


def test_an_old_checkpoint_without_the_new_fields_loads(tmp_path):
    m = build("gpt2", residual_mode="cut", cut_layer=1)
    args = {k: v for k, v in m.config.to_dict().items()
            if k not in ("value_residual_learned", "hc_streams", "hc_sinkhorn_iters")}
    torch.save({"model": m.state_dict(), "model_args": args}, tmp_path / "old.pt")
    loaded = GPT.from_checkpoint(str(tmp_path / "old.pt")).eval()
    assert torch.equal(run_all(loaded, tokens())[0], run_all(m, tokens())[0])


def test_a_pretrained_llama_imports_into_each_variant_as_the_plain_model_at_attenuation_0(tmp_path):
    """A retrofit: the HF import adds the variant's own parameters at their init; with the ramp at a = 0 the
    model is the imported plain model bit for bit (and for the variants that start as the plain model, at a = 1)."""
    save_tiny_llama(tmp_path, vocab_size=64)
    plain = from_pretrained(str(tmp_path)).eval()
    idx = tokens()
    for variant in ("value-learned", "hc", "mhc", "denseformer"):
        m = from_pretrained(str(tmp_path), **VARIANTS[variant]).eval()
        assert set(m.state_dict()) - set(plain.state_dict()) == m.residual_state_keys()
        m.set_attenuation(0.0)
        assert_bit_for_bit(m, plain, idx)
        m.set_attenuation(1.0)
        if variant in ("hc", "denseformer"):
            assert_bit_for_bit(m, plain, idx)


# ---- through the entry points: train.main with tracking, analyze.main, FSDP ----

RUN = ["--device=cpu", "--n_layer=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_tokens=128",
       "--warmup_iters=0", "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=3", "--eval_tokens=256",
       "--max_iters=3", "--threads=1", "--log_interval=1", "--seed=5"]
RUN_ARCH = {"gpt2": ["--n_head=2"], "llama": ["--arch=llama", "--n_head=4", "--n_kv_head=2", "--bias=False",
                                              "--tie_embeddings=False"]}
RUN_VARIANT = {
    "value-learned": ["--residual_mode=value_residual"],
    "hc": ["--residual_mode=hyper_connections", "--hc_streams=2"],
    "mhc": ["--residual_mode=hyper_connections", "--hc_streams=2", "--hc_sinkhorn_iters=10"],
    "denseformer": ["--residual_mode=denseformer"],
}


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", list(RUN_VARIANT))
def test_trains_with_tracking_and_analyses(variant, arch, prose_shards, tmp_path, capsys):
    out = tmp_path / "run"
    train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", *RUN, *RUN_ARCH[arch], *RUN_VARIANT[variant],
                "--track_sequences=2"])
    assert "has no effect" not in capsys.readouterr().err  # its settings act in its mode
    evals = rows(out, "eval")
    start = initial_alphas(rows(out, "run")[0]["config"]) or [1.0, 1.0]  # mHC: not learned, 1 by the constraint
    assert evals[0]["alphas"] == pytest.approx(start, abs=1e-6)
    assert evals[-1]["alignment"]["misalignment"] is not None and evals[-1]["val_loss"] < evals[0]["val_loss"]
    if variant == "mhc":  # doubly stochastic: the streams' sum is carried with weight 1, however R trains
        assert evals[-1]["alphas"] == pytest.approx([1.0, 1.0], abs=1e-3)
    else:
        assert evals[-1]["alphas"] != pytest.approx(start, abs=1e-4)  # learned, and logged

    val = glob.glob(f"{prose_shards}/*_val_*.bin")[0]
    analyze.main(["--ckpt", str(out), "--shards", val, "--num_sequences=2", "--seq_len=32", "--batch_size=2",
                  f"--out_dir={tmp_path / 'analysis'}", "--progress=False", "--log", str(out / "log.jsonl")])
    with open(tmp_path / "analysis" / "metrics.json") as f:
        (analysed,) = json.load(f)["models"]
    assert [layer["layer"] for layer in analysed["layers"]] == [0, 1, 2]  # the embeddings, after each block
    # the lens decodes the last state it reads (the streams' sum, the averaged state) as the model does
    assert analysed["layers"][-1]["lens_ce"] == pytest.approx(analysed["final_loss"], rel=1e-5)
    assert analysed["misalignment"] is not None
    assert os.path.exists(tmp_path / "analysis" / "alphas.png")


@pytest.mark.parametrize("variant, arch", [("value-learned", "llama"), ("hc", "gpt2"), ("mhc", "llama"),
                                           ("denseformer", "gpt2")])
def test_a_1_rank_fsdp_run_equals_the_plain_process_run(variant, arch, prose_shards, tmp_path):
    common = [f"--data_dir={prose_shards}", *RUN, *RUN_ARCH[arch], *RUN_VARIANT[variant], "--track_sequences=2"]
    train.main([*common, f"--out_dir={tmp_path / 'one'}"])
    train.main([*common, f"--out_dir={tmp_path / 'fsdp'}", "--parallelism=fsdp"])
    one, fsdp = rows(tmp_path / "one", "train"), rows(tmp_path / "fsdp", "train")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in fsdp], rel=1e-5)
    one, fsdp = rows(tmp_path / "one", "eval"), rows(tmp_path / "fsdp", "eval")
    assert fsdp[-1]["alphas"] == pytest.approx(one[-1]["alphas"], abs=1e-5)  # gathered from the shards
    assert fsdp[-1]["alignment"]["misalignment"] == pytest.approx(one[-1]["alignment"]["misalignment"], abs=1e-4)
