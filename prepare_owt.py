"""
OpenWebText -> token shards for train.py / eval_benchmarks.py (GPT-2 tokens; --tokenizer for another).

    python prepare_owt.py                              # Skylion007/openwebtext (parquet export) -> data/openwebtext
    python prepare_owt.py --streaming --max_tokens 100_000_000
    python prepare_owt.py --data_files 'owt/*.parquet' # local files (offline machines)
    python prepare_owt.py --source <other parquet mirror> --revision main

Settings use configurator.py (config files, --key=value or --key value, --key v1 v2 for
--data_files, bare --flag for booleans); `--help` lists and describes them.

The original script-based `openwebtext` dataset does not load in current
`datasets`; the default reads the parquet export of Skylion007/openwebtext
(revision refs/convert/parquet). Change it with --source/--config/--revision.
Caution: the hub's automatic parquet export of a big dataset can be partial; the
full OpenWebText has 8,013,769 documents, which this script checks at the end.

As in nanoGPT, a random 0.0005 of the documents (seed 2357) form the val split,
decided per document from a hash of (seed, document index), so it streams.
Output: {out_dir}/openwebtext_{train,val}_{i:06d}.bin and _done.json (written last).
Exit status: 0 done, 1 bad or missing input, 2 a bad setting.
"""
import sys

from nanoshift import prepare
from nanoshift.common import SettingError, run_main
from nanoshift.configurator import configure
from nanoshift.prepare import PREPARE_DEFAULTS, check_prepare_settings, hashed_split

OWT_DOCUMENTS = 8_013_769  # documents in the full OpenWebText train split

DEFAULTS = dict(
    PREPARE_DEFAULTS,
    source="Skylion007/openwebtext",
    revision="refs/convert/parquet",
    out_dir="data/openwebtext",
    val_fraction=0.0005,  # fraction of documents in val, in (0, 1)
    seed=2357,  # seed of the val/train document split
)


def run(argv):
    settings = configure(DEFAULTS, argv, help_from=[__file__, prepare.__file__])
    check_prepare_settings(settings)
    if not 0 < settings["val_fraction"] < 1:
        raise SettingError(f"val_fraction must be in (0, 1), got {settings['val_fraction']}")
    manifest = prepare.prepare_from_settings(
        settings, "openwebtext", hashed_split(settings["val_fraction"], settings["seed"]),
        {"val_fraction": settings["val_fraction"], "seed": settings["seed"]})
    if not settings["data_files"] and settings["max_tokens"] is None and manifest["documents_read"] != OWT_DOCUMENTS:
        print(f"warning: read {manifest['documents_read']:,} documents, but OpenWebText has {OWT_DOCUMENTS:,}; "
              f"the source is probably a partial parquet export (see --source/--revision)")


def main(argv=None):
    """The command line: errors exit by common.run_main (2 a bad setting, 1 bad input)."""
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
