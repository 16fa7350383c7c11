"""
OpenWebText -> GPT-2 uint16 token shards for train.py / eval_benchmarks.py.

    python prepare_owt.py                              # Skylion007/openwebtext (parquet export) -> data/openwebtext
    python prepare_owt.py --streaming --max_tokens 100_000_000
    python prepare_owt.py --data_files 'owt/*.parquet' # local files (offline machines)
    python prepare_owt.py --source <other parquet mirror> --revision main

Settings use configurator.py (config files, --key=value or --key value, --key v1 v2 for
--data_files, bare --flag for booleans); `--help` lists them.

The original script-based `openwebtext` dataset does not load in current
`datasets`; the default reads the parquet export of Skylion007/openwebtext
(revision refs/convert/parquet). Change it with --source/--config/--revision.
Caution: the hub's automatic parquet export of a big dataset can be partial; the
full OpenWebText has 8,013,769 documents, which this script checks at the end.

As in nanoGPT, a random 0.0005 of the documents (seed 2357) form the val split,
decided per document from a hash of (seed, document index), so it streams.
Output: {out_dir}/openwebtext_{train,val}_{i:06d}.bin and _done.json (written last).
"""
from data import PREPARE_DEFAULTS, configure_prepare, run_prepare_script, hashed_split, prepare_from_settings

OWT_DOCUMENTS = 8_013_769  # documents in the full OpenWebText train split

DEFAULTS = dict(
    PREPARE_DEFAULTS,
    source="Skylion007/openwebtext",
    revision="refs/convert/parquet",
    out_dir="data/openwebtext",
    val_fraction=0.0005,  # fraction of documents in val
    seed=2357,  # seed of the val/train document split
)


def main(argv=None):
    settings = configure_prepare(DEFAULTS, argv)
    manifest = prepare_from_settings(settings, "openwebtext", hashed_split(settings["val_fraction"], settings["seed"]),
                                     {"val_fraction": settings["val_fraction"], "seed": settings["seed"]})
    if not settings["data_files"] and settings["max_tokens"] is None and manifest["documents_read"] != OWT_DOCUMENTS:
        print(f"warning: read {manifest['documents_read']:,} documents, but OpenWebText has {OWT_DOCUMENTS:,}; "
              f"the source is probably a partial parquet export (see --source/--revision)")


if __name__ == "__main__":
    run_prepare_script(main)
