"""Groups of seeds (groups.py) in eval_benchmarks.py and analyze.py: the statistics against numpy/scipy, the
rules (labels, seeds, mixed configurations, pairing), and groups of tiny runs end to end into one table with
intervals and into plots with bands, for checkpoints and training logs. In process: no subprocess."""

import json
import os

import numpy as np
import pytest
import scipy.stats
from matplotlib.collections import PolyCollection

import analyze
import eval_benchmarks
from nanoshift import groups, plots
from nanoshift.common import InputError, SettingError
from conftest import tiny_gpt, write_checkpoint
from nanoshift.data import write_shard

MODES = {"baseline": dict(residual_mode="none"), "gate": dict(residual_mode="gate", gate_mode="layer")}
SEEDS = (1, 2, 3)


def save_run(folder, seed, **model):
    """A tiny run as train.py leaves it, as far as groups care: weights, model_args and config['seed']."""
    return write_checkpoint(tiny_gpt(seed, **model), folder, config={"seed": seed})


def scipy_summary(values):
    values = np.asarray(values, dtype=float)
    lo, hi = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
    return values.mean(), values.std(ddof=1), lo, hi


def scipy_paired(group, baseline):
    diff = np.asarray(group, dtype=float) - np.asarray(baseline, dtype=float)
    mean, _, lo, hi = scipy_summary(diff)
    return mean, lo, hi, scipy.stats.ttest_rel(group, baseline).pvalue

# -----------------------------------------------------------------------------
# Must show 1: the numbers equal an independent computation; unmatched seeds are a clear error


def test_group_summaries_and_paired_differences_equal_numpy_and_scipy():
    rng = np.random.default_rng(0)
    base = rng.normal(3.30, 0.02, size=(4, 3))  # 4 seeds x 3 layers
    gate = base - 0.01 + rng.normal(0, 0.003, size=(4, 3))
    trees = {f"b{s}": {"loss": float(base[s, 0]), "layers": [{"layer": l, "x": float(base[s, l])} for l in range(3)],
                       "crossing": None if s == 0 else float(base[s, 1]), "space": "raw"} for s in range(4)}
    trees.update({f"g{s}": {"loss": float(gate[s, 0]), "layers": [{"layer": l, "x": float(gate[s, l])} for l in range(3)],
                            "crossing": float(gate[s, 1]), "space": "raw"} for s in range(4)})
    seeds = [7, 3, 9, 1]  # any ints; pairs are matched by seed, not by order
    g = groups.make_group("gate", [groups.Run(f"g{s}", f"g{s}", seeds[s]) for s in range(4)])
    b = groups.make_group("baseline", [groups.Run(f"b{s}", f"b{s}", seeds[s]) for s in range(4)])
    assert g.seeds == [1, 3, 7, 9]

    summary = groups.summarize([trees[f"g{s}"] for s in range(4)])
    for layer in range(3):
        got = summary["layers"][layer]["x"]
        mean, std, lo, hi = scipy_summary(gate[:, layer])
        assert (got["n"], got["mean"], got["std"]) == (4, pytest.approx(mean, abs=1e-14), pytest.approx(std, abs=1e-14))
        assert got["ci95"] == pytest.approx([lo, hi], abs=1e-10)
    assert summary["space"] == "raw" and summary["layers"][2]["layer"]["mean"] == 2
    low, high = groups.band([trees[f"g{s}"] for s in range(4)])
    assert low["loss"] == pytest.approx(scipy_summary(gate[:, 0])[2], abs=1e-10)
    assert high["layers"][1]["x"] == pytest.approx(scipy_summary(gate[:, 1])[3], abs=1e-10)

    diffs = groups.differences(g, b, trees)
    mean, lo, hi, p = scipy_paired(gate[:, 0], base[:, 0])
    assert diffs["loss"]["mean"] == pytest.approx(mean, abs=1e-14) and diffs["loss"]["ci95"] == pytest.approx([lo, hi], abs=1e-10)
    assert diffs["loss"]["p_value"] == pytest.approx(p, abs=1e-12) and diffs["loss"]["significant"]
    # a number that one baseline run lacks (no crossing) is paired over the seeds that have it on both sides
    mean, lo, hi, p = scipy_paired(gate[1:, 1], base[1:, 1])
    assert diffs["crossing"]["n"] == 3 and diffs["crossing"]["p_value"] == pytest.approx(p, abs=1e-12)
    mean, lo, hi, p = scipy_paired(gate[:, 0], base[:, 0])
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    assert groups.format_difference(diffs["loss"], 4) == f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}], {p_text}"
    noise = groups.format_difference(groups.differences(g, g, trees)["loss"], 4)  # a group against itself
    assert noise == "+0.0000 [+0.0000, +0.0000], p = 1.000, n.s."
    # a deeper group (the depth study): its scalars pair with the baseline's, its per-layer lists have no partner
    for s in range(4):
        trees[f"g{s}"]["layers"].append({"layer": 3, "x": 3.0})
    deeper = groups.differences(g, b, trees)
    assert deeper["layers"] is None and deeper["loss"]["mean"] == pytest.approx(diffs["loss"]["mean"], abs=1e-15)
    trees["g0"]["layers"].pop()
    with pytest.raises(InputError, match="differ in shape"):  # within a group, another depth is still an error
        groups.summarize([trees[f"g{s}"] for s in range(4)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: baseline and gate over seeds 1-3, a gate run of seed 4 (unmatched), a cut run of seed 1 (a group of
    one; mixed modes), a run without a recorded seed, and a val shard of GPT-2 tokens."""
    tmp = tmp_path_factory.mktemp("groups")
    for mode, model in MODES.items():
        for seed in SEEDS:
            save_run(tmp / f"out-{mode}-s{seed}", seed, **model)
    save_run(tmp / "extra" / "out-gate-s4", 4, **MODES["gate"])
    save_run(tmp / "extra" / "out-cut-s1", 1, residual_mode="cut")
    write_checkpoint(tiny_gpt(5), tmp / "foreign")  # no config: e.g. a nanoGPT checkpoint
    write_shard(tmp / "demo_val_000000.bin", np.random.default_rng(0).integers(0, 50257, 3000).astype(np.uint16))
    return tmp


def test_unmatched_seeds_are_a_clear_error_before_anything_is_evaluated(runs, capsys):
    out = runs / "eval-unmatched"
    with pytest.raises(SystemExit) as e:
        eval_benchmarks.main(["--ckpt", f"{runs}/out-baseline-s*", f"gate={runs}/out-gate-s[12]", "--benchmarks", "demo",
                              "--demo_shards", str(runs / "*.bin"), "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot pair group 'gate' with the baseline 'baseline' by seed: seed 3 has no " \
        "'gate' run. Give both" in err and "[]" not in err
    assert not out.exists()  # refused before any model was loaded
    gate = groups.make_group("gate", [groups.Run("a", "a", 1), groups.Run("b", "b", 4)])
    base = groups.make_group("baseline", [groups.Run("c", "c", 1), groups.Run("d", "d", 2)])
    with pytest.raises(InputError, match=r"seed 4 has no 'baseline' run; seed 2 has no 'gate' run\."):
        groups.baseline_of([base, gate])


def test_the_unmatched_seeds_message_names_only_what_is_missing():
    """Never "seeds [] have no ... run": each side is named only when it lacks seeds, in the right number."""
    base = groups.make_group("base", [groups.Run(f"b{s}", f"b{s}", s) for s in (1, 2, 3)])
    for seeds, message in (((1, 2, 3, 4, 5), "by seed: seeds 4, 5 have no 'base' run. Give"),
                           ((1,), "by seed: seeds 2, 3 have no 'gate' run. Give"),
                           ((1, 2, 7), "by seed: seed 7 has no 'base' run; seed 3 has no 'gate' run. Give")):
        gate = groups.make_group("gate", [groups.Run(f"g{s}", f"g{s}", s) for s in seeds])
        with pytest.raises(InputError) as e:
            groups.baseline_of([base, gate])
        assert message in str(e.value) and "[]" not in str(e.value)


def test_group_rules_labels_patterns_seeds_and_mixed_configurations(runs):
    assert [groups.group_label(p) for p in ("out-gate-s*", "runs/cut_seed?/ckpt.pt", "out-demo/*", "x/out-gate-s1",
                                            "out-gate-s*/log.jsonl", "*")] == ["gate", "cut", "demo", "gate-s1", "gate", "*"]
    assert groups.expand(["out-a", "out-b/ckpt.pt"]) is None  # no group: callers keep one column per run
    found = groups.model_groups([f"{runs}/out-baseline-s*", f"g={runs}/out-gate-s*", f"{runs}/extra/out-gate-s4"])
    assert [(g.label, g.seeds) for g in found] == [("baseline", [1, 2, 3]), ("g", [1, 2, 3]), ("gate-s4", [4])]
    assert [run.name for run in found[1].runs] == ["out-gate-s1", "out-gate-s2", "out-gate-s3"]
    with pytest.raises(InputError, match="no checkpoints match"):
        groups.model_groups([f"{runs}/out-nothing-s*"])
    with pytest.raises(SettingError, match="two groups are labelled 'gate'"):
        groups.model_groups([f"{runs}/out-gate-s*", f"{runs}/extra/out-gate-s*"])
    with pytest.raises(InputError, match=r"group 'mixed' mixes runs of different model settings \(residual_mode='cut' "
                                         r"in out-cut-s1 but 'gate' in out-gate-s4\)"):
        groups.model_groups([f"mixed={runs}/extra/out-*"])
    with pytest.raises(InputError, match="out-gate-s1 and out-gate-s1 both have seed 1"):
        groups.make_group("twice", [groups.Run("a", "out-gate-s1", 1), groups.Run("b", "out-gate-s1", 1)])
    with pytest.raises(InputError, match=r"group 'x': foreign record\(s\) no seed"):
        groups.make_group("x", [groups.Run("f", "foreign"), groups.Run("g", "g", 1)])
    with pytest.raises(InputError, match=r"is in two groups \('a' and 'b'\)"):
        groups.model_groups([f"a={runs}/out-gate-s*", f"b={runs}/out-gate-s1"])

# -----------------------------------------------------------------------------
# Must show 2: a group of tiny runs end to end into one table with intervals and into plots with bands


def test_groups_evaluate_into_one_table_with_intervals_and_paired_differences(runs):
    out = runs / "eval"
    eval_benchmarks.main(["--ckpt", f"{runs}/out-baseline-s*", f"{runs}/out-gate-s*", "--benchmarks", "demo", "--demo_shards", str(runs / "*.bin"), "--context=16",
                          "--max_tokens=400", "--misalignment_windows=2", "--progress=False", "--out_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == [f"out-{m}-s{s}" for m in MODES for s in SEEDS]
    assert results["groups"]["gate"]["seeds"] == [1, 2, 3] and results["differences"]["baseline"] == "baseline"
    loss = {m: [results["models"][f"out-{m}-s{s}"]["demo"]["loss"] for s in SEEDS] for m in MODES}
    got = results["groups"]["gate"]["metrics"]["demo"]["loss"]
    mean, std, lo, hi = scipy_summary(loss["gate"])
    assert (got["mean"], got["std"], got["ci95"]) == (pytest.approx(mean), pytest.approx(std), pytest.approx([lo, hi]))
    d = results["differences"]["groups"]["gate"]["demo"]["loss"]
    mean, lo, hi, p = scipy_paired(loss["gate"], loss["baseline"])
    assert (d["mean"], d["ci95"], d["p_value"]) == (pytest.approx(mean), pytest.approx([lo, hi]), pytest.approx(p))
    table = (out / "results.md").read_text()
    assert table.startswith("| benchmark | metric | baseline (n=3) | gate (n=3) |")
    assert f"| Demo (Shakespeare val) | loss | {groups.format_stat(results['groups']['baseline']['metrics']['demo']['loss'], 4)} |" in table
    assert " ± " in table and "(sd " in table and "| gate − baseline |" in table and f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" in table
    assert "Every run:\n\n| benchmark | metric | out-baseline-s1 |" in table  # the per-run table follows
    # bits per byte is summarised and paired like the loss, a row of both tables
    bpb = {m: [results["models"][f"out-{m}-s{s}"]["demo"]["bpb"] for s in SEEDS] for m in MODES}
    got = results["groups"]["gate"]["metrics"]["demo"]["bpb"]
    mean, std, lo, hi = scipy_summary(bpb["gate"])
    assert (got["mean"], got["std"], got["ci95"]) == (pytest.approx(mean), pytest.approx(std), pytest.approx([lo, hi]))
    d = results["differences"]["groups"]["gate"]["demo"]["bpb"]
    mean, lo, hi, p = scipy_paired(bpb["gate"], bpb["baseline"])
    assert (d["mean"], d["ci95"], d["p_value"]) == (pytest.approx(mean), pytest.approx([lo, hi]), pytest.approx(p))
    assert f"|  | bits per byte | {groups.format_stat(results['groups']['baseline']['metrics']['demo']['bpb'], 4)} |" in table


def test_groups_of_one_run_show_their_numbers_and_a_difference_without_interval(runs):
    out = runs / "eval-one"
    eval_benchmarks.main(["--ckpt", f"b={runs}/out-baseline-s1", f"c={runs}/extra/out-cut-s1", "--benchmarks", "demo",
                          "--demo_shards", str(runs / "*.bin"), "--context=16", "--max_tokens=200",
                          "--misalignment_windows=0", "--progress=False", "--out_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    b, c = (results["models"][name]["demo"]["loss"] for name in ("out-baseline-s1", "out-cut-s1"))
    table = (out / "results.md").read_text()
    assert f"| Demo (Shakespeare val) | loss | {b:.4f} | {c:.4f} |" in table
    assert f"| Demo (Shakespeare val) | loss | {c - b:+.4f} (1 seed: no interval) |" in table


def test_an_unseeded_group_of_one_is_compared_with_nothing(runs):
    found = groups.model_groups([f"{runs}/foreign", f"{runs}/out-gate-s*"])
    assert found[0].seeds == [None] and groups.baseline_of(found) is None  # (a note: no paired comparisons)
    assert groups.baseline_of(found, "gate") is found[1]  # the unseeded group is skipped, not an error


def test_groups_analyse_into_group_tables_and_plots_with_bands(runs, capsys):
    out = runs / "analysis"
    analyze.main(["--ckpt", f"base={runs}/out-baseline-s*", f"{runs}/out-gate-s*", f"{runs}/foreign",
                  "--baseline_group=base", "--shards", str(runs / "*.bin"), "--num_sequences=4", "--seq_len=16",
                  "--k=3", "--progress=False", "--out_dir", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["models"]) == 7 and list(saved["groups"]) == ["base", "gate", "foreign"]
    by_name = {r["label"]: r for r in saved["models"]}
    scores = [by_name[name]["misalignment"] for name in saved["groups"]["gate"]["runs"]]
    assert saved["groups"]["gate"]["stats"]["misalignment"]["mean"] == pytest.approx(np.mean(scores))
    base_scores = [by_name[f"out-baseline-s{s}"]["misalignment"] for s in SEEDS]
    assert saved["differences"]["groups"]["gate"]["misalignment"]["p_value"] == pytest.approx(
        scipy_paired(scores, base_scores)[3])
    text = (out / "groups.md").read_text()
    assert text.startswith("| number | base (n=3) | gate (n=3) | foreign (n=1) |")
    assert "| number | gate − base |" in text  # the unseeded run is not compared
    assert "groups of seeds:" in capsys.readouterr().out
    shown = [plots.group_result(label, [by_name[name] for name in g["runs"]]) for label, g in saved["groups"].items()]
    ax = plots.plot_topk(shown).axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 * 2  # input and target curves of the two groups of 3; the group of one has no band
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels[0] == "base (n=3, 95% CI): input t_i" and labels[-1] == "foreign: target t_i+1"
    mean_curve = [np.mean([by_name[n]["layers"][l]["topk_input"] for n in saved["groups"]["gate"]["runs"]]) for l in range(3)]
    assert list(ax.get_lines()[2].get_ydata()) == pytest.approx(mean_curve)
    for name in ("topk", "cosine_projection", "lens", "shift_depth"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

# -----------------------------------------------------------------------------
# Training logs as groups: alphas, shift over training, the cut sweep


def write_log(folder, seed, config, alphas, scores, val_loss, iters=(0, 50, 100)):
    """A train.py log: run row (seed, model_args), train rows with alphas, eval rows with tracked alignment."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(alphas[0])
    rows = [{"type": "run", "iter": 0, "config": {**config, "seed": seed, "n_layer": n}, "model_args": config}]
    for it, a in zip(iters, alphas):
        rows.append({"type": "train", "iter": it, "loss": 5.0, "alphas": a})
    for it, score in zip(iters, scores):
        space = {"topk_target": [0.1 * l for l in range(n + 1)], "first_win_median": 1 + it // 50}
        rows.append({"type": "eval", "iter": it, "val_loss": val_loss, "alphas": alphas[-1], "misalignment": score,
                     "alignment": {"misalignment": score, "raw": space, "normed": space}})
    rows.append({"type": "end", "iter": iters[-1], "reason": "max_iters"})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "log.jsonl")


def test_training_logs_as_groups_plot_means_with_bands(tmp_path, capsys):
    gate = {"residual_mode": "gate", "gate_mode": "layer", "gate_alpha_min": 0.5, "cut_layer": -1}
    rng = np.random.default_rng(1)
    alphas = {s: (0.8 + 0.1 * rng.random((3, 2))).tolist() for s in SEEDS}
    scores = {s: (0.5 + 0.1 * rng.random(3)).tolist() for s in SEEDS}
    for s in SEEDS:
        write_log(tmp_path / f"out-gate-s{s}", s, gate, alphas[s], scores[s], 4.0 + s / 10)
    write_log(tmp_path / "out-gate-s4", 4, gate, alphas[1][:2], scores[1][:2], 4.0, iters=(0, 50))  # still training
    analyze.main(["--log", str(tmp_path / "out-gate-s*" / "log.jsonl"), "--out_dir", str(tmp_path / "plots")])
    assert "logged alphas at different iterations" in capsys.readouterr().out  # the 4th run: drawn at 0 and 50 only
    assert {"alphas.png", "shift_training.png", "target_match_by_step.png"} <= set(os.listdir(tmp_path / "plots"))
    run = analyze.group_log("gate", [str(tmp_path / f"out-gate-s{s}" / "log.jsonl") for s in SEEDS])
    assert run["name"] == "gate (n=3, 95% CI)" and run["final_val_loss"] == pytest.approx(4.2)
    (ax,) = analyze.alphas_figure([run]).axes
    layer1 = [line for line in ax.get_lines() if line.get_label() == "layer 1"][0]
    assert list(layer1.get_ydata()) == pytest.approx(np.mean([alphas[s] for s in SEEDS], axis=0)[:, 1])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # one per layer
    highs = [scipy_summary([alphas[s][i][1] for s in SEEDS])[3] for i in range(3)]  # layer 1's interval per iteration
    assert bands[1].get_paths()[0].vertices[:, 1].max() == pytest.approx(max(highs))
    assert ax.get_legend().get_title().get_text() == "group gate (n=3, 95% CI)"
    score_ax, depth_ax = plots.plot_shift_over_training([run]).axes
    assert list(score_ax.get_lines()[0].get_ydata()) == pytest.approx(np.mean([scores[s] for s in SEEDS], axis=0))
    assert sum(isinstance(c, PolyCollection) for c in score_ax.collections) == 1
    assert plots.plot_target_match_by_step(run).axes[0].get_title().startswith("gate, mean of 3 runs")
    write_log(tmp_path / "out-x-s9", 9, {**gate, "residual_mode": "cut"}, alphas[1], scores[1], 4.0)
    with pytest.raises(InputError, match="mixes runs of different model settings"):
        analyze.group_log("x", [str(tmp_path / "out-gate-s1" / "log.jsonl"), str(tmp_path / "out-x-s9" / "log.jsonl")])


def test_cut_sweep_pools_seeds_per_layer_and_bands_the_baseline(tmp_path):
    logs = []
    for layer, losses in [(0, [3.4, 3.5, 3.3]), (1, [3.2, 3.1, 3.3])]:
        for s, loss in zip(SEEDS, losses):
            config = {"n_layer": 2, "residual_mode": "cut", "cut_layer": layer, "cut_alpha": 0.5}
            logs.append(analyze.read_log(write_log(tmp_path / f"cut{layer}-s{s}", s, config, [[1, 1]], [0.5], loss, (0,))))
    base = [analyze.read_log(write_log(tmp_path / f"base-s{s}", s, {"residual_mode": "none"}, [[1, 1]], [0.5], loss, (0,)))
            for s, loss in zip(SEEDS, [3.0, 3.1, 2.9])]
    ax = analyze.cut_sweep_figure(logs, base).axes[0]
    sweep = ax.get_lines()[0]
    assert list(sweep.get_ydata()) == pytest.approx([3.4, 3.2]) and sweep.get_label().endswith("(mean over seeds, 95% CI)")
    _, _, (bars,) = ax.containers[0].lines
    low, high = scipy_summary([3.4, 3.5, 3.3])[2:]
    assert bars.get_segments()[0][:, 1] == pytest.approx([low, high])
    assert any(abs(p.get_y() - scipy_summary([3.0, 3.1, 2.9])[2]) < 1e-9 for p in ax.patches)  # the baseline's band
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "baseline, no cut (mean of 3 seeds, 95% CI)"
