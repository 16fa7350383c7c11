"""Shared test fixtures: offline settings, real prose, tiny models and checkpoints, tiny shards."""
import os
import sys

# Tests never touch the network: the HuggingFace hub is unreachable on CI machines (set before any import
# that reads these).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pydoc_data.topics  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest.ini runs the tests on every core (pytest-xdist, -n auto): one torch thread per worker, so the workers do
# not fight over the cores (the entry points the tests start use OMP_NUM_THREADS=1 or half the cores themselves)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from nanoshift.checkpoint import save_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from nanoshift.prepare import first_tokens_split, prepare_shards  # noqa: E402

# Real multi-paragraph prose with what trips tokenisers up: unicode, digits, code,
# odd whitespace, a literal "<|endoftext|>" that must stay ordinary text, and
# documents with no text at all (skipped).
DOCUMENTS = [
    "The Tragedy of Hamlet, Prince of Denmark\n\nACT I. Scene I. Elsinore. A platform before the castle.\n\n"
    "Bernardo. Who's there?\nFrancisco. Nay, answer me: stand, and unfold yourself.\n",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions,\n"
    "water is split and O\u2082 is released; the Calvin cycle then fixes 6 CO\u2082 into one glucose molecule.\n\n"
    "Plants absorb mostly red (≈680 nm) and blue (≈450 nm) light, which is why leaves look green.\n",
    "",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fib(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\n",
    "   \n\t  \n",
    "Les élèves ont étudié la Révolution française de 1789 à 1799. Über 80% bestanden die Prüfung.\n"
    "日本語のテキストも含まれています。 Emoji too: 🚀🌍.\n\n\n   Trailing spaces and tabs\t\t\n",
    "A model card said: <|endoftext|> is just text here, not the special token.\n",
    "In 1905, Einstein published four papers. The third introduced special relativity; the fourth,\n"
    "E = mc^2. " * 12,
    "Short.",
]


# a model that runs in milliseconds; vocab_size covers GPT-2 token ids, so it can read real shards
# two ranks on this machine (gloo), as the multi-process tests launch train.py and their own workers
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50304)


def tiny_gpt(seed=0, **config):
    """A tiny GPT (TINY_GPT, overridden by config) with seeded random weights."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY_GPT, **config})).eval()


def write_checkpoint(model, folder, name="ckpt.pt", **extra):
    """model as a checkpoint (what GPT.from_checkpoint needs: 'model', 'model_args', plus extra keys) in
    folder/name, the way train.py writes it; returns the folder (a run dir) as a string."""
    os.makedirs(folder, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_args": model.config.to_dict(), **extra},
                    os.path.join(folder, name))
    return str(folder)


def pydoc_documents():
    """The ~80 sections of Python's language reference (ships with CPython): real English prose."""
    return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]


def save_tiny_tokenizer(folder, texts=None, vocab_size=400, bos=True, words=None):
    """A small HF tokenizer, built offline and saved with save_pretrained in folder; returns the folder.

    Default: a byte-level BPE trained on texts (default: the pydoc prose), Llama-style: <s> (BOS, put
    before every text by default), </s> (EOS), <unk>. bos=False: no BOS token (then </s> separates
    documents). words: a WordLevel vocabulary of these words instead (whitespace split), for large vocabularies.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if bos else ["<unk>", "</s>"]
    if words is not None:
        vocab = {t: i for i, t in enumerate(specials + list(words))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts or pydoc_documents(), trainer)
    kwargs = dict(eos_token="</s>", unk_token="<unk>")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        kwargs["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(folder))
    return str(folder)


def save_tiny_llama(folder, vocab_size, seed=0, n_layer=2, hidden=32, heads=4, kv_heads=2, tied=False):
    """A random tiny transformers LlamaForCausalLM saved in folder (next to a tokenizer, if one is there);
    every weight moved off its init so a wrong import shows. Returns the HF model (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   intermediate_size=2 * hidden + 8, num_hidden_layers=n_layer, vocab_size=vocab_size,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="session")
def prose_shards(tmp_path_factory):
    """Shards of real English prose: the ~80 sections of Python's language reference (ships with CPython),
    written by prepare.py's shard writer (a finished prepare: _done.json); the first ~8k tokens are the
    val split. Returns the folder."""
    out = tmp_path_factory.mktemp("pydoc_shards")
    prepare_shards(pydoc_documents(), str(out), "pydoc", first_tokens_split(8000), shard_tokens=40_000, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(HF dir with a tiny random LlamaForCausalLM + its own 400-token BPE tokenizer, the HF model, prose shards
    tokenized with that tokenizer): what a retrofit starts from."""
    from nanoshift.data import get_tokenizer

    hf_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("hf_llama"))
    hf = save_tiny_llama(hf_dir, get_tokenizer(hf_dir).n_vocab)
    data = str(tmp_path_factory.mktemp("llama_shards"))
    prepare_shards(pydoc_documents(), data, "pydoc", first_tokens_split(8000), shard_tokens=40_000, progress=False,
                   tokenizer=hf_dir)
    return hf_dir, hf, data


def bpe_prose_shards(folder, split_tokens, shard_tokens):
    """Prose shards in a 400-token BPE fitted for the test (a model vocabulary of 512: steps take milliseconds):
    {"shards": folder, "tokenizer": its folder}."""
    tokenizer = save_tiny_tokenizer(folder / "tokenizer")
    prepare_shards(pydoc_documents(), str(folder / "shards"), "pydoc", first_tokens_split(split_tokens),
                   shard_tokens=shard_tokens, progress=False, tokenizer=tokenizer)
    return {"shards": str(folder / "shards"), "tokenizer": tokenizer}
