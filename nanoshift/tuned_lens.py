"""
The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens"):
one affine translator per lensed state, h -> h + A_l h + b_l, decoded through the model's final norm and
unembedding exactly like the logit lens (lm.decode), trained so the decoded distribution matches the model's
own final one. A library module; analyze.py --lens=tuned|both drives it.

    from nanoshift.tuned_lens import load_or_train, make_step_batches, train_translators
    from nanoshift.lens import LensOptions, analyze_model
    translators, info = train_translators(lm, make_step_batches(windows, tokens_per_step=8192, steps=250))
    result = analyze_model(lm, batches, LensOptions(lens="tuned"), translators=translators)
    translators, info = load_or_train(lm, "out/ckpt.tuned_lens.pt", lambda: step_batches)  # saved, reused

Translators: one per residual state 0 .. L-1 (embeddings ... after block L-1) and, with mid=True, one per
mid-block state; the last state L has none (its lens is the model's output, as in the tuned-lens package).
A and b start at zero, so an untrained lens *is* the logit lens, bit for bit (h + (h 0^T + 0) == h), and
weight decay pulls the translators back towards it.

Training (the recipe of the tuned-lens package's defaults): loss = sum over states of the mean over positions
of KL(p_final || p_lens), p_final the model's own next-token distribution at the same position; SGD with
Nesterov momentum 0.9, learning rate 1.0 x (1 - momentum) (PyTorch's momentum scales the step by
1 / (1 - momentum); tuned-lens undoes that so the working rate is "1"), weight decay 1e-3, gradient norm
clipped to 1, learning rate decaying linearly to 0 over the steps, no warm-up. Full scale is 250 steps of
2^18 tokens (65.5M tokens). CPU scale (analyze.py's default on --device=cpu): the same 250 steps and
schedule with 2^8 tokens per step (64k tokens, 1/1024 of the full run; in practice at least one analysis
window per step): the number of steps and the schedule decide where SGD ends up, the tokens per step only
how noisy each step's gradient is. Measured on a tiny trained model (docs/tuned-lens.md): 250 steps of 2^8,
2^10 or 2^12 tokens end at the same held-out KL (to 3 digits), 50 steps of 2^10 at twice the KL. On a CPU
the lens costs ~3 unembedding matmuls per state and token to train, so the full recipe would take days there
(bench.py --section=tuned_lens). The package trains under bfloat16 autocast; here the lens runs
in the model's dtype (float32 on CPU).

Saved next to the checkpoint (ckpt.pt -> ckpt.tuned_lens.pt), weights-only (read with checkpoint.load_checkpoint,
which runs no code from the file), with a fingerprint of the model's weights: a file whose fingerprint is not
the model's (another checkpoint, or the same run's ckpt.pt after more training) is refused with an InputError.

Cost: training costs per step one forward of the trunk plus, per state, a lens decode and its backward
(~3 unembedding matmuls per state and token); the tuned analysis adds one C x C matmul per state to the logit
lens's C x V decode (bench_tuned_lens measures both).
"""

import hashlib
import math
import os
import re
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoshift.checkpoint import load_checkpoint, save_checkpoint
from nanoshift.common import InputError, SettingError
from nanoshift.lens import LENS_CHUNK_BYTES, LensOptions, analyze_model, lens_states

# the tuned-lens package's defaults (its scripts/ingredients.py Optimizer and train_loop.py Train)
REFERENCE_STEPS = 250
REFERENCE_TOKENS_PER_STEP = 2 ** 18
CPU_TOKENS_PER_STEP = 2 ** 8  # the CPU scale (module docstring)
LEARNING_RATE = 1.0  # times (1 - momentum): the SGD lr is 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
MAX_GRAD_NORM = 1.0

FILE_KIND = "nanoshift tuned lens"
FILE_VERSION = 1
FINGERPRINT_SAMPLES = 1 << 16  # elements hashed per tensor (all of a smaller one)


def _zero_translator(d_model):
    translator = torch.nn.Linear(d_model, d_model, bias=True)
    torch.nn.init.zeros_(translator.weight)
    torch.nn.init.zeros_(translator.bias)
    return translator


class Translators(torch.nn.Module):
    """The affine translators of one model, indexed like lens.lens_states: state s in 0 .. L-1 is the
    residual state after s blocks (translator resid[s]), s = L the last state (identity), s > L the mid-block
    state of block s - L - 1 (translator mids[s - L - 1], present when mid=True). Float32 parameters
    whatever the model's dtype."""

    def __init__(self, n_layer, d_model, mid=False):
        super().__init__()
        self.n_layer, self.d_model, self.mid = n_layer, d_model, mid
        self.resid = torch.nn.ModuleList(_zero_translator(d_model) for _ in range(n_layer))
        self.mids = torch.nn.ModuleList(_zero_translator(d_model) for _ in range(n_layer if mid else 0))

    @classmethod
    def for_model(cls, lm, mid=False):
        """Zero (logit-lens) translators for lm, on its device."""
        return cls(lm.n_layer, lm.out_embedding.shape[1], mid).to(lm.device)

    def translator(self, state):
        """The Linear of lens state `state` (lens.lens_states order), None for the last residual state."""
        L = self.n_layer
        if state < L:
            return self.resid[state]
        if state == L:
            return None
        if not self.mid:
            raise SettingError("these translators have none for the mid-block states: train them with mid=True (--mid)")
        return self.mids[state - L - 1]

    def forward(self, h, state):
        """h + A h + b for lens state `state`, in h's dtype (computed in float32)."""
        translator = self.translator(state)
        if translator is None:
            return h
        x = h.to(translator.weight.dtype)
        return (x + F.linear(x, translator.weight, translator.bias)).to(h.dtype)

    def check_fits(self, lm, mid):
        """SettingError unless these translators can lens every state of lm (mid: the mid-block ones too)."""
        d_model = lm.out_embedding.shape[1]
        if (self.n_layer, self.d_model) != (lm.n_layer, d_model):
            raise SettingError(f"translators for {self.n_layer} layers x {self.d_model} do not fit {lm.name} "
                               f"({lm.n_layer} layers x {d_model})")
        if mid and not self.mid:
            raise SettingError(f"the translators of {lm.name} have none for the mid-block states: train them "
                               "with mid=True (--mid)")


# -----------------------------------------------------------------------------
# Tied to the model's weights


def model_fingerprint(lm):
    """A hash of lm's weights: per tensor (sorted by name) its name, shape and up to FINGERPRINT_SAMPLES
    elements at an even stride (all of a smaller tensor), rounded to bfloat16 so a float32 and a bfloat16
    load of one checkpoint agree. Deterministic and cheap (a few MB hashed for any model size); training
    moves every weight, so any further training of a checkpoint changes it."""
    digest = hashlib.sha256(f"{lm.n_layer}:{lm.out_embedding.shape[1]}".encode())
    for name, tensor in sorted(lm.model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def file_stem(name):
    """A model name as a safe file name part ('org/model 1' -> 'org_model_1')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def translator_path(lm, out_dir="."):
    """Where lm's translators live: next to our checkpoint (out/ckpt.pt -> out/ckpt.tuned_lens.pt); for an HF
    model, in out_dir, named after the model."""
    if lm.source.startswith("ckpt:"):
        ckpt = lm.source[len("ckpt:"):]
        return (ckpt[:-3] if ckpt.endswith(".pt") else ckpt) + ".tuned_lens.pt"
    return os.path.join(out_dir, file_stem(lm.name) + ".tuned_lens.pt")


def save_translators(translators, path, lm, training):
    """Write translators (weights-only, atomic) with lm's fingerprint and what the training did."""
    save_checkpoint({"kind": FILE_KIND, "version": FILE_VERSION, "fingerprint": model_fingerprint(lm),
                     "model_source": lm.source, "n_layer": translators.n_layer, "d_model": translators.d_model,
                     "mid": translators.mid, "translators": translators.state_dict(), "training": training}, path)
    return path


def load_translators(path, lm):
    """(translators, training record) saved for lm in path. InputError for an unreadable file, a file that is
    not a tuned lens, or translators trained for other weights (another checkpoint, or this one before more
    training)."""
    state = load_checkpoint(path, map_location="cpu")
    if state.get("kind") != FILE_KIND or state.get("version") != FILE_VERSION:
        raise InputError(f"{path} is not a nanoshift tuned-lens file (version {FILE_VERSION})")
    fingerprint = model_fingerprint(lm)
    if state["fingerprint"] != fingerprint:
        raise InputError(f"{path} holds translators trained for other weights ({state['model_source']}, fingerprint "
                         f"{state['fingerprint']}), not for {lm.name} ({lm.source}, fingerprint {fingerprint}): "
                         "the checkpoint changed since they were trained, or the file belongs to another model. "
                         "Delete it, or train new ones with --lens_retrain=True")
    translators = Translators(state["n_layer"], state["d_model"], state["mid"])
    translators.load_state_dict(state["translators"])
    translators.check_fits(lm, mid=False)
    return translators.to(lm.device), state["training"]


# -----------------------------------------------------------------------------
# Training


def default_tokens_per_step(device):
    """2^18 tokens per step on an accelerator (the package's default), 2^8 on a CPU (module docstring)."""
    return CPU_TOKENS_PER_STEP if str(device).startswith("cpu") else REFERENCE_TOKENS_PER_STEP


def windows_needed(tokens_per_step, steps, seq_len):
    """How many windows of seq_len inputs make `steps` steps of at least tokens_per_step tokens each."""
    return steps * math.ceil(tokens_per_step / seq_len)


def make_step_batches(windows, tokens_per_step, steps, batch_size=4):
    """Split [N, T+1] token windows (analysis windows: inputs, then one target, which training ignores) into
    `steps` lists of [B, T+1] batches, each list at least tokens_per_step input tokens (its gradients
    accumulate into one optimizer step). InputError if there are too few windows."""
    per_step = math.ceil(tokens_per_step / (windows.size(1) - 1))
    if windows.size(0) < steps * per_step:
        raise InputError(f"tuned-lens training needs {steps * per_step} windows of {windows.size(1) - 1} tokens "
                         f"({steps} steps of {tokens_per_step} tokens), got {windows.size(0)}")
    return [list(torch.split(windows[i * per_step:(i + 1) * per_step], batch_size)) for i in range(steps)]


class _FrozenModel:
    """Within: the model's parameters need no gradient (only the translators learn), restored after."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def train_translators(lm, step_batches, mid=False, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                      max_grad_norm=MAX_GRAD_NORM, translators=None, progress=False):
    """Train lm's translators (new zero ones, or `translators`) on step_batches (make_step_batches: one list of
    [B, T+1] token batches per step); the recipe is the module docstring's.

    Returns (translators, training record: steps, tokens, seconds, tokens_per_s, and the mean KL per state of
    the first and last steps, "kl_first_step" / "kl_last_step", lens_states order without the last state).
    """
    if not step_batches:
        raise SettingError("tuned-lens training needs at least one step")
    translators = translators if translators is not None else Translators.for_model(lm, mid)
    translators.check_fits(lm, mid)
    optimizer = torch.optim.SGD(translators.parameters(), lr=lr * (1 - momentum), momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    steps = len(step_batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    L = lm.n_layer
    trained = [s for s in range(len(lens_states(L, mid))) if s != L]
    chunk = max(1, LENS_CHUNK_BYTES // (4 * lm.vocab_size))
    history, tokens, start = [], 0, time.perf_counter()
    translators.train()
    with _FrozenModel(lm.model):
        for batches in tqdm(step_batches, desc=f"tuned lens {lm.name}", unit="step", disable=not progress):
            positions = sum(b.size(0) * (b.size(1) - 1) for b in batches)
            kl_sums = torch.zeros(len(trained), device=lm.device)  # on the device: read once per step
            for batch in batches:
                x = batch[:, :-1].to(lm.device)
                with torch.no_grad():
                    resid, mids = lm.hidden_states(x, mid=mid)
                states = [s.reshape(-1, s.size(-1)) for s in resid + (mids if mid else [])]
                for start_row in range(0, x.numel(), chunk):
                    rows = slice(start_row, start_row + chunk)
                    with torch.no_grad():
                        final = torch.log_softmax(lm.decode(states[L][rows]), dim=-1)
                    for i, s in enumerate(trained):
                        logp = torch.log_softmax(lm.decode(translators(states[s][rows], s)), dim=-1)
                        kl = F.kl_div(logp, final, log_target=True, reduction="sum")
                        (kl / positions).backward()  # one state at a time: one [chunk, V] graph alive
                        kl_sums[i] += kl.detach()
                del resid, mids, states
            torch.nn.utils.clip_grad_norm_(translators.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            history.append((kl_sums / positions).cpu().tolist())
            tokens += positions
    translators.eval()
    seconds = time.perf_counter() - start
    return translators, {"steps": steps, "tokens": tokens, "tokens_per_step": tokens // steps, "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "lr": lr, "momentum": momentum,
                         "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "mid": mid,
                         "kl_first_step": history[0], "kl_last_step": history[-1]}


def load_or_train(lm, path, make_batches, mid=False, retrain=False, progress=False):
    """lm's translators: loaded from path when it exists (InputError if they belong to other weights, or lack
    the mid-block ones that mid asks for), else (or with retrain) trained on make_batches() (a callable, so no
    data is read when the file is there) and saved to path. Returns (translators, record with "loaded")."""
    if os.path.exists(path) and not retrain:
        translators, training = load_translators(path, lm)
        if mid and not translators.mid:
            raise InputError(f"{path} has no translators for the mid-block states (--mid): delete it, or train "
                             "new ones with --lens_retrain=True")
        return translators, dict(training, loaded=True, path=path)
    translators, training = train_translators(lm, make_batches(), mid=mid, progress=progress)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_translators(translators, path, lm, training)
    return translators, dict(training, loaded=False, path=path)


def translators_for(lms, make_windows, seq_len, steps=REFERENCE_STEPS, tokens_per_step=0, batch_size=4, mid=False,
                    retrain=False, out_dir=".", progress=False):
    """One Translators per model, as analyze.py --lens=tuned gets them: load_or_train at translator_path(lm, out_dir)
    with `steps` steps of tokens_per_step tokens (0: default_tokens_per_step of the model's device);
    make_windows(lm, n) -> [n, seq_len + 1] token windows of lm's training text (called only to train). Prints
    what it did per model."""
    out = []
    for lm in lms:
        per_step = tokens_per_step or default_tokens_per_step(lm.device)
        needed = windows_needed(per_step, steps, seq_len)
        translators, info = load_or_train(
            lm, translator_path(lm, out_dir),
            lambda: make_step_batches(make_windows(lm, needed), per_step, steps, batch_size), mid, retrain, progress)
        verb = "loaded" if info["loaded"] else f"trained ({info['seconds']:.1f} s, {info['tokens_per_s']:,.0f} tokens/s) and saved"
        print(f"tuned lens of {lm.name}: {verb} {info['path']} ({info['steps']} steps of {info['tokens_per_step']:,} "
              f"tokens; last step's mean KL to the final layer {sum(info['kl_last_step']) / len(info['kl_last_step']):.4f})")
        out.append(translators)
    return out


# -----------------------------------------------------------------------------
# Cost


def bench_tuned_lens(lm, windows, steps=4, tokens_per_step=None, batch_size=4, repeats=2):
    """The tuned lens's costs on lm and [N, T+1] token windows, in one run: translator training tokens/s
    (`steps` steps of tokens_per_step tokens, default all the windows over the steps), and the analysis time
    of the tuned lens against the logit lens on the same windows (best of `repeats`, alternating), as ratios
    to the logit-lens analysis. Returns a dict of the numbers."""
    T = windows.size(1) - 1
    tokens_per_step = tokens_per_step or (windows.size(0) // steps) * T
    step_batches = make_step_batches(windows, tokens_per_step, steps, batch_size)
    translators, training = train_translators(lm, step_batches)
    batches = list(torch.split(windows, batch_size))
    runs = {"logit": lambda: analyze_model(lm, batches, LensOptions(), progress=False),
            "tuned": lambda: analyze_model(lm, batches, LensOptions(lens="tuned"), progress=False,
                                           translators=translators)}
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    analysed = windows.size(0) * T
    return {"train_tokens_per_s": training["tokens_per_s"], "train_tokens": training["tokens"],
            "logit_analysis_tokens_per_s": analysed / best["logit"],
            "tuned_analysis_tokens_per_s": analysed / best["tuned"],
            "tuned_vs_logit_analysis": best["tuned"] / best["logit"],
            "train_vs_logit_analysis": (analysed / best["logit"]) / training["tokens_per_s"]}
