"""Shared test fixtures: offline settings, real prose, tiny models and checkpoints, tiny shards."""
import os

# Tests never touch the network: the HuggingFace hub is unreachable on CI machines (set before any import
# that reads these).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pydoc_data.topics  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from prepare import first_tokens_split, prepare_shards  # noqa: E402

# Real multi-paragraph prose with what trips tokenisers up: unicode, digits, code,
# odd whitespace, a literal "<|endoftext|>" that must stay ordinary text, and
# documents with no text at all (skipped).
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


@pytest.fixture(scope="session")
def prose_shards(tmp_path_factory):
    """Shards of real English prose: the ~80 sections of Python's language reference (ships with CPython),
    written by prepare.py's shard writer (a finished prepare: _done.json); the first ~8k tokens are the
    val split. Returns the folder."""
    out = tmp_path_factory.mktemp("pydoc_shards")
    documents = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    prepare_shards(documents, str(out), "pydoc", first_tokens_split(8000), shard_tokens=40_000, progress=False)
    return str(out)
