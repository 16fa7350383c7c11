"""
Scoring token sequences with a causal LM (an lm.LanguageModel): the one place where windows are planned,
batched, run through the model and turned into per-token losses, shared by eval_benchmarks.py (perplexity,
LAMBADA, HellaSwag) and harness.py (the lm-evaluation-harness adapter). A library module.

    nll, hit = score_tokens(lm, sequences, context, stride)   # per-target NLL and top-1 hits, sliding windows
    scores = continuation_scores(lm, [(context_ids, continuation_ids), ...])  # [(logprob, greedy)], harness-style
    context_ids, continuation_ids = encode_pair(lm, "The cat", " sat")        # the harness's pair encoding
"""

import numpy as np
import torch
from tqdm import tqdm


def window_plan(n, context, stride):
    """Sliding windows over a sequence of n tokens, as (start, length, scored) triples.

    A window feeds tokens[start:start+length] and predicts tokens[start+1:start+length+1]; it scores
    its last `scored` predictions. As in HF's perplexity guide, windows start every `stride` tokens; the
    first scores all its predictions, each later one only those past the previous window's end, so
    targets 1..n-1 are scored once each, and stride == context is plain chunking.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    windows, start, done = [], 0, 0  # targets 1..done are scored
    while done < n - 1:
        end = min(start + context, n - 1)
        windows.append((start, end - start, end - done))
        start, done = start + stride, end
    return windows


def nll_and_hits_(logits, targets):
    """Cross-entropy (nats) and top-1 hits of [N, V] float32 logits; overwrites the logits.

    One max pass gives both the argmax and the log-sum-exp shift, and the exp runs in place, so no
    second [N, V] tensor is allocated (F.cross_entropy + argmax: ~1.6x slower on CPU).
    """
    top, pred = logits.max(dim=-1)
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    log_sum_exp = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
    return log_sum_exp - target_logit, pred == targets


@torch.inference_mode()
def score_tokens(lm, sequences, context, stride, batch_size=8, progress=False, desc=None):
    """Per-target NLL (nats, float32) and top-1 hits (bool) for each sequence: two lists of [n-1] arrays.

    Windows of every sequence are batched together, longest first, and right-padded: the model is
    causal, so padding after a window's last token never changes its logits. Cross-entropy and argmax
    run on the scored positions only, in place on the logits lm.logits returns.
    """
    nll = [np.zeros(max(len(s) - 1, 0), dtype=np.float32) for s in sequences]
    hit = [np.zeros(max(len(s) - 1, 0), dtype=bool) for s in sequences]
    windows = [(i, start, length, scored) for i, seq in enumerate(sequences)
               for start, length, scored in window_plan(len(seq), context, stride)]
    windows.sort(key=lambda w: -w[2])  # similar lengths share a batch: little padding
    bar = tqdm(total=sum(w[3] for w in windows), unit="tok", unit_scale=True, desc=desc, disable=not progress,
               leave=False)
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        T = batch[0][2]
        x = np.zeros((len(batch), T), dtype=np.int64)
        rows, cols, targets = [], [], []
        for r, (i, start, length, scored) in enumerate(batch):
            x[r, :length] = sequences[i][start:start + length]
            rows.append(np.full(scored, r))
            cols.append(np.arange(length - scored, length))
            targets.append(sequences[i][start + length - scored + 1:start + length + 1])
        logits = lm.logits(torch.from_numpy(x).to(lm.device))  # [B, T, V] float32
        V = logits.size(-1)
        if all(w[3] == T for w in batch):  # every position scored (chunking, LAMBADA): a view, no copy
            scored_logits = logits.reshape(-1, V)
        else:
            rows_t = torch.from_numpy(np.concatenate(rows)).to(logits.device)
            cols_t = torch.from_numpy(np.concatenate(cols)).to(logits.device)
            scored_logits = logits[rows_t, cols_t]  # [N, V]
        target_t = torch.from_numpy(np.concatenate(targets)).to(logits.device)
        batch_nll, batch_hit = (t.cpu().numpy() for t in nll_and_hits_(scored_logits, target_t))
        pos = 0
        for i, start, length, scored in batch:
            first = start + length - scored  # array index of the first scored target (target index - 1)
            nll[i][first:first + scored] = batch_nll[pos:pos + scored]
            hit[i][first:first + scored] = batch_hit[pos:pos + scored]
            pos += scored
        bar.update(pos)
    bar.close()
    return nll, hit


def encode_pair(lm, context, continuation):
    """Token ids of (context, continuation) as lm-evaluation-harness encodes a pair for a causal LM: the
    context's trailing spaces move to the continuation, and the continuation's tokens are what encoding
    context + continuation adds after the context's tokens (= encode(continuation) for GPT-2 when the
    continuation starts with a space; not so for SentencePiece tokenizers)."""
    if not context:
        raise ValueError("encode_pair needs a non-empty context")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = list(lm.encode(context))
    return context_ids, list(lm.encode(context + continuation))[len(context_ids):]


def continuation_scores(lm, pairs, batch_size=8, progress=False, desc=None):
    """[(log-probability, greedy)] of each continuation given its context, as the harness defines them.

    pairs: [(context token ids, continuation token ids)], the continuation non-empty and at most
    lm.block_size tokens. A context too long for the model is left-truncated: the model reads the last
    block_size + 1 tokens of context + continuation minus the last one, as the harness's HF model does.
    log-probability: the sum over the continuation's tokens (float64 sum of float32 per-token losses);
    greedy: every continuation token is the argmax of its prediction. One forward per pair, batched
    through score_tokens.
    """
    sequences, lengths = [], []
    for context, continuation in pairs:
        if not context:
            raise ValueError("a continuation needs a context of at least one token (the harness uses EOT)")
        if not 1 <= len(continuation) <= lm.block_size:
            raise ValueError(f"a continuation must have 1 to {lm.block_size} tokens ({lm.name}'s context), "
                             f"got {len(continuation)}")
        sequences.append(np.asarray((list(context) + list(continuation))[-(lm.block_size + 1):], dtype=np.int64))
        lengths.append(len(continuation))
    nll, hit = score_tokens(lm, sequences, lm.block_size, lm.block_size, batch_size, progress, desc)
    return [(-float(n[-k:].astype(np.float64).sum()), bool(h[-k:].all())) for n, h, k in zip(nll, hit, lengths)]
