"""analyze.py: text and shard windows, and end to end: an overlay of checkpoints on token shards, its files
and plots, the training-log plots (alphas over training, cut sweep), and clear errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import analyze
from nanoshift.common import InputError
from conftest import tiny_gpt, write_checkpoint
from nanoshift.data import get_tokenizer, write_shard
from nanoshift.lm import OurGPT
from nanoshift import plots
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUNS = {"out-baseline": dict(residual_mode="none"), "out-cut": dict(residual_mode="cut", cut_layer=-1),
        "out-gate": dict(residual_mode="gate", gate_mode="layer")}


def save_run(folder, seed=0, **kw):
    return write_checkpoint(tiny_gpt(seed, **kw), folder)


@pytest.fixture(scope="module")
def overlay(tmp_path_factory):
    """Three tiny runs (baseline / cut / gate) analysed together on GPT-2 token shards."""
    tmp = tmp_path_factory.mktemp("overlay")
    rng = np.random.default_rng(0)
    write_shard(tmp / "demo_val_000000.bin", rng.integers(0, 50257, 3000).astype(np.uint16))
    runs = [save_run(tmp / name, seed=i, **kw) for i, (name, kw) in enumerate(RUNS.items())]
    out = tmp / "analysis"
    analyze.main(["--ckpt", *runs, "--shards", str(tmp / "*_val_*.bin"), "--num_sequences=6", "--seq_len=16",
                  "--out_dir", str(out), "--progress=False", "--k=3"])
    return out


def test_overlay_writes_metrics_for_every_checkpoint_and_layer(overlay, capsys):
    data = json.loads((overlay / "metrics.json").read_text())
    assert [m["label"] for m in data["models"]] == list(RUNS)
    assert data["settings"]["shards"].endswith("*_val_*.bin") and data["settings"]["k"] == 3
    for m in data["models"]:
        assert (m["space"], m["lens_norm"], m["k"], m["positions"]) == ("raw", True, 3, 6 * 16)
        assert [row["layer"] for row in m["layers"]] == [0.0, 1.0, 2.0]
    csv_rows = (overlay / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("model,source,kind,layer,space,lens_norm,k,topk_input")
    assert len(csv_rows) == 1 + 3 * 3 and all(",raw,True,3," in row for row in csv_rows[1:])


@pytest.mark.parametrize("name", ["topk.png", "cosine_projection.png", "lens.png", "shift_depth.png"])
def test_plots_are_valid_pngs(overlay, name):
    import matplotlib.image

    path = overlay / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_overlay_figures_have_one_curve_per_checkpoint(overlay):
    results = json.loads((overlay / "metrics.json").read_text())["models"]
    fig = plots.plot_topk(results)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{run}: {what}" for run in RUNS for what in ("input t_i", "target t_i+1")]
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    for line, (result, name) in zip(curves, [(r, n) for r in results for n in ("topk_input", "topk_target")]):
        assert list(line.get_ydata()) == [row[name] for row in result["layers"]]
    assert len(curves) == 2 * 3
    fig = plots.plot_cosine_projection(results)
    labelled = lambda ax: [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labelled(fig.axes[0]) == [f"{run}: cos(h, {e})" for run in RUNS for e in ("e_in", "e_out")]
    # the 0 / 1 reference levels are legend entries, not text on the axis that can collide
    assert labelled(fig.axes[1]) == ["0 = the input embedding", "1 = the target embedding"] + [
        f"{run}: projection" for run in RUNS]
    assert not fig.axes[1].texts
    assert [ax.get_xlabel() for ax in fig.axes] == ["layer (0 = embeddings)"] * 2
    lens = plots.plot_lens(results)
    assert [ax.get_title() for ax in lens.axes] == ["logit lens cross-entropy", "logit lens entropy",
                                                   "KL(model's output || lens)"]
    assert all(len([l for l in ax.get_lines() if not l.get_label().startswith("_")]) == 3 for ax in lens.axes)
    shift = plots.plot_shift_depth(results).axes[0]
    bars = shift.containers
    assert len(bars) == 3 and all(len(b) == 2 + 2 for b in bars)  # layers 0..2 and "never"
    assert [t.get_text() for t in shift.get_xticklabels()] == ["0", "1", "2", "never"]
    assert [t.get_text().split(" (")[0] for t in shift.get_legend().get_texts()] == list(RUNS)


def test_shift_depth_ticks_never_crowd_never_for_deep_models():
    layers = 26
    result = {"label": "deep", "n_layer": layers, "shift_depth": {
        "first_win_hist": [1] * (layers + 1), "first_win_never": 3, "first_win_median": 13}}
    ax = plots.plot_shift_depth([result]).axes[0]
    ticks = list(ax.get_xticks())
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "never"
    assert ticks[-1] - ticks[-2] >= ticks[1] - ticks[0]  # "never" at least one tick step from the last number


def test_mid_states_are_rows_between_layers(tmp_path):
    run = save_run(tmp_path / "run")
    write_shard(tmp_path / "v_val_000000.bin", np.arange(1000, dtype=np.uint16))
    analyze.main(["--ckpt", run, "--shards", str(tmp_path / "*.bin"), "--num_sequences=2", "--seq_len=8",
                  "--mid", "--space=normed", "--lens_norm=False", "--out_dir", str(tmp_path / "a"), "--progress=False"])
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())["models"][0]
    assert [(r["kind"], r["layer"]) for r in m["layers"]] == [
        ("resid", 0.0), ("resid", 1.0), ("resid", 2.0), ("mid", 0.5), ("mid", 1.5)]
    assert (m["space"], m["lens_norm"]) == ("normed", False)

# -----------------------------------------------------------------------------
# Training logs, in train.py's format


def write_log(folder, config, alphas, val_losses):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"type": "run", "iter": 0, "config": config}]
    for it, a in enumerate(alphas):
        rows.append({"type": "train", "iter": it * 10, "loss": 5.0, "alphas": a})
    for it, loss in enumerate(val_losses):
        rows.append({"type": "eval", "iter": it * 50, "val_loss": loss, "alphas": alphas[-1]})
    rows.append({"type": "end", "iter": 100, "reason": "max_iters"})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "log.jsonl")


def test_alpha_plot_has_one_line_per_layer_over_training(tmp_path):
    config = {"n_layer": 3, "residual_mode": "gate", "gate_mode": "layer", "cut_layer": -1}
    alphas = [[0.8, 0.8, 0.8], [0.85, 0.8, 0.7], [0.95, 0.9, 0.6]]
    path = write_log(tmp_path / "out-gate", config, alphas, [4.0, 3.5])
    analyze.main(["--log", path, "--out_dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "alphas.png").read_bytes()[:8] == PNG_SIGNATURE
    (ax,) = analyze.alphas_figure([analyze.read_log(path)]).axes
    start, *layers = ax.get_lines()
    # the eval row at iter 50 extends the train rows' series: the x-axis runs to the last logged iteration
    assert [list(line.get_ydata()) for line in layers] == [list(col) + [col[-1]] for col in zip(*alphas)]
    assert list(layers[0].get_xdata()) == [0, 10, 20, 50] and ax.get_xlim() == (0, 50)
    assert start.get_label() == "uniform start (0.833)" and list(start.get_ydata()) == [pytest.approx(1 - 0.5 / 3)] * 2
    assert ax.get_title() == "residual alpha per layer: layer gate"
    assert ax.get_legend().get_title().get_text() == "run out-gate"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["uniform start (0.833)"] + [
        f"layer {l}" for l in range(3)]


def write_tracked_log(folder, n_layer, scores, medians):
    """A train.py log whose eval rows carry tracked alignment (the fields plot_shift_over_training reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"type": "run", "iter": 0, "config": {"n_layer": n_layer, "residual_mode": "none"}}]
    for i, (score, median) in enumerate(zip(scores, medians)):
        curve = [min(1.0, (l + i) / (n_layer + 2)) for l in range(n_layer + 1)]
        space = {"topk_target": curve, "first_win_median": median}
        rows.append({"type": "eval", "iter": 100 * i, "val_loss": 5.0 - i, "alphas": [1.0] * n_layer,
                     "misalignment": score, "alignment": {"misalignment": score, "raw": space, "normed": space}})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "log.jsonl")


def test_shift_over_training_overlays_runs_and_normalises_depth(tmp_path):
    a = write_tracked_log(tmp_path / "out-a", 4, [0.6, 0.5, 0.4], [3, 2, 2])
    b = write_tracked_log(tmp_path / "out-b", 8, [0.7, 0.6, 0.3], [6, None, 4])  # None: most tokens never switch
    analyze.main(["--log", a, b, "--out_dir", str(tmp_path / "plots")])
    assert {"alphas.png", "shift_training.png", "target_match_by_step.png"} <= set(os.listdir(tmp_path / "plots"))
    runs = [analyze.read_log(p) for p in (a, b)]
    score_ax, depth_ax = plots.plot_shift_over_training(runs).axes
    assert [line.get_label() for line in score_ax.get_lines()] == ["out-a", "out-b"]
    assert [list(line.get_ydata()) for line in score_ax.get_lines()] == [[0.6, 0.5, 0.4], [0.7, 0.6, 0.3]]
    assert list(score_ax.get_lines()[0].get_xdata()) == [0, 100, 200]
    depths = [list(line.get_ydata()) for line in depth_ax.get_lines()]
    assert depths[0] == [0.75, 0.5, 0.5] and depths[1][0] == 0.75 and depths[1][2] == 0.5  # median / depth
    assert score_ax.get_ylabel().startswith("misalignment") and depth_ax.get_xlabel() == "iteration"
    picture = plots.plot_target_match_by_step(runs[1])
    image = picture.axes[0].get_images()[0].get_array()
    assert image.shape == (9, 3)  # layers 0..8 x three evals
    assert [t.get_text() for t in picture.axes[0].get_xticklabels()] == ["0", "100", "200"]
    assert "out-b" in picture.axes[0].get_title()


def test_models_of_different_depth_share_a_training_flops_axis(tmp_path):
    """The depth study: a 2-block and a 4-block run are drawn against training FLOPs (model.flops_per_token x
    tokens per step x iteration); runs of one depth keep the iteration axis."""
    logs = []
    for n_layer in (2, 4):
        path = write_tracked_log(tmp_path / f"out-{n_layer}", n_layer, [0.6, 0.5], [1, 1])
        rows = [json.loads(line) for line in open(path)]
        rows[0]["config"]["total_batch_tokens"] = 256
        rows[0]["model_args"] = dict(n_layer=n_layer, n_head=2, n_embd=16, block_size=32, vocab_size=64)
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        logs.append(analyze.read_log(path))
    scales = analyze.compute_axis(logs)
    for run, scale in zip(logs, scales):
        assert scale == GPT(GPTConfig(**run["model_args"])).flops_per_token() * 256
    assert scales[1] > 1.5 * scales[0]
    score_ax, depth_ax = plots.plot_shift_over_training(logs, scales).axes
    assert [list(line.get_xdata()) for line in score_ax.get_lines()] == [[0, 100 * s] for s in scales]
    assert depth_ax.get_xlabel() == "training FLOPs"
    assert analyze.compute_axis(logs[:1] * 2) is None  # one depth: iterations compare


def test_cut_sweep_plots_final_val_loss_per_cut_layer_and_the_baseline(tmp_path):
    logs = []
    for layer, loss in [(-1, 3.1), (0, 3.4), (1, 3.2)]:  # -1 is the last of 3 blocks
        config = {"n_layer": 3, "residual_mode": "cut", "cut_layer": layer, "cut_alpha": 0.5}
        logs.append(write_log(tmp_path / f"out-cut{layer}", config, [[1, 1, 1]], [5.0, loss]))
    baseline = write_log(tmp_path / "out-baseline", {"n_layer": 3, "residual_mode": "none", "cut_layer": -1},
                         [[1, 1, 1]], [5.0, 3.0])
    analyze.main(["--cut_sweep", str(tmp_path / "out-cut*" / "log.jsonl"), "--baseline", baseline,
                  "--out_dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "cut_sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    fig = analyze.cut_sweep_figure([analyze.read_log(p) for p in logs], analyze.read_log(baseline))
    sweep, base = fig.axes[0].get_lines()
    assert list(sweep.get_xdata()) == [0, 1, 2] and list(sweep.get_ydata()) == [3.4, 3.2, 3.1]
    assert list(base.get_ydata()) == [3.0, 3.0]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["cut, alpha 0.5",
                                                                             "baseline, no cut (out-baseline)"]
    assert fig.axes[0].get_xlabel() == "cut layer (block index)"


def test_training_log_errors_name_the_file(tmp_path, capsys):
    path = write_log(tmp_path / "out-x", {"n_layer": 3, "residual_mode": "none", "cut_layer": -1}, [[1, 1, 1]], [3.0])
    with pytest.raises(SystemExit) as e:
        analyze.main(["--cut_sweep", path, "--out_dir", str(tmp_path / "a")])
    assert e.value.code == 1 and "out-x/log.jsonl: residual_mode is 'none', not 'cut'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze.main(["--log", str(tmp_path / "nowhere.jsonl"), "--out_dir", str(tmp_path / "a")])
    assert "training logs match" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# Bad input: a non-zero exit and a message naming the thing


def test_missing_checkpoint_exits_non_zero_naming_the_file(tmp_path):
    missing = tmp_path / "out-nothing" / "ckpt.pt"
    result = subprocess.run([sys.executable, "analyze.py", "--ckpt", str(missing), "--out_dir", str(tmp_path / "a")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"checkpoint not found: {missing}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,code,message", [  # 2: a bad setting, 1: bad or missing data (common.py's rule)
    (["--seq_len=64"], 2, "config error: seq_len=64 is longer than run's block size 32"),
    (["--data_files", "{empty}/*.txt"], 1, "error: no text in --data_files"),
    (["--data_files", "{empty}/*.csv"], 1, "error: no input files match"),
    (["--space=sideways"], 2, "config error: space must be 'raw' or 'normed'"),
    (["--k=0"], 2, "config error: k must be an int >= 1"),
    (["--shards", "{empty}/*.bin"], 1, "error: no token shards (--shards) match"),
    (["--lens_dtype=float8"], 2, "config error: lens_dtype must be one of ['auto', 'float32'"),
    (["--dtype=float64"], 2, "config error: dtype must be one of ['float32'"),
    (["--out_dir={empty}/a.txt"], 2, "config error: out_dir="),  # a file, not a folder
    ([], 1, "could not load 'Salesforce/wikitext'"),  # the default dataset, and no hub (tests are offline): say what to do
])
def test_bad_input_exits_with_a_clear_message(tmp_path, capsys, argv, code, message):
    run = save_run(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n\n")
    argv = [a.replace("{empty}", str(empty)) for a in argv]
    with pytest.raises(SystemExit) as e:  # later settings win: argv overrides --seq_len=8
        analyze.main(["--ckpt", run, "--out_dir", str(tmp_path / "a"), "--progress=False", "--seq_len=8",
                      "--num_sequences=2", *argv])
    err = capsys.readouterr().err
    assert e.value.code == code and message in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # a failed run leaves no output folder


def test_nothing_to_analyse_and_unknown_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        analyze.main(["--out_dir", str(tmp_path)])
    assert e.value.code == 2 and "nothing to analyse" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        analyze.main(["--ckpts", "x"])
    assert e.value.code == 2 and "did you mean --ckpt" in capsys.readouterr().err


def test_wikitext_rows_become_articles_and_other_rows_stay_documents(tmp_path):
    rows = [" = Alpha = \n", "", " alpha text \n", " = = Part = = \n", " more alpha \n", " = Beta = \n", " beta \n"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    files = [str(tmp_path / "d.jsonl")]
    assert analyze.read_documents(data_files=files) == [r for r in rows if r]
    assert analyze.read_documents(data_files=files, wikitext=True) == [
        " = Alpha = \n alpha text \n = = Part = = \n more alpha \n", " = Beta = \n beta \n"]

# -----------------------------------------------------------------------------
# Text windows


def gpt2_lm():
    torch.manual_seed(0)
    return OurGPT(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=50304)).eval(), "g")


DOCS = ["Alpha beta gamma delta epsilon zeta eta theta iota kappa.", "Lambda mu nu xi omicron pi rho.",
        "Sigma tau upsilon phi chi psi omega, the end of the alphabet."]


def test_text_windows_read_the_same_text_and_mark_document_boundaries():
    lm = gpt2_lm()
    starts = analyze.text_starts(DOCS, 20, seed=5)
    for d, c in starts:  # every start is the first character of a word
        assert not DOCS[d][c].isspace() and (c == 0 or DOCS[d][c - 1].isspace())
    windows = analyze.text_windows(lm, DOCS, starts, 30)
    assert windows.shape == (20, 30)
    enc = get_tokenizer()
    for (d, c), row in zip(starts, windows.tolist()):
        text = enc.decode(row[:row.index(lm.eot)] if lm.eot in row else row)
        expected = (DOCS[d] + DOCS[(d + 1) % 3])[c:]
        assert expected.startswith(text.split(".")[0])
        assert row.count(lm.eot) >= 1  # 30 tokens always cross a document boundary here
    assert torch.equal(windows, analyze.text_windows(lm, DOCS, analyze.text_starts(DOCS, 20, seed=5), 30))
    assert not torch.equal(windows, analyze.text_windows(lm, DOCS, analyze.text_starts(DOCS, 20, seed=6), 30))


def test_too_little_text_is_an_error():
    with pytest.raises(InputError, match="too little text"):
        analyze.text_windows(gpt2_lm(), ["just a few words"], [(0, 0)], 60)


def test_shard_windows_are_reproducible_and_stay_in_one_shard(tmp_path):
    for i, n in enumerate([300, 50, 500]):
        write_shard(tmp_path / f"t_val_{i:06d}.bin", (i * 1000 + np.arange(n)).astype(np.uint16))
    pattern = str(tmp_path / "t_val_*.bin")
    w = analyze.shard_windows(pattern, 40, 64, seed=0)
    assert torch.equal(w, analyze.shard_windows(pattern, 40, 64, seed=0))
    assert (w[:, 1:] - w[:, :-1] == 1).all()  # consecutive tokens of one shard, never across shards
    assert set((w[:, 0] // 1000).tolist()) == {0, 2}  # the 50-token shard is too short for a window
