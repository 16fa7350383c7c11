"""lens.py: every metric against a plain float64 computation written here, shift-depth rules, option
checks, and streaming memory."""

import json
import os
import re

import numpy as np
import pytest
import torch

from nanoshift import lens
from nanoshift.common import SettingError
from nanoshift.lens import LensOptions, LensStats, analyze_model, crossing_layer
from nanoshift.lm import OurGPT
from nanoshift.tuned_lens import Translators
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 40  # tiny vocabulary for the reference tests: rows come in identical pairs (2j, 2j+1) to force ties


def tie_model(n_layer=3, seed=0):
    """A tiny GPT whose embedding rows come in identical pairs, so every logit appears twice (ties at
    the k-th place for odd k), and whose blocks are strong enough that the state leaves the input token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=32, vocab_size=V)).eval()
    with torch.no_grad():
        w = model.lm_head.weight
        w[1::2] = w[0::2]
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(40)  # random blocks that actually move the residual stream
    return model


def batched(windows, batch_size):
    return list(torch.split(windows, batch_size))


def tokens(n_seq, T, vocab, seed=1):
    return torch.randint(0, vocab, (n_seq, T + 1), generator=torch.Generator().manual_seed(seed))


def reference(model, toks, k, space, lens_norm, mid, translators=None):
    """Every metric, computed in float64 numpy with the textbook definitions, position by position; with
    translators (the tuned lens), each state h first becomes h + A h + b (float64), the last state unchanged."""
    x, y = toks[:, :-1].reshape(-1).numpy(), toks[:, 1:].reshape(-1).numpy()
    with torch.no_grad():
        resid, mids = model.hidden_states(toks[:, :-1], mid=True)
    ln = model.transformer.ln_f
    g, b = ln.weight.detach().double().numpy(), ln.bias.detach().double().numpy()
    E = model.lm_head.weight.detach().double().numpy()

    def layer_norm(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + ln.eps) * g + b

    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    def cos(a, c):
        return (a * c).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(c, axis=-1)

    as_np = lambda s: s.reshape(-1, s.size(-1)).double().numpy()
    logp_final = log_softmax(layer_norm(as_np(resid[-1])) @ E.T)
    e_in, e_out = E[x], E[y]
    if space == "normed":
        e_in, e_out = layer_norm(e_in), layer_norm(e_out)
    proj_ok = (x != y) & (np.abs(e_out - e_in).sum(-1) > 0)
    states = [("resid", l, s) for l, s in enumerate(resid)] + ([("mid", l + 0.5, s) for l, s in enumerate(mids)]
                                                              if mid else [])
    rows, wins = [], []
    n = len(x)
    L = len(resid) - 1
    for index, (kind, layer, state) in enumerate(states):
        h = as_np(state)
        if translators is not None and index != L:
            t = translators.translator(index)
            h = h + h @ t.weight.detach().double().numpy().T + t.bias.detach().double().numpy()
        z = (layer_norm(h) if lens_norm else h) @ E.T
        # in the top k <=> fewer than k tokens have a strictly larger logit
        in_topk = lambda t: np.array([(z[i] > z[i, t[i]]).sum() < k for i in range(n)])
        logp = log_softmax(z)
        p = np.exp(logp)
        v = layer_norm(h) if space == "normed" else h
        d = e_out - e_in
        proj = ((v - e_in) * d).sum(-1)[proj_ok] / (d * d).sum(-1)[proj_ok]
        win = z[np.arange(n), y] > z[np.arange(n), x]
        if kind == "resid":
            wins.append(win)
        rows.append({
            "kind": kind, "layer": float(layer),
            "topk_input": in_topk(x).mean(), "topk_target": in_topk(y).mean(),
            "cos_input": cos(v, e_in).mean(), "cos_target": cos(v, e_out).mean(),
            "projection": proj.mean(), "target_wins": win[x != y].mean(),
            "lens_ce": -logp[np.arange(n), y].mean(), "entropy": -(p * logp).sum(-1).mean(),
            "kl_final": (np.exp(logp_final) * (logp_final - logp)).sum(-1).mean(),
        })
    hist = [0] * (L + 2)  # first layer from which the target wins at every later layer; last bin: never
    for i in np.flatnonzero(x != y):
        first = L + 1
        for layer in range(L, -1, -1):
            if not wins[layer][i]:
                break
            first = layer
        hist[first] += 1
    return rows, hist


@pytest.mark.parametrize("space,lens_norm", [("raw", True), ("normed", True), ("raw", False)])
def test_every_metric_equals_the_plain_computation(space, lens_norm, monkeypatch):
    monkeypatch.setattr(lens, "LENS_CHUNK_BYTES", 4 * V * 7)  # 7-token chunks: straddle sequences
    model, k = tie_model(), 5
    toks = tokens(6, 16, V)
    toks[0, 3:6] = 7  # t_i == t_{i+1}: skipped by the projection and the win statistics
    toks[1, 4:6] = torch.tensor([10, 11])  # distinct tokens, identical embedding rows: no projection direction
    lm = OurGPT(model, "tiny")
    got = analyze_model(lm, batched(toks, 4), LensOptions(k=k, space=space, lens_norm=lens_norm, mid=True),
                        progress=False)
    want, hist = reference(model, toks, k, space, lens_norm, mid=True)
    assert len(got["layers"]) == len(want) == 2 * model.config.n_layer + 1
    for g, w in zip(got["layers"], want):
        assert (g["kind"], g["layer"]) == (w["kind"], w["layer"])
        for name in ("topk_input", "topk_target", "target_wins"):
            assert g[name] == pytest.approx(w[name], abs=1e-12), (name, g["layer"])
        for name in ("cos_input", "cos_target", "projection"):
            assert g[name] == pytest.approx(w[name], abs=2e-5), (name, g["layer"])
        for name in ("lens_ce", "entropy", "kl_final"):
            assert g[name] == pytest.approx(w[name], abs=2e-4), (name, g["layer"])
    s = got["shift_depth"]
    assert s["first_win_hist"] + [s["first_win_never"]] == hist
    assert sum(c > 0 for c in hist) >= 2, "the test model should shift tokens at different depths"
    pairs = list(zip(toks[:, :-1].flatten().tolist(), toks[:, 1:].flatten().tolist()))
    assert got["positions"] == 6 * 16 and got["positions_diff"] == sum(a != b for a, b in pairs) <= 6 * 16 - 2
    assert got["positions_projection"] == sum(a // 2 != b // 2 for a, b in pairs) < got["positions_diff"]
    if lens_norm:  # the last layer's lens is the model's own output distribution
        assert got["layers"][model.config.n_layer]["kl_final"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("space", ["raw", "normed"])
def test_every_metric_under_the_tuned_lens_equals_the_plain_computation(space):
    """The tuned lens through the same engine: random translators (the mid-block ones too), every metric of the
    translated states against the float64 reference."""
    model, k = tie_model(), 5
    toks = tokens(4, 16, V, seed=5)
    lm = OurGPT(model, "tiny")
    torch.manual_seed(1)
    translators = Translators.for_model(lm, mid=True)
    with torch.no_grad():
        for p in translators.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    got = analyze_model(lm, batched(toks, 3), LensOptions(k=k, space=space, mid=True, lens="tuned"), progress=False,
                        translators=translators)
    want, hist = reference(model, toks, k, space, True, mid=True, translators=translators)
    logit = analyze_model(lm, batched(toks, 3), LensOptions(k=k, space=space, mid=True), progress=False)
    assert got["lens"] == "tuned"
    for g, w, plain in zip(got["layers"], want, logit["layers"]):
        assert (g["kind"], g["layer"]) == (w["kind"], w["layer"])
        for name in ("topk_input", "topk_target", "target_wins"):
            assert g[name] == pytest.approx(w[name], abs=1e-12), (name, g["layer"])
        for name in ("cos_input", "cos_target", "projection"):
            assert g[name] == pytest.approx(w[name], abs=2e-5), (name, g["layer"])
        for name in ("lens_ce", "entropy", "kl_final"):
            assert g[name] == pytest.approx(w[name], abs=2e-4), (name, g["layer"])
        if g["layer"] != model.config.n_layer:  # translated: not the logit lens's numbers
            assert g["kl_final"] != pytest.approx(plain["kl_final"], rel=0.1)
    assert got["shift_depth"]["first_win_hist"] + [got["shift_depth"]["first_win_never"]] == hist


def test_test_model_really_has_ties_at_the_kth_place():
    """The premise of the tie test: with paired rows, the k-th and (k+1)-th logits are equal, so
    torch.topk's indices would drop one of two tied tokens that the >= rule keeps."""
    model, k = tie_model(), 5
    toks = tokens(6, 16, V)
    lm = OurGPT(model, "tiny")
    with torch.no_grad():
        resid, _ = model.hidden_states(toks[:, :-1])
        z = lm.decode(resid[2].reshape(-1, 16))
    top = z.sort(dim=-1, descending=True).values
    assert torch.equal(top[:, k - 1], top[:, k])
    x = toks[:, :-1].reshape(-1)
    by_indices = (z.topk(k).indices == x[:, None]).any(-1)
    ours = LensStats(z.clone(), x, x, k).topk_in
    assert (ours & ~by_indices).any() and not (by_indices & ~ours).any()


def test_topk_match_counts_every_token_tied_at_the_kth_place_and_wins_are_strict():
    z = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 1.0]])
    for t, expected in [(0, [True, True]), (2, [True, True]), (3, [True, True]), (1, [False, True]),
                        (4, [False, False])]:
        lens = LensStats(z.clone(), torch.tensor([t, t]), torch.tensor([2, 2]), k=2)
        assert lens.topk_in.tolist() == expected
    lens = LensStats(z.clone(), torch.tensor([2, 2]), torch.tensor([3, 0]), k=2)
    assert lens.wins.tolist() == [False, False]  # a tie is no win: 2 vs 2, and 5 vs 5
    assert LensStats(z.clone(), torch.tensor([1, 4]), torch.tensor([2, 0]), k=2).wins.tolist() == [True, True]


def test_crossing_layer_by_hand():
    layers = [0, 1, 2, 3]
    assert crossing_layer(layers, [1, 0.8, 0.4, 0.1], [0, 0.2, 0.6, 0.9]) == pytest.approx(1.75)
    assert crossing_layer(layers, [0, 0, 0, 0], [0, 0.1, 0.2, 0.3]) == 0.0  # target never behind
    assert crossing_layer(layers, [1, 1, 1, 1], [0, 0, 0, 0.5]) is None  # input still ahead at the end
    assert crossing_layer(layers, [1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(2.5)  # the last crossing counts
    assert crossing_layer([0, 1, 2], [0.5] * 3, [0.0, 0.25, 1.0]) == pytest.approx(1 + 0.25 / 0.75)


def test_crossing_layer_equals_a_dense_search_on_random_curves():
    """The crossing is sup{x : input(x) > target(x)} of the piecewise-linear curves."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 6, 600_001)
    for _ in range(50):
        a, b = rng.random(7), rng.random(7)
        above = np.interp(grid, np.arange(7), a - b) > 0
        got = crossing_layer(list(range(7)), a.tolist(), b.tolist())
        if above[-1]:
            assert got is None
        elif not above.any():
            assert got == 0.0
        else:
            assert got == pytest.approx(grid[np.flatnonzero(above)[-1]], abs=2e-5)


def test_sequences_without_a_shift_give_no_projection_instead_of_nan():
    lm = OurGPT(tie_model(), "tiny")
    r = analyze_model(lm, [torch.full((2, 9), 4)], progress=False)  # t_i == t_{i+1} everywhere
    assert r["positions_diff"] == 0 and r["shift_depth"]["projection_half"] is None
    assert all(row["projection"] is None and row["target_wins"] is None for row in r["layers"])
    assert r["layers"][0]["topk_input"] == 1.0  # the repeated token is its own target: counted by both
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("options, named", [
    (dict(k=0), "k must be an int >= 1"), (dict(k=2.5), "k must be an int"), (dict(space="sideways"), "space must be"),
    (dict(lens_dtype="float8"), "lens_dtype must be one of ['auto', 'float32'"),
    (dict(lens="tuned-ish"), "lens must be one of ['logit', 'tuned']"),
    (dict(lens="tuned", lens_norm=False), "lens_norm=False is for the logit lens only"),
])
def test_lens_options_are_checked_once_naming_the_setting(options, named):
    with pytest.raises(SettingError) as error:
        LensOptions(**options)
    assert named in str(error.value)


def test_k_larger_than_the_vocabulary_is_a_setting_error():
    with pytest.raises(SettingError, match="at most the vocabulary size 40"):
        analyze_model(OurGPT(tie_model(), "tiny"), [tokens(1, 4, V)], LensOptions(k=41), progress=False)


def test_analysis_is_the_same_for_any_batch_size_and_chunk(monkeypatch):
    model = tie_model()
    lm = OurGPT(model, "tiny")
    toks = tokens(5, 12, V, seed=3)
    a = analyze_model(lm, batched(toks, 5), progress=False)
    monkeypatch.setattr(lens, "LENS_CHUNK_BYTES", 4 * V * 5)
    b = analyze_model(lm, batched(toks, 2), progress=False)
    assert a["shift_depth"] == b["shift_depth"]
    for ra, rb in zip(a["layers"], b["layers"]):
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, abs=1e-6), key

# -----------------------------------------------------------------------------
# Memory: streaming, so the peak does not grow with the number of sequences


def _peak_rss_kib(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    fn()
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_does_not_grow_with_the_number_of_sequences():
    torch.manual_seed(0)
    lm = OurGPT(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=8192)).eval(), "m")
    run = lambda n: analyze_model(lm, batched(tokens(n, 32, 8192), 8), progress=False)
    run(8)  # warm-up: allocator pools, lazy imports
    small = _peak_rss_kib(lambda: run(8))
    large = _peak_rss_kib(lambda: run(96))
    # keeping the logits of every position would need 96 * 32 * 8192 * 4 bytes = 96 MiB per layer
    assert large - small < 24 * 1024, f"peak RSS grew from {small} to {large} KiB"
