"""model.py: GPT-2 parity with transformers, the residual formulas, gates, loading, bad configs."""

import math

import pytest
import torch

from nanoshift.common import InputError
from model import GPT, GPTConfig
from nanoshift.hf import from_pretrained

TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=64, dropout=0.0)


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=101)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(d)
    return d, hf


def test_from_pretrained_matches_transformers_logits_and_loss(hf_gpt2_dir):
    d, hf = hf_gpt2_dir
    ours = from_pretrained(str(d)).eval()
    idx = tokens(B=2, T=24, V=101)
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
    assert (ref.logits[:, :-1] - logits).abs().max().item() < 1e-4
    assert abs(ref.loss.item() - loss.item()) < 1e-5


def test_from_pretrained_with_gate_starts_uniform_and_the_gate_learns(hf_gpt2_dir):
    d, _ = hf_gpt2_dir
    m = from_pretrained(str(d), residual_mode="gate", gate_mode="layer", gate_alpha_min=0.5)
    assert m.residual_alphas() == pytest.approx([0.75, 0.75])  # the budget 0.5 spread evenly over 2 layers
    plain = from_pretrained(str(d))
    assert torch.equal(m.transformer.h[1].mlp.c_fc.weight, plain.transformer.h[1].mlp.c_fc.weight)
    idx = tokens(B=2, T=16, V=101)
    _, loss = m(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert m.gate.logits.grad is not None and m.gate.logits.grad.abs().sum() > 0  # the loss reaches the gate


def test_cut_alpha_one_is_bit_identical_to_none():
    base = tiny()
    cut = tiny(residual_mode="cut", cut_layer=1, cut_alpha=1.0)
    cut.load_state_dict(base.state_dict())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(base(idx, idx)[0], cut(idx, idx)[0])


def reference_forward(model, idx, alphas):
    """The paper's formula written out by hand: x_{l+1} = a_l x_l + (block_l(x_l) - x_l)."""
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(torch.arange(idx.size(1)))
    states = [x]
    for block, a in zip(tr.h, alphas):
        h = x + block.attn(block.ln_1(x))
        block_out = h + block.mlp(block.ln_2(h))
        x = a * x + (block_out - x)
        states.append(x)
    return model.lm_head(tr.ln_f(x)), states


def test_cut_matches_hand_written_formula_and_leaves_other_layers_alone():
    c = 1
    base = tiny()
    cut = tiny(residual_mode="cut", cut_layer=c, cut_alpha=0.5)
    cut.load_state_dict(base.state_dict())
    idx = tokens()
    with torch.no_grad():
        ref_logits, ref_states = reference_forward(cut, idx, [1.0, 0.5, 1.0])
        logits, _ = cut(idx, idx)
        states, _ = cut.hidden_states(idx)
        base_states, _ = base.hidden_states(idx)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    for got, want in zip(states, ref_states):
        assert torch.allclose(got, want, atol=1e-5)
    for l in range(c + 1):  # before and at the cut input: identical to the baseline
        assert torch.equal(states[l], base_states[l])
    assert not torch.allclose(states[c + 1], base_states[c + 1])


def test_cut_layer_accepts_negative_index_and_list():
    assert tiny(residual_mode="cut", cut_layer=-1).residual_alphas() == [1.0, 1.0, 0.5]
    assert tiny(residual_mode="cut", cut_layer=[0, 2], cut_alpha=0.25).residual_alphas() == [0.25, 1.0, 0.25]


def test_layer_gate_starts_uniform_and_learns():
    m = tiny(residual_mode="gate", gate_mode="layer", gate_alpha_min=0.2)
    L = 3
    assert m.residual_alphas() == pytest.approx([1 - 0.8 / L] * L)
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    before = m.gate.logits.detach().clone()
    m.train()
    _, loss = m(tokens(), tokens(seed=2))
    loss.backward()
    assert m.gate.logits.grad is not None and m.gate.logits.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, m.gate.logits.detach())
    assert sum(1 - a for a in m.residual_alphas()) == pytest.approx(0.8, abs=1e-6)  # fixed budget


def test_layer_gate_matches_hand_written_formula():
    m = tiny(residual_mode="gate", gate_mode="layer", gate_alpha_min=0.0)
    with torch.no_grad():
        m.gate.logits.copy_(torch.tensor([0.0, 1.0, 3.0]))
        p = torch.softmax(m.gate.logits, 0)
        idx = tokens()
        ref, _ = reference_forward(m, idx, list(1 - p))
        assert torch.allclose(m(idx, idx)[0], ref, atol=1e-5)


def test_token_gate_at_init_equals_layer_gate():
    layer = tiny(residual_mode="gate", gate_mode="layer")
    token = tiny(residual_mode="gate", gate_mode="token")
    token.load_state_dict({**token.state_dict(), **{k: v for k, v in layer.state_dict().items() if not k.startswith("gate.")}})
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(layer(idx, idx)[0], token(idx, idx)[0], atol=1e-6)
    assert token.residual_alphas() == pytest.approx(layer.residual_alphas())


def test_token_gate_gives_each_token_its_own_alphas():
    m = tiny(residual_mode="gate", gate_mode="token", gate_alpha_min=0.0)
    with torch.no_grad():
        m.gate.proj.weight.normal_()
        idx = tokens()
        x0 = m.transformer.wte(idx) + m.transformer.wpe(torch.arange(idx.size(1)))
        alpha = m.gate(x0)  # [B, T, L]
        assert alpha.shape == (2, 12, 3)
        assert alpha[0, 0].tolist() != pytest.approx(alpha[0, 1].tolist())
        assert torch.allclose((1 - alpha).sum(-1), torch.ones(2, 12), atol=1e-6)
        ref_logits = None
        tr = m.transformer
        x = x0
        for l, block in enumerate(tr.h):
            h = x + block.attn(block.ln_1(x))
            x = alpha[..., l:l + 1] * x + (h + block.mlp(block.ln_2(h)) - x)
        ref_logits = m.lm_head(tr.ln_f(x))
        assert torch.allclose(m(idx, idx)[0], ref_logits, atol=1e-5)
        assert m.residual_alphas() == pytest.approx(alpha.mean((0, 1)).tolist(), abs=1e-6)


def test_scalar_gate_starts_near_one_and_is_independent_per_layer():
    m = tiny(residual_mode="gate", gate_mode="scalar")
    alphas = m.residual_alphas()
    assert all(0.97 < a < 1.0 for a in alphas)
    with torch.no_grad():
        m.gate.logits[1] = -2.0
    alphas = m.residual_alphas()
    assert alphas[0] == pytest.approx(alphas[2]) and alphas[1] == pytest.approx(1 / (1 + math.exp(2.0)))


def test_optimizer_groups_never_decay_gate_and_apply_lr_mult():
    m = tiny(residual_mode="gate", gate_mode="token")
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    gate_ids = {id(p) for n, p in m.named_parameters() if n.startswith("gate.")}
    assert len(gate_ids) == 4  # ln weight/bias, proj weight/bias (the 2-D proj weight included)
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if ids & gate_ids:
            assert ids == gate_ids and g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(1e-2)
        elif g["weight_decay"] > 0:
            assert all(p.dim() >= 2 for p in g["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in m.parameters())


def test_inference_returns_last_position_only():
    m = tiny()
    logits, loss = m(tokens())
    assert logits.shape == (2, 1, 64) and loss is None


def test_hidden_states_shapes_and_mid_states():
    m = tiny()
    idx = tokens()
    resid, mids = m.hidden_states(idx, mid=True)
    assert len(resid) == 4 and len(mids) == 3
    assert all(s.shape == (2, 12, 16) for s in resid + mids)
    block = m.transformer.h[0]
    with torch.no_grad():
        assert torch.allclose(mids[0], resid[0] + block.attn(block.ln_1(resid[0])))
    assert m.hidden_states(idx)[1] == []


@pytest.mark.parametrize("kw, needle", [
    (dict(residual_mode="cut", cut_alpha=0.0), "cut_alpha"),
    (dict(residual_mode="cut", cut_alpha=-0.5), "cut_alpha"),
    (dict(residual_mode="cut", cut_alpha=1.5), "cut_alpha"),
    (dict(residual_mode="cut", cut_layer=3), "cut_layer=3"),
    (dict(residual_mode="cut", cut_layer=-4), "cut_layer=-4"),
    (dict(residual_mode="cut", cut_layer=[0, 7]), "cut_layer=7"),
    (dict(residual_mode="cut", cut_layer=1.5), "cut_layer"),
    (dict(residual_mode="skip"), "residual_mode"),
    (dict(residual_mode="gate", gate_mode="head"), "gate_mode"),
    (dict(gate_alpha_min=1.0), "gate_alpha_min"),
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
])
def test_bad_config_fails_with_message_naming_the_setting(kw, needle):
    with pytest.raises(ValueError, match="GPTConfig") as err:
        GPTConfig(**{**TINY, **kw})
    assert needle in str(err.value)


def test_sequence_longer_than_block_size_is_rejected():
    m = tiny()
    with pytest.raises(ValueError, match="longer than block_size=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def save_ckpt(path, model, prefix=""):
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()},
                "model_args": model.config.to_dict()}, path)


def test_from_checkpoint_roundtrip_and_compile_prefix(tmp_path):
    m = tiny(residual_mode="gate", gate_mode="token")
    with torch.no_grad():
        m.gate.proj.weight.normal_()
    save_ckpt(tmp_path / "ckpt.pt", m, prefix="_orig_mod.")
    m2 = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert m2.config == m.config
    m3 = GPT.from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True)).eval()  # an already-loaded dict
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(m(idx, idx)[0], m2(idx, idx)[0])
        assert torch.equal(m(idx, idx)[0], m3(idx, idx)[0])


def test_from_checkpoint_loads_karpathy_nanogpt_format(tmp_path):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=64, dropout=0.0)
    m = GPT(GPTConfig(**args, gelu_approx="none")).eval()
    sd = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    for i in range(2):  # nanoGPT's non-flash path registers a causal-mask buffer called attn.bias
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save({"model": sd, "model_args": args, "iter_num": 10, "best_val_loss": 3.0, "config": {}},
               tmp_path / "ckpt.pt")
    m2 = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert m2.config.gelu_approx == "none" and m2.config.residual_mode == "none"
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(m(idx, idx)[0], m2(idx, idx)[0])


def test_from_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found: .*nope.pt"):
        GPT.from_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt is not a training checkpoint"):
        GPT.from_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt is not a readable checkpoint"):
        GPT.from_checkpoint(tmp_path / "junk.pt")


def test_from_pretrained_without_transformers_says_how_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *a, **kw):
        if name == "transformers":
            raise ImportError("no module")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match="pip install transformers"):
        from_pretrained("gpt2")


def test_torch_compile_layer_gate_matches_eager():
    m = tiny(residual_mode="gate", gate_mode="layer")
    with torch.no_grad():
        m.gate.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    idx = tokens()
    compiled = torch.compile(m)
    with torch.no_grad():
        assert torch.allclose(compiled(idx, idx)[1], m(idx, idx)[1], atol=1e-5)
