# The demo's baseline (python demo.py runs it with demo_cut.py and demo_gate.py): config/recipe_bytes.py, the CPU
# recipe bench.py --section=recipe chose, on the Shakespeare corpus as bytes:
#   python prepare_fineweb.py --demo --tokenizer=bytes --out_dir=data/demo_bytes
#   python train.py config/demo.py        (config/demo_cut.py, config/demo_gate.py: the same with attenuation)
# 6 blocks x 128 (layerwise curves with some resolution), 128 bytes of context, 1,000 steps of 1,024 bytes
# (1.0M bytes, under a quarter of the train split: no text twice), ~2.5 minutes on one thread of an idle core.
exec(open("config/recipe_bytes.py").read())

out_dir = "out-demo-baseline"  # (demo.py puts its three runs in out-demo/)
# the demo's runs end at max_iters: keep their final ckpt.pt as weights only (a third of the size with AdamW's
# moments) and best.pt as a hard link to it. An interrupted run still resumes exactly: the checkpoints
# written before the end keep everything.
save_optimizer_at_end = False
threads = 0  # demo.py passes its own --threads; by hand: OMP_NUM_THREADS if set, else half the cores
