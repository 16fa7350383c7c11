"""
Downstream tasks: our checkpoints in EleutherAI's lm-evaluation-harness (lm_eval 0.4.x), registered as
the model `nanoshift`. Every residual mode (none / cut / gate) and both archs (gpt2 / llama) load through
lm.load_lm, like analyze.py and eval_benchmarks.py.

    python harness.py --model nanoshift --model_args ckpt=out-gate/ckpt.pt \\
        --tasks hellaswag,arc_easy,piqa,lambada_openai --batch_size 16 --device cuda

`python harness.py ...` is lm_eval's own command line (every lm_eval option works) with `nanoshift`
registered first: a plain `lm_eval --model nanoshift` cannot find it, because lm_eval's CLI only knows
its built-in models. Exit status: 0 done; 1 a missing or unreadable checkpoint; 2 bad model_args (both
one line, no traceback); lm_eval's own errors as lm_eval reports them. From Python, importing this module
registers the model:

    import harness, lm_eval
    results = lm_eval.simple_evaluate(model="nanoshift", model_args="ckpt=out-gate,dtype=bfloat16",
                                      tasks=["hellaswag"], device="cuda", batch_size=16)
    results = lm_eval.simple_evaluate(model=harness.NanoshiftLM(ckpt="out-gate"), tasks=["hellaswag"])

model_args: ckpt (a checkpoint file or a run dir holding ckpt.pt; required), device (default cuda if
there is one, else cpu), dtype (float32 | bfloat16 | float16: the weights; log-probabilities are taken
in float32), batch_size (sequences per forward, default 8), max_gen_toks (default 256).

How requests are scored (the conventions of the harness's own `hf` model, so the two give the same
numbers for the same weights, for GPT-2's tokenizer and for a model's own HF tokenizer alike;
tests/test_harness.py checks both):
- tokens: a text is encoded as the model's tokenizer does by default, as `hf` does: with its BOS in
  front for a tokenizer that puts one there (Llama-family), with nothing for GPT-2's. The prefix token
  (what an empty context or a document's first window is conditioned on) is the tokenizer's BOS if it has
  one, else its end-of-text token (lm.prefix_token; both are <|endoftext|> for GPT-2).
- loglikelihood: the pair is encoded as the harness does (TemplateLM._encode_pair: the context's trailing
  spaces move to the continuation; an empty context is the prefix token). The model reads the last
  block_size + 1 tokens of context + continuation minus the last: a long context is left-truncated.
  Returns (sum of the continuation's log-probabilities, whether every continuation token is the argmax).
- loglikelihood_rolling: lm_eval's own disjoint rolling windows (utils.get_rolling_token_windows with
  the prefix token and the model's block_size) over the document's tokens (for a BOS tokenizer these
  start with BOS, so, as in `hf`, log p(BOS | BOS) is part of the sum), each window scored like a
  loglikelihood request; each document's windows are summed.
- generate_until: greedy only (do_sample true or a temperature > 0 is refused), up to max_gen_toks
  tokens, stopping at end-of-text or at the first stop string (cut from the output); the text is decoded
  with the model's own tokenizer, special tokens left out (lm.decode_text; `hf`'s skip_special_tokens).
  The model always reads the last block_size tokens of context + generated text (the context is
  left-truncated as the generation goes on; `hf` instead cuts the context to block_size - max_gen_toks
  once, so the two differ only when context + generation exceed block_size). Requests are batched,
  right-padded (a causal model's logits do not depend on padding after the last real token).
Special-token text inside a request ("<s>", "<|endoftext|>") stays ordinary text, as everywhere in
nanoshift; `hf` would read it as the special token.

lm_eval is optional: without it this module imports, but using the adapter raises an ImportError that
says `pip install lm_eval`.
"""

import importlib
import os
import sys

import numpy as np
import torch

from nanoshift.common import NanoshiftError, SettingError, exit_with
from nanoshift.lm import load_lm
from nanoshift.scoring import continuation_scores

LM_EVAL_MISSING = ("the downstream-task adapter needs the optional package lm_eval "
                   "(lm-evaluation-harness): pip install lm_eval==0.4.13")
MODEL_NAME = "nanoshift"

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # optional: the module stays importable, the adapter says what to install
    TemplateLM = None


def require_lm_eval():
    """ImportError with the install command if lm_eval is missing."""
    if TemplateLM is None:
        raise ImportError(LM_EVAL_MISSING)


class NanoshiftLM(TemplateLM or object):
    """An lm_eval model for our checkpoints (see the module docstring for how requests are scored)."""

    def __init__(self, ckpt=None, device=None, dtype="float32", batch_size=8, max_gen_toks=256,
                 max_batch_size=None, **unused):
        require_lm_eval()
        super().__init__()
        if ckpt is None:
            raise SettingError(f"model_args must give ckpt=<checkpoint file or run dir> for --model {MODEL_NAME}")
        if unused:  # e.g. pretrained=...: an hf argument given to the wrong model
            raise SettingError(f"unknown model_args for {MODEL_NAME}: {sorted(unused)}; "
                             "known: ckpt, device, dtype, batch_size, max_gen_toks")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            print(f"{MODEL_NAME}: batch_size={batch_size!r} is not supported (no automatic batch search); using 8",
                  file=sys.stderr)
            batch_size = 8
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise SettingError(f"batch_size and max_gen_toks must be >= 1, got {batch_size} and {max_gen_toks}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm = load_lm(ckpt=ckpt, device=device, dtype=dtype)
        self._device = self.lm.device

    # -- what TemplateLM needs

    @property
    def eot_token_id(self):
        return self.lm.eot

    @property
    def prefix_token_id(self):
        return self.lm.prefix_token

    @property
    def max_length(self):
        return self.lm.block_size

    @property
    def tokenizer_name(self):
        return self.lm.tokenizer_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """The tokenizer's default encoding (its BOS in front, if it puts one there), as `hf` encodes a text;
        add_special_tokens=False: the text's tokens alone (the harness asks so for an empty context's
        continuation)."""
        prefix = list(self.lm.bos_prefix) if add_special_tokens is not False else []
        return prefix + list(self.lm.encode(string))

    def tok_decode(self, tokens):
        return self.lm.decode_text(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation), context ids, continuation ids)] -> [(logprob, greedy)]."""
        results = continuation_scores(self.lm, [(ctx, cont) for _, ctx, cont in requests], self.batch_size,
                                      progress=not disable_tqdm, desc=f"{MODEL_NAME} loglikelihood")
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        scores = continuation_scores(self.lm, windows, self.batch_size, progress=not disable_tqdm,
                                     desc=f"{MODEL_NAME} loglikelihood_rolling")
        totals = np.zeros(len(requests), dtype=np.float64)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        results = [float(t) for t in totals]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests, disable_tqdm=False):
        results = [None] * len(requests)
        prepared = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            until, max_gen_toks = self._generation_settings(gen_kwargs)
            prepared.append((i, self.tok_encode(context) or [self.prefix_token_id], until, max_gen_toks))
        prepared.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch
        for b in range(0, len(prepared), self.batch_size):
            batch = prepared[b:b + self.batch_size]
            for (i, _, _, _), text in zip(batch, self._greedy(batch)):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    # -- generation

    def _generation_settings(self, gen_kwargs):
        """(stop strings, max new tokens) of one request; sampling is refused (greedy only)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_gen_toks = int(kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None)
                           or self.max_gen_toks)
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise SettingError(f"{MODEL_NAME} generates greedily only; this task asks for sampling ({gen_kwargs})")
        return until, max_gen_toks

    @torch.inference_mode()
    def _greedy(self, batch):
        """Greedy continuations of a batch of (index, context ids, stop strings, max new tokens)."""
        L = self.lm.block_size
        tokens = [list(ctx) for _, ctx, _, _ in batch]
        generated = [[] for _ in batch]
        done = [False] * len(batch)
        for step in range(max(r[3] for r in batch)):
            active = [r for r in range(len(batch)) if not done[r]]
            if not active:
                break
            windows = [tokens[r][-L:] for r in active]
            T = max(len(w) for w in windows)
            x = torch.zeros((len(active), T), dtype=torch.long)
            for row, w in enumerate(windows):
                x[row, :len(w)] = torch.tensor(w)
            logits = self.lm.logits(x.to(self.lm.device))  # [B, T, V]
            last = torch.tensor([len(w) - 1 for w in windows], device=logits.device)
            next_ids = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
            for r, token in zip(active, next_ids):
                _, _, until, max_new = batch[r]
                if token == self.eot_token_id:
                    done[r] = True
                    continue
                tokens[r].append(token)
                generated[r].append(token)
                text = self.tok_decode(generated[r])
                if len(generated[r]) >= max_new or any(s in text for s in until):
                    done[r] = True
        texts = []
        for r, (_, _, until, _) in enumerate(batch):
            text = self.tok_decode(generated[r])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def register():
    """Register NanoshiftLM under the name `nanoshift` in lm_eval's model registry (done on import)."""
    require_lm_eval()
    from lm_eval.api.registry import model_registry

    importlib.import_module("lm_eval.models")  # the built-ins first: lm_eval adds them only to an empty registry

    # a lazy "module:class" path, not the class: `python harness.py` runs this file as __main__, and the
    # registry must hand out the one NanoshiftLM of the module `harness` (registering the same path twice is fine)
    model_registry.register(MODEL_NAME, target="harness:NanoshiftLM")


if TemplateLM is not None:
    register()


def main(argv=None):
    """lm_eval's command line with `nanoshift` registered: `python harness.py --model nanoshift ...`.

    The adapter's own errors (a missing or unreadable checkpoint, bad model_args) end the run as one line and
    common.exit_with's status (1 for data, 2 for a setting), like every nanoshift entry point; lm_eval's own
    errors keep lm_eval's reporting. NANOSHIFT_TRACEBACK=1 shows the traceback."""
    try:
        require_lm_eval()
    except ImportError as e:
        exit_with(e)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    try:
        cli_evaluate()
    except NanoshiftError as e:
        if os.environ.get("NANOSHIFT_TRACEBACK") == "1":
            raise
        exit_with(e)


if __name__ == "__main__":
    main()
