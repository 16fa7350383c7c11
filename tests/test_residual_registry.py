"""model.py's residual-variant registry: its API (RESIDUALS, register_residual, residual_settings,
residual_config_keys, residual_label, initial_alphas, residual_examples, configure_optimizers' lr_mults); a toy
variant registered at run time that builds, trains, lands in its own optimizer group, logs its alphas and
goes away again; a variant that wires the trunk itself; and, pinned against model.py as it was before the
registry (commit 5260efe, read from git), that every existing mode on both archs is bit-for-bit unchanged:
initial weights and RNG use, state_dict keys, logits, loss, gradients, the attenuation ramp, optimizer
groups and old checkpoints.

    python -m pytest -q -p no:xdist tests/test_residual_registry.py
"""

import glob
import importlib.util
import json
import os
import re
import subprocess

import pytest
import torch

import analyze
import bench
import model as model_now
import train
from model import (GPT, RESIDUALS, GPTConfig, Residual, initial_alphas, register_residual, residual_config_keys,
                   residual_examples, residual_label, residual_settings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_REGISTRY = "5260efe"  # the last commit whose model.py had no registry
TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=64)
ARCHS = {"gpt2": dict(), "llama": dict(arch="llama", n_head=4, n_kv_head=2, bias=False, tie_embeddings=False)}
# every existing mode, with non-default settings where they exist
MODES = {
    "none": dict(residual_mode="none"),
    "cut-last": dict(residual_mode="cut", cut_layer=-1, cut_alpha=0.5),
    "cut-list": dict(residual_mode="cut", cut_layer=[0, -1], cut_alpha=0.25),
    "gate-layer": dict(residual_mode="gate", gate_mode="layer", gate_alpha_min=0.3),
    "gate-token": dict(residual_mode="gate", gate_mode="token"),
    "gate-scalar": dict(residual_mode="gate", gate_mode="scalar"),
}
OLD_VARIANTS = ["none", "cut", "gate"]  # the variants model.py had before the registry (pinned below)
# variants added since, with nothing to be bit-for-bit against: their own tests pin them
PINNED_ELSEWHERE = {"lambdas", "rezero", "layerscale", "deepnorm",  # tests/test_variants_scalar.py
                    "value_residual", "hyper_connections", "denseformer"}  # tests/test_variants_streams.py
BUILT_IN = list(RESIDUALS)  # what model.py registers (before any test adds a toy)
BUILT_IN_CONFIG_KEYS = residual_config_keys()


def tokens(B=2, T=12, V=64, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the toy variants (fixtures, so other tests can run them through train.py / analyze.py / bench.py) ----

class Floor(Residual):
    """floor (a toy for the tests): alpha_l = cut_alpha + (1 - cut_alpha) * sigmoid(w_l), w_l learned from 0,
    so every layer starts halfway between cut_alpha and 1. Reads the existing cut_alpha; unlike the gate its
    parameters are weight-decayed, and their lr is multiplied by the training setting floor_lr_mult."""

    name = "floor"
    settings = ("cut_alpha",)
    lr_mult_setting = "floor_lr_mult"
    decays = True
    examples = (dict(cut_alpha=0.5),)

    def __init__(self, config):
        super().__init__(config)
        self.w = torch.nn.Parameter(torch.zeros(config.n_layer))

    @classmethod
    def label(cls, settings):
        return f"floor {settings.get('cut_alpha')}"

    @classmethod
    def initial_alphas(cls, settings):
        return [(1 + settings["cut_alpha"]) / 2] * settings["n_layer"]

    def alphas(self, x0):
        floor = self.config.cut_alpha
        return list((floor + (1 - floor) * torch.sigmoid(self.w)).unbind(0))

    def alpha_values(self):
        return [float(a) for a in self.alphas(None)]


class ScaledUpdate(Residual):
    """scaled (a toy wiring the trunk itself, like rezero): x_{l+1} = x_l + s_l * F_l(x_l), s = 0 at init, so
    the untrained trunk passes the embeddings through. Its alphas (logged) are the update scales s_l."""

    name = "scaled"

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.zeros(config.n_layer))

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        for block, scale in zip(blocks, self.scale):
            out, mid = block(x, None, rope)
            if attenuation is not None:  # a = 0: scale 1, the plain block
                scale = 1 - attenuation * (1 - scale)
            x = x + scale * (out - x)
            if resid is not None:
                resid.append(x)
            if mids is not None:
                mids.append(mid)
        return x

    def alpha_values(self):
        return self.scale.tolist()


@pytest.fixture
def floor_variant():
    """Floor registered for the test, unregistered afterwards (whatever the test did)."""
    register_residual(Floor)
    try:
        yield Floor
    finally:
        RESIDUALS.pop(Floor.name, None)


@pytest.fixture
def scaled_variant():
    register_residual(ScaledUpdate)
    try:
        yield ScaledUpdate
    finally:
        RESIDUALS.pop(ScaledUpdate.name, None)


# ---- the registry API ----

def test_the_built_in_variants_and_what_train_py_asks_for():
    assert list(RESIDUALS)[:3] == OLD_VARIANTS and set(BUILT_IN) == set(OLD_VARIANTS) | PINNED_ELSEWHERE
    # what train.py held by hand before the registry (MODE_SETTINGS and RESIDUAL_KEYS), for the old variants
    assert {k: v for k, v in residual_settings().items() if set(v) & set(OLD_VARIANTS)} == {
        "cut_layer": ("cut",), "cut_alpha": ("cut",), "gate_mode": ("gate",), "gate_alpha_min": ("gate",),
        "gate_lr_mult": ("gate",)}
    assert residual_config_keys()[:6] == ("dropout", "residual_mode", "cut_layer", "cut_alpha", "gate_mode",
                                          "gate_alpha_min")
    assert {k: v for k, v in residual_examples().items() if v["residual_mode"] in OLD_VARIANTS} == {
        "no attenuation": dict(residual_mode="none"),
        "cut at block -1, alpha 0.5": dict(residual_mode="cut", cut_layer=-1, cut_alpha=0.5),
        "layer gate": dict(residual_mode="gate", gate_mode="layer"),
        "token gate": dict(residual_mode="gate", gate_mode="token"),
        "scalar gate": dict(residual_mode="gate", gate_mode="scalar")}


def test_labels_and_initial_alphas_from_a_config_or_a_logged_dict():
    gate = GPTConfig(n_layer=4, residual_mode="gate", gate_alpha_min=0.2)
    assert residual_label(gate) == "layer gate, alpha_min 0.2"
    assert initial_alphas(gate) == pytest.approx([0.8] * 4)  # 1 - 0.8 / 4: the budget spread evenly
    assert residual_label({"residual_mode": "gate", "gate_mode": "token"}) == "token gate"  # a partial log
    assert initial_alphas({"residual_mode": "gate", "gate_mode": "layer", "n_layer": 2}) == [0.75, 0.75]
    assert initial_alphas({"residual_mode": "gate", "gate_mode": "scalar", "n_layer": 2}) == [0.98, 0.98]
    assert residual_label({"residual_mode": "cut", "cut_layer": [1, -1], "cut_alpha": 0.5}) == (
        "cut at block [1, -1], alpha 0.5")
    assert initial_alphas({"residual_mode": "cut", "n_layer": 2}) is None  # not learned
    assert residual_label(GPTConfig()) == "no attenuation" and initial_alphas(GPTConfig()) is None
    assert residual_label({"residual_mode": "mystery"}) == "mystery"  # a mode this model.py does not know
    assert residual_label({}) == "?" and initial_alphas({"residual_mode": "mystery"}) is None


def test_scalar_gate_initial_alphas_are_what_the_model_starts_with():
    for mode in ("layer", "token", "scalar"):
        cfg = GPTConfig(**TINY, residual_mode="gate", gate_mode=mode, gate_alpha_min=0.4)
        assert GPT(cfg).residual_alphas() == pytest.approx(initial_alphas(cfg), abs=1e-7), mode


@pytest.mark.parametrize("make, needle", [
    (lambda: type("Bad", (Residual,), {"name": "two words"}), "must be a Python identifier"),
    (lambda: type("Bad", (Residual,), {"name": None}), "must be a Python identifier"),
    (lambda: type("Bad", (Residual,), {"name": "gate"}), "'gate' is already registered, by Gate"),
    (lambda: type("Bad", (Residual,), {"name": "bad", "settings": ("gate_floor",)}), "['gate_floor']"),
])
def test_register_residual_rejects_bad_variants(make, needle):
    with pytest.raises(ValueError) as err:
        register_residual(make())
    assert needle in str(err.value)
    assert list(RESIDUALS) == BUILT_IN


def test_a_variant_named_like_a_gpt_attribute_is_refused_when_built():
    register_residual(type("Clash", (Residual,), {"name": "generate"}))
    try:
        with pytest.raises(ValueError, match="GPT already has an attribute of that name"):
            GPT(GPTConfig(**TINY, residual_mode="generate"))
    finally:
        RESIDUALS.pop("generate")


def test_unknown_residual_mode_names_the_registered_ones():
    with pytest.raises(ValueError, match=re.escape(f"unknown residual_mode='floor', expected one of {tuple(BUILT_IN)}")):
        GPTConfig(residual_mode="floor")


def test_configure_optimizers_takes_lr_mults_by_setting_or_a_bare_number():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY, residual_mode="gate", gate_mode="layer"))
    for lr_mults in ({"gate_lr_mult": 10.0, "floor_lr_mult": 3.0}, 10.0):
        opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", lr_mults)
        assert opt.param_groups[2]["params"] == [m.gate.logits]
        assert opt.param_groups[2]["lr"] == pytest.approx(1e-2) and opt.param_groups[2]["weight_decay"] == 0.0
    assert m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[2]["lr"] == pytest.approx(1e-3)


# ---- a variant added at run time ----

def test_a_registered_toy_variant_builds_trains_logs_and_goes_away(floor_variant):
    assert residual_settings()["cut_alpha"] == ("cut", "floor")
    assert residual_settings()["floor_lr_mult"] == ("floor",)
    assert residual_config_keys() == BUILT_IN_CONFIG_KEYS  # floor reads no new field
    assert residual_examples()["floor 0.5"] == dict(residual_mode="floor", cut_alpha=0.5)
    cfg = GPTConfig(**TINY, residual_mode="floor", cut_alpha=0.5)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert isinstance(m.residual, Floor) and m.floor is m.residual
    assert m.residual_state_keys() == {"floor.w"} and "floor.w" in m.state_dict()
    assert m.residual_alphas() == initial_alphas(cfg) == [0.75] * 3
    assert residual_label(cfg) == "floor 0.5"

    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", {"floor_lr_mult": 10.0, "gate_lr_mult": 2.0})
    (group,) = [g for g in opt.param_groups if any(p is m.floor.w for p in g["params"])]
    assert group["params"] == [m.floor.w] and group["weight_decay"] == 0.1 and group["lr"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    m.train()
    x, y = tokens(T=16), tokens(T=16, seed=2)
    losses = []
    for _ in range(5):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    w = m.floor.w.detach()
    assert not torch.equal(w, torch.zeros(3))  # the variant's own parameter trained
    assert m.residual_alphas() == pytest.approx((0.5 + 0.5 * torch.sigmoid(w)).tolist())  # and is logged
    m.set_attenuation(0.5)
    assert m.residual_alphas() == pytest.approx((1 - 0.5 * (0.5 - 0.5 * torch.sigmoid(w))).tolist())


def test_a_toy_variant_at_attenuation_0_is_the_plain_model(floor_variant):
    torch.manual_seed(0)
    toy = GPT(GPTConfig(**TINY, residual_mode="floor", cut_alpha=0.2)).eval()
    plain = GPT(GPTConfig(**TINY)).eval()
    plain.load_state_dict({k: v for k, v in toy.state_dict().items() if k not in toy.residual_state_keys()})
    toy.set_attenuation(0.0)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(toy(idx, idx)[0], plain(idx, idx)[0])
        toy.set_attenuation(1.0)
        assert not torch.allclose(toy(idx, idx)[0], plain(idx, idx)[0])


def test_the_toy_variant_is_gone_after_its_fixture(floor_variant):
    pass  # the fixture's teardown runs after this test; the next test checks the registry


def test_the_registry_is_back_to_the_built_in_variants():
    assert list(RESIDUALS) == BUILT_IN and "floor_lr_mult" not in residual_settings()
    with pytest.raises(ValueError, match="residual_mode='floor'"):
        GPTConfig(residual_mode="floor")


def test_a_variant_can_wire_the_trunk_itself(scaled_variant):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY, residual_mode="scaled"))
    idx = tokens()
    resid, mids = m.hidden_states(idx, mid=True)
    assert len(resid) == 4 and len(mids) == 3
    assert all(torch.equal(r, resid[0]) for r in resid)  # s = 0: every block's update is scaled away
    assert m.residual_alphas() == [0.0, 0.0, 0.0]
    opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    _, loss = m.train()(idx, tokens(seed=2))
    loss.backward()
    opt.step()
    assert all(s != 0.0 for s in m.residual_alphas())  # the scales learned
    m.set_attenuation(0.0)  # the ramp at 0: the plain model
    plain = GPT(GPTConfig(**TINY)).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("scaled.")})
    with torch.no_grad():
        assert torch.allclose(m.eval()(idx, idx)[0], plain(idx, idx)[0], atol=1e-6)


# ---- bit for bit with model.py before the registry ----

@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """model.py as of commit 5260efe, imported under another name (it imports nanoshift.checkpoint and
    nanoshift.common, which are unchanged in what it uses)."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_REGISTRY}:model.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs git and commit {BEFORE_REGISTRY} (the model before the registry): {e}")
    path = tmp_path_factory.mktemp("before") / "model_before_registry.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model_before_registry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(module, kw):
    """(model, the RNG state after building it) for module's GPT from the same seed."""
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**kw))
    return model, torch.get_rng_state()


def nudge_gate(model):
    """Move the gate away from its uniform init the same way in both models, so the alphas differ by layer."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.gate.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen))


def param_names(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"], g["lr"], g["lr_mult"]) for g in opt.param_groups]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_is_bit_for_bit_what_it_was_before_the_registry(before, arch, mode, tmp_path):
    kw = {**TINY, **ARCHS[arch], **MODES[mode], "dropout": 0.1}
    old, old_rng = build(before, kw)
    new, new_rng = build(model_now, kw)
    assert torch.equal(old_rng, new_rng)  # the same random numbers drawn, in the same order
    assert list(new.state_dict()) == list(old.state_dict())  # keys and their order: checkpoints are unchanged
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), k
    old_fields = old.config.to_dict()  # fields added since keep their defaults, after the old ones
    assert list(new.config.to_dict())[:len(old_fields)] == list(old_fields)
    assert {k: v for k, v in new.config.to_dict().items() if k in old_fields} == old_fields
    assert new.config.cut_layers == old.config.cut_layers
    if mode.startswith("gate"):
        nudge_gate(old)
        nudge_gate(new)
    idx, targets = tokens(), tokens(seed=2)

    for model in (old, new):
        model.eval()
    with torch.no_grad():
        for a in (1.0, 0.3, 0.0):  # the attenuation ramp: configured, mid-ramp, the plain model
            for model in (old, new):
                model.set_attenuation(a)
            assert torch.equal(old(idx, targets)[0], new(idx, targets)[0]), a
            assert old.residual_alphas() == new.residual_alphas(), a
            (old_resid, old_mids), (new_resid, new_mids) = old.hidden_states(idx, True), new.hidden_states(idx, True)
            assert all(torch.equal(x, y) for x, y in zip(old_resid + old_mids, new_resid + new_mids))
            assert len(new_resid) == 4 and len(new_mids) == 3

    for model in (old, new):  # training: dropout draws from the RNG, the ramp mid-way
        model.train().set_attenuation(0.6)
    torch.manual_seed(5)
    _, old_loss = old(idx, targets)
    old_loss.backward()
    torch.manual_seed(5)
    _, new_loss = new(idx, targets)
    new_loss.backward()
    assert torch.equal(old_loss, new_loss)
    for (k, a), b in zip(old.named_parameters(), new.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), k
    assert old.residual_alphas() == new.residual_alphas()  # token gate: the mean over the last forward

    old_opt = old.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", 10.0)  # the old positional gate_lr_mult
    for new_opt in (new.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", {"gate_lr_mult": 10.0}),
                    new.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", 10.0)):
        assert param_names(new, new_opt) == param_names(old, old_opt)
    old_opt.step()
    new_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))

    # a checkpoint written by the old code loads into the new one and computes the same
    old.eval().set_attenuation(1.0)
    torch.save({"model": old.state_dict(), "model_args": old.config.to_dict(), "iter_num": 3,
                "config": {"attenuation_warmup_iters": 6}}, tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    old.set_attenuation(0.5)  # what from_checkpoint sets: iter 3 of a 6-step ramp
    with torch.no_grad():
        assert torch.equal(loaded(idx, targets)[0], old(idx, targets)[0])
    assert loaded.residual_alphas() == old.residual_alphas()


def test_the_pinned_modes_cover_every_registered_example():
    covered = {(kw["residual_mode"], kw.get("gate_mode")) for kw in MODES.values()}
    assert {(kw["residual_mode"], kw.get("gate_mode")) for kw in residual_examples().values()
            if kw["residual_mode"] not in PINNED_ELSEWHERE} <= covered


# ---- a new variant needs only its registry entry: train.py, analyze.py and bench.py take it as it is ----

def test_a_toy_variant_trains_analyses_and_benchmarks_through_the_entry_points(floor_variant, prose_shards, tmp_path,
                                                                               capsys):
    out = tmp_path / "floor"
    train.main([f"--data_dir={prose_shards}", f"--out_dir={out}", "--device=cpu", "--n_layer=2", "--n_head=2",
                "--n_embd=32", "--block_size=32", "--batch_size=4", "--total_batch_tokens=128", "--warmup_iters=0",
                "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=3", "--eval_tokens=256", "--max_iters=3",
                "--threads=1", "--track_sequences=2", "--residual_mode=floor", "--cut_alpha=0.6",
                "--floor_lr_mult=50"])
    with open(out / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    assert evals[0]["alphas"] == pytest.approx([0.8, 0.8])  # halfway between cut_alpha and 1
    assert evals[-1]["alphas"] != pytest.approx([0.8, 0.8], abs=1e-4)  # learned (its lr x 50)
    assert evals[-1]["alignment"]["misalignment"] is not None  # tracked
    assert evals[0]["val_bpb"] > 0
    captured = capsys.readouterr()
    assert "has no effect" not in captured.err  # floor_lr_mult acts in this mode

    val = glob.glob(f"{prose_shards}/*_val_*.bin")[0]
    analyze.main(["--ckpt", str(out), "--shards", val, "--num_sequences=2", "--seq_len=32", "--batch_size=2",
                  f"--out_dir={tmp_path / 'analysis'}", "--progress=False", "--log", str(out / "log.jsonl")])
    with open(tmp_path / "analysis" / "metrics.json") as f:
        metrics = json.load(f)
    assert "floor" in json.dumps(metrics)  # the run and its mode are in the analysis
    assert os.path.exists(tmp_path / "analysis" / "alphas.png")

    bench.run(["--section=train", "--repeats=1", "--tiny=True"])
    table = capsys.readouterr().out
    assert "| floor 0.5 |" in table and "| no attenuation |" in table
    assert "| saved for backward (MiB) | vs no attenuation | weights, grads, AdamW (MiB) |" in table


def test_saved_for_backward_counts_activations_not_weights():
    """bench's per-variant memory: what autograd keeps grows with the batch (activations), not with the weights;
    hyper-connections' four streams keep more than the plain residual."""
    import bench

    def saved(batch, **settings):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **settings))
        x = torch.randint(0, 64, (batch, 16))
        return bench.saved_for_backward_bytes(model, x, x)

    one, two = saved(2), saved(4)
    assert one > 0 and abs(two / one - 2) < 0.05
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert saved(1) < weights  # a batch of one sequence keeps less than the weights, so no weight is counted
    assert saved(2, residual_mode="hyper_connections", hc_streams=4) > 1.1 * one
