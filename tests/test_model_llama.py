"""model.py, arch='llama': parity with transformers' LlamaForCausalLM, the residual formulas on llama
blocks, torch.compile, config validation and checkpoint compatibility."""

import math

import pytest
import torch

from model import GPT, GPTConfig, initial_alphas, residual_examples
from nanoshift.hf import from_pretrained

TINY_LLAMA = dict(arch="llama", n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=64,
                  dropout=0.0, tie_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def tiny_llama(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY_LLAMA, **kw})).eval()


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- parity with transformers ----

# (hidden, heads, kv heads, intermediate, tied, rope_theta, rope scaling): odd sizes on purpose
HF_CASES = {
    "tied-gqa-3to1": (48, 3, 1, 80, True, 5000.0, None),
    "untied-mha-llama3": (48, 3, 3, 80, False, 500000.0, LLAMA3),
    "tied-gqa-llama3": (64, 4, 2, 96, True, 1000.0, {**LLAMA3, "factor": 4.0, "high_freq_factor": 2.0}),
    "untied-gqa-linear": (32, 4, 2, 72, False, 10000.0, {"rope_type": "linear", "factor": 2.0}),
}


def save_hf_llama(d, hidden, heads, kv, inter, tied, theta, scaling, n_layer=3, vocab=101, **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, num_hidden_layers=n_layer, vocab_size=vocab,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                   rope_parameters=rope, **extra)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # move every weight (norm weights included) away from its init
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(d)
    return hf


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_llama(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"hf_llama_{request.param}")
    hf = save_hf_llama(d, *HF_CASES[request.param])
    return request.param, d, hf


def test_from_pretrained_llama_matches_transformers(hf_llama):
    case, d, hf = hf_llama
    hidden, heads, kv, inter, tied, theta, scaling = HF_CASES[case]
    ours = from_pretrained(str(d)).eval()
    cfg = ours.config
    assert (cfg.arch, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.mlp_size, cfg.block_size, cfg.vocab_size) == \
        ("llama", hidden, heads, kv, inter, 64, 101)
    assert (cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (tied, theta, 1e-6)
    assert (cfg.rope_scaling or {}).get("rope_type") == (scaling or {}).get("rope_type")
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    assert "wpe" not in ours.transformer

    idx = tokens(B=2, T=40, V=101)
    with torch.no_grad():
        ref = hf(idx, labels=idx, output_hidden_states=True)
        logits, _ = ours(idx, idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        resid, _ = ours.hidden_states(idx)
        last_normed = ours.transformer.ln_f(resid[-1])
    assert (ref.logits - logits).abs().max().item() < 1e-4
    assert abs(ref.loss.item() - loss.item()) < 1e-5
    assert len(resid) == len(ref.hidden_states) == 4
    for l in range(3):  # embeddings and blocks 1..L-1: raw residual states
        assert (ref.hidden_states[l] - resid[l]).abs().max().item() < 1e-4, l
    assert (ref.hidden_states[3] - last_normed).abs().max().item() < 1e-4  # HF's last one is after the norm

    # the comparison is sharp enough to see the rotary details: wrong theta or no scaling is visibly off
    wrong = [dict(rope_theta=theta * 2)] + ([dict(rope_scaling=None)] if scaling else [])
    for override in wrong:
        with torch.no_grad():
            off, _ = from_pretrained(str(d), **override).eval()(idx, idx)
        assert (ref.logits - off).abs().max().item() > 1e-3, override


def test_bfloat16_model_matches_transformers_bfloat16(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf_llama(tmp_path, *HF_CASES["untied-mha-llama3"])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = from_pretrained(str(tmp_path)).eval().to(torch.bfloat16)
    idx = tokens(B=2, T=40, V=101)
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx, idx)
    assert logits.dtype == torch.bfloat16
    # bf16 rounding differences would show as ~1e-2: the norm and rotary math follow transformers' dtypes
    assert (ref.float() - logits.float()).abs().max().item() < 1e-3
    # float32 weights under bf16 autocast (how train.py runs): rotary in float32 like transformers
    hf32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours32 = from_pretrained(str(tmp_path)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = hf32(idx).logits
        logits, _ = ours32(idx, idx)
    assert (ref.float() - logits.float()).abs().max().item() < 1e-3


def test_from_pretrained_llama_with_gate_keeps_the_pretrained_weights(tmp_path):
    save_hf_llama(tmp_path, *HF_CASES["tied-gqa-3to1"])
    plain = from_pretrained(str(tmp_path))
    m = from_pretrained(str(tmp_path), residual_mode="gate", gate_mode="layer", gate_alpha_min=0.25)
    assert m.config.residual_mode == "gate" and m.config.gate_alpha_min == 0.25
    assert torch.equal(m.gate.logits.detach(), torch.zeros(3))
    for k, v in plain.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_our_gpt_uses_input_and_output_embeddings_of_an_untied_llama():
    from nanoshift.lm import OurGPT

    untied = OurGPT(tiny_llama(), "untied")
    m = untied.model
    assert untied.tied is False
    assert untied.in_embedding is m.transformer.wte.weight and untied.out_embedding is m.lm_head.weight
    t = torch.tensor([3, 5])
    assert torch.equal(untied.target_vectors(t), m.lm_head.weight[t])
    assert not torch.equal(untied.input_vectors(t), untied.target_vectors(t))
    tied = OurGPT(tiny_llama(tie_embeddings=True), "tied")
    assert tied.tied is True and tied.in_embedding is tied.out_embedding is tied.model.lm_head.weight


# ---- the residual formulas on llama blocks ----

def rope_by_hand(T, head_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(T).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def reference_forward(model, idx, alphas):
    """x_{l+1} = a_l x_l + (block_l(x_l) - x_l), the llama block run by hand from its parts."""
    tr = model.transformer
    rope = rope_by_hand(idx.size(1), model.config.n_embd // model.config.n_head)
    x = tr.wte(idx)
    states, mids = [x], []
    for block, a in zip(tr.h, alphas):
        h = x + block.attn(block.ln_1(x), rope)
        block_out = h + block.mlp(block.ln_2(h))
        x = a * x + (block_out - x)
        states.append(x)
        mids.append(h)
    return model.lm_head(tr.ln_f(x)), states, mids


def test_llama_cut_alpha_one_is_bit_identical_to_none():
    base = tiny_llama()
    cut = tiny_llama(residual_mode="cut", cut_layer=1, cut_alpha=1.0)
    cut.load_state_dict(base.state_dict())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(base(idx, idx)[0], cut(idx, idx)[0])
        for a, b in zip(base.hidden_states(idx)[0], cut.hidden_states(idx)[0]):
            assert torch.equal(a, b)


def test_llama_none_and_cut_match_hand_written_formula():
    base = tiny_llama()
    cut = tiny_llama(residual_mode="cut", cut_layer=1, cut_alpha=0.5)
    cut.load_state_dict(base.state_dict())
    assert cut.residual_alphas() == [1.0, 0.5, 1.0]
    idx = tokens()
    with torch.no_grad():
        ref_base, _, _ = reference_forward(base, idx, [1.0, 1.0, 1.0])
        assert torch.allclose(base(idx, idx)[0], ref_base, atol=1e-5)
        ref_logits, ref_states, ref_mids = reference_forward(cut, idx, [1.0, 0.5, 1.0])
        logits, _ = cut(idx, idx)
        states, mids = cut.hidden_states(idx, mid=True)
        base_states, _ = base.hidden_states(idx)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert len(states) == 4 and len(mids) == 3
    for got, want in zip(states + mids, ref_states + ref_mids):
        assert torch.allclose(got, want, atol=1e-5)
    for l in range(2):  # before and at the cut input: identical to the baseline
        assert torch.equal(states[l], base_states[l])
    assert not torch.allclose(states[2], base_states[2], atol=1e-3)


def test_llama_layer_and_scalar_gates_match_hand_written_formula():
    idx = tokens()
    m = tiny_llama(residual_mode="gate", gate_mode="layer", gate_alpha_min=0.2)
    assert m.residual_alphas() == pytest.approx([1 - 0.8 / 3] * 3)
    with torch.no_grad():
        m.gate.logits.copy_(torch.tensor([0.0, 1.0, 3.0]))
        alphas = 1 - 0.8 * torch.softmax(torch.tensor([0.0, 1.0, 3.0]), 0)
        ref, _, _ = reference_forward(m, idx, list(alphas))
        assert torch.allclose(m(idx, idx)[0], ref, atol=1e-5)
    assert m.residual_alphas() == pytest.approx(alphas.tolist())

    s = tiny_llama(residual_mode="gate", gate_mode="scalar")
    assert all(0.97 < a < 1.0 for a in s.residual_alphas())
    with torch.no_grad():
        s.gate.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
        alphas = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5]))
        ref, _, _ = reference_forward(s, idx, list(alphas))
        assert torch.allclose(s(idx, idx)[0], ref, atol=1e-5)
    assert s.residual_alphas() == pytest.approx(alphas.tolist())


def test_llama_token_gate_uses_rmsnorm_of_x0_and_matches_hand_written_formula():
    m = tiny_llama(residual_mode="gate", gate_mode="token", gate_alpha_min=0.0)
    assert m.residual_alphas() == pytest.approx([1 - 1 / 3] * 3)  # W = b = 0: uniform, like 'layer'
    assert {n for n, _ in m.gate.named_parameters()} == {"ln.weight", "proj.weight", "proj.bias"}  # no LN bias
    idx = tokens()
    with torch.no_grad():
        m.gate.proj.weight.normal_()
        m.gate.ln.weight.uniform_(0.5, 1.5)
        x0 = m.transformer.wte(idx)
        normed = x0 * torch.rsqrt(x0.pow(2).mean(-1, keepdim=True) + m.config.norm_eps) * m.gate.ln.weight
        alpha = 1 - torch.softmax(normed @ m.gate.proj.weight.T + m.gate.proj.bias, dim=-1)  # [B, T, L]
        assert torch.allclose(m.gate(x0), alpha, atol=1e-6)
        assert alpha[0, 0].tolist() != pytest.approx(alpha[0, 1].tolist())
        ref, _, _ = reference_forward(m, idx, [alpha[..., l:l + 1] for l in range(3)])
        assert torch.allclose(m(idx, idx)[0], ref, atol=1e-5)
    assert m.residual_alphas() == pytest.approx(alpha.mean((0, 1)).tolist(), abs=1e-6)


# ---- torch.compile ----

@pytest.mark.parametrize("setting", list(residual_examples()))  # every registered variant
def test_torch_compile_llama_trains_like_eager(setting):
    """fullgraph=True: any graph break is an error. The aot_eager backend captures the same forward and
    backward graphs as inductor (dynamo + AOTAutograd) without inductor's code generation, which costs
    30-50 s per setting on a 2-core CPU; test_model.py runs inductor itself on a gpt2 model."""
    backend = "aot_eager"
    torch._dynamo.reset()  # each setting compiles GPT.forward anew: past 8 settings dynamo's recompile limit would stop it
    kw = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, dropout=0.0, **residual_examples()[setting])
    eager = tiny_llama(**kw).train()
    model = tiny_llama(**kw).train()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opts = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0}) for m in (eager, model)]
    x, y = tokens(T=16), tokens(T=16, seed=2)
    for _ in range(3):
        losses = []
        for m, opt in zip((eager, compiled), opts):
            _, loss = m(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert math.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[1] < math.log(64)  # it learned something in 3 steps
    assert model.residual_alphas() == pytest.approx(eager.residual_alphas(), abs=1e-4)
    if initial_alphas(model.config) is not None:  # alphas the variant learns (the gate's) moved
        assert model.residual_alphas() != pytest.approx(tiny_llama(**kw).residual_alphas(), abs=1e-5)


# ---- shape, init, optimizer groups ----

def test_llama_modules_init_and_param_counts():
    m = tiny_llama(n_embd=64, n_head=4, n_kv_head=1, n_layer=2)
    cfg = m.config
    assert cfg.mlp_size == 192  # 8/3 * 64 = 170.7, rounded up to a multiple of 64
    assert [GPTConfig(arch="llama", n_embd=e, n_head=1).mlp_size for e in (576, 768, 960)] == [1536, 2048, 2560]
    sd = m.state_dict()
    assert sorted(k for k in sd if k.startswith("transformer.h.0.")) == sorted(
        f"transformer.h.0.{k}.weight" for k in ("ln_1", "ln_2", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                 "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert not any(k.endswith("bias") for k in sd)
    assert sd["transformer.h.0.attn.k_proj.weight"].shape == (16, 64)  # 1 kv head of 16
    assert sd["transformer.h.0.mlp.up_proj.weight"].shape == (192, 64)
    for k, v in sd.items():
        if "ln" in k:
            assert torch.equal(v, torch.ones(64)), k
    for name in ("attn.o_proj", "mlp.down_proj"):  # GPT-2's scaled init on the residual outputs
        assert m.transformer.h[1].get_submodule(name).weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert m.transformer.h[1].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)

    total = sum(p.numel() for p in m.parameters())
    per_block = 2 * 64 + 64 * 64 * 2 + 64 * 16 * 2 + 3 * 64 * 192
    assert total == 2 * 64 * 64 + 2 * per_block + 64  # wte + lm_head (untied), blocks, ln_f
    assert m.num_params() == total - 64 * 64  # the looked-up input table is left out
    assert m.num_params(non_embedding=False) == total
    tied = tiny_llama(n_embd=64, n_head=4, n_kv_head=1, n_layer=2, tie_embeddings=True)
    assert tied.num_params() == tied.num_params(non_embedding=False) == total - 64 * 64
    assert m.flops_per_token(16) == 6 * m.num_params() + 12 * 2 * 4 * 16 * 16


def test_llama_optimizer_groups():
    m = tiny_llama(residual_mode="gate", gate_mode="token")
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0})
    names = {id(p): n for n, p in m.named_parameters()}
    decay, no_decay, gate = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert sorted(gate) == ["gate.ln.weight", "gate.proj.bias", "gate.proj.weight"]
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-2)
    assert "transformer.wte.weight" in decay and "lm_head.weight" in decay
    assert all(n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in no_decay) and len(no_decay) == 7
    assert len(decay) + len(no_decay) + len(gate) == len(list(m.parameters()))


# ---- bad configs, bad imports, checkpoints ----

@pytest.mark.parametrize("kw, needle", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(arch="mamba"), "arch='mamba'"),
    (dict(arch="gpt2", tie_embeddings=False), "tie_embeddings"),
    (dict(arch="gpt2", n_kv_head=2, tie_embeddings=True), "n_kv_head"),
    (dict(arch="gpt2", n_kv_head=None, intermediate_size=64, tie_embeddings=True), "intermediate_size"),
    (dict(arch="gpt2", n_kv_head=None, rope_theta=5e5, tie_embeddings=True), "rope_theta"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling has unsupported rope type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 4.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "fator": 3.0}), "fator"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "factor"),
    (dict(rope_scaling="llama3"), "rope_scaling"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(n_embd=36, n_head=4, n_kv_head=None), "must be even for rotary"),
])
def test_bad_llama_config_fails_with_message_naming_the_setting(kw, needle):
    with pytest.raises(ValueError, match="GPTConfig") as err:
        GPTConfig(**{**TINY_LLAMA, **kw})
    assert needle in str(err.value)


def test_from_pretrained_rejects_what_arch_llama_cannot_represent(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = (32, 4, 2, 64, True, 10000.0, None)
    cases = [  # (extra HF settings, what the message must say); directories are named m0, m1, ...
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(mlp_bias=True), "mlp_bias=True is not supported"),
        (dict(head_dim=16), "head_dim=16 is not hidden_size // num_attention_heads = 8"),
    ]
    for i, (extra, needle) in enumerate(cases):
        save_hf_llama(tmp_path / f"m{i}", *base, n_layer=1, **extra)
        with pytest.raises(ValueError, match=needle):
            from_pretrained(str(tmp_path / f"m{i}"))
    save_hf_llama(tmp_path / "m3", *base[:-1], {"rope_type": "yarn", "factor": 4.0}, n_layer=1)
    with pytest.raises(ValueError, match="m3: GPTConfig: rope_scaling has unsupported rope type 'yarn'"):
        from_pretrained(str(tmp_path / "m3"))
    transformers.MistralConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1).save_pretrained(
        tmp_path / "mistral")
    with pytest.raises(ValueError, match="model_type='mistral' is not supported"):
        from_pretrained(str(tmp_path / "mistral"))


def test_llama_checkpoint_roundtrip(tmp_path):
    m = tiny_llama(rope_theta=5e5, rope_scaling=dict(LLAMA3), residual_mode="gate", gate_mode="token")
    with torch.no_grad():
        m.gate.proj.weight.normal_()
    torch.save({"model": {"_orig_mod." + k: v for k, v in m.state_dict().items()},
                "model_args": m.config.to_dict()}, tmp_path / "ckpt.pt")
    m2 = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert m2.config == m.config and m2.config.rope_scaling["rope_type"] == "llama3"
    assert m2.lm_head.weight is not m2.transformer.wte.weight
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(m(idx, idx)[0], m2(idx, idx)[0])


def test_old_gpt2_checkpoint_without_new_fields_loads_as_gpt2(tmp_path):
    old_args = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True,
                    gelu_approx="tanh", residual_mode="cut", cut_layer=-1, cut_alpha=0.5, gate_mode="layer",
                    gate_alpha_min=0.5)  # the model_args checkpoints had before arch existed
    torch.manual_seed(0)
    m = GPT(GPTConfig(**old_args)).eval()
    torch.save({"model": m.state_dict(), "model_args": old_args}, tmp_path / "ckpt.pt")
    m2 = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert m2.config.arch == "gpt2" and m2.config.tie_embeddings and m2.config.norm_eps == 1e-5
    assert "wpe" in m2.transformer and m2.lm_head.weight is m2.transformer.wte.weight
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(m(idx, idx)[0], m2(idx, idx)[0])


def test_gpt2_state_dict_keys_are_unchanged():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    assert list(m.state_dict()) == [
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
