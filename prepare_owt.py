"""
OpenWebText -> GPT-2 uint16 token shards for train.py / eval_benchmarks.py.

    python prepare_owt.py                              # Skylion007/openwebtext (parquet export) -> data/openwebtext
    python prepare_owt.py --streaming --max_tokens 100_000_000
    python prepare_owt.py --data_files 'owt/*.parquet' # local files (offline machines)
    python prepare_owt.py --source <other parquet mirror> --revision main

The original script-based `openwebtext` dataset does not load in current
`datasets`; the default reads the parquet export of Skylion007/openwebtext
(revision refs/convert/parquet). Change it with --source/--config/--revision.
Caution: the hub's automatic parquet export of a big dataset can be partial; the
full OpenWebText has 8,013,769 documents, which this script checks at the end.

As in nanoGPT, a random 0.0005 of the documents (seed 2357) form the val split,
decided per document from a hash of (seed, document index), so it streams.
Output: {out_dir}/openwebtext_{train,val}_{i:06d}.bin and _done.json (written last).
"""
import argparse

from data import add_prepare_arguments, hashed_split, prepare_from_args

OWT_DOCUMENTS = 8_013_769  # documents in the full OpenWebText train split

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_prepare_arguments(parser, source="Skylion007/openwebtext", revision="refs/convert/parquet",
                      out_dir="data/openwebtext")
parser.add_argument("--val_fraction", type=float, default=0.0005, help="fraction of documents in val")
parser.add_argument("--seed", type=int, default=2357, help="seed of the val/train document split")

if __name__ == "__main__":
    args = parser.parse_args()
    manifest = prepare_from_args(args, "openwebtext", hashed_split(args.val_fraction, args.seed),
                                 {"val_fraction": args.val_fraction, "seed": args.seed})
    if not args.data_files and args.max_tokens is None and manifest["documents_read"] != OWT_DOCUMENTS:
        print(f"warning: read {manifest['documents_read']:,} documents, but OpenWebText has {OWT_DOCUMENTS:,}; "
              f"the source is probably a partial parquet export (see --source/--revision)")
