# The reproduction's baseline (python reproduce.py: baseline, two cuts and the layer gate over 12 seeds on CPU; the
# lab and depth studies build on it too): the demo's recipe, nanoGPT's CPU recipe (config/recipe_nanogpt.py: 4 x 128,
# 64 bytes of context, 2,000 steps of 768 bytes), with one torch thread per run (reproduce.py runs two at once on 2
# cores). By hand, after reproduce.py's prepare step:
#   python seeds.py config/repro.py --seeds 1 2 3      (config/repro_cut.py, repro_cut_mid.py, repro_gate.py alike)
# Why this scale is in reproduce.py's docstring.
exec(open("config/recipe_nanogpt.py").read())

out_dir = "out-repro/baseline"  # seeds.py adds -s<seed>
threads = 1
# 8 evals of nanoGPT's 15,360 val bytes over training (the comparison is eval_benchmarks.py's, on 128 KiB)
track_alignment = True  # the shift over training, at every eval (cheap with 257 logits)
track_sequences = 16
save_optimizer_at_end = False  # a finished run keeps its weights only: ~70 runs stay ~150 MB
