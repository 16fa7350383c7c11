"""
The figures of analyze.py, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed). A library module: it draws what it is given and reads no files.

    python analyze.py --ckpt out-baseline out-cut out-gate      # topk.png, cosine_projection.png, lens.png, shift_depth.png
    python analyze.py --log out-gate/log.jsonl                  # alphas.png, shift_training.png, target_match_by_step.png
    python analyze.py --cut_sweep 'out-cut*/log.jsonl' --baseline out-baseline/log.jsonl   # cut_sweep.png

    from nanoshift.plots import plot_topk, save_figure, write_plots
    write_plots(results, "analysis")                   # the PLOTS of lens results as analysis/<name>.png
    save_figure(plot_topk(results), "topk.png")        # or one Figure at a time

What they draw:
- lens results (nanoshift.lens.analyze_models: one dict per model with "label", "layers" rows, "shift_depth",
  ...): one color per model. A group of seeds is drawn from group_result(): its mean line, with the 95%
  interval of the mean shaded ("band").
- training logs (analyze.py's read_log / group_log dicts: "name", "alphas", "alignment", and for a group
  "alphas_band" / "alignment_band"): alphas over training, the tracked shift over training, the layer x step
  picture of the target match.
- the cut sweep: points already pooled by cut layer (analyze.py's cut_sweep_figure).
Every plot_* returns a matplotlib Figure; save_figure writes one as PNG, atomically.
"""

import math
import os

import numpy as np

from nanoshift.common import atomic_write
from nanoshift.groups import band, mean
from nanoshift.stats import describe

PLOTS = ("topk", "cosine_projection", "lens", "shift_depth")  # what write_plots draws of lens results

# -----------------------------------------------------------------------------
# Pieces every figure uses


def _figure(ncols=1, width=6.4, height=4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _label(ax, title, xlabel, ylabel, ncol=1):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, ncol=ncol)


def _color(i):
    """Ten distinct colours, then the lighter shades of tab20 (the residual lab draws a dozen groups)."""
    from matplotlib import colormaps

    return colormaps["tab10"](i) if i < 10 else colormaps["tab20"]((2 * (i - 10) + 1) % 20)


def _nan(values):
    """Numbers for matplotlib: None (no value) becomes NaN, a gap in a line or band."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _band(ax, xs, low, high, color):
    """A group's 95% interval around its mean line, shaded."""
    ax.fill_between(xs, _nan(low), _nan(high), color=color, alpha=0.2, linewidth=0)


def group_result(label, results):
    """One result of a group of runs' results (analyze_model's keys): the mean of every number over the runs,
    the group's label, and "band": the (low, high) ends of the 95% interval of the mean in the same shape
    (None for a group of one run, which is its run under the group's label)."""
    out = mean(results)
    out["label"] = label if len(results) == 1 else f"{label} (n={len(results)}, 95% CI)"
    out["band"] = band(results) if len(results) > 1 else None
    return out


# -----------------------------------------------------------------------------
# Lens results: one curve per model (or group) against the layer


def _curves(ax, results, metrics, styles, ylabel):
    """One color per model; one line style per metric (e.g. input solid, target dashed); a group (group_result)
    is its mean line with the 95% interval shaded."""
    for i, r in enumerate(results):
        resid = [row for row in r["layers"] if row["kind"] == "resid"]
        mids = [row for row in r["layers"] if row["kind"] == "mid"]
        for (name, what), style in zip(metrics, styles):
            ax.plot([row["layer"] for row in resid], [row[name] for row in resid], style, color=_color(i),
                    label=f"{r['label']}: {what}", markersize=4)
            if r.get("band"):
                low, high = ([row[name] for row in end["layers"] if row["kind"] == "resid"] for end in r["band"])
                _band(ax, [row["layer"] for row in resid], low, high, _color(i))
            if mids:
                ax.plot([row["layer"] for row in mids], [row[name] for row in mids], style[0], color=_color(i),
                        markerfacecolor="none", markersize=5, linestyle="none")
    ax.set_xlabel("layer (0 = embeddings" + (", hollow = mid-block" if any(
        row["kind"] == "mid" for r in results for row in r["layers"]) else "") + ")")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _mark_crossings(ax, results, key):
    """A dotted vertical line per model at its crossing layer (shift_depth[key]), when there is one."""
    for i, r in enumerate(results):
        if r["shift_depth"][key] is not None:
            ax.axvline(r["shift_depth"][key], color=_color(i), linestyle=":", linewidth=1.2)


def plot_topk(results):
    k = results[0]["k"]
    fig, (ax,) = _figure()
    _curves(ax, results, [("topk_input", "input t_i"), ("topk_target", "target t_i+1")], ["o-", "s--"],
            f"top-{k} match")
    _mark_crossings(ax, results, "topk_crossing")
    ax.set_ylim(-0.02, 1.02)
    norm = "final norm" if results[0]["lens_norm"] else "no final norm"
    ax.set_title(f"logit lens top-{k} match ({norm}); dotted: crossing")
    return fig


def plot_cosine_projection(results):
    fig, (ax_cos, ax_proj) = _figure(2)
    _curves(ax_cos, results, [("cos_input", "cos(h, e_in)"), ("cos_target", "cos(h, e_out)")], ["o-", "s--"],
            "cosine similarity")
    _mark_crossings(ax_cos, results, "cosine_crossing")
    ax_cos.set_title(f"cosine to the input / target embedding ({results[0]['space']} state; dotted: crossing)")
    # the reference levels go in the legend, not as text on the axis: with a raw state the curves can run
    # far past 1, and labels at 0 and 1 then sit on top of each other
    ax_proj.axhline(0, color="gray", linewidth=1, linestyle=":", label="0 = the input embedding")
    ax_proj.axhline(1, color="gray", linewidth=1, linestyle="--", label="1 = the target embedding")
    _curves(ax_proj, results, [("projection", "projection")], ["o-"], "<h - e_in, e_out - e_in> / |e_out - e_in|^2")
    ax_proj.set_title(f"projection onto input -> target ({results[0]['space']} state, t_i != t_i+1)")
    return fig


def plot_lens(results):
    fig, axes = _figure(3, width=5)
    for ax, (name, ylabel) in zip(axes, [("lens_ce", "cross-entropy vs target (nats)"),
                                         ("entropy", "entropy of the lens (nats)"),
                                         ("kl_final", "KL(final || layer) (nats)")]):
        _curves(ax, results, [(name, ylabel.split(" (")[0])], ["o-"], ylabel)
    axes[0].set_title("logit lens cross-entropy")
    axes[1].set_title("logit lens entropy")
    axes[2].set_title("KL(model's output || lens)")
    return fig


def plot_shift_depth(results):
    """Per-token first-win layer: fraction of positions (t_i != t_i+1) per layer, 'never' last."""
    fig, (ax,) = _figure(width=7.5)
    n_max = max(r["n_layer"] for r in results)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        s = r["shift_depth"]
        counts = np.array(s["first_win_hist"] + [s["first_win_never"]], dtype=float)
        xs = np.array(list(range(r["n_layer"] + 1)) + [n_max + 1 + math.ceil((n_max + 1) / 14)])
        total = max(counts.sum(), 1)
        ax.bar(xs - 0.4 + width * (i + 0.5), counts / total, width=width, color=_color(i),
               label=f"{r['label']} (median {_fmt_median(s['first_win_median'])})")
        if r.get("band"):  # a group: the 95% interval of each bar's mean
            low, high = (_nan(end["shift_depth"]["first_win_hist"] + [end["shift_depth"]["first_win_never"]])
                         for end in r["band"])
            ax.errorbar(xs - 0.4 + width * (i + 0.5), counts / total, yerr=[(counts - low) / total, (high - counts) / total],
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    step = math.ceil((n_max + 1) / 14)  # at most ~14 numbered ticks
    never = n_max + 1 + step  # one tick step right of the last layer, so its label never touches a number
    ticks = list(range(0, n_max + 1, step))
    ax.set_xticks(ticks + [never], [str(t) for t in ticks] + ["never"])
    _label(ax, "per-token shift depth", "first layer from which the target's logit stays above the input's",
           "fraction of positions")
    return fig


def _fmt_median(median):
    """A first-win median: a layer for one run, the mean over seeds (1 decimal) for a group; "-" for none."""
    if median is None:
        return "-"
    return str(int(median)) if float(median).is_integer() else f"{median:.1f}"


# -----------------------------------------------------------------------------
# Training logs


def plot_shift_over_training(logs, flops_per_iter=None):
    """The tracked alignment of each run against the training step (one line per run, baseline / cut /
    gate overlaid): its misalignment score, and its shift depth (the median first-win layer, normalised
    by the depth so runs of different depth share the axis). A group (group_log): its mean and 95% band.
    flops_per_iter ([one per log]): the x axis is training FLOPs instead (models of different depth)."""
    fig, (ax_score, ax_depth) = _figure(2, width=5.5)
    for i, run in enumerate(logs):
        points = run["alignment"]
        iters = [it * (flops_per_iter[i] if flops_per_iter else 1) for it, _ in points]
        n = len(points[0][1]["raw"]["topk_target"]) - 1  # blocks: the curves have L + 1 states

        def depth(a):
            return None if a["raw"]["first_win_median"] is None else a["raw"]["first_win_median"] / n

        ax_score.plot(iters, [a["misalignment"] for _, a in points], "o-", color=_color(i), label=run["name"],
                      markersize=3)
        ax_depth.plot(iters, [depth(a) for _, a in points], "o-", color=_color(i),
                      label=run["name"], markersize=3)
        if run.get("alignment_band"):
            _band(ax_score, iters, [lo["misalignment"] for _, lo, _ in run["alignment_band"]],
                  [hi["misalignment"] for _, _, hi in run["alignment_band"]], _color(i))
            _band(ax_depth, iters, [depth(lo) for _, lo, _ in run["alignment_band"]],
                  [depth(hi) for _, _, hi in run["alignment_band"]], _color(i))
    x = "training FLOPs" if flops_per_iter else "iteration"
    _label(ax_score, "misalignment over training", x, "misalignment (0-1, lower = earlier shift)")
    _label(ax_depth, "shift depth over training", x, "median first-win layer / number of blocks")
    for ax in (ax_score, ax_depth):
        ax.set_ylim(-0.02, 1.02)
    return fig


def plot_target_match_by_step(run):
    """Layer x training step picture of one run's tracked top-k target match."""
    points = run["alignment"]
    values = np.array([a["raw"]["topk_target"] for _, a in points], dtype=float).T  # [layers, evals]
    fig, (ax,) = _figure(width=7)
    ax.grid(False)
    image = ax.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=max(1e-9, float(np.nanmax(values))),
                      cmap="viridis")
    ticks = list(range(len(points)))
    step = max(1, len(ticks) // 10)
    ax.set_xticks(ticks[::step], [str(points[t][0]) for t in ticks[::step]])
    who = f"{run['label']}, mean of {len(run['runs'])} runs" if run.get("runs") else run["name"]
    ax.set_title(f"{who}: top-k match of the target t_i+1 per layer over training")
    ax.set_xlabel("iteration (eval)")
    ax.set_ylabel("layer (0 = embeddings)")
    fig.colorbar(image, ax=ax, label="fraction of positions")
    return fig


def plot_alphas(logs, modes, starts):
    """Residual alpha of every layer over training, one panel per run (the paper's Figure 5), the x-axis
    running to the last logged iteration. modes: each run's residual mode in words (the panel's title);
    starts: the alpha every layer starts from (the gate's uniform start, a dashed line), or None for none."""
    from matplotlib import colormaps

    fig, axes = _figure(len(logs), width=5.5)
    for ax, run, mode, start in zip(axes, logs, modes, starts):
        iters = [it for it, _ in run["alphas"]]
        values = np.array([a for _, a in run["alphas"]], dtype=float)  # [steps, layers]
        n = values.shape[1]
        if start is not None:
            ax.axhline(start, color="gray", linestyle="--", linewidth=1, label=f"uniform start ({start:.3f})")
        cmap = colormaps["viridis"]
        for layer in range(n):
            ax.plot(iters, values[:, layer], color=cmap(layer / max(n - 1, 1)), label=f"layer {layer}")
            if run.get("alphas_band"):  # a group: the 95% interval of each layer's mean alpha
                _band(ax, iters, [lo[layer] for _, lo, _ in run["alphas_band"]],
                      [hi[layer] for _, _, hi in run["alphas_band"]], cmap(layer / max(n - 1, 1)))
        ax.set_xlim(iters[0], max(iters[-1], iters[0] + 1))
        ax.set_title(f"residual alpha per layer: {mode}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("alpha")
        ax.legend(fontsize=8, ncol=2 if n > 8 else 1, title=f"{'group' if run.get('runs') else 'run'} {run['name']}",
                  title_fontsize=8)
    return fig


def plot_cut_sweep(points, alphas, baseline=None, baseline_label="baseline, no cut"):
    """Final validation loss against the cut layer (the paper's Figure 4). points: [(cut layers, stats.describe()
    of the final val losses of the runs with that cut)], drawn at the first layer as their mean, with the 95%
    interval as an error bar when some cut has several runs (seeds); alphas: the cut alphas, for the legend.
    baseline: stats.describe() of the baseline runs' final val losses, a horizontal line at the mean with the
    95% interval shaded (when there is one)."""
    fig, (ax,) = _figure()
    xs, ys = [layers[0] for layers, _ in points], [d["mean"] for _, d in points]
    several = any(d["n"] > 1 for _, d in points)
    ax.plot(xs, ys, "o-", color=_color(0), label="cut, alpha " + ", ".join(f"{a:g}" for a in alphas)
            + (" (mean over seeds, 95% CI)" if several else ""))
    if several:
        low = [d["mean"] - d["ci95"][0] if d["ci95"] else 0.0 for _, d in points]
        high = [d["ci95"][1] - d["mean"] if d["ci95"] else 0.0 for _, d in points]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=_color(0), capsize=3)
    for (layers, _), y in zip(points, ys):
        if len(layers) > 1:  # several cut layers in one run: plotted at the first, labelled with all
            ax.annotate(",".join(map(str, layers)), (layers[0], y), xytext=(3, 3), textcoords="offset points",
                        fontsize=8)
    if baseline is not None:
        ax.axhline(baseline["mean"], color="gray", linestyle="--", label=baseline_label)
        if baseline["ci95"]:
            ax.axhspan(*baseline["ci95"], color="gray", alpha=0.2, linewidth=0)
    ax.set_xticks(sorted(set(xs)))
    _label(ax, "validation loss vs cut layer", "cut layer (block index)", "final validation loss")
    return fig


# -----------------------------------------------------------------------------
# Files


def bulk_groups(points):
    """The groups whose mean misalignment and mean bits/byte both lie within 5 median absolute deviations of
    the median group's (all of them if that leaves fewer than 3): what a zoomed panel shows when a few
    groups sit far from the rest."""
    means = {label: (float(np.mean([m for m, _ in runs])), float(np.mean([b for _, b in runs])))
             for label, runs in points.items() if runs}
    keep = set(means)
    for axis in (0, 1):
        values = np.array([xy[axis] for xy in means.values()])
        median = np.median(values)
        spread = 5 * max(np.median(np.abs(values - median)), 1e-12)
        keep &= {label for label, xy in means.items() if abs(xy[axis] - median) <= spread}
    return keep if len(keep) >= 3 else set(means)


def plot_misalignment_vs_bpb(points):
    """The residual lab at a glance: each run's misalignment (x) against its val bits/byte (y), coloured by
    group, and each group's mean with its 95% interval on both axes (points: {group: [(misalignment, bpb)]}).
    When some groups sit far from the rest (bulk_groups), a second panel zooms on the rest."""
    bulk = bulk_groups(points)
    panels = [(points, "every group")] + ([({k: v for k, v in points.items() if k in bulk}, "zoomed on the bulk")]
                                         if len(bulk) < len([v for v in points.values() if v]) else [])
    fig, axes = _figure(len(panels), width=8, height=6)
    colors = {label: _color(i) for i, label in enumerate(points)}
    for ax, (shown, title) in zip(axes, panels):
        for label, runs in shown.items():
            if not runs:
                continue
            xs, ys = zip(*runs)
            ax.scatter(xs, ys, s=14, color=colors[label], alpha=0.45)
            mx, my = describe(xs), describe(ys)
            xerr = None if mx["ci95"] is None else [[mx["mean"] - mx["ci95"][0]], [mx["ci95"][1] - mx["mean"]]]
            yerr = None if my["ci95"] is None else [[my["mean"] - my["ci95"][0]], [my["ci95"][1] - my["mean"]]]
            ax.errorbar([mx["mean"]], [my["mean"]], xerr=xerr, yerr=yerr, fmt="o", color=colors[label], markersize=7,
                        capsize=3, label=label)
        _label(ax, f"misalignment against loss, {title}\n(small: one run; large: group mean, 95% interval)",
               "misalignment (0-1, lower = earlier shift)", "val bits per byte (lower is better)")
    return fig


def save_figure(fig, path):
    """Write a figure as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    return path


def write_plots(results, out_dir, plots=PLOTS):
    """The named plots (PLOTS) of the results as out_dir/<name>.png; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    makers = {"topk": plot_topk, "cosine_projection": plot_cosine_projection, "lens": plot_lens,
              "shift_depth": plot_shift_depth}
    return [save_figure(makers[name](results), os.path.join(out_dir, f"{name}.png")) for name in plots]
