# config/repro.py with the same fixed cut in the middle of the stack (block 1 of 0-3, three before the last)
# instead of the last block: reproduce.py's second cut, which asks whether where the attenuation sits matters
exec(open("config/repro.py").read())

out_dir = "out-repro/cut_mid"
residual_mode = "cut"
cut_layer = -3  # counted from the end, so that a shallower model (reproduce.py --smoke's 3 blocks) has it too
cut_alpha = 0.5
