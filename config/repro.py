# The reproduction's baseline (python reproduce.py: baseline, two cuts and the layer gate over 12 seeds on CPU):
# the demo's recipe, config/recipe_bytes.py, with one torch thread per run (reproduce.py runs two at once on 2
# cores). By hand, after reproduce.py's prepare step:
#   python seeds.py config/repro.py --seeds 1 2 3      (config/repro_cut.py, repro_cut_mid.py, repro_gate.py alike)
# Why this scale is in reproduce.py's docstring.
exec(open("config/recipe_bytes.py").read())

out_dir = "out-repro/baseline"  # seeds.py adds -s<seed>
threads = 1
# the recipe's 1,000 steps (1.0M bytes, no text twice) and 5 evals of the first 32 KiB of val (the comparison is
# eval_benchmarks.py's, on 128 KiB)
track_sequences = 8  # the shift over training, at every eval (cheap with 257 logits)
save_optimizer_at_end = False  # a finished run keeps its weights only: 48 runs stay ~250 MB
