"""nanoshift's library: what the entry points at the repository root (train.py, analyze.py, eval_benchmarks.py,
...) share. model.py stays at the root, the one file a researcher edits; nothing here imports an entry point."""
