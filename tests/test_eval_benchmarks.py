"""eval_benchmarks.py: metrics equal hand computations, the sliding window scores each token once,
LAMBADA last-word accuracy from a model with known predictions, clear errors, and the CLI end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_benchmarks as eb
from nanoshift import scoring
from nanoshift.configurator import configure
from nanoshift import data
from nanoshift.data import EOT_TOKEN, get_tokenizer, shard_name, write_shard
from nanoshift.common import InputError
from conftest import write_checkpoint
from nanoshift.lm import LanguageModel, OurGPT, load_models, model_specs
from model import GPT, GPTConfig
from nanoshift.hf import from_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# real, repetitive text: every line repeats the previous one, so a longer context predicts better
# ("that" and "the" are followed by many different words; two or three words back decide which)
RHYME = """This is the house that Jack built.
This is the malt that lay in the house that Jack built.
This is the rat that ate the malt that lay in the house that Jack built.
This is the cat that killed the rat that ate the malt that lay in the house that Jack built.
This is the dog that worried the cat that killed the rat that ate the malt that lay in the house that Jack built.
This is the cow with the crumpled horn that tossed the dog that worried the cat that killed the rat that ate the malt that lay in the house that Jack built.
This is the maiden all forlorn that milked the cow with the crumpled horn that tossed the dog that worried the cat that killed the rat that ate the malt that lay in the house that Jack built.
"""


def rhyme_tokens():
    """The rhyme's GPT-2 tokens renumbered 0..k-1, so the tiny model needs only a 64-row vocabulary."""
    ids = get_tokenizer().encode_ordinary(RHYME)
    compact = {t: i for i, t in enumerate(sorted(set(ids)))}
    return np.array([compact[t] for t in ids], dtype=np.int64)


@pytest.fixture(scope="module")
def trained_lm():
    """A 2-layer GPT trained for 100 steps on the rhyme (~2 s): good with context, poor without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only cost time on a busy 2-core machine
    try:
        torch.manual_seed(0)
        stream = np.tile(rhyme_tokens(), 4)
        T = 16
        model = GPT(GPTConfig(block_size=T, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(100):
            starts = torch.randint(0, len(stream) - T - 1, (16,), generator=gen).tolist()
            x = torch.stack([torch.from_numpy(stream[i:i + T]) for i in starts])
            y = torch.stack([torch.from_numpy(stream[i + 1:i + T + 1]) for i in starts])
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5  # it has learned the rhyme
        yield OurGPT(model, "tiny")
    finally:
        torch.set_num_threads(threads)


def hand_metrics(nll, hit):
    loss = float(np.mean(nll))
    return {"loss": loss, "ppl": math.exp(loss), "acc": 100.0 * float(np.mean(hit)), "tokens": len(nll)}


def assert_metrics(got, expected, rel=1e-5):
    """got == expected; perplexities to rel 1e-4 (exp turns float32 rounding of a loss of ~10 into that)."""
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4 if "ppl" in key else rel, abs=1e-9), key


def window_logprobs(lm, tokens):
    """float64 log-softmax of lm's logits for one window of tokens (inputs only)."""
    with torch.no_grad():
        logits = lm.logits(torch.as_tensor(tokens, dtype=torch.long)[None])[0]
    return torch.log_softmax(logits.double(), dim=-1)

# -----------------------------------------------------------------------------
# 1. metrics equal a hand computation


def test_single_window_metrics_equal_hand_computation(trained_lm):
    seq = rhyme_tokens()[:16]  # 15 targets: one window of the 16-token context
    lp = window_logprobs(trained_lm, seq[:-1])
    targets = torch.from_numpy(seq[1:])
    nll = -lp[torch.arange(15), targets].numpy()
    hit = (lp.argmax(-1) == targets).numpy()
    got = eb.evaluate(trained_lm, seq)
    assert got["context"] == 16 and got["stride"] == 8  # clipped to block_size, half of it
    assert_metrics(got, hand_metrics(nll, hit))


def test_in_place_scoring_equals_cross_entropy_and_argmax():
    torch.manual_seed(0)
    logits = torch.randn(50, 1000) * torch.tensor([1.0, 30.0, 1e4]).repeat(17)[:50, None]  # tame to extreme
    targets = torch.randint(0, 1000, (50,))
    targets[::3] = logits[::3].argmax(-1)  # some hits
    expected_nll = F.cross_entropy(logits.double(), targets, reduction="none")
    expected_hit = logits.argmax(-1) == targets
    assert 0 < expected_hit.sum() < 50
    nll, hit = scoring.nll_and_hits_(logits.clone(), targets)
    assert torch.allclose(nll.double(), expected_nll, rtol=1e-5, atol=1e-4)
    assert torch.equal(hit, expected_hit)


def test_sliding_window_metrics_equal_hand_computation(trained_lm):
    """Target t (predicted from tokens < t) is scored in the first window if t <= context, else in the
    window that starts at k*stride, k the fewest strides whose window reaches t."""
    seq, context, stride = rhyme_tokens(), 16, 5
    n = len(seq)
    nll, hit, cache = [], [], {}
    for t in range(1, n):
        if t <= context:
            start, end = 0, min(context, n - 1)
        else:
            start = math.ceil((t - context) / stride) * stride
            end = min(start + context, n - 1)
        if (start, end) not in cache:
            cache[start, end] = window_logprobs(trained_lm, seq[start:end])
        row = cache[start, end][t - 1 - start]
        nll.append(-row[seq[t]].item())
        hit.append(row.argmax().item() == seq[t])
    expected = hand_metrics(nll, hit)
    assert 0 < expected["acc"] < 100  # a real mix of hits and misses
    for batch_size in (1, 3, 64):  # batching (and right-padding the short last window) changes nothing
        assert_metrics(eb.evaluate(trained_lm, seq, context=context, stride=stride, batch_size=batch_size), expected)

# -----------------------------------------------------------------------------
# 2. the sliding window


def test_window_plan_scores_every_target_exactly_once():
    for n in range(0, 50):
        for context in (1, 2, 5, 16):
            for stride in range(1, context + 1):
                counts = np.zeros(n + 1, dtype=int)  # counts[t]: times target t is scored
                plan = scoring.window_plan(n, context, stride)
                for w, (start, length, scored) in enumerate(plan):
                    assert 1 <= scored <= length <= context and start + length <= n - 1
                    if w == 0:
                        assert start == 0 and scored == length  # the first window scores all it predicts
                    targets = range(start + length - scored + 1, start + length + 1)
                    for t in targets:
                        counts[t] += 1
                        # every later target has at least context - stride tokens of context
                        assert t - start >= min(t, context - stride + 1)
                assert counts[0] == counts[n] == 0 and (counts[1:n] == 1).all(), (n, context, stride)


def test_stride_equal_to_context_is_plain_chunking(trained_lm):
    seq, T = rhyme_tokens(), 16
    total, hits, count = 0.0, 0, 0
    for i in range(0, len(seq) - 1, T):  # nanoGPT-style chunks: x = tokens[i:i+T], y = the next ones
        x, y = seq[i:i + T], seq[i + 1:i + T + 1]
        x = x[:len(y)]
        with torch.no_grad():
            logits = trained_lm.logits(torch.from_numpy(x)[None])[0]
        total += F.cross_entropy(logits, torch.from_numpy(y), reduction="sum").item()
        hits += (logits.argmax(-1) == torch.from_numpy(y)).sum().item()
        count += len(y)
    got = eb.evaluate(trained_lm, seq, context=T, stride=T)
    assert got["tokens"] == count == len(seq) - 1
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["acc"] == pytest.approx(100.0 * hits / count)


def test_smaller_stride_gives_lower_loss_on_trained_model(trained_lm):
    seq, context = rhyme_tokens(), 8
    chunked = eb.evaluate(trained_lm, seq, context=context, stride=context)
    for stride in (4, 2, 1):
        sliding = eb.evaluate(trained_lm, seq, context=context, stride=stride)
        assert sliding["tokens"] == chunked["tokens"] == len(seq) - 1
        # chunking predicts each window's first tokens almost without context; sliding never does
        assert sliding["loss"] < chunked["loss"] - 0.02, (stride, sliding["loss"], chunked["loss"])

# -----------------------------------------------------------------------------
# 3. LAMBADA last-word accuracy from a model with known predictions


class BigramOracle(LanguageModel):
    """An LM whose logits are set by hand: at each position, `margin` on table[current token]
    (token 0 when absent), 0 on every other token. Uses the GPT-2 tokenizer."""

    def __init__(self, table, margin=4.0):
        self.table, self.margin = table, margin
        self.name, self.source = "oracle", "test"
        self.block_size, self.vocab_size, self.eot = 64, 50257, EOT_TOKEN
        self.device = torch.device("cpu")
        self._enc = get_tokenizer()

    def encode(self, text):
        return self._enc.encode_ordinary(text)

    def logits(self, idx):
        nxt = torch.tensor([self.table.get(t, 0) for t in idx.flatten().tolist()]).view(idx.shape)
        return torch.zeros(*idx.shape, self.vocab_size).scatter_(-1, nxt.unsqueeze(-1), self.margin)


def test_lambada_last_word_accuracy_from_known_predictions(tmp_path):
    enc = get_tokenizer()
    cases = [  # (passage, how the oracle predicts the last word's tokens)
        ("She poured the tea and handed him a cup", "all"),  # a one-token word, predicted
        ("The name on the brass plate read Wojciechowski", "all"),  # several tokens, every one predicted
        ("Behind the glass they watched the hippopotamus", "first"),  # first token right, the next wrong
        ("He opened the door and saw his brother", "none"),  # first token wrong
    ]
    table, words = {}, []
    for passage, known in cases:
        context, word = passage.rsplit(" ", 1)
        ctx, w = enc.encode_ordinary(context), enc.encode_ordinary(" " + word)
        words.append(w)
        predicted = {"all": len(w), "first": 1, "none": 0}[known]  # word tokens the oracle gets right
        for j in range(predicted):  # the token before word token j -> word token j
            prev = ctx[-1] if j == 0 else w[j - 1]
            assert table.setdefault(prev, w[j]) == w[j]  # no clash between passages
    assert len(words[1]) >= 2 and len(words[2]) >= 2 and table.get(words[2][0]) != words[2][1]
    oracle = BigramOracle(table)

    # expected values, computed directly from the oracle's rule (no eval code involved)
    V, m = oracle.vocab_size, oracle.margin
    def nll_of(hit):
        return math.log(math.exp(m) + V - 1) - (m if hit else 0.0)
    nll, hit, word_nll, word_right = [], [], [], []
    for (passage, _), w in zip(cases, words):
        seq = [EOT_TOKEN] + enc.encode_ordinary(passage.rsplit(" ", 1)[0]) + w
        hits = [table.get(a, 0) == b for a, b in zip(seq[:-1], seq[1:])]
        nll += [nll_of(h) for h in hits]
        hit += hits
        word_nll.append(sum(nll_of(h) for h in hits[-len(w):]))
        word_right.append(all(hits[-len(w):]))
    assert word_right == [True, True, False, False]

    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p, _ in cases))
    settings = dict(eb.DEFAULTS, benchmarks=["lambada"], lambada_files=[str(path)], out_dir=str(tmp_path / "out"),
                    progress=False, misalignment_windows=0)  # an oracle has no hidden states for the lens
    got = eb.run(settings, lms=[oracle])["models"]["oracle"]["lambada"]
    assert got["last_word_acc"] == 50.0 and got["words"] == 4
    word_loss = float(np.mean(word_nll))
    assert_metrics(got, dict(hand_metrics(nll, hit), last_word_loss=word_loss, last_word_ppl=math.exp(word_loss)))
    assert "| LAMBADA | loss |" in (tmp_path / "out" / "results.md").read_text()


def test_lambada_word_split_follows_the_harness():
    assert eb.split_last_word("He said hello") == ("He said", " hello")
    assert eb.split_last_word("two  spaces") == ("two", "  spaces")  # trailing context spaces move over
    with pytest.raises(InputError, match="no 'context last-word' split"):
        eb.split_last_word("Alone")

# -----------------------------------------------------------------------------
# data handling


def test_wikitext_articles_same_from_hub_rows_and_raw_file():
    hub_rows = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Section = = \n", " More . \n", "",
                " = Beta = \n", "", " Beta text . \n"]
    raw_file = [" \n = Alpha = \n \n Alpha text . \n = = Section = = \n More . \n \n = Beta = \n \n Beta text . \n"]
    expected = [" = Alpha = \n Alpha text . \n = = Section = = \n More . \n", " = Beta = \n Beta text . \n"]
    assert data.wikitext_articles(hub_rows) == data.wikitext_articles(raw_file) == expected


def test_text_stream_is_separator_plus_encoded_articles(trained_lm, tmp_path):
    articles = [" = Alpha = \n Alpha text . \n", " = Beta = \n Beta text . \n"]
    enc = get_tokenizer()
    expected = [EOT_TOKEN] + enc.encode_ordinary(articles[0]) + [EOT_TOKEN] + enc.encode_ordinary(articles[1])
    (seq,), word_lens = eb.benchmark_tokens("wikitext103", articles, trained_lm)
    assert seq.tolist() == expected and word_lens is None
    (capped,), _ = eb.benchmark_tokens("wikitext103", articles, trained_lm, max_tokens=5)
    assert capped.tolist() == expected[:6]  # 5 targets


def test_model_names_are_run_folders_and_unique(tmp_path):
    for run in ("a/out", "b/out", "gate"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "ckpt.pt").write_bytes(b"")
    ckpts = [str(tmp_path / "a/out/ckpt.pt"), str(tmp_path / "b/out"), str(tmp_path / "gate")]
    specs = model_specs(ckpt=ckpts, hf=["gpt2"])
    assert [name for _, _, name in specs] == ckpts[:2] + ["gate", "gpt2"]  # the two "out" runs clash
    with pytest.raises(InputError, match="checkpoint not found: .*empty/ckpt.pt"):
        (tmp_path / "empty").mkdir()
        load_models(ckpt=[str(tmp_path / "empty")])  # checked before any model loads
    with pytest.raises(InputError, match="no models"):
        load_models()


def test_table_rows_are_benchmark_by_metric_with_a_column_per_model():
    wiki = {"loss": 3.0, "ppl": math.exp(3.0), "acc": 28.456, "tokens": 1000, "context": 1024, "stride": 512}
    lambada = dict(wiki, last_word_acc=33.3, last_word_ppl=40.0, words=10)
    table = eb.format_table({"base": {"wikitext103": wiki, "lambada": lambada}, "gate": {"wikitext103": wiki}})
    assert table.splitlines() == [
        "| benchmark | metric | base | gate |",
        "| --- | --- | ---: | ---: |",
        "| WikiText-103 | loss | 3.0000 | 3.0000 |",
        "|  | perplexity | 20.09 | 20.09 |",
        "|  | top-1 acc (%) | 28.46 | 28.46 |",
        "|  | tokens scored | 1,000 | 1,000 |",
        "|  | context / stride | 1024 / 512 | 1024 / 512 |",
        "| LAMBADA | loss | 3.0000 | - |",
        "|  | perplexity | 20.09 | - |",
        "|  | top-1 acc (%) | 28.46 | - |",
        "|  | last-word acc (%) | 33.30 | - |",
        "|  | last-word perplexity | 40.00 | - |",
        "|  | tokens scored | 1,000 | - |",
        "|  | context / stride | 1024 / 512 | - |",
    ]


def test_config_eval_file_is_valid():
    settings = configure(eb.DEFAULTS, [os.path.join(REPO, "config", "eval.py")], eb.EXTRA_TYPES)
    eb.check_settings(settings)
    assert settings["ckpt"] and all(isinstance(c, str) for c in settings["ckpt"])

# -----------------------------------------------------------------------------
# 4. clear errors


@pytest.fixture
def val_shard(tmp_path):
    enc = get_tokenizer()
    tokens = []
    for doc in RHYME.splitlines():
        tokens += [EOT_TOKEN] + enc.encode_ordinary(doc)
    path = tmp_path / shard_name("toy", "val", 0)
    write_shard(path, np.array(tokens, dtype=np.uint16))
    return str(path)


def main_error(capsys, argv, code=1):
    """main(argv) must exit with status `code` (2 a bad setting, 1 bad data) and no traceback; its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        eb.main(argv + ["--progress=False"])
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) >= 1
    return err


@pytest.fixture
def ckpt_file(tmp_path):
    """A file that passes the existence check; the errors below come before any model is loaded."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    return str(path)


def test_unknown_benchmark_is_a_clear_error(capsys, ckpt_file):
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "wikitext103", "lambda"], code=2)
    assert "unknown benchmark 'lambda'" in err and "did you mean 'lambada'" in err
    assert "'openwebtext', 'fineweb_edu'" in err  # the valid names are listed


def test_bad_numbers_are_clear_errors(capsys, ckpt_file):
    for setting, message in (("--context=0", "context must be >= 1"), ("--max_tokens=-5", "max_tokens must be >= 0"),
                             ("--batch_size=0", "batch_size must be >= 1")):
        assert "config error: " + message in main_error(capsys, ["--ckpt", ckpt_file, setting], code=2)


def test_missing_shards_say_how_to_make_them(capsys, ckpt_file, tmp_path):
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "openwebtext",
                              f"--openwebtext_shards={tmp_path}/nothing_val_*.bin"])
    assert "no OpenWebText token shards match" in err and "python prepare_owt.py" in err and "--openwebtext_shards" in err


def test_missing_local_files_name_the_setting(capsys, ckpt_file, tmp_path):
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "lambada", f"--lambada_files={tmp_path}/no.jsonl"])
    assert "--lambada_files" in err and "no input files match" in err


def test_an_empty_local_lambada_file_is_named_not_reported_as_a_hub_failure(capsys, ckpt_file, tmp_path):
    (tmp_path / "lambada.jsonl").write_text("")
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "lambada", f"--lambada_files={tmp_path}/lambada.jsonl"])
    assert "--lambada_files" in err and "lambada.jsonl'] is empty" in err and "hub" not in err


def test_hub_benchmark_offline_says_how_to_use_local_files(capsys, ckpt_file):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "lambada"])
    assert "EleutherAI/lambada_openai" in err and "offline" in err
    assert "--lambada_files" in err and "lambada_test.jsonl" in err
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "wikitext103"])
    assert "--wikitext103_files" in err and "wiki.test.raw" in err


def test_checkpoint_that_does_not_load_is_a_clear_error(capsys, tmp_path, val_shard):
    data = ["--benchmarks", "fineweb_edu", f"--fineweb_edu_shards={val_shard}"]
    err = main_error(capsys, ["--ckpt", str(tmp_path / "missing.pt")] + data)
    assert "checkpoint not found" in err and "missing.pt" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    err = main_error(capsys, ["--ckpt", str(bad)] + data)
    assert "could not load checkpoint" in err and "bad.pt" in err
    torch.save({"weights": {}}, tmp_path / "other.pt")
    err = main_error(capsys, ["--ckpt", str(tmp_path / "other.pt")] + data)
    assert "could not load checkpoint" in err and "not a training checkpoint" in err


def test_corrupt_shard_is_a_clear_error(capsys, ckpt_file, tmp_path, val_shard):
    with open(val_shard, "r+b") as f:
        f.truncate(os.path.getsize(val_shard) - 2)
    err = main_error(capsys, ["--ckpt", ckpt_file, "--benchmarks", "fineweb_edu", f"--fineweb_edu_shards={val_shard}"])
    assert "FineWeb-Edu" in err and os.path.basename(val_shard) in err and "truncated" in err


def test_shards_refused_for_a_model_with_another_tokenizer(val_shard):
    class ByteLM(BigramOracle):
        def encode(self, text):
            return list(text.encode())
    lm = ByteLM({})
    assert not lm.uses_gpt2_tokens()
    with pytest.raises(InputError, match="oracle does not use the GPT-2 tokenizer.*FineWeb-Edu"):
        eb.benchmark_tokens("fineweb_edu", [val_shard], lm)
    assert BigramOracle({}).uses_gpt2_tokens()  # the same model with GPT-2's tokenizer is accepted

# -----------------------------------------------------------------------------
# the command line, end to end: our checkpoint and the same weights as an HF model agree


def test_cli_ckpt_and_hf_model_of_the_same_weights_agree(tmp_path, val_shard):
    transformers = pytest.importorskip("transformers")
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    hf_dir = tmp_path / "hf-tiny"
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)  # no tokenizer files: lm.py uses GPT-2's
    model = from_pretrained(str(hf_dir))
    write_checkpoint(model, tmp_path / "ours")

    lines = RHYME.splitlines()
    rows = [" = The House = \n", ""] + [f" {line} \n" for line in lines[:4]] + [" = The Cow = \n"] + \
        [f" {line} \n" for line in lines[4:]]
    pq.write_table(pa.table({"text": rows}), tmp_path / "wikitext.parquet")
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": line.rstrip(".")}) + "\n" for line in lines))
    out_dir = tmp_path / "out"
    results = eb.main([f"--ckpt={tmp_path / 'ours'}", "--hf", str(hf_dir),
                       "--wikitext103_files", str(tmp_path / "wikitext.parquet"),
                       "--lambada_files", str(tmp_path / "lambada.jsonl"),
                       f"--openwebtext_shards={val_shard}", f"--fineweb_edu_shards={val_shard}",
                       "--max_tokens=100", "--stride=12", "--batch_size=3", f"--out_dir={out_dir}", "--progress=False"])
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["models"] == results["models"]
    ours, hf = saved["models"]["ours"], saved["models"]["hf-tiny"]
    assert list(ours) == list(hf) == ["wikitext103", "lambada", "openwebtext", "fineweb_edu"]
    for bench in ours:
        assert ours[bench]["context"] == 32 and ours[bench]["stride"] == 12
        for key, value in ours[bench].items():
            assert hf[bench][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (bench, key)
    assert ours["wikitext103"]["tokens"] == ours["openwebtext"]["tokens"] == 100
    assert ours["lambada"]["tokens"] >= 100 and ours["lambada"]["words"] < len(lines)  # whole passages
    table = (out_dir / "results.md").read_text()
    assert table.splitlines()[0] == "| benchmark | metric | ours | hf-tiny |"
    assert "|  | context / stride | 32 / 12 | 32 / 12 |" in table
    for row in ("| WikiText-103 | loss |", "| LAMBADA | loss |", "|  | last-word acc (%) |",
                "| OpenWebText | loss |", "| FineWeb-Edu | loss |", "|  | misalignment (lens.py) |"):
        assert row in table
    for bench in ours:  # the same weights read as our checkpoint and as an HF model: the same score
        assert 0 <= ours[bench]["misalignment"] <= 1 and hf[bench]["misalignment"] == pytest.approx(
            ours[bench]["misalignment"], abs=5e-3)  # float noise may flip a tie
