"""What a new user meets first: --help describes every setting of every entry point, one exit-code rule
(2 a bad setting, 1 bad or missing data) with no traceback and no new folder left behind, the CPU thread
setting, the demo's disk footprint, and a results page (docs/results.md) that quotes the demo's own summary."""
import os
import re
import subprocess
import sys

import torch

import analyze
from nanoshift.common import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["train.py", "analyze.py", "eval_benchmarks.py", "prepare_fineweb.py", "prepare_owt.py", "demo.py",
                "bench.py", "convert_checkpoint.py", "export_checkpoint.py", "seeds.py", "reproduce.py"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_all(commands, cwd=ROOT):
    """Run the commands side by side (they mostly wait on imports); their CompletedProcess-like results."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_every_entry_point_help_describes_every_setting():
    results = run_all([[sys.executable, script, "--help"] for script in ENTRY_POINTS])
    for script, result in zip(ENTRY_POINTS, results):
        assert result.returncode == 0, (script, result.stderr)
        lines = result.stdout.splitlines()
        settings = [i for i, line in enumerate(lines) if re.match(r"  --\w+ +=", line)]
        assert settings, (script, result.stdout)
        for i in settings:
            described = i + 1 < len(lines) and lines[i + 1].startswith("      ") and len(lines[i + 1].strip()) > 8
            assert described, f"{script}: {lines[i].split('=')[0].strip()} has no description"
    bench_help = results[ENTRY_POINTS.index("bench.py")].stdout
    assert all(section in bench_help for section in ("data", "train", "analyze", "eval", "threads"))


def test_one_exit_code_rule_for_every_entry_point_and_no_folder_left_behind(tmp_path):
    missing = str(tmp_path / "missing")
    out = str(tmp_path / "out")
    cases = [  # (command, status, start of the message)
        (["train.py", "--batch_size=0", f"--out_dir={out}"], 2, "config error: batch_size"),
        (["train.py", f"--data_dir={missing}", f"--out_dir={out}", "--device=cpu"], 1, "error: data_dir="),
        (["analyze.py", "--ckpt", missing, "--k=0", f"--out_dir={out}"], 2, "config error: k must"),
        (["analyze.py", "--ckpt", missing, f"--out_dir={out}"], 1, "error: checkpoint not found"),
        (["eval_benchmarks.py", "--benchmarks", "lambda", f"--out_dir={out}"], 2, "config error: unknown benchmark"),
        (["eval_benchmarks.py", "--ckpt", missing, "--benchmarks", "demo", f"--demo_shards={missing}/*.bin",
          f"--out_dir={out}"], 1, "error: no Demo (Shakespeare val) token shards"),
        (["prepare_fineweb.py", "--num_proc=0", f"--out_dir={out}"], 2, "config error: num_proc"),
        (["prepare_fineweb.py", f"--data_files={missing}/*.txt", f"--out_dir={out}"], 1, "error: no input files"),
        (["prepare_owt.py", "--val_fraction=2", f"--out_dir={out}"], 2, "config error: val_fraction"),
        (["prepare_owt.py", f"--data_files={missing}/*.txt", f"--out_dir={out}"], 1, "error: no input files"),
        (["demo.py", "--steps=plot", f"--out={out}"], 2, "config error: unknown demo step"),
        (["bench.py", "--section=nope"], 2, "config error: unknown section"),
        (["convert_checkpoint.py", missing], 2, "config error: unpickling can run code"),
        (["convert_checkpoint.py", missing, "--trust"], 1, "error: checkpoint not found"),
        (["export_checkpoint.py"], 2, "config error: give the run to export"),
        (["export_checkpoint.py", missing], 1, "error: not found"),
        (["seeds.py", "config/demo.py", "--seeds=1,1", f"--out_dir={out}"], 2, "config error: seeds must be different"),
        (["reproduce.py", "--steps=plot", f"--out={out}"], 2, "config error: unknown step"),
    ]
    results = run_all([[sys.executable, *cmd] for cmd, _, _ in cases])
    for (cmd, status, start), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == status and lines and lines[-1].startswith(start), (cmd, result.stderr)
        assert "Traceback" not in result.stderr, (cmd, result.stderr)
    assert not os.path.exists(out)  # no failed run created its output folder


def test_cpu_threads_respect_the_setting_then_omp_num_threads_then_half_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(5) == 5 and cpu_threads(0) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_threads(0) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_threads(0) == 1


def test_the_threads_setting_is_honoured_by_train_and_analyze(prose_shards, tmp_path, capsys):
    from conftest import tiny_gpt, write_checkpoint

    before = torch.get_num_threads()
    try:
        run = write_checkpoint(tiny_gpt(), tmp_path / "model")
        analyze.main(["--ckpt", run, f"--shards={prose_shards}/*_val_*.bin", "--num_sequences=1", "--seq_len=8",
                      "--threads=1", f"--out_dir={tmp_path / 'a'}", "--progress=False", "--plots", "topk"])
        assert torch.get_num_threads() == 1
        assert sorted(os.listdir(tmp_path / "a")) == ["metrics.csv", "metrics.json", "topk.png"]
    finally:
        torch.set_num_threads(before)
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
            "--total_batch_tokens=32", "--warmup_iters=0", "--max_iters=1", "--eval_tokens=32"]
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    for args, extra_env, want in (([], {"OMP_NUM_THREADS": "2"}, 2), (["--threads=1"], {"OMP_NUM_THREADS": "2"}, 1)):
        out = tmp_path / f"t{want}"
        result = subprocess.run([sys.executable, "train.py", f"--data_dir={prose_shards}", f"--out_dir={out}",
                                 *tiny, *args], cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert f"{want} CPU thread(s)" in result.stdout


def test_the_demo_runs_fit_in_100_mb(tmp_path):
    """The demo's three configs (their model and checkpoint settings; a few steps on test data, as bytes like
    the demo's) take less than a third of 100 MB each: final ckpt.pt weights only, best.pt a hard link to it."""
    from conftest import pydoc_documents
    from nanoshift.prepare import first_tokens_split, prepare_shards

    shards = tmp_path / "bytes"
    prepare_shards(pydoc_documents()[:20], str(shards), "pydoc", first_tokens_split(8000), shard_tokens=100_000,
                   progress=False, tokenizer="bytes")
    commands = [[sys.executable, "train.py", f"config/{name}.py", f"--data_dir={shards}",
                 f"--out_dir={tmp_path / 'runs' / name}", "--max_iters=2", "--eval_interval=1", "--warmup_iters=0",
                 "--eval_tokens=512", "--track_alignment=False"] for name in ("demo", "demo_cut", "demo_gate")]
    for result in run_all(commands):
        assert result.returncode == 0, result.stderr
    seen, total = set(), 0
    for folder, _, files in os.walk(tmp_path / "runs"):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            if stat.st_ino not in seen:  # a hard link takes no second copy
                seen.add(stat.st_ino)
                total += stat.st_blocks * 512
    assert total < 100 * 2**20, f"{total / 2**20:.0f} MB"
    assert os.path.samefile(tmp_path / "runs" / "demo_gate" / "best.pt", tmp_path / "runs" / "demo_gate" / "ckpt.pt")


def test_the_results_page_quotes_the_published_demo_summary_and_its_pictures_exist():
    results = open(os.path.join(ROOT, "docs", "results.md")).read()
    summary = open(os.path.join(ROOT, "docs", "demo", "summary.md")).read()
    quoted = re.search(r"<!-- demo summary: begin -->\n(.*?)<!-- demo summary: end -->", results, re.S)
    assert quoted, "docs/results.md must quote docs/demo/summary.md between the demo-summary markers"
    assert quoted.group(1).strip() == summary.strip()  # verbatim: the page's numbers are that run's
    pictures = re.findall(r"\(demo/([\w.]+\.png)\)", results)
    assert pictures
    for picture in pictures:
        assert os.path.isfile(os.path.join(ROOT, "docs", "demo", picture)), picture
