"""
The lens engine: layerwise alignment metrics of the causal shift (arXiv 2602.14760), computed one
way for analyze.py, training (alignment tracking), the demo and bench.py. A library module.

    from nanoshift.lens import LensOptions, analyze_model, summary_table
    result = analyze_model(lm, token_batches, LensOptions(k=5, space="normed"))   # lm: lm.load_lm(...)
    print(summary_table([result]))

token_batches: [B, T+1] int64 tensors (T inputs, then one more target). The result is a dict with the
model's description, one row per state ("layers") and the shift-depth summaries ("shift_depth").

Metrics, for the state h = h_l[i] (l = 0 the embeddings ... L the last block; with --mid also the
state after attention of block l, plotted at l - 1/2), input t = t_i, target u = t_{i+1}:

- decoding (logit lens): z = LN_f(h) E_out^T with the final norm recomputed on h (--lens_norm=False:
  z = h E_out^T), soft-capped like the model (Gemma-2). Over every row of the unembedding (padding rows
  included), so the lens at the last layer is exactly the model's own prediction.
- lens: "logit" (the decoding above) or "tuned" (tuned_lens.py): each state h is first mapped by its
  layer's trained affine translator, h + A h + b, then decoded the same way; every metric below is then
  that of the translated state (the cosine and projection too: the state as the tuned lens reads it).
  Untrained translators are zero, so the tuned lens then equals the logit lens bit for bit.
- top-k match: t (input) or u (target) counts as in the top k if z[t] >= the k-th largest logit.
  Ties at the k-th place therefore all count (torch.topk would pick among them arbitrarily): the rule
  is "fewer than k tokens have a strictly larger logit".
- cosine: cos(h, e_in) and cos(h, e_out); projection <h - e_in, e_out - e_in> / ||e_out - e_in||^2
  (0 at the input embedding, 1 at the target's), averaged over positions with t != u only (and
  e_in != e_out: distinct tokens with the same embedding row have no direction to project on).
  Reference vectors: e_in = s * E_in[t], the token part of h_0 (s = sqrt(d) for Gemma, 1 otherwise;
  GPT-2's position embedding is not part of it), e_out = s * E_in[u] for tied embeddings (the "shifted
  input": same space, same scale), E_out[u] for untied ones (the row that scores u; printed at load).
  --space=raw compares the raw residual state (the paper's reading); --space=normed compares LN_f(h)
  with LN_f(e_in), LN_f(e_out): state and references go through the same final norm, so nothing
  but the direction of the state moves the metric (a normed state against raw embeddings would
  mix scales: the projection of a position-free model would not even be 0 at layer 0).
- lens extras: cross-entropy -log p_l(u), entropy H(p_l), and KL(p_final || p_l) =
  sum_v p_final(v) (log p_final(v) - log p_l(v)), where p_final is the model's own output
  distribution (the final norm is always applied to it): the extra nats paid for coding the model's
  prediction with layer l's lens. 0 at the last layer when --lens_norm is on.
- target wins (per token and layer): z[u] > z[t] (strictly; positions with t == u skipped).
  The per-token first-win layer is the first layer from which the target wins at every later layer,
  "never" when it does not win at the last layer. Its distribution is the per-token shift depth.
- crossing layer of an input/target pair of curves (top-k match, cosine): the layer from which the
  target curve stays at or above the input curve, linearly interpolated between the two layers around
  it; 0 if the target is never behind, none if the input is still ahead at the last layer. The same rule
  with the constant 1/2 as "input" gives the layer where the projection passes half-way.
- misalignment score (one number per model, in [0, 1], lower = better aligned): the mean over positions
  with t != u of f / L, where f is the position's first-win layer (above) and L the number of blocks;
  "never" counts as 1. It is the expected normalised depth at which a token's residual stream stops
  looking like its input and starts looking like its target: 0 if every target already beats its
  input at the embeddings, 1 if none does before the output. Why this reading: it is built on what
  each token does, so it is not fooled by an input collapse (on a real 135M Llama-family model the
  top-5 input match falls to ~0.08 right after block 1 while the target match stays ~0.15 until layer
  ~19, so the top-k curves "cross" at layer ~1, yet the median first-win layer is 20: the deep shift
  the paper describes, which this score reports); it uses every position, not only a crossing point
  of averaged curves; and dividing by L makes models of different depth comparable (a stretched copy
  of a model, each layer's behaviour spread over twice the layers, has the same score). The "never"
  share is reported beside it (never_fraction), since it caps the score.

Computed streaming: batch by batch, and within a batch token chunk by token chunk, one layer's
logits at a time (a chunk holds at most LENS_CHUNK_BYTES of logits), accumulating sums per layer;
memory depends on --batch_size and the model, never on --num_sequences. The lens decodes all L+1
states through the unembedding where a forward decodes one, so for GPT-2 124M it costs ~4x a
forward (bench.py --section analyze); --lens_dtype=bfloat16 runs the lens matmuls in bf16 (~2.5x
faster on CPUs with bf16 units, logits to ~3 digits).
"""

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from nanoshift.common import InputError, SettingError, markdown_table
from model import DTYPES, dtype_from_name

LENS_CHUNK_BYTES = 128 << 20  # float32 logits of one token chunk (~4 such buffers live); large chunks
# amortise reading the unembedding matrix: below a few hundred rows the lens matmul is memory-bound

# per-layer metrics: (name, averaged over) -- "all" positions, "diff" = positions with t_i != t_{i+1},
# "proj" = those whose reference vectors differ too (distinct tokens can share an embedding row)
METRICS = [("topk_input", "all"), ("topk_target", "all"), ("cos_input", "all"), ("cos_target", "all"),
           ("projection", "proj"), ("target_wins", "diff"), ("lens_ce", "all"), ("entropy", "all"),
           ("kl_final", "all")]
LENSES = ("logit", "tuned")


@dataclass(frozen=True)
class LensOptions:
    """What to measure, checked once here (SettingError naming the setting).

    k: top-k of the match metrics; space: "raw" | "normed", the state cosine and projection compare;
    lens_norm: decode with the final norm recomputed per state; mid: also the mid-block states;
    lens_dtype: "auto" (the model's dtype) or a DTYPES name for the lens matmul; lens: "logit" | "tuned"
    (the tuned lens: lens_sums needs the model's translators, tuned_lens.py).
    """

    k: int = 5
    space: str = "raw"
    lens_norm: bool = True
    mid: bool = False
    lens_dtype: str = "auto"
    lens: str = "logit"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise SettingError(f"k must be an int >= 1, got {self.k!r}")
        if self.space not in ("raw", "normed"):
            raise SettingError(f"space must be 'raw' or 'normed', got {self.space!r}")
        if self.lens_dtype != "auto":
            dtype_from_name(self.lens_dtype, "lens_dtype", also=["auto"])
        if self.lens not in LENSES:
            raise SettingError(f"lens must be one of {list(LENSES)}, got {self.lens!r}")
        if self.lens == "tuned" and not self.lens_norm:
            raise SettingError("lens='tuned' decodes through the final norm (its translators were trained so): "
                               "lens_norm=False is for the logit lens only")

    @classmethod
    def from_settings(cls, settings):
        """The options out of a settings dict that holds them (e.g. analyze.py's)."""
        return cls(**{key: settings[key] for key in cls.__dataclass_fields__})

def _rowdot(a, b):
    """sum_v a[i, v] b[i, v] per row, without materialising a * b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def crossing_layer(layers, input_curve, target_curve):
    """The layer from which target_curve stays >= input_curve, interpolated; 0 if never behind, None if
    the input curve is still ahead at the last layer."""
    d = [a - b for a, b in zip(input_curve, target_curve)]
    m = len(d)
    while m > 0 and d[m - 1] <= 0:
        m -= 1
    if m == len(d):
        return None
    if m == 0:
        return float(layers[0])
    # d[m - 1] > 0 >= d[m]: linear interpolation between the two layers
    return float(layers[m - 1] + (layers[m] - layers[m - 1]) * d[m - 1] / (d[m - 1] - d[m]))


class _Reference:
    """Per token chunk: the input/target reference vectors in the chosen space."""

    def __init__(self, lm, x, y, normed_space):
        e_in, e_out = lm.input_vectors(x), lm.target_vectors(y)
        if normed_space:
            e_in, e_out = lm.final_norm(e_in), lm.final_norm(e_out)
        self.e_in, self.e_out = e_in.float(), e_out.float()
        self.in_norm, self.out_norm = self.e_in.norm(dim=-1), self.e_out.norm(dim=-1)
        self.direction = self.e_out - self.e_in
        self.direction_sq = _rowdot(self.direction, self.direction)
        self.has_direction = (self.direction_sq > 0) & (x != y)


class LensStats:
    """What the metrics need from one state's lens logits z [n, V], in one topk and one softmax pass.

    z is shifted in place by its row maximum: the distribution is unchanged, and the float32 dot
    products below then sum terms that are small wherever p is large (as p log p does), instead of
    terms of the size of the raw logits (~100 for GPT-2), which would cost three digits.
    """

    def __init__(self, z, x, y, k):
        top, top_index = z.topk(k, dim=-1)  # sorted: [:, 0] the largest logit, [:, -1] the k-th largest
        z_in, z_out = z.gather(1, x[:, None]).squeeze(1), z.gather(1, y[:, None]).squeeze(1)
        self.topk_in, self.topk_out = z_in >= top[:, -1], z_out >= top[:, -1]
        self.wins = z_out > z_in
        self.z = z.sub_(top[:, :1])
        self.p = torch.softmax(z, dim=-1)
        self.lse = -self.p.gather(1, top_index[:, :1]).squeeze(1).log()  # p(argmax) = exp(0 - lse)
        self.ce = self.lse - (z_out - top[:, 0])
        self.entropy = self.lse - _rowdot(self.p, z)

    def kl_from(self, final):
        """KL(final || self) = sum_v p_f (log p_f - log p) = -H_f - p_f . z + lse (z shifted, any shift)."""
        return self.lse - _rowdot(final.p, self.z) - final.entropy


def _state_sums(lens, v, diff, ref, final):
    """Sums over a token chunk of every per-layer metric, from the lens and the compared state v [n, C]."""
    v = v.float()
    v_norm = v.norm(dim=-1).clamp_min(1e-12)
    cos_in = _rowdot(v, ref.e_in) / (v_norm * ref.in_norm).clamp_min(1e-12)
    cos_out = _rowdot(v, ref.e_out) / (v_norm * ref.out_norm).clamp_min(1e-12)
    proj = _rowdot(v - ref.e_in, ref.direction) / ref.direction_sq.where(ref.has_direction, 1.0)
    return torch.stack([
        lens.topk_in.sum(), lens.topk_out.sum(), cos_in.sum(), cos_out.sum(),
        proj.where(ref.has_direction, 0.0).sum(), (lens.wins & diff).sum(), lens.ce.sum(), lens.entropy.sum(),
        lens.kl_from(final).sum(),
    ]).cpu().double()  # (MPS has no float64)


@dataclass
class LensSums:
    """What the metrics are averages of: per-state sums (float64) and counts over the tokens seen.

    Sums over disjoint sets of tokens add up with `+`, so windows measured one at a time, or on different
    ranks, combine into exactly the numbers of one pass when they are added in the same order (training's
    alignment tracking sums per-window results in window order, as analyze_model does with batch_size=1).
    """

    sums: torch.Tensor  # [states, len(METRICS)] float64
    first_win: torch.Tensor  # [L + 2] int64: first-win layer 0..L, then "never"
    final_ce: float = 0.0  # the model's own loss summed over the positions
    positions: int = 0
    positions_diff: int = 0  # positions with t_i != t_{i+1}
    positions_projection: int = 0  # ... whose reference vectors differ too

    def __add__(self, other):
        return LensSums(self.sums + other.sums, self.first_win + other.first_win, self.final_ce + other.final_ce,
                        self.positions + other.positions, self.positions_diff + other.positions_diff,
                        self.positions_projection + other.positions_projection)


def lens_states(n_layer, mid):
    """(kind, layer) of every state measured: the L + 1 residual states, then the mid-block ones."""
    return [("resid", float(l)) for l in range(n_layer + 1)] + ([("mid", l + 0.5) for l in range(n_layer)] if mid else [])


def check_translators(lm, options, translators):
    """SettingError unless translators fit options.lens: given for the tuned lens (and fitting lm), not for
    the logit lens."""
    if options.lens == "tuned":
        if translators is None:
            raise SettingError(f"lens='tuned' needs {lm.name}'s translators (tuned_lens.load_or_train)")
        translators.check_fits(lm, options.mid)
    elif translators is not None:
        raise SettingError("translators were given, but lens='logit': set lens='tuned' to use them")


@torch.inference_mode()
def lens_sums(lm, token_batches, options=LensOptions(), progress=False, spaces=None, translators=None):
    """Stream token batches ([B, T+1] int64: inputs then one target) through lm; the LensSums.

    spaces: a tuple of spaces ("raw", "normed") to measure in one pass instead of options.space; then the
    result is {space: LensSums}, each equal to a pass of its own (the lens is shared, only the cosine
    and projection differ). translators (options.lens == "tuned"): tuned_lens.Translators; each state is
    translated first, and every metric, the cosine and projection included, is that of the translated
    state (the state as the tuned lens reads it; untrained translators give the logit lens exactly). A
    problem with the model or the tokens is an InputError.
    """
    k, lens_norm, mid, lens_dtype = options.k, options.lens_norm, options.mid, options.lens_dtype
    if k > lm.vocab_size:
        raise SettingError(f"k={k} must be at most the vocabulary size {lm.vocab_size} of {lm.name}")
    check_translators(lm, options, translators)
    measured = spaces or (options.space,)
    any_normed = "normed" in measured
    weight = None if lens_dtype == "auto" else lm.out_embedding.detach().to(DTYPES[lens_dtype])
    L = lm.n_layer
    states = lens_states(L, mid)
    accs = {space: LensSums(torch.zeros(len(states), len(METRICS), dtype=torch.float64),
                            torch.zeros(L + 2, dtype=torch.int64)) for space in measured}
    chunk = max(1, LENS_CHUNK_BYTES // (4 * lm.vocab_size))

    total = sum(b.numel() - b.size(0) for b in token_batches) if hasattr(token_batches, "__len__") else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=lm.name, disable=not progress)
    for batch in token_batches:
        batch = batch.to(lm.device)
        if batch.dim() != 2 or batch.size(1) < 2:
            raise InputError(f"token batches must be [B, T+1] with T >= 1, got {tuple(batch.shape)}")
        top = int(batch.max())
        if top >= lm.vocab_size or int(batch.min()) < 0:
            raise InputError(f"token id {top} is outside {lm.name}'s vocabulary of {lm.vocab_size}")
        if batch.size(1) - 1 > lm.block_size:
            raise InputError(f"sequences of {batch.size(1) - 1} tokens are longer than {lm.name}'s "
                             f"block size {lm.block_size}: lower --seq_len")
        x_all, y_all = batch[:, :-1], batch[:, 1:]
        resid, mids = lm.hidden_states(x_all, mid=mid)
        C = resid[0].size(-1)
        flat = [s.reshape(-1, C) for s in resid] + [s.reshape(-1, C) for s in (mids if mid else [])]
        x_all, y_all = x_all.reshape(-1), y_all.reshape(-1)
        for start in range(0, x_all.numel(), chunk):
            sl = slice(start, start + chunk)
            x, y = x_all[sl], y_all[sl]
            diff = x != y
            refs = {space: _Reference(lm, x, y, space == "normed") for space in measured}
            # the model's own distribution first: with lens_norm the last layer's lens *is* it
            final = LensStats(lm.decode(flat[L][sl], True, weight), x, y, k)
            never_won_after = torch.full_like(x, -1)  # the last layer at which the target did not win
            for s in [L] + [s for s in range(len(states)) if s != L]:
                h = flat[s][sl] if translators is None else translators(flat[s][sl], s)
                normed = lm.final_norm(h) if (lens_norm or any_normed) else None
                if s == L and lens_norm:
                    lens = final
                else:
                    lens = LensStats(lm.unembed(normed if lens_norm else h, weight), x, y, k)
                for space, acc in accs.items():
                    acc.sums[s] += _state_sums(lens, normed if space == "normed" else h, diff, refs[space], final)
                if s <= L:  # residual states only; visited in increasing order after L, so clamp = max
                    never_won_after = torch.where(lens.wins, never_won_after, never_won_after.clamp(min=s))
                del lens
                final.z = None  # only the final p and entropy are needed from here on
            first_win = torch.bincount((never_won_after + 1)[diff].cpu(), minlength=L + 2)
            ce = final.ce.sum().item()
            for space, acc in accs.items():
                acc.first_win += first_win
                acc.final_ce += ce
                acc.positions += x.numel()
                acc.positions_diff += int(diff.sum())
                acc.positions_projection += int(refs[space].has_direction.sum())
            del final, refs
        del resid, mids, flat
        bar.update(x_all.numel())
    bar.close()
    return accs if spaces else accs[options.space]


def analyze_model(lm, token_batches, options=LensOptions(), progress=True, translators=None):
    """The per-layer metrics of lm on the token batches ([B, T+1] int64: inputs then one target), under
    options.lens (the tuned lens: give lm's translators, tuned_lens.py).

    Returns {"label", "source", "n_layer", ..., "lens", "layers": [row per state], "shift_depth": {...},
    "misalignment": score}. A problem with the model or the tokens is an InputError.
    """
    return summarise(lm, lens_sums(lm, token_batches, options, progress, translators=translators), options)


def misalignment_score(first_win_hist, never, n_layer):
    """The mean normalised depth at which tokens switch from their input to their target (see the top
    of this file): sum over first-win layers l of count * l / L, "never" counted as 1, over all counted
    positions. None when there are none."""
    total = sum(first_win_hist) + never
    if not total:
        return None
    return (sum(layer * count for layer, count in enumerate(first_win_hist)) / n_layer + never) / total


def summarise(lm, acc, options):
    """The result dict (what analyze_model returns) of LensSums measured with these options."""
    if acc.positions == 0:
        raise InputError(f"{lm.name}: no tokens to analyse")
    counts = {"all": acc.positions, "diff": acc.positions_diff, "proj": acc.positions_projection}
    rows = []
    n_diff = counts["diff"]
    for (kind, layer), row in zip(lens_states(lm.n_layer, options.mid), acc.sums.tolist()):
        entry = {"kind": kind, "layer": layer}
        for (name, over), value in zip(METRICS, row):
            entry[name] = value / counts[over] if counts[over] else None  # e.g. every t_i == t_{i+1}
        rows.append(entry)
    resid = [r for r in rows if r["kind"] == "resid"]
    layers = [r["layer"] for r in resid]
    curve = lambda name: [r[name] for r in resid]
    hist = acc.first_win.tolist()
    winners = sum(hist[:-1])
    cumulative, median = 0, None
    for layer, count in enumerate(hist):  # the median token's first-win layer, "never" counted as last
        cumulative += count
        if n_diff and cumulative * 2 >= n_diff:
            median = layer if layer <= lm.n_layer else None
            break
    shift = {
        "topk_crossing": crossing_layer(layers, curve("topk_input"), curve("topk_target")),
        "cosine_crossing": crossing_layer(layers, curve("cos_input"), curve("cos_target")),
        "projection_half": (None if None in curve("projection")  # no position with t_i != t_{i+1}
                            else crossing_layer(layers, [0.5] * len(layers), curve("projection"))),
        "first_win_hist": hist[:-1],
        "first_win_never": hist[-1],
        "first_win_median": median,
        "first_win_mean": (sum(l * c for l, c in enumerate(hist[:-1])) / winners) if winners else None,
        "never_fraction": hist[-1] / n_diff if n_diff else None,
    }
    return {
        "label": lm.name, "source": getattr(lm, "source", lm.name), "n_layer": lm.n_layer,
        "vocab_size": lm.vocab_size, "tied": lm.tied, "embed_scale": lm.embed_scale,
        **asdict(options),
        "positions": counts["all"], "positions_diff": n_diff,
        "positions_projection": counts["proj"],
        "final_loss": acc.final_ce / counts["all"],
        "misalignment": misalignment_score(hist[:-1], hist[-1], lm.n_layer),
        "layers": rows, "shift_depth": shift,
    }


def analyze_models(lms, token_batches, options=LensOptions(), progress=True, translators=None):
    """analyze_model for each model. token_batches: one iterable of [B, T+1] token tensors shared by all
    models, or a list with one such iterable per model (models with different tokenizers); translators
    (the tuned lens): one per model."""
    per_model = (isinstance(token_batches, (list, tuple)) and len(token_batches) == len(lms)
                 and all(isinstance(b, (list, tuple)) for b in token_batches))
    if not per_model:
        token_batches = [token_batches] * len(lms)
    translators = translators or [None] * len(lms)
    return [analyze_model(lm, batches, options, progress, t) for lm, batches, t in zip(lms, token_batches, translators)]


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(results):
    """Markdown table: the shift depth of each model, with a note on what "-" means."""
    header = ["model", "layers", "tokens", "top-k cross", "cosine cross", "projection 1/2",
              "first-win median", "never", "misalignment", "final CE"]
    rows = []
    for r in results:
        s = r["shift_depth"]
        rows.append([r["label"], r["n_layer"], f"{r['positions']:,}", _fmt(s["topk_crossing"]),
                     _fmt(s["cosine_crossing"]), _fmt(s["projection_half"]),
                     "-" if s["first_win_median"] is None else s["first_win_median"],
                     "-" if s["never_fraction"] is None else f"{s['never_fraction']:.1%}",
                     _fmt(r["misalignment"], 3), _fmt(r["final_loss"], 3)])
    note = ("\n\nCrossings are interpolated layers (0 = embeddings). \"-\": the input curve is still ahead at the "
            "last layer (no crossing), or, for the first-win median, most tokens never switch to the target. "
            "Misalignment: the mean normalised depth at which tokens switch from input to target (0-1, lower = "
            "earlier; lens.py).")
    return markdown_table(header, rows) + note
