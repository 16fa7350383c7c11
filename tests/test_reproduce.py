"""reproduce.py: its smoke version runs every step for real (seeds.py and train.py for the three modes, eval_benchmarks.py
and analyze.py on the groups, the report) in about half a minute; the report says what the paired differences mean;
the BPE it fits is a deterministic tokenizer that the rest of nanoshift reads."""

import json
import math
import os
import sys

import numpy as np
import pytest
import scipy.stats

import reproduce
from conftest import pydoc_documents
from nanoshift.data import get_tokenizer
from nanoshift import plots
from nanoshift.stats import minimal_detectable_difference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_reproduction_runs_every_step_into_results(prose_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the steps are the command lines of the repository's scripts and configs
    out = tmp_path / "repro"
    reproduce.main(["--smoke", f"--data_dir={prose_shards}", f"--out={out}"])
    assert "prepare: " in capsys.readouterr().out  # the data_dir holds a finished prepare: nothing downloaded
    for mode in reproduce.MODES:  # real train.py runs through seeds.py: seed 1 of each mode, to max_iters
        rows = [json.loads(line) for line in (out / f"{mode}-s1" / "log.jsonl").read_text().splitlines()]
        assert rows[0]["config"]["seed"] == 1 and (rows[-1]["type"], rows[-1]["iter"], rows[-1]["reason"]) == (
            "end", 4, "max_iters")
    results = json.loads((out / "results.json").read_text())
    assert {label: g["seeds"] for label, g in results["eval"]["groups"].items()} == {m: [1] for m in reproduce.MODES}
    assert set(results["eval"]["differences"]["groups"]) == {"cut", "cut_mid", "gate"}  # paired by the checkpoints' seeds
    assert set(results["analysis"]["groups"]) == set(reproduce.MODES) and "train gate (1 seed)" in results["seconds"]
    text = (out / "results.md").read_text()
    assert "the smoke version" in text and "- (no interval or test: a comparison needs 2 or more seeds)" in text
    assert "| benchmark | metric | baseline (n=1) | cut (n=1) | cut_mid (n=1) | gate (n=1) |" in text
    assert "| number | baseline (n=1) | cut (n=1) | cut_mid (n=1) | gate (n=1) |" in text and "(1 seed: no interval)" in text
    assert "What this design can detect" not in text  # one seed: no paired sd, no resolution to state
    # bits per byte next to the loss, and the floors of the val split with the groups above the bigram one named
    assert "|  | bits per byte |" in text
    floors = results["eval"]["floors"]["demo"]
    assert floors["bigram"]["bpb"] < floors["unigram"]["bpb"]
    assert "- Floors of the val split (counted on its train split, floors.py): unigram floor: " in text
    assert "Mean bits per byte above the bigram floor (worse than counting token pairs): baseline, cut, cut_mid, gate." in text
    for name in ("topk", "cosine_projection", "lens", "shift_depth", "alphas", "shift_training", "target_match_by_step"):
        assert (out / "analysis" / f"{name}.png").stat().st_size > 0
    assert {f"train_{m}.log" for m in reproduce.MODES} | {"eval.log", "analyze.log"} <= set(os.listdir(out / "logs"))


def test_the_report_says_whether_a_difference_is_inside_the_noise():
    def diff(mean, lo, hi, p):
        return {"demo": {"loss": {"n": 5, "mean": mean, "ci95": [lo, hi], "p_value": p, "significant": p < 0.05}}}

    results = {"differences": {"baseline": "baseline", "groups": {"cut": diff(0.004, -0.006, 0.014, 0.31),
                                                                  "gate": diff(-0.021, -0.03, -0.012, 0.0004)}}}
    assert reproduce.verdict(results) == [
        "- cut − baseline, val loss: +0.0040 nats (95% CI [-0.0060, +0.0140], p = 0.310, 5 seeds): no significant "
        "difference from the baseline (the interval contains 0).",
        "- gate − baseline, val loss: -0.0210 nats (95% CI [-0.0300, -0.0120], p < 0.001, 5 seeds): lower than the "
        "baseline's (significant at 5%)."]
    # a unitless score (misalignment) reads without a dangling unit
    scores = {"differences": {"baseline": "baseline", "groups": {"cut": {"demo": {"misalignment": {
        "n": 12, "mean": -0.0123, "ci95": [-0.02, -0.004], "p_value": 0.01, "significant": True}}}}}}
    assert reproduce.verdict(scores, "misalignment", "") == [
        "- cut − baseline, val misalignment: -0.0123 (95% CI [-0.0200, -0.0040], p = 0.010, 12 seeds): lower than the "
        "baseline's (significant at 5%)."]


def test_the_report_states_what_the_design_can_detect_from_the_paired_sd():
    def diff(std, n):
        return {"demo": {"bpb": {"n": n, "mean": 0.001, "std": std, "ci95": [-0.01, 0.01], "p_value": 0.5,
                                 "significant": False}}}

    results = {"differences": {"baseline": "baseline", "groups": {"cut": diff(0.008, 12), "gate": diff(0.015, 12),
                                                                  "one": diff(None, 1)}}}
    mdd = (scipy.stats.t.ppf(0.975, 11) + scipy.stats.t.ppf(0.8, 11)) * 0.008 / math.sqrt(12)
    assert reproduce.design_lines(results) == [
        f"- cut − baseline: paired sd of the val bits/byte difference 0.0080 over 12 seeds (target <= 0.01: met); the "
        f"smallest difference this design detects (5% two-sided, 80% power) is {mdd:.4f} bits/byte.",
        f"- gate − baseline: paired sd of the val bits/byte difference 0.0150 over 12 seeds (target <= 0.01: not met); "
        f"the smallest difference this design detects (5% two-sided, 80% power) is {mdd / 0.008 * 0.015:.4f} bits/byte."]


def test_the_split_half_estimate_finds_the_text_samples_share_of_the_noise():
    """Simulated: per seed, a true model difference (sd 0.008) plus independent noise in each half of the text
    (sd 0.006 per half, so 0.006 / sqrt(2) on the whole); the estimate recovers the text's part."""
    rng = np.random.default_rng(0)
    seeds, models, groups = list(range(1, 401)), {}, {"baseline": {"seeds": [], "runs": []}, "cut": {"seeds": [], "runs": []}}
    for seed in seeds:
        true = rng.normal(0, 0.008)
        for label, offset in (("baseline", 0.0), ("cut", true)):
            halves = [2.7 + offset + rng.normal(0, 0.006 / math.sqrt(2)) for _ in range(2)]
            models[f"{label}-s{seed}"] = {"demo": {"bpb": sum(halves) / 2, "bpb_halves": halves}}
            groups[label]["seeds"].append(seed)
            groups[label]["runs"].append(f"{label}-s{seed}")
    results = {"groups": groups, "models": models}
    assert reproduce.text_sample_sd(results, "cut", "baseline") == pytest.approx(0.006 / math.sqrt(2), rel=0.1)
    short = {"groups": {k: {"seeds": v["seeds"][:2], "runs": v["runs"][:2]} for k, v in groups.items()}, "models": models}
    assert reproduce.text_sample_sd(short, "cut", "baseline") is None  # 2 seeds: no estimate


@pytest.mark.parametrize("n", [3, 5, 12, 30])
def test_the_minimal_detectable_difference_has_the_power_it_claims(n):
    sd = 0.01
    mdd = minimal_detectable_difference(sd, n)
    assert mdd == pytest.approx((scipy.stats.t.ppf(0.975, n - 1) + scipy.stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n),
                                rel=1e-9)
    # the exact power of the two-sided paired t-test at that true difference (noncentral t): about 80%
    crit, shift = scipy.stats.t.ppf(0.975, n - 1), mdd / (sd / math.sqrt(n))
    power = scipy.stats.nct.sf(crit, n - 1, shift)  # (the other tail, below -crit, is < 1e-6 here)
    assert 0.75 < power < 0.81
    assert minimal_detectable_difference(0.0, n) == 0.0 and minimal_detectable_difference(2 * sd, n) == pytest.approx(2 * mdd)
    assert minimal_detectable_difference(sd, n, power=0.9) > mdd > minimal_detectable_difference(sd, n, alpha=0.2)


def test_the_minimal_detectable_difference_refuses_what_has_no_answer():
    from nanoshift.common import InputError
    for args in ((0.01, 1), (-0.01, 5), (0.01, 5, 0.0), (0.01, 5, 0.05, 1.0)):
        with pytest.raises(InputError):
            minimal_detectable_difference(*args)


def test_runs_at_once_finish_all_and_stop_with_the_first_failure(tmp_path, capsys):
    ok = [sys.executable, "-c", "import time; time.sleep(0.3); print('done')"]
    steps = {name: (ok, str(tmp_path / f"{name}.log")) for name in ("a", "b", "c")}
    seconds = reproduce.run_steps_at_once(steps, 2, "reproduce")
    assert set(seconds) == {"a", "b", "c"} and (tmp_path / "c.log").read_text().strip() == "done"
    bad = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit) as stop:
        reproduce.run_steps_at_once({"bad": (bad, str(tmp_path / "bad.log")), "good": (ok, str(tmp_path / "g.log"))},
                                    2, "reproduce")
    assert stop.value.code == 3 and (tmp_path / "g.log").read_text().strip() == "done"  # the other one finished
    assert "step 'bad' failed (exit 3)" in capsys.readouterr().err


def test_the_report_states_the_floors_and_names_groups_above_the_bigram_floor():
    floors = {"unigram": {"nats": 6.48, "bpb": 2.93}, "bigram": {"nats": 5.08, "bpb": 2.30}}
    groups = {"baseline": {"metrics": {"demo": {"bpb": {"mean": 2.41}}}},
              "gate": {"metrics": {"demo": {"bpb": {"mean": 2.12}}}}}
    assert reproduce.floor_lines({"groups": groups, "floors": {"demo": floors}}) == [
        "- Floors of the val split (counted on its train split, floors.py): unigram floor: 6.480 nats/token, 2.930 "
        "bits/byte; bigram floor: 5.080 nats/token, 2.300 bits/byte. Mean bits per byte above the bigram floor "
        "(worse than counting token pairs): baseline."]
    assert reproduce.floor_lines({"groups": groups}) == []


def test_the_fitted_bpe_is_deterministic_and_reads_like_any_tokenizer(tmp_path):
    texts = []
    for i, doc in enumerate(pydoc_documents()[:30]):
        (tmp_path / f"{i}.txt").write_text(doc)
        texts.append(str(tmp_path / f"{i}.txt"))
    first = reproduce.fit_tokenizer(texts, str(tmp_path / "a"), 384)
    second = reproduce.fit_tokenizer(texts, str(tmp_path / "b"), 384)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    tok = get_tokenizer(first)
    assert tok.n_vocab == 384 and tok.bos_prefix == () and tok.doc_separator == tok.hf.convert_tokens_to_ids("<|endoftext|>")
    text = "The with statement, 3 × 4 and <|endoftext|> as plain text."
    assert tok.decode(tok.encode_ordinary(text)) == text and get_tokenizer(second).tokenizer_id == tok.tokenizer_id
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_bad_settings_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--steps=train,plot", f"--out={tmp_path}"])
    assert e.value.code == 2 and "unknown step(s) ['plot']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--smoke", f"--data_dir={tmp_path / 'nothing'}", f"--out={tmp_path}"])
    assert e.value.code == 2 and "--smoke prepares nothing" in capsys.readouterr().err


def test_the_lab_has_every_registry_variant_with_its_scalars_at_the_gates_lr(monkeypatch):
    monkeypatch.chdir(ROOT)
    from model import RESIDUALS, residual_examples

    groups = reproduce.lab_groups()
    expected = {reproduce.slug(label) for label, s in residual_examples().items()
                if s["residual_mode"] not in reproduce.LAB_LEFT_OUT} | {"baseline", "cut", "gate"}
    assert set(groups) == expected and "rezero_no_norm" in groups and "denseformer" in groups
    assert groups["gate"] == ("gate", ["config/repro_gate.py"])
    for label, (folder, args) in groups.items():
        assert folder == label and os.path.exists(os.path.join(ROOT, args[0]))
        mode = next((a.split("=", 1)[1] for a in args if a.startswith("--residual_mode=")), None)
        if mode and RESIDUALS[mode].lr_mult_setting:  # every learned scalar moves at the gate's 10x
            assert f"--{RESIDUALS[mode].lr_mult_setting}={reproduce.LAB_LR_MULT}" in args
    assert "--rezero_norm=False" in groups["rezero_no_norm"][1]


def test_the_depth_study_matches_training_flops_and_reuses_the_baseline_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    import torch
    from model import GPT, GPTConfig

    groups = reproduce.depth_groups()
    assert groups["blocks_4"] == ("baseline", ["config/repro.py"])  # the paper study's baseline runs
    shape = dict(n_head=4, n_embd=128, block_size=64, vocab_size=257, bias=False)
    with torch.device("meta"):
        base = 2000 * GPT(GPTConfig(n_layer=4, **shape)).flops_per_token()
        for n in (8, 12):
            args = groups[f"blocks_{n}"][1]
            steps = int(next(a for a in args if a.startswith("--max_iters=")).split("=")[1])
            assert f"--n_layer={n}" in args and f"--lr_decay_iters={steps}" in args
            per_step = GPT(GPTConfig(n_layer=n, **shape)).flops_per_token()
            assert abs(steps * per_step / base - 1) < 0.5 / steps + 1e-9  # the nearest whole number of steps
            assert steps < 2000 * 4 / n * 1.1


def test_bad_study_or_group_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--study=labs", f"--out={tmp_path}", "--steps=report"])
    assert e.value.code == 2 and "choose from ['paper', 'lab', 'depth']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--study=lab", "--groups=baseline,nope", f"--out={tmp_path}", "--steps=report"])
    assert e.value.code == 2 and "groups: ['nope'] not in study 'lab'" in capsys.readouterr().err


def test_the_relation_lines_say_whether_misalignment_goes_with_loss():
    with_loss = {"a": [(0.2, 2.70), (0.21, 2.71)], "b": [(0.3, 2.75), (0.31, 2.74)], "c": [(0.4, 2.80), (0.41, 2.81)],
                 "d": [(0.5, 2.85), (0.52, 2.86)], "e": [(0.6, 2.90), (0.6, 2.91)]}
    lines = reproduce.relation_lines(with_loss)
    assert lines[0].startswith("- Misalignment against val bits/byte across the 5 groups' means: Spearman rho +1.00")
    assert lines[0].endswith("a lower misalignment goes with a lower loss across methods.")
    assert lines[1].startswith("- Over the 10 runs: Pearson r +1.00")
    unrelated = {"a": [(0.2, 2.8)], "b": [(0.3, 2.7)], "c": [(0.4, 2.9)], "d": [(0.5, 2.75)]}
    assert reproduce.relation_lines(unrelated)[0].endswith("no significant relation across methods.")
    assert reproduce.relation_lines({"a": [(0.2, 2.8)], "b": [(0.3, 2.7)]}) == [
        "- (misalignment against bits/byte: fewer than 3 groups, no correlation)"]
    # two groups far from the rest (as deepnorm's post-LN states and rezero without norms): the plot zooms on
    # the others, and the report gives the correlation without them too
    near = {label: [(0.3 + (m - 0.2) / 10, b) for m, b in runs] for label, runs in with_loss.items()}  # 0.30-0.34
    far = dict(near, x=[(0.9, 2.75), (0.92, 2.76)], y=[(0.62, 3.5), (0.63, 3.52)])
    assert plots.bulk_groups(far) == set(near)
    lines = reproduce.relation_lines(far)
    assert lines[1].startswith("- Misalignment against val bits/byte across the 5 groups' means near each other "
                               "(without x, y, far from the rest): Spearman rho +1.00")
    assert len(plots.plot_misalignment_vs_bpb(far).axes) == 2 and len(plots.plot_misalignment_vs_bpb(near).axes) == 1


def test_smoke_lab_draws_misalignment_against_bpb_per_run(prose_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "lab"
    reproduce.main(["--smoke", "--study=lab", "--groups=baseline,rezero,denseformer", f"--data_dir={prose_shards}",
                    f"--out={out}"])
    assert {p.name for p in out.iterdir()} >= {"baseline-s1", "rezero-s1", "denseformer-s1", "lab"}
    results = json.loads((out / "lab" / "results.json").read_text())
    assert list(results["eval"]["groups"]) == ["baseline", "rezero", "denseformer"]
    assert (out / "lab" / "analysis" / "misalignment_vs_bpb.png").stat().st_size > 0
    text = (out / "lab" / "results.md").read_text()
    assert text.startswith("# nanoshift: the residual lab") and "misalignment_vs_bpb.png" in text
    assert "- Misalignment against val bits/byte across the 3 groups' means" in text or "no correlation" in text


def test_a_study_links_exactly_its_own_seeds_of_the_shared_runs(tmp_path):
    """The paper's baseline has seeds 1-8, the lab's 1-4: the lab's groups must catch 1-4 only (else the
    pairing with a 4-seed group fails), and the depth study's 4-block group is the baseline's runs."""
    out = tmp_path / "out-repro"
    for seed in range(1, 9):
        (out / f"baseline-s{seed}").mkdir(parents=True)
    for seed in range(1, 5):
        (out / f"rezero-s{seed}").mkdir()
    groups = {"baseline": ("baseline", []), "rezero": ("rezero", [])}
    runs = reproduce.link_runs(str(out), str(out / "lab"), groups, [1, 2, 3, 4])
    assert sorted(os.listdir(runs)) == [f"{g}-s{s}" for g in ("baseline", "rezero") for s in range(1, 5)]
    assert os.path.samefile(os.path.join(runs, "baseline-s3"), out / "baseline-s3")
    assert reproduce.group_args(runs, groups) == [f"baseline={runs}/baseline-s*", f"rezero={runs}/rezero-s*"]
    runs = reproduce.link_runs(str(out), str(out / "depth"), {"blocks_4": ("baseline", [])}, [1, 2])
    assert sorted(os.listdir(runs)) == ["blocks_4-s1", "blocks_4-s2"]
    assert os.path.samefile(os.path.join(runs, "blocks_4-s2"), out / "baseline-s2")
    reproduce.link_runs(str(out), str(out / "depth"), {"blocks_4": ("baseline", [])}, [1, 2])  # a rerun: no error


def test_config_values_reads_config_files_and_overrides_left_to_right(tmp_path):
    """The launchers' reader (seeds.py, reproduce.py's matched steps): a config that execs its base, then
    overrides as Python literals or strings, the last one winning; an unreadable config file named."""
    from nanoshift.common import SettingError
    from nanoshift.configurator import config_values

    base = tmp_path / "base.py"
    base.write_text("n_layer = 4\nout_dir = 'out-a'\nimport math\n_private = 1\n")
    child = tmp_path / "child.py"
    child.write_text(f"exec(open({str(base)!r}).read())\nmax_iters = 2000\n")
    got = config_values([str(child), "--n_layer=8", "--out_dir", "runs/b", "--gelu_approx=none", "--n_layer=12"])
    assert got == {"n_layer": 12, "out_dir": "runs/b", "max_iters": 2000, "gelu_approx": "none"}
    with pytest.raises(SettingError, match="cannot read config file .*missing.py: FileNotFoundError"):
        config_values([str(tmp_path / "missing.py")])
