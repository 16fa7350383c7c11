"""
Benchmark evaluation (the paper's Table II): loss, perplexity and top-1 next-token accuracy on
WikiText, LAMBADA, OpenWebText and FineWeb-Edu, for several models side by side.

    python eval_benchmarks.py --ckpt out-baseline/ckpt.pt out-cut/ckpt.pt out-gate/ckpt.pt
    python eval_benchmarks.py config/eval.py                          # the example config
    python eval_benchmarks.py --hf gpt2 --ckpt out-gate --device=cuda --dtype=bfloat16
    python eval_benchmarks.py --ckpt out-gate --benchmarks wikitext103 lambada \\
        --wikitext103_files wikitext/test-00000-of-00001.parquet --lambada_files lambada_test.jsonl
    python eval_benchmarks.py --ckpt out-gate --max_tokens=20000 --batch_size=4   # a quick look
    python eval_benchmarks.py --ckpt 'out-baseline-s*' 'out-gate-s*'   # groups of seeds: mean, 95% CI, paired tests
    python eval_benchmarks.py --help                                   # every setting

Models: --ckpt (our checkpoints or out dirs, several) and --hf (transformers causal LMs: hub names or
local save_pretrained dirs, several), all loaded by lm.load_models. Output: a markdown table, one
column per model, printed and written to {out_dir}/results.md, and {out_dir}/results.json (both
rewritten atomically after every model, so a long run that dies keeps what it finished). Exit status:
0 done, 1 bad or missing data or models, 2 a bad setting.

Groups of seeds (groups.py has the rules): a quoted --ckpt pattern ('out-gate-s*') or label=pattern is a
group of runs. Every run is evaluated as above, then results.md starts with a table of every group
(mean ± 95% t interval and standard deviation over seeds, for every metric) and a table of each group's
paired differences from the baseline group (--baseline_group, default the first; matched by seed, with
the 95% interval and the paired t-test's p-value), above the per-run table; results.json gains "groups"
and "differences". Seeds that do not pair up are an error before anything is evaluated.

From Python (e.g. a demo script):

    from eval_benchmarks import DEFAULTS, evaluate, format_table, run
    metrics = evaluate(lm, tokens, context=256, stride=128)   # one lm (lm.load_lm), token array(s)
    results = run(dict(DEFAULTS, ckpt=["out-demo/gate"], benchmarks=["demo"], max_tokens=20_000))
    print(format_table(results["models"]))

Benchmarks (--benchmarks; each one's data can come from local files, for offline machines):

    wikitext103  WikiText-103 test, hub Salesforce/wikitext (wikitext-103-raw-v1)    --wikitext103_files
    wikitext2    WikiText-2 test (wikitext-2-raw-v1; the same test articles as -103) --wikitext2_files
    lambada      LAMBADA, OpenAI version, test, hub EleutherAI/lambada_openai        --lambada_files
    hellaswag    HellaSwag validation, 0-shot, hub Rowan/hellaswag                   --hellaswag_files
    openwebtext  our val shards from prepare_owt.py                                  --openwebtext_shards
    fineweb_edu  our val shards from prepare_fineweb.py                              --fineweb_edu_shards
    demo         the demo corpus's val shard from prepare_fineweb.py --demo        --demo_shards

How each is turned into tokens (one rule everywhere: every document starts with the model's document
separator, lm.doc_separator: <|endoftext|> for GPT-2 tokenizers, exactly as in our training shards;
BOS for models whose tokenizer starts texts with one (Llama, Gemma, ...); else EOS, else nothing):
- WikiText: the raw test lines are joined into articles (a new article starts at each top-level
  heading " = Title = "; blank lines are dropped, so the hub's rows and the original wiki.test.raw
  give the same articles). The articles are tokenized and concatenated into ONE stream, like the
  standard WikiText perplexity eval, so a window's context may reach into the previous article.
- LAMBADA: every passage is its own sequence (never a stream). The last word is what follows the
  last space, as in lm-evaluation-harness, and so is the encoding: separator + encode(context) + the
  tokens that encode(context + " " + word) adds after them (= encode(" " + word) for GPT-2).
  Loss/perplexity/accuracy cover every token of the passages; last-word accuracy counts a word right
  only if the argmax at each of its token positions is the true token (greedy); last-word perplexity
  is exp(mean over passages of the word's summed NLL), the harness's convention.
- HellaSwag: exactly as lm-evaluation-harness 0.4.13's task `hellaswag` (its utils.py preprocessing,
  copied here: no lm_eval needed): query = preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()), four continuations " " + preprocess(ending), each scored as the log-likelihood
  of the continuation given the query (the harness's pair encoding, no separator before the query, the
  model's whole block_size as context). acc: the highest log-likelihood is the right ending; acc_norm
  (the number usually quoted): the highest log-likelihood per character of the ending. tests/
  test_harness.py checks both against the harness itself. --context/--stride do not apply; --max_tokens
  caps the scored continuation tokens (whole examples).
- OpenWebText / FineWeb-Edu: the val shards (documents delimited by the tokenizer's separator: EOT
  50256 for GPT-2) in sorted order form ONE token stream. The shards' _done.json names their tokenizer
  (none: GPT-2's); a model with another tokenizer is refused for them.

Sliding window (HF's perplexity guide): a sequence longer than --context tokens is read in windows of
--context tokens that start every --stride tokens (default: half the context). The first window
scores all its predictions, every later one only the new ones (its last --stride), so each token is
scored exactly once and, after the first window, with at least context - stride tokens of context.
--stride equal to --context is plain chunking. --max_tokens caps the scored tokens per benchmark
(LAMBADA: whole passages until the cap is reached). Windows of all sequences are batched together
(--batch_size windows per forward), and cross-entropy and argmax run on the scored positions only.

Metrics: token-weighted mean loss (nats), perplexity = exp(loss), top-1 next-token accuracy (%). The
softmax runs over all of the model's output rows (for our models the padded 50304, as in training).
Bits per byte (floors.bits_per_byte, nanochat's val_bpb; every model with a tokenizer): the summed loss of
the targets that stand for text, over ln 2 times their UTF-8 bytes (data.token_byte_lengths: separators
count 0 bytes and are left out of both sums), so models with different tokenizers compare; "bytes scored"
is that byte count. For WikiText scored whole it equals the articles' own UTF-8 length ("text_bytes" in
results.json; a note is printed where a tokenizer makes them differ).

Floors (floors.py): for a shards benchmark whose val shards sit in a finished prepare with a train split,
the unigram and bigram cross-entropy of that whole val split under counts of its train split are
reference rows of the table (nats/token and bits/byte) and results.json's "floors"; a model whose bits
per byte is above the bigram floor (worse than counting token pairs) has "above bigram floor" next to
its number ("floor_label" in results.json). The floors cover the whole val split, the models the first
--max_tokens targets of it.
"""

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

from nanoshift.common import (InputError, SettingError, check_out_dir, expand_globs, markdown_table, run_main, set_threads, write_json,
                    write_text)
from nanoshift.configurator import configure
from nanoshift.data import (GPT2_NAME, HubError, iter_documents, read_shard, read_shard_header, shards_tokenizer,
                            token_byte_lengths, wikitext_articles)
from nanoshift.floors import bits_per_byte, floor_label, nats_and_bytes, shards_floors
from nanoshift.groups import baseline_of, differences, group_tables, lookup, model_groups
from nanoshift.groups import summarize as summarize_runs
from nanoshift.lens import LensOptions, analyze_model
from nanoshift.lm import load_models
from model import dtype_from_name
from nanoshift.scoring import continuation_scores, encode_pair, score_tokens
from nanoshift.tuned_lens import load_translators, translator_path

# -----------------------------------------------------------------------------
# Benchmarks


@dataclass(frozen=True)
class Benchmark:
    name: str  # the name in --benchmarks
    title: str  # the row label in the table
    kind: str  # "wikitext" | "lambada" | "shards"
    hub: tuple = None  # (dataset, config, split) for the text benchmarks
    shards: str = None  # default glob of the val shards
    prepare: str = None  # the command that writes those shards

    @property
    def setting(self):
        """The setting that points this benchmark at local data."""
        return f"{self.name}_{'shards' if self.kind == 'shards' else 'files'}"


BENCHMARKS = {b.name: b for b in [
    Benchmark("wikitext103", "WikiText-103", "wikitext", hub=("Salesforce/wikitext", "wikitext-103-raw-v1", "test")),
    Benchmark("wikitext2", "WikiText-2", "wikitext", hub=("Salesforce/wikitext", "wikitext-2-raw-v1", "test")),
    Benchmark("lambada", "LAMBADA", "lambada", hub=("EleutherAI/lambada_openai", "default", "test")),
    Benchmark("hellaswag", "HellaSwag", "hellaswag", hub=("Rowan/hellaswag", None, "validation")),
    Benchmark("openwebtext", "OpenWebText", "shards", shards="data/openwebtext/openwebtext_val_*.bin",
              prepare="python prepare_owt.py"),
    Benchmark("fineweb_edu", "FineWeb-Edu", "shards", shards="data/fineweb_edu/fineweb_edu_val_*.bin",
              prepare="python prepare_fineweb.py"),
    Benchmark("demo", "Demo (Shakespeare val)", "shards", shards="data/demo/demo_val_*.bin",
              prepare="python prepare_fineweb.py --demo"),
]}

# what to download where the hub cannot be reached (named in the error message)
LOCAL_FILE_HINTS = {
    "wikitext": "the split's parquet file from the hub repo (e.g. wikitext-103-raw-v1/test-00000-of-00001.parquet), "
                "or wiki.test.raw from the original WikiText zip renamed to .txt",
    "lambada": "lambada_test.jsonl from the hub repo EleutherAI/lambada_openai (one passage per row), "
               "or a .txt file with one passage per line",
    "hellaswag": "the validation split of the hub repo Rowan/hellaswag as parquet or jsonl (rows with "
                 "activity_label, ctx_a, ctx_b, endings, label), e.g. hellaswag_val.jsonl",
}

DEFAULTS = dict(
    ckpt=[],  # our checkpoints (files, or out dirs holding ckpt.pt); quoted patterns / label=pattern: groups of seeds
    hf=[],  # transformers causal LMs: hub names or local save_pretrained dirs
    benchmarks=["wikitext103", "lambada", "openwebtext", "fineweb_edu"],  # any of: wikitext103, wikitext2, lambada, hellaswag, openwebtext, fineweb_edu, demo
    wikitext103_files=[],  # local parquet/jsonl/txt instead of the hub (empty: the hub)
    wikitext2_files=[],  # local WikiText-2 test files instead of the hub (empty: the hub)
    lambada_files=[],  # local LAMBADA jsonl/txt instead of the hub (empty: the hub)
    hellaswag_files=[],  # local HellaSwag validation jsonl/parquet instead of the hub (empty: the hub)
    openwebtext_shards=BENCHMARKS["openwebtext"].shards,  # glob(s) of OpenWebText val shards (prepare_owt.py)
    fineweb_edu_shards=BENCHMARKS["fineweb_edu"].shards,  # glob(s) of FineWeb-Edu val shards (prepare_fineweb.py)
    demo_shards=BENCHMARKS["demo"].shards,  # the demo corpus (not in the default list)
    max_tokens=0,  # cap on scored tokens per benchmark, 0 = all
    context=1024,  # window length in tokens (clipped to each model's block_size)
    stride=0,  # new tokens scored per window, 0 = context // 2
    batch_size=8,  # windows per forward; the float32 logits take batch_size * context * vocab * 4 bytes
    misalignment_windows=16,  # windows per benchmark the misalignment score (lens.py) is measured on; 0 = none
    lens="logit",  # the misalignment's lens: 'logit' | 'tuned' (translators saved by analyze.py --lens=tuned next to each model)
    device="cuda" if torch.cuda.is_available() else "cpu",  # 'cuda' (the default where there is one) | 'cpu'
    dtype="float32",  # float32 | bfloat16 | float16 (the model's weights; logits are scored in float32)
    threads=0,  # CPU threads: 0 = OMP_NUM_THREADS if set, else half the cores (common.cpu_threads)
    baseline_group="",  # groups of seeds: the label of the group the others are compared with ('' = the first)
    out_dir="out-eval",  # folder for results.md and results.json
    progress=True,  # tqdm progress bars
)
# the shard settings take one glob or a list of them
EXTRA_TYPES = {f"{b.name}_shards": (list,) for b in BENCHMARKS.values() if b.kind == "shards"}


def check_benchmark_names(names):
    for name in names:
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, BENCHMARKS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingError(f"unknown benchmark {name!r}{hint}; choose from {list(BENCHMARKS)}")
    if not names:
        raise SettingError(f"no benchmarks selected; choose from {list(BENCHMARKS)}")


def _read_rows(bench, files, text_column="text"):
    """The text column (None: whole rows) of a hub dataset or of local files, through data.iter_documents."""
    dataset, config, split = bench.hub
    try:
        return list(iter_documents(dataset, config, split, data_files=files or None, text_column=text_column))
    except HubError as e:  # the hub could not be reached (offline) or has no such dataset
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(
            f"{bench.title}: could not load {dataset} ({config}, {split}) from the HuggingFace hub"
            f"{' (offline mode: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1)' if offline else ''}.\n"
            f"Download it on a machine with internet and point --{bench.setting} at the local copy: "
            f"{LOCAL_FILE_HINTS[bench.kind]}.\n(cause: {str(e).splitlines()[0]})") from e
    except InputError as e:  # bad local files
        raise InputError(f"{bench.title}: --{bench.setting}: {e}") from e


def lambada_passages(rows):
    """LAMBADA rows -> passages (one per non-empty line; the passages have no line breaks)."""
    return [line.strip() for row in rows for line in (row or "").splitlines() if line.strip()]


def split_last_word(passage):
    """(context, target) as lm-evaluation-harness splits LAMBADA: the target is ' ' + the last word."""
    context, space, word = passage.rpartition(" ")
    if not space or not context.strip() or not word:
        raise InputError(f"LAMBADA passage has no 'context last-word' split at a space: {passage[:80]!r}")
    trailing = len(context) - len(context.rstrip())  # the harness moves the context's trailing spaces
    return context[:len(context) - trailing], context[len(context) - trailing:] + " " + word


def shard_paths(bench, patterns):
    return expand_globs(patterns, f"{bench.title} token shards", hint=f". Write them with `{bench.prepare}` or "
                        f"point --{bench.setting} at existing *_val_*.bin shards.")


def load_benchmark(name, settings):
    """A benchmark's raw data: documents (WikiText articles, LAMBADA passages) or shard paths.

    Shards are only checked here (header, size); their tokens are memory-mapped when evaluated.
    """
    bench = BENCHMARKS[name]
    if bench.kind == "shards":
        paths = shard_paths(bench, settings.get(bench.setting) or bench.shards)
        for path in paths:
            try:
                read_shard_header(path)
            except ValueError as e:
                raise InputError(f"{bench.title}: {e}") from e
        return paths
    if bench.kind == "hellaswag":
        return hellaswag_examples(_read_rows(bench, settings.get(bench.setting) or [], text_column=None))
    rows = _read_rows(bench, settings.get(bench.setting) or [])
    documents = wikitext_articles(rows) if bench.kind == "wikitext" else lambada_passages(rows)
    if not documents:
        raise InputError(f"{bench.title}: the data holds no text (--{bench.setting})")
    return documents

# -----------------------------------------------------------------------------
# Tokens


def benchmark_tokens(name, data, lm, max_tokens=0):
    """Token sequences of one benchmark (data from load_benchmark) for this model's tokenizer.

    Returns (sequences, word_lens): a list of int arrays (one stream, or one per LAMBADA passage) and,
    for LAMBADA, the token count of each passage's last word (its last targets), else None.
    """
    bench = BENCHMARKS[name]
    limit = max_tokens + 1 if max_tokens else None  # n tokens hold n - 1 targets
    if bench.kind == "shards":
        name, tokenizer_id = shards_tokenizer(data)  # the shards' _done.json says whose tokens (none: GPT-2's)
        if lm.tokenizer_id != tokenizer_id:
            what = ("the GPT-2 tokenizer", "GPT-2") if tokenizer_id == GPT2_NAME else (f"the tokenizer {name!r}",
                                                                                      f"{name!r}")
            raise InputError(f"{lm.name} does not use {what[0]}, but {bench.title} is read from {what[1]} "
                            f"token shards; evaluate it on text benchmarks only (e.g. --benchmarks wikitext103 lambada)"
                            " or on shards prepared with its tokenizer (--tokenizer)")
        pieces, total = [], 0
        for path in data:
            tokens = read_shard(path)
            if limit:
                tokens = tokens[:limit - total]
            pieces.append(np.asarray(tokens, dtype=np.int64))
            total += len(tokens)
            if limit and total >= limit:
                break
        return [np.concatenate(pieces)], None
    if bench.kind == "wikitext":
        pieces, total = [], 0
        for article in data:
            ids = lm.doc_separator + list(lm.encode(article))
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if limit and total >= limit:
                break
        stream = np.concatenate(pieces)
        return [stream[:limit] if limit else stream], None
    sequences, word_lens, total = [], [], 0
    for passage in data:
        context, target = split_last_word(passage)
        # lm-evaluation-harness's pair encoding: the word's tokens are what encoding the whole passage
        # adds after the context's tokens (the same as encode(target) for GPT-2, not for SentencePiece)
        context_ids, word = encode_pair(lm, context, target)
        if not word:
            raise InputError(f"{lm.name}: the last word of this LAMBADA passage encodes to no token: {passage[:80]!r}")
        seq = np.asarray(lm.doc_separator + context_ids + word, dtype=np.int64)
        sequences.append(seq)
        word_lens.append(len(word))
        total += len(seq) - 1
        if max_tokens and total >= max_tokens:
            break  # whole passages only: the last word must stay
    return sequences, word_lens

# -----------------------------------------------------------------------------
# Scoring


def summarize(nll, hit, word_lens=None):
    """Token-weighted metrics from per-target arrays; LAMBADA's last-word metrics if word_lens."""
    all_nll = np.concatenate(nll).astype(np.float64) if nll else np.zeros(0)
    if all_nll.size == 0:
        raise InputError("nothing to score: every sequence is shorter than two tokens")
    loss = float(all_nll.mean())
    out = {"loss": loss, "ppl": math.exp(loss), "acc": 100.0 * float(np.concatenate(hit).mean()),
           "tokens": int(all_nll.size)}
    if word_lens is not None:
        word_nll = [float(n[-k:].astype(np.float64).sum()) for n, k in zip(nll, word_lens)]
        word_hit = [bool(h[-k:].all()) for h, k in zip(hit, word_lens)]
        out["last_word_acc"] = 100.0 * float(np.mean(word_hit))
        out["last_word_loss"] = float(np.mean(word_nll))
        out["last_word_ppl"] = math.exp(out["last_word_loss"])
        out["words"] = len(word_lens)
    return out


def evaluate(lm, sequences, context=1024, stride=0, batch_size=8, word_lens=None, progress=False, desc=None,
             byte_lengths=None):
    """Loss, perplexity and top-1 accuracy of lm on token sequences (a list of int arrays, or one array).

    context is clipped to lm.block_size; stride 0 means half the context. word_lens (LAMBADA): the
    number of final tokens of each sequence that form its last word, for last-word accuracy/perplexity.
    byte_lengths (data.token_byte_lengths of the tokens' tokenizer): also "bpb" (bits per byte), "bytes"
    (the bytes of text the scored targets stand for) and "bpb_halves" (the bits per byte of the first and the
    second half of the scored targets).
    """
    if isinstance(sequences, (np.ndarray, torch.Tensor)) and sequences.ndim == 1:
        sequences = [sequences]
    sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
    context = min(context, lm.block_size)
    stride = stride or max(1, context // 2)
    if not 1 <= stride <= context:
        raise InputError(f"--stride={stride} must be between 1 and the context ({context} tokens for {lm.name})")
    if batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {batch_size}")
    top = max((int(s.max()) for s in sequences if s.size), default=0)
    if top >= lm.vocab_size:
        raise InputError(f"token id {top} is outside {lm.name}'s vocabulary of {lm.vocab_size}")
    nll, hit = score_tokens(lm, sequences, context, stride, batch_size, progress, desc)
    out = dict(summarize(nll, hit, word_lens), context=context, stride=stride)
    if byte_lengths is not None:
        sums = [nats_and_bytes(n, s[1:], byte_lengths) for n, s in zip(nll, sequences)]
        nats_sum, byte_count = sum(n for n, _ in sums), sum(b for _, b in sums)
        out["bytes"] = byte_count
        out["bpb"] = bits_per_byte(nats_sum, byte_count) if byte_count else None
        # the scored targets' first and second half, each on its own: two models' difference in the halves
        # tells the text sample's share of a comparison's noise (reproduce.py's split-half estimate)
        nll_all, targets_all = np.concatenate(nll), np.concatenate([s[1:] for s in sequences])
        half = len(targets_all) // 2
        halves = [nats_and_bytes(nll_all[a:b], targets_all[a:b], byte_lengths)
                  for a, b in ((0, half), (half, len(targets_all)))]
        if all(b for _, b in halves):
            out["bpb_halves"] = [bits_per_byte(n, b) for n, b in halves]
    return out


def text_bytes(name, documents):
    """The UTF-8 bytes of a text benchmark's documents (WikiText articles): what its bits per byte is over
    when every article is scored."""
    return sum(len(doc.encode("utf-8")) for doc in documents) if BENCHMARKS[name].kind == "wikitext" else None

# -----------------------------------------------------------------------------
# HellaSwag (multiple choice, scored as lm-evaluation-harness 0.4.13's task `hellaswag` does)


def hellaswag_preprocess(text):
    """lm_eval/tasks/hellaswag/utils.py `preprocess`: strip, WikiHow's ' [title]' -> '. ', drop other
    [bracketed] artifacts, then one pass of double space -> single space."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_examples(rows):
    """HellaSwag rows -> [(query, endings, gold)] as the harness's process_docs builds them: query =
    preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), endings preprocessed."""
    examples = []
    for i, row in enumerate(rows):
        try:
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
            endings = [hellaswag_preprocess(e) for e in row["endings"]]
            gold = int(row["label"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"HellaSwag row {i} is not a HellaSwag example (needs activity_label, ctx_a, ctx_b, "
                             f"endings, label): {type(e).__name__}: {e}") from e
        if not 0 <= gold < len(endings):
            raise InputError(f"HellaSwag row {i}: label {gold} is not an index into its {len(endings)} endings")
        examples.append((query, endings, gold))
    return examples


def hellaswag_loglikelihoods(lm, examples, batch_size=8, max_tokens=0, progress=False):
    """Per example, the log-likelihood of each ending given the query, as the harness requests it
    (context = query, continuation = " " + ending, the pair encoding of scoring.encode_pair, the model's
    whole block_size as context). Returns (loglikelihoods per example, gold continuations' token ids)."""
    pairs, owners, gold_tokens, total = [], [], [], 0
    for n, (query, endings, gold) in enumerate(examples):
        encoded = [encode_pair(lm, query, " " + ending) for ending in endings]
        pairs += encoded
        owners += [n] * len(endings)
        gold_tokens.append(np.asarray(encoded[gold][0] + encoded[gold][1], dtype=np.int64))
        total += sum(len(cont) for _, cont in encoded)
        if max_tokens and total >= max_tokens:
            break  # whole examples only
    scores = continuation_scores(lm, pairs, batch_size, progress, desc=f"{lm.name} hellaswag")
    lls = [[] for _ in gold_tokens]
    for n, (logprob, _) in zip(owners, scores):
        lls[n].append(logprob)
    return lls, gold_tokens


def hellaswag_metrics(examples, lls):
    """acc (argmax of the log-likelihoods) and acc_norm (argmax of log-likelihood / the ending's length
    in characters: lm_eval 0.4.13's acc_norm divides by len(choice), the ending without the leading space;
    its acc_bytes uses UTF-8 bytes), in %, over the examples that were scored."""
    acc = acc_norm = 0
    for (_, endings, gold), ll in zip(examples, lls):
        ll = np.asarray(ll, dtype=np.float64)
        acc += int(np.argmax(ll) == gold)
        acc_norm += int(np.argmax(ll / np.array([float(len(e)) for e in endings])) == gold)
    n = len(lls)
    return {"mc_acc": 100.0 * acc / n, "mc_acc_norm": 100.0 * acc_norm / n, "examples": n}

# -----------------------------------------------------------------------------
# Models and the table

METRIC_ROWS = [  # (key, label, cell); a row is shown for a benchmark if some model has its key
    ("loss", "loss", lambda m: f"{m['loss']:.4f}"),
    ("bpb", "bits per byte", lambda m: "-" if m["bpb"] is None else
     f"{m['bpb']:.4f}" + (f" ({m['floor_label']})" if m.get("floor_label") else "")),
    ("ppl", "perplexity", lambda m: f"{m['ppl']:.2f}"),
    ("acc", "top-1 acc (%)", lambda m: f"{m['acc']:.2f}"),
    ("last_word_acc", "last-word acc (%)", lambda m: f"{m['last_word_acc']:.2f}"),
    ("last_word_ppl", "last-word perplexity", lambda m: f"{m['last_word_ppl']:.2f}"),
    ("mc_acc_norm", "acc_norm (%), length-normalised", lambda m: f"{m['mc_acc_norm']:.2f}"),
    ("mc_acc", "acc (%)", lambda m: f"{m['mc_acc']:.2f}"),
    ("examples", "examples", lambda m: f"{m['examples']:,}"),
    ("misalignment", "misalignment (lens.py)", lambda m: "-" if m["misalignment"] is None else f"{m['misalignment']:.3f}"),
    ("tokens", "tokens scored", lambda m: f"{m['tokens']:,}"),
    ("bytes", "bytes scored", lambda m: f"{m['bytes']:,}"),
    ("context", "context / stride", lambda m: f"{m['context']} / {m['stride']}"),
]


def floor_rows(floors, n_models):
    """The reference rows of a benchmark's floors (floors.data_floors): 'nats / bits per byte' in every column."""
    return [["", f"{name} floor of the val split (nats / bits per byte)"]
            + [f"{floors[name]['nats']:.4f} / {floors[name]['bpb']:.4f}"] * n_models for name in ("unigram", "bigram")]


def format_table(results, floors=None):
    """Markdown table like the paper's Table II: rows = benchmark x metric, one column per model.

    results: {model name: {benchmark name: metrics dict}} (what run() returns as results["models"]).
    floors: {benchmark name: floors.data_floors dict} (run()'s results["floors"]): reference rows.
    """
    models = list(results)
    rows = []
    for b in (b for b in BENCHMARKS if any(b in results[m] for m in models)):
        first = True
        for key, label, cell in METRIC_ROWS:
            metrics = [results[m].get(b, {}) for m in models]
            if not any(key in m for m in metrics):
                continue
            rows.append([BENCHMARKS[b].title if first else "", label] + [cell(m) if key in m else "-" for m in metrics])
            first = False
        if floors and floors.get(b):
            rows += floor_rows(floors[b], len(models))
    return markdown_table(["benchmark", "metric"] + models, rows, align=["left", "left"] + ["right"] * len(models))


# digits of each metric in the tables of groups (the per-run table's precision)
GROUP_DIGITS = {"loss": 4, "bpb": 4, "ppl": 2, "acc": 2, "last_word_acc": 2, "last_word_ppl": 2, "mc_acc_norm": 2, "mc_acc": 2,
                "misalignment": 3}


def summarize_groups(groups, baseline, models):
    """({label: {"runs", "seeds", "metrics"}}, {label: paired differences}) of groups of runs: "metrics" is
    groups.summarize of the runs' {benchmark: metrics} (describe() at every number), the differences are
    groups.differences against the baseline group (None: no paired comparison) for every other group with seeds."""
    summary = {g.label: {"runs": [run.name for run in g.runs], "seeds": g.seeds,
                         "metrics": summarize_runs([models[run.name] for run in g.runs])} for g in groups}
    diffs = {g.label: differences(g, baseline, models) for g in groups
             if baseline is not None and g is not baseline and g.pairable}
    return summary, diffs


def format_group_tables(groups, baseline, summary, diffs, floors=None):
    """Markdown: every group's metrics (mean ± 95% interval, sd) and the paired differences from the baseline;
    below them the floors (floors.data_floors per benchmark), if any, and the groups whose mean bits per byte
    is above the bigram floor."""
    metrics = {label: s["metrics"] for label, s in summary.items()}
    rows = []
    for b in BENCHMARKS:
        present = [(key, label) for key, label, _ in METRIC_ROWS if key in GROUP_DIGITS
                   and any(lookup(metrics[g.label], (b, key)) is not None for g in groups)]
        rows += [([BENCHMARKS[b].title if i == 0 else "", label], (b, key), GROUP_DIGITS[key])
                 for i, (key, label) in enumerate(present)]
    text = group_tables(rows, ["benchmark", "metric"], groups, metrics, diffs, baseline)
    for b, floor in (floors or {}).items():
        if not floor:
            continue
        above = [g.label for g in groups if floor_label((lookup(metrics[g.label], (b, "bpb")) or {}).get("mean"), floor)]
        text += (f"\n\n{BENCHMARKS[b].title} floors (val split, counted on train): " + "; ".join(
            f"{name} {floor[name]['nats']:.4f} nats/token, {floor[name]['bpb']:.4f} bits/byte" for name in ("unigram", "bigram"))
            + (f". Mean bits per byte above the bigram floor: {', '.join(above)}." if above else
               ". Every group's mean bits per byte is below the bigram floor."))
    return text


def _write_outputs(out_dir, results, table):
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), results, indent=2)
    write_text(os.path.join(out_dir, "results.md"), table + "\n")


def benchmark_misalignment(lm, sequences, context, n_windows, translators=None):
    """lens.py's misalignment score of lm on the first n_windows windows of the benchmark's tokens: windows of
    context + 1 tokens back to back along each sequence (a stream), or whole shorter sequences (LAMBADA
    passages), one window per forward."""
    windows = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        length = min(context + 1, len(seq))
        for start in range(0, len(seq) - length + 1, length):
            if len(windows) == n_windows:
                break
            windows.append(torch.from_numpy(seq[start:start + length])[None])
        if len(windows) == n_windows:
            break
    windows = [w for w in windows if w.size(1) >= 2]
    options = LensOptions(lens="logit" if translators is None else "tuned")
    return analyze_model(lm, windows, options, progress=False, translators=translators)["misalignment"] if windows else None


def saved_translators(lm, settings):
    """lens='tuned': the translators analyze.py --lens=tuned saved for lm (tied to its weights), else None."""
    if settings["lens"] == "logit" or not settings["misalignment_windows"]:
        return None
    path = translator_path(lm, settings["out_dir"])
    if not os.path.exists(path):
        raise InputError(f"lens='tuned' but {lm.name} has no tuned-lens translators at {path}: train them once with "
                         f"python analyze.py --lens=tuned (same model), or use --lens=logit")
    return load_translators(path, lm)[0]


def check_settings(settings):
    """Every check that needs no data or model (SettingError naming the setting)."""
    check_benchmark_names(settings["benchmarks"])
    for key, low in (("context", 1), ("batch_size", 1), ("stride", 0), ("max_tokens", 0), ("misalignment_windows", 0)):
        if settings[key] < low:
            raise SettingError(f"{key} must be >= {low}, got {settings[key]}")
    if settings["lens"] not in ("logit", "tuned"):
        raise SettingError(f"lens must be 'logit' or 'tuned', got {settings['lens']!r}")
    dtype_from_name(settings["dtype"])
    set_threads(settings["threads"])


def run(settings, lms=None):
    """Evaluate every model on every benchmark; writes out_dir/results.{md,json}; returns the results.

    settings: DEFAULTS with overrides. lms: already-loaded models to use instead of --ckpt/--hf.
    Returns {"settings": ..., "models": {name: {benchmark: metrics}}, "sources": {name: spec}}.
    """
    check_settings(settings)
    check_out_dir(settings["out_dir"])  # before hours of work, not after
    groups = model_groups(settings["ckpt"], settings["hf"]) if lms is None else None
    if settings["baseline_group"] and not groups:
        raise SettingError("baseline_group names a group of seeds: give --ckpt groups (quoted patterns or label=pattern)")
    baseline = baseline_of(groups, settings["baseline_group"]) if groups else None  # seeds pair up, or an error now
    names = settings["benchmarks"]
    data = {name: load_benchmark(name, settings) for name in names}  # all data present before any model loads
    if lms is None:
        ckpt = [run.path for g in groups for run in g.runs if not run.hf] if groups else settings["ckpt"]
        lms = load_models(ckpt, settings["hf"], settings["device"], settings["dtype"])
    results = {"settings": {k: settings[k] for k in DEFAULTS}, "models": {}, "sources": {}}
    # the n-gram floors of shards benchmarks read from a prepared folder (cached there in floors.json)
    floors = {name: shards_floors(data[name]) for name in names if BENCHMARKS[name].kind == "shards"}
    floors = {name: f for name, f in floors.items() if f is not None}
    if floors:
        results["floors"] = floors
    token_cache = {}  # tokenizing is shared by models with the same tokenizer
    for lm in lms:  # a generator: one model in memory at a time
        metrics = {}
        translators = saved_translators(lm, settings)
        for name in names:
            if BENCHMARKS[name].kind == "hellaswag":
                lls, gold_tokens = hellaswag_loglikelihoods(lm, data[name], settings["batch_size"],
                                                            settings["max_tokens"], settings["progress"])
                metrics[name] = hellaswag_metrics(data[name], lls)
                if settings["misalignment_windows"]:  # on the queries with their right endings
                    metrics[name]["misalignment"] = benchmark_misalignment(
                        lm, gold_tokens, min(settings["context"], lm.block_size), settings["misalignment_windows"],
                        translators)
                print(f"{lm.name} HellaSwag: acc_norm {metrics[name]['mc_acc_norm']:.4g}, "
                      f"acc {metrics[name]['mc_acc']:.4g} ({metrics[name]['examples']} examples)")
                continue
            key = (lm.tokenizer_id, name)
            if key not in token_cache:
                try:
                    token_cache[key] = benchmark_tokens(name, data[name], lm, settings["max_tokens"])
                except ValueError as e:  # e.g. an HF model saved without its tokenizer
                    raise InputError(f"{lm.name}: {e}") from e
            sequences, word_lens = token_cache[key]
            byte_lengths = token_byte_lengths(lm.text_tokenizer) if lm.text_tokenizer is not None else None
            metrics[name] = evaluate(lm, sequences, settings["context"], settings["stride"], settings["batch_size"],
                                     word_lens, settings["progress"], desc=f"{lm.name} {name}", byte_lengths=byte_lengths)
            if byte_lengths is not None and not settings["max_tokens"] and text_bytes(name, data[name]) is not None:
                metrics[name]["text_bytes"] = text_bytes(name, data[name])
                if metrics[name]["text_bytes"] != metrics[name]["bytes"]:
                    print(f"note: {lm.name} {BENCHMARKS[name].title}: its tokens stand for {metrics[name]['bytes']:,} "
                          f"bytes, the text has {metrics[name]['text_bytes']:,} (a tokenizer that adds a space before "
                          "a text's first word, e.g. SentencePiece); bits per byte uses the tokens' count")
            if name in floors and metrics[name].get("bpb") is not None:
                metrics[name]["floor_label"] = floor_label(metrics[name]["bpb"], floors[name])
            if settings["misalignment_windows"]:
                metrics[name]["misalignment"] = benchmark_misalignment(
                    lm, sequences, min(settings["context"], lm.block_size), settings["misalignment_windows"], translators)
            print(f"{lm.name} {BENCHMARKS[name].title}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in metrics[name].items() if isinstance(v, float)))
        results["models"][lm.name] = metrics
        results["sources"][lm.name] = lm.source
        _write_outputs(settings["out_dir"], results, format_table(results["models"], floors))
        del lm  # free one model before the next is loaded
    table = format_table(results["models"], floors)
    if groups:
        summary, diffs = summarize_groups(groups, baseline, results["models"])
        results["groups"] = summary
        results["differences"] = {"baseline": baseline and baseline.label, "groups": diffs,
                                  "test": "two-sided paired t-test over seeds (stats.py)"}
        table = format_group_tables(groups, baseline, summary, diffs, floors) + "\n\nEvery run:\n\n" + table
        _write_outputs(settings["out_dir"], results, table)
    print()
    print(table)
    print(f"\nwrote {os.path.join(settings['out_dir'], 'results.md')} and results.json")
    return results


def main(argv=None):
    """The command line: settings from argv (default sys.argv), then run(); errors exit by common.run_main."""
    return run_main(lambda: run(configure(DEFAULTS, sys.argv[1:] if argv is None else argv, EXTRA_TYPES,
                                          help_from=__file__)))


if __name__ == "__main__":
    main()
