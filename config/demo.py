# The demo's baseline (python demo.py runs it with demo_cut.py and demo_gate.py): the CPU recipe that learned
# most per CPU-minute in `python bench.py --section=recipe` (docs/recipe.md): nanoGPT's documented CPU recipe,
# config/recipe_nanogpt.py, on the Shakespeare corpus as bytes:
#   python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
#   python train.py config/demo.py        (config/demo_cut.py, config/demo_gate.py: the same with attenuation)
# 4 blocks x 128, 64 bytes of context, 2,000 steps of 768 bytes (1.5M bytes, a third of the train split: no text
# twice), lr 1e-3 cosine to 1e-4; ~2.2 minutes on one thread of an idle core.
exec(open("config/recipe_nanogpt.py").read())

out_dir = "out-demo-baseline"  # (demo.py puts its three runs in out-demo/)
# the shift over training: the lens on 16 val windows of 64 bytes at every eval (cheap with 257 logits)
track_alignment = True
track_sequences = 16
save_best = True
# the demo's runs end at max_iters: keep their final ckpt.pt as weights only (a third of the size with AdamW's
# moments) and best.pt as a hard link to it. An interrupted run still resumes exactly: the checkpoints
# written before the end keep everything.
save_optimizer_at_end = False
threads = 0  # demo.py passes its own --threads; by hand: OMP_NUM_THREADS if set, else half the cores
