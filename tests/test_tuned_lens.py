"""tuned_lens.py: untrained translators are the logit lens exactly; a trained tuned lens beats the logit lens
on KL to the final layer at every intermediate layer of a tiny trained model; translators are tied to the
weights they were trained for; the forward and the training agree with the tuned-lens package (PyPI
tuned-lens 0.2.0), skipped with a reason where it is not installed."""

import json
import os

import pytest
import torch

from nanoshift.common import InputError, SettingError
from nanoshift.lens import LensOptions, analyze_model, lens_states
from nanoshift.lm import HFCausalLM, OurGPT, load_lm
from nanoshift.tuned_lens import (Translators, bench_tuned_lens, load_or_train, load_translators, make_step_batches,
                                  model_fingerprint, save_translators, train_translators, translator_path,
                                  windows_needed)
from conftest import save_tiny_llama, write_checkpoint
from model import GPT, GPTConfig

V, T = 64, 32  # the tiny corpus: a vocabulary of 64, windows of 32 tokens


def cycle_corpus(n, seed, vocab=V, length=T + 1, p_follow=0.8):
    """[n, length] windows of a Markov chain: each token is followed by its successor in one fixed permutation
    with probability p_follow, else by a uniformly random token. Learnable in a few hundred steps, with a
    final distribution that is neither one-hot nor uniform."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    follow = torch.rand(n, length, generator=g) < p_follow
    noise = torch.randint(0, vocab, (n, length), generator=g)
    for j in range(1, length):
        out[:, j] = torch.where(follow[:, j], perm[out[:, j - 1]], noise[:, j])
    return out


def train_tiny(model, steps=150, lr=3e-3, batch=16):
    """The model trained in-process on cycle_corpus (AdamW); returned in eval mode."""
    data = cycle_corpus(512, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        b = data[torch.randint(0, len(data), (batch,), generator=g)]
        if isinstance(model, GPT):
            _, loss = model(b[:, :-1], b[:, 1:])
        else:  # transformers: labels are shifted inside
            loss = model(input_ids=b[:, :-1], labels=b[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained_gpt():
    """Our GPT (3 blocks x 32) trained for 150 steps on the cycle corpus, as an OurGPT."""
    torch.manual_seed(0)
    model = train_tiny(GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=T, vocab_size=V)))
    return OurGPT(model, "tiny-trained")


def random_gpt(seed=0, n_layer=3, **kw):
    """A random tiny GPT whose blocks move the residual stream (so every state decodes differently)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=T, vocab_size=V, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(20)
    return OurGPT(model, f"random-{seed}")


def random_translators(lm, mid=False, scale=0.1, seed=0):
    torch.manual_seed(seed)
    translators = Translators.for_model(lm, mid)
    with torch.no_grad():
        for p in translators.parameters():
            p.copy_(scale * torch.randn_like(p))
    return translators


# -----------------------------------------------------------------------------
# The tuned lens in the lens engine


@pytest.mark.parametrize("space,mid", [("raw", False), ("normed", True)])
def test_untrained_translators_reproduce_every_logit_lens_metric_exactly(space, mid):
    lm = random_gpt()
    batches = list(torch.split(torch.randint(0, V, (6, T + 1), generator=torch.Generator().manual_seed(3)), 4))
    logit = analyze_model(lm, batches, LensOptions(space=space, mid=mid, k=3), progress=False)
    tuned = analyze_model(lm, batches, LensOptions(space=space, mid=mid, k=3, lens="tuned"), progress=False,
                          translators=Translators.for_model(lm, mid))
    assert (logit.pop("lens"), tuned.pop("lens")) == ("logit", "tuned")
    assert tuned == logit  # every number, bit for bit: layers, shift depth, misalignment, first-win histogram


def test_trained_translators_change_the_metrics_and_are_the_translated_decode():
    """With non-zero translators, the tuned lens's KL at a layer equals a hand computation of
    KL(final || softmax(decode(h + A h + b))), and the last layer (no translator) is unchanged."""
    lm = random_gpt()
    toks = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(4))
    translators = random_translators(lm)
    tuned = analyze_model(lm, [toks], LensOptions(lens="tuned"), progress=False, translators=translators)
    logit = analyze_model(lm, [toks], LensOptions(), progress=False)
    with torch.no_grad():
        resid, _ = lm.hidden_states(toks[:, :-1])
        final = torch.log_softmax(lm.decode(resid[-1]).double(), -1)
        for layer in range(lm.n_layer):
            lens = torch.log_softmax(lm.decode(translators(resid[layer], layer)).double(), -1)
            kl = (final.exp() * (final - lens)).sum(-1).mean().item()
            assert tuned["layers"][layer]["kl_final"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
            assert tuned["layers"][layer]["kl_final"] != pytest.approx(logit["layers"][layer]["kl_final"], rel=1e-3)
    assert tuned["layers"][-1] == logit["layers"][-1]


def test_trained_tuned_lens_has_lower_kl_than_the_logit_lens_at_every_intermediate_layer(trained_gpt):
    lm = trained_gpt
    steps = 40
    translators, info = train_translators(lm, make_step_batches(cycle_corpus(steps * 4, seed=3), 4 * T, steps))
    held_out = list(torch.split(cycle_corpus(32, seed=2), 8))
    logit = analyze_model(lm, held_out, LensOptions(), progress=False)
    tuned = analyze_model(lm, held_out, LensOptions(lens="tuned"), progress=False, translators=translators)
    kl_logit = [row["kl_final"] for row in logit["layers"]]
    kl_tuned = [row["kl_final"] for row in tuned["layers"]]
    assert kl_logit[0] > 0.5  # the embeddings are far from the output under the logit lens: a real gap to close
    for layer in range(lm.n_layer):  # every intermediate state (0 = embeddings ... L - 1)
        assert kl_tuned[layer] < kl_logit[layer], (layer, kl_tuned, kl_logit)
    assert kl_tuned[0] < 0.5 * kl_logit[0]
    assert kl_tuned[-1] == kl_logit[-1] == 0.0  # the last state is the model's output under both lenses
    assert info["steps"] == steps and info["tokens"] == steps * 4 * T
    assert all(last < first for first, last in zip(info["kl_first_step"], info["kl_last_step"]))
    assert tuned["final_loss"] == logit["final_loss"]


def test_training_leaves_the_model_untouched_and_without_gradients(trained_gpt):
    before = {k: v.clone() for k, v in trained_gpt.model.state_dict().items()}
    train_translators(trained_gpt, make_step_batches(cycle_corpus(4, seed=5), 2 * T, 2))
    after = trained_gpt.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in trained_gpt.model.parameters())


def test_mid_block_translators_are_trained_and_used(trained_gpt):
    translators, info = train_translators(trained_gpt, make_step_batches(cycle_corpus(8, seed=6), 2 * T, 4), mid=True)
    L = trained_gpt.n_layer
    assert len(info["kl_first_step"]) == len(lens_states(L, True)) - 1  # every state but the last
    assert all(t.weight.abs().sum() > 0 for t in translators.mids)
    tuned = analyze_model(trained_gpt, [cycle_corpus(2, seed=7)], LensOptions(lens="tuned", mid=True), progress=False,
                          translators=translators)
    assert [r["kind"] for r in tuned["layers"]].count("mid") == L


# -----------------------------------------------------------------------------
# Tied to the weights


def test_translators_from_another_checkpoint_are_refused(tmp_path):
    write_checkpoint(random_gpt(0).model, tmp_path / "a")
    write_checkpoint(random_gpt(1).model, tmp_path / "b")
    a, b = load_lm(ckpt=str(tmp_path / "a")), load_lm(ckpt=str(tmp_path / "b"))
    path = translator_path(a)
    assert path == str(tmp_path / "a" / "ckpt.tuned_lens.pt")
    save_translators(random_translators(a), path, a, {"steps": 1})
    loaded, training = load_translators(path, a)  # the same weights: accepted, every tensor back
    assert training == {"steps": 1}
    assert all(torch.equal(x, y) for x, y in zip(loaded.parameters(), random_translators(a).parameters()))
    with pytest.raises(InputError, match=r"ckpt.tuned_lens.pt holds translators trained for other weights.*--lens_retrain"):
        load_translators(path, b)
    with torch.no_grad():  # the same run after a little more training: every weight moved a little
        for p in a.model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    with pytest.raises(InputError, match="trained for other weights"):
        load_translators(path, a)


def test_fingerprint_is_the_same_for_float32_and_bfloat16_loads_of_one_checkpoint(tmp_path):
    write_checkpoint(random_gpt(0).model, tmp_path / "a")
    fp32, bf16 = load_lm(ckpt=str(tmp_path / "a")), load_lm(ckpt=str(tmp_path / "a"), dtype="bfloat16")
    assert model_fingerprint(fp32) == model_fingerprint(bf16) != model_fingerprint(random_gpt(1))


def test_load_or_train_trains_once_then_reuses_the_saved_translators(tmp_path):
    lm = random_gpt()
    path = str(tmp_path / "lens" / "m.tuned_lens.pt")
    calls = []

    def make_batches():
        calls.append(1)
        return make_step_batches(cycle_corpus(4, seed=8), 2 * T, 2)

    trained, info = load_or_train(lm, path, make_batches)
    assert calls == [1] and not info["loaded"] and os.path.isfile(path)
    loaded, info = load_or_train(lm, path, make_batches)
    assert calls == [1] and info["loaded"] and info["steps"] == 2
    assert all(torch.equal(x, y) for x, y in zip(trained.parameters(), loaded.parameters()))
    with pytest.raises(InputError, match="no translators for the mid-block states"):
        load_or_train(lm, path, make_batches, mid=True)
    _, info = load_or_train(lm, path, make_batches, mid=True, retrain=True)
    assert calls == [1, 1] and load_translators(path, lm)[0].mid


def test_a_file_that_is_not_a_tuned_lens_is_refused(tmp_path):
    lm = random_gpt()
    ckpt = write_checkpoint(lm.model, tmp_path / "run")
    with pytest.raises(InputError, match="not a nanoshift tuned-lens file"):
        load_translators(os.path.join(ckpt, "ckpt.pt"), lm)
    (tmp_path / "broken.pt").write_bytes(b"not torch")
    with pytest.raises(InputError, match="broken.pt is not a readable checkpoint"):
        load_translators(str(tmp_path / "broken.pt"), lm)


def test_bad_lens_settings_are_setting_errors():
    lm = random_gpt()
    toks = [torch.randint(0, V, (1, 9))]
    with pytest.raises(SettingError, match="lens must be one of"):
        LensOptions(lens="tuned-ish")
    with pytest.raises(SettingError, match="lens_norm=False is for the logit lens only"):
        LensOptions(lens="tuned", lens_norm=False)
    with pytest.raises(SettingError, match="needs random-0's translators"):
        analyze_model(lm, toks, LensOptions(lens="tuned"), progress=False)
    with pytest.raises(SettingError, match="set lens='tuned'"):
        analyze_model(lm, toks, LensOptions(), progress=False, translators=Translators.for_model(lm))
    with pytest.raises(SettingError, match="do not fit"):
        analyze_model(lm, toks, LensOptions(lens="tuned"), progress=False, translators=Translators(2, 16))
    with pytest.raises(SettingError, match="none for the mid-block states"):
        analyze_model(lm, toks, LensOptions(lens="tuned", mid=True), progress=False, translators=Translators.for_model(lm))
    with pytest.raises(InputError, match="needs 8 windows"):
        make_step_batches(torch.zeros(3, T + 1, dtype=torch.long), 2 * T, 4)
    assert windows_needed(100, 3, 32) == 3 * 4


def test_bench_reports_training_speed_and_the_analysis_cost_ratio(trained_gpt):
    numbers = bench_tuned_lens(trained_gpt, cycle_corpus(8, seed=9), steps=2, repeats=1)
    assert numbers["train_tokens"] == 8 * T and numbers["train_tokens_per_s"] > 0
    assert numbers["tuned_vs_logit_analysis"] > 0 and numbers["train_vs_logit_analysis"] > 0
    assert numbers["logit_analysis_tokens_per_s"] / numbers["tuned_analysis_tokens_per_s"] == pytest.approx(
        numbers["tuned_vs_logit_analysis"])


# -----------------------------------------------------------------------------
# The reference: PyPI tuned-lens


def _tuned_lens_package():
    try:
        from tuned_lens.nn import TunedLens
    except ImportError as e:
        pytest.skip(f"the reference package tuned-lens is not importable ({e}): pip install tuned-lens==0.2.0")
    return TunedLens


def _hf_gpt2(n_layer=3, hidden=32, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=hidden, n_layer=n_layer, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _package_lens(TunedLens, hf_model, translators):
    """The package's TunedLens for hf_model with our translators' A and b copied in."""
    reference = TunedLens.from_model(hf_model)
    assert len(reference.layer_translators) == len(translators.resid)  # one per state but the last, like ours
    with torch.no_grad():
        for theirs, ours in zip(reference.layer_translators, translators.resid):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_translator_forward_equals_the_tuned_lens_package(family, tmp_path):
    TunedLens = _tuned_lens_package()
    hf = save_tiny_llama(tmp_path, vocab_size=V, n_layer=3) if family == "llama" else _hf_gpt2()
    lm = HFCausalLM(hf, family)
    translators = random_translators(lm)
    reference = _package_lens(TunedLens, hf, translators)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resid, _ = lm.hidden_states(x)
        for layer in range(lm.n_layer):
            ours = lm.decode(translators(resid[layer], layer))
            theirs = reference(resid[layer], idx=layer).float()
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ours, lm.decode(resid[layer]), atol=1e-3)  # the translator did something


def test_training_reaches_the_kl_of_the_tuned_lens_recipe_run_on_the_package_lens():
    """The package's own training script cannot run here (tuned_lens.scripts imports torchdata.dataloader2,
    which torchdata >= 0.10 no longer has), so its loop body is run on its TunedLens module: per step, for
    each state but the last, KL(final || lens) under bfloat16 autocast, backward per state; SGD-Nesterov with
    its defaults, clip 1, linear decay. Same tokens, same steps: the held-out KLs agree within 5% per layer."""
    TunedLens = _tuned_lens_package()
    hf = train_tiny(_hf_gpt2(), steps=150)
    lm = HFCausalLM(hf, "tiny-gpt2")
    steps = 30
    step_batches = make_step_batches(cycle_corpus(steps * 4, seed=3), 4 * T, steps)
    ours, _ = train_translators(lm, step_batches)

    reference = TunedLens.from_model(hf)
    params = list(reference.layer_translators.parameters())
    opt = torch.optim.SGD(params, lr=1.0 * (1 - 0.9), momentum=0.9, nesterov=True, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for batches in step_batches:
        for batch in batches:
            with torch.no_grad():
                out = hf(input_ids=batch[:, :-1], output_hidden_states=True)
            labels = out.logits.float().log_softmax(-1)
            for i, h in enumerate(out.hidden_states[:-1]):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = reference(h, idx=i)
                    loss = (labels.exp() * (labels - logits.log_softmax(-1))).sum(-1).mean()
                (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        schedule.step()

    held_out = cycle_corpus(16, seed=2)
    with torch.no_grad():
        resid, _ = lm.hidden_states(held_out[:, :-1])
        final = torch.log_softmax(lm.decode(resid[-1]), -1)
        kl = lambda logits: (final.exp() * (final - torch.log_softmax(logits, -1))).sum(-1).mean().item()
        for layer in range(lm.n_layer):
            logit_kl = kl(lm.decode(resid[layer]))
            our_kl, their_kl = kl(lm.decode(ours(resid[layer], layer))), kl(reference(resid[layer], idx=layer).float())
            assert their_kl < logit_kl and our_kl < logit_kl
            assert our_kl == pytest.approx(their_kl, rel=0.05), (layer, our_kl, their_kl, logit_kl)


def test_analyze_tuned_lens_of_an_hf_llama_on_text(tmp_path, capsys):
    """analyze.py --hf (a tiny Llama with its own tokenizer, BOS first) --data_files --lens=both: translators
    trained on the text, saved in out_dir under the model's name, reused by a --prompt run."""
    import analyze
    from conftest import save_tiny_tokenizer

    words = "the of and to in a is was for on that with as by it at from his an were".split()
    path = tmp_path / "llama"
    save_tiny_tokenizer(path, words=words)
    save_tiny_llama(path, vocab_size=len(words) + 3, n_layer=2)
    texts = tmp_path / "texts"
    texts.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        picks = torch.randint(0, len(words), (300,), generator=g).tolist()
        (texts / f"doc{i}.txt").write_text(" ".join(words[j] for j in picks) + "\n")
    out = tmp_path / "out"
    common = ["--hf", str(path), "--data_files", str(texts / "*.txt"), "--seq_len=16", "--lens_steps=3",
              "--lens_tokens_per_step=32", "--progress=False", "--out_dir", str(out)]
    analyze.main(common + ["--lens=both", "--num_sequences=3"])
    assert "tuned lens of llama: trained" in capsys.readouterr().out
    assert os.path.isfile(out / "llama.tuned_lens.pt")
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert [m["lens"] for m in models] == ["logit", "tuned"]
    assert models[0]["layers"][-1] == models[1]["layers"][-1]  # the output: no translator
    assert models[0]["layers"][0]["kl_final"] != models[1]["layers"][0]["kl_final"]
    analyze.main(common + ["--lens=tuned", "--prompt", "the of and to in"])
    assert "tuned lens of llama: loaded" in capsys.readouterr().out
    html = (out / "grid_llama_tuned.html").read_text()
    data = json.loads(html.split('id="lens-data">', 1)[1].split("</script>", 1)[0])
    assert data["token_text"] == ["<s>", "the", "of", "and", "to", "in"]  # the model's BOS, then the words
    assert data["lens"] == "tuned" and len(data["rows"]) == 3


def test_eval_reports_the_misalignment_under_the_tuned_lens_from_saved_translators(tmp_path, capsys):
    """eval_benchmarks.py --lens=tuned reads the translators analyze.py saved next to the checkpoint (and refuses
    to guess without them); under the tuned lens the score differs from the logit lens's on the same windows."""
    import analyze
    import eval_benchmarks as eb
    from conftest import DOCUMENTS, tiny_gpt

    from nanoshift.data import get_tokenizer

    docs = [d.strip() for d in DOCUMENTS if " " in d.strip()]
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = tiny_gpt(seed=5, n_embd=32).train()  # memorises the passages, so the target wins at some depth
    ids = torch.tensor(get_tokenizer("gpt2").encode_ordinary(" ".join(docs)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(120):
        starts = torch.randint(0, len(ids) - 17, (8,), generator=torch.Generator().manual_seed(step))
        batch = torch.stack([ids[i:i + 17] for i in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run = write_checkpoint(model.eval(), tmp_path / "run")
    settings = dict(eb.DEFAULTS, ckpt=[run], benchmarks=["lambada"], lambada_files=[str(text)], progress=False,
                    context=16, misalignment_windows=4, out_dir=str(tmp_path / "eval"))
    with pytest.raises(InputError, match="no tuned-lens translators"):
        eb.run(dict(settings, lens="tuned"))
    analyze.main(["--ckpt", run, "--data_files", str(text), "--seq_len=16", "--num_sequences=2", "--lens=both",
                  "--lens_steps=3", "--lens_tokens_per_step=32", "--progress=False", "--out_dir", str(tmp_path / "an")])
    assert os.path.isfile(tmp_path / "an" / "lens_overlay_run.png")  # into an out_dir that did not exist yet
    logit = eb.run(settings)["models"]["run"]["lambada"]["misalignment"]
    tuned = eb.run(dict(settings, lens="tuned"))["models"]["run"]["lambada"]["misalignment"]
    assert logit is not None and tuned is not None and tuned != logit
    with pytest.raises(SettingError, match="lens must be"):
        eb.run(dict(settings, lens="magic"))
