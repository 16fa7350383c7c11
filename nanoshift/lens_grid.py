"""
The picture every lens user expects: for one prompt, the layer x position grid of each state's top decoded
token (the figure of the original logit-lens write-up; tuned-lens's prediction-trajectory heatmap), under the
logit or the tuned lens, as a PNG and as one self-contained HTML page; and the overlay of both lenses' metrics
for one model. A library module; analyze.py --prompt "..." [--lens=logit|tuned|both] writes them.

    from nanoshift.lens_grid import lens_grid, write_grid_html, plot_grid, plot_lens_overlay
    grid = lens_grid(lm, lm.bos_prefix + lm.encode("The capital of France is"), translators=None)
    write_grid_html(grid, "analysis/grid.html")        # hover a cell: its top-5 tokens and probabilities
    fig = plot_grid(grid)                               # matplotlib Figure (analyze.save_figure writes PNGs)
    fig = plot_lens_overlay(logit_result, tuned_result) # analyze_model results of one model, both lenses

A cell (state s, position i) holds the top-1 token of the lens's distribution at that state and position,
coloured by what it is: the input token t_i (blue), the target t_i+1 (orange), both when t_i = t_i+1
(purple), or neither (grey); the shade is its probability (pale = unsure). The last position's target is
not in the prompt, so it is never "target". Rows are the states bottom-up (0 = embeddings; mid-block
states, with mid=True, between their block's neighbours); the last row is the model's own prediction.

The HTML page needs no network: its CSS and JavaScript are inline, the data a JSON block in the page; the
table is rendered in the page itself (readable without JavaScript, each cell's top-5 also in its title).
"""

import html
import json

import numpy as np
import torch

from nanoshift.common import InputError, write_text
from nanoshift.lens import check_translators, LensOptions, lens_states

CLASSES = ("input", "target", "both", "neither")
CLASS_COLORS = {"input": (0.16, 0.42, 0.85), "target": (0.96, 0.50, 0.05), "both": (0.55, 0.27, 0.75),
                "neither": (0.45, 0.45, 0.45)}
CLASS_TEXT = {"input": "the input token t_i", "target": "the target t_i+1", "both": "input = target",
              "neither": "neither"}


def token_text(lm, token_id):
    """A token as text for a grid cell: decoded by lm's tokenizer, newlines and tabs escaped; '#id' for ids the
    tokenizer has no text for (padding rows of the unembedding, or a model without a tokenizer)."""
    tok = lm.text_tokenizer
    try:
        text = tok.decode([int(token_id)]) if tok is not None else None
    except Exception:  # ids past the tokenizer's vocabulary (padding rows) raise in tiktoken and HF
        text = None
    if text is None:
        return f"#{int(token_id)}"
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def cell_class(top1, input_token, target_token):
    """What the top-1 token of a cell is: 'input', 'target', 'both' (t_i = t_i+1) or 'neither'."""
    is_input, is_target = top1 == input_token, target_token is not None and top1 == target_token
    return "both" if is_input and is_target else "input" if is_input else "target" if is_target else "neither"


@torch.inference_mode()
def lens_grid(lm, tokens, translators=None, mid=False, top=5):
    """The lens grid of one token sequence (the model's ids, BOS included where the model expects one) under
    the logit lens (translators None) or the tuned lens (lm's tuned_lens.Translators).

    Returns a dict: model, lens, tokens, token_text, targets (t_i+1, None at the end), rows (one per state,
    bottom-up: {"kind", "layer"}), and per row and position: top_ids, top_probs, top_text (the top `top`
    tokens) and classes (cell_class of the top-1).
    """
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise InputError("the prompt has no tokens")
    if len(tokens) > lm.block_size:
        raise InputError(f"the prompt is {len(tokens)} tokens, longer than {lm.name}'s block size {lm.block_size}")
    if max(tokens) >= lm.vocab_size or min(tokens) < 0:
        raise InputError(f"token id {max(tokens)} is outside {lm.name}'s vocabulary of {lm.vocab_size}")
    lens = "logit" if translators is None else "tuned"
    check_translators(lm, LensOptions(mid=mid, lens=lens), translators)
    x = torch.tensor([tokens], dtype=torch.long, device=lm.device)
    resid, mids = lm.hidden_states(x, mid=mid)
    states = resid + (mids if mid else [])
    order = sorted(range(len(states)), key=lambda s: lens_states(lm.n_layer, mid)[s][1])  # by layer, bottom-up
    targets = tokens[1:] + [None]
    grid = {"model": lm.name, "source": getattr(lm, "source", lm.name), "lens": lens, "tokens": tokens,
            "token_text": [token_text(lm, t) for t in tokens], "targets": targets,
            "target_text": [None if t is None else token_text(lm, t) for t in targets],
            "rows": [], "top_ids": [], "top_probs": [], "top_text": [], "classes": []}
    for s in order:
        kind, layer = lens_states(lm.n_layer, mid)[s]
        h = states[s][0] if translators is None else translators(states[s][0], s)
        probs, ids = torch.softmax(lm.decode(h), dim=-1).topk(min(top, lm.vocab_size), dim=-1)
        ids, probs = ids.tolist(), probs.tolist()
        grid["rows"].append({"kind": kind, "layer": layer})
        grid["top_ids"].append(ids)
        grid["top_probs"].append(probs)
        grid["top_text"].append([[token_text(lm, t) for t in row] for row in ids])
        grid["classes"].append([cell_class(row[0], t, u) for row, t, u in zip(ids, tokens, targets)])
    return grid


def row_label(row):
    """'0' ... 'L' for the residual states, '2.5 mid' for the mid-block state of block 3."""
    return f"{row['layer']:g}" + (" mid" if row["kind"] == "mid" else "")


def _cell_rgb(cls, prob):
    """The class colour over white, opaque in proportion to the probability (at least 15%: still readable)."""
    alpha = 0.15 + 0.85 * float(prob)
    return tuple(1 - alpha + alpha * c for c in CLASS_COLORS[cls])


def _shorten(text, width=8):
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_grid(grid):
    """The grid as a matplotlib Figure (object API, Agg: no display): top-1 token text in each cell."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows, cols = len(grid["rows"]), len(grid["tokens"])
    image = np.array([[_cell_rgb(c, p[0]) for c, p in zip(classes, probs)]
                      for classes, probs in zip(grid["classes"], grid["top_probs"])])
    fig = Figure(figsize=(3.5 + 0.8 * cols, 2.4 + 0.32 * rows), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image, origin="lower", aspect="auto", interpolation="nearest")
    for r in range(rows):
        for c in range(cols):
            ax.text(c, r, _shorten(grid["top_text"][r][c][0]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(cols), [_shorten(t) for t in grid["token_text"]], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [row_label(row) for row in grid["rows"]], fontsize=8)
    ax.set_xlabel("position: input token t_i")
    ax.set_ylabel("layer (0 = embeddings)")
    ax.set_xticks(np.arange(-0.5, cols), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"{grid['model']}: {grid['lens']} lens, top-1 token per layer and position\n(top row: the model's "
                 "output; shade: probability)", fontsize=10)
    ax.legend(handles=[Patch(color=CLASS_COLORS[c], label=CLASS_TEXT[c]) for c in CLASSES], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 17px; } p { font-size: 13px; max-width: 60em; }
table.grid { border-collapse: collapse; font-size: 13px; }
table.grid td, table.grid th { border: 1px solid #fff; padding: 4px 6px; text-align: center; white-space: pre;
  min-width: 2.5em; max-width: 7em; overflow: hidden; text-overflow: ellipsis; }
table.grid th { background: #eee; font-weight: normal; }
table.grid td.cell { cursor: default; }
table.grid td.cell:hover { outline: 2px solid #000; }
.key span { display: inline-block; padding: 1px 6px; margin-right: 6px; color: #fff; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #444; padding: 6px 8px; font-size: 12px;
  box-shadow: 2px 2px 6px rgba(0,0,0,.3); pointer-events: none; z-index: 10; }
#tip table td { padding: 1px 6px; white-space: pre; }
"""

# reads the JSON block; hovering a cell shows its top-k tokens; #cell=ROW,COL in the address shows one at load
_HTML_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('lens-data').textContent);
  var tip = document.getElementById('tip');
  function esc(s) { var d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
  function show(cell, x, y) {
    var r = +cell.dataset.row, c = +cell.dataset.col, row = data.rows[r];
    var lines = ['<b>layer ' + row.label + ', position ' + c + '</b><br>input ' + esc(JSON.stringify(data.token_text[c])) +
      (data.target_text[c] === null ? '' : ', target ' + esc(JSON.stringify(data.target_text[c]))) + '<table>'];
    for (var k = 0; k < data.top_ids[r][c].length; k++) {
      lines.push('<tr><td>' + (k + 1) + '.</td><td>' + esc(JSON.stringify(data.top_text[r][c][k])) + '</td><td>' +
        (100 * data.top_probs[r][c][k]).toFixed(1) + '%</td></tr>');
    }
    tip.innerHTML = lines.join('') + '</table>';
    tip.style.display = 'block';
    tip.style.left = (x + 14) + 'px';
    tip.style.top = (y + 14) + 'px';
  }
  document.querySelectorAll('td.cell').forEach(function (cell) {
    cell.addEventListener('mouseenter', function (e) { show(cell, e.clientX, e.clientY); });
    cell.addEventListener('mousemove', function (e) { tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 14) + 'px'; });
    cell.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  });
  var m = /cell=(\\d+),(\\d+)/.exec(location.hash);
  if (m) {
    var cell = document.querySelector('td.cell[data-row="' + m[1] + '"][data-col="' + m[2] + '"]');
    if (cell) { var b = cell.getBoundingClientRect(); show(cell, b.right, b.top); }
  }
})();
"""


def _json_for_script(obj):
    """JSON safe inside a <script> element: no '<' (so no '</script>' or '<!--' can end it early)."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def grid_html(grid):
    """The grid as one self-contained HTML page (a string): inline CSS and JavaScript, no external resource."""
    esc = html.escape
    data = {key: grid[key] for key in ("model", "lens", "tokens", "token_text", "targets", "target_text", "top_ids",
                                       "top_probs", "top_text", "classes")}
    data["rows"] = [dict(row, label=row_label(row)) for row in grid["rows"]]
    body = []
    for r in reversed(range(len(grid["rows"]))):  # the output at the top, as in the PNG
        cells = [f"<th>{esc(row_label(grid['rows'][r]))}</th>"]
        for c, (cls, probs, texts) in enumerate(zip(grid["classes"][r], grid["top_probs"][r], grid["top_text"][r])):
            rgb = ",".join(str(round(255 * v)) for v in _cell_rgb(cls, probs[0]))
            title = "\n".join(f"{k + 1}. {json.dumps(t, ensure_ascii=False)} {100 * p:.1f}%"
                              for k, (t, p) in enumerate(zip(texts, probs)))
            cells.append(f'<td class="cell {cls}" data-row="{r}" data-col="{c}" style="background:rgb({rgb})" '
                         f'title="{esc(title)}">{esc(_shorten(texts[0]))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    body.append("<tr><th>input</th>" + "".join(f"<th>{esc(_shorten(t))}</th>" for t in grid["token_text"]) + "</tr>")
    key = "".join(f'<span style="background:rgb({",".join(str(round(255 * v)) for v in CLASS_COLORS[c])})">'
                  f"{esc(CLASS_TEXT[c])}</span>" for c in CLASSES)
    title = f"{grid['model']}: {grid['lens']} lens grid"
    rows = "\n".join(body)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_HTML_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>Each cell: the top-1 token that the {esc(grid['lens'])} lens decodes from the state at that layer (rows, bottom-up:
0 = embeddings, the top row the model's own prediction) and position (columns: the input token below).
Colour: what the token is; shade: its probability. Hover a cell for its top-{len(grid['top_ids'][0][0])} tokens.</p>
<p class="key">{key}</p>
<table class="grid">
{rows}
</table>
<div id="tip"></div>
<script type="application/json" id="lens-data">{_json_for_script(data)}</script>
<script>{_HTML_SCRIPT}</script>
</body></html>
"""


def write_grid_html(grid, path):
    """grid_html, written atomically to path; returns path."""
    return write_text(path, grid_html(grid))


def plot_lens_overlay(logit, tuned):
    """Both lenses' metrics of one model (analyze_model results under lens='logit' and lens='tuned') in one
    figure: top-k input/target match, KL to the final layer, and the per-token first-win layer."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(16, 4.4), layout="constrained")
    ax_topk, ax_kl, ax_win = fig.subplots(1, 3)
    styles = {"logit": "--", "tuned": "-"}
    n = logit["n_layer"]
    for r in (logit, tuned):
        resid = [row for row in r["layers"] if row["kind"] == "resid"]
        layers = [row["layer"] for row in resid]
        ls = styles[r["lens"]]
        ax_topk.plot(layers, [row["topk_input"] for row in resid], ls, marker="o", color=CLASS_COLORS["input"],
                     label=f"{r['lens']} lens: input t_i", markersize=3)
        ax_topk.plot(layers, [row["topk_target"] for row in resid], ls, marker="s", color=CLASS_COLORS["target"],
                     label=f"{r['lens']} lens: target t_i+1", markersize=3)
        ax_kl.plot(layers, [row["kl_final"] for row in resid], ls, marker="o", color="black",
                   label=f"{r['lens']} lens", markersize=3)
        s = r["shift_depth"]
        counts = np.array(s["first_win_hist"] + [s["first_win_never"]], dtype=float)
        offset = -0.2 if r["lens"] == "logit" else 0.2
        score = "-" if r["misalignment"] is None else f"{r['misalignment']:.3f}"
        ax_win.bar(np.arange(n + 2) + offset, counts / max(counts.sum(), 1), width=0.4,
                   color="0.6" if r["lens"] == "logit" else "0.2",
                   label=f"{r['lens']} lens (median {s['first_win_median']}, misalignment {score})")
    ax_topk.set_title(f"{logit['label']}: top-{logit['k']} match, both lenses")
    ax_topk.set_ylim(-0.02, 1.02)
    ax_kl.set_title("KL(model's output || lens) (nats)")
    ax_win.set_title("per-token first-win layer")
    ax_win.set_xticks(list(range(n + 1)) + [n + 1], [str(l) for l in range(n + 1)] + ["never"])
    for ax in (ax_topk, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, xlabel in ((ax_topk, "layer (0 = embeddings)"), (ax_kl, "layer (0 = embeddings)"),
                       (ax_win, "first layer from which the target's logit stays above the input's")):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig
