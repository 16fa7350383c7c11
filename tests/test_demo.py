"""demo.py: the summary it writes from the runs' logs, the generated samples, the recipe its configs train, and
that a failing step stops the demo."""

import json
import os
import subprocess
import sys

import pytest

import demo
import train
from conftest import tiny_gpt, write_checkpoint
from nanoshift.configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_reports_val_loss_gate_mass_and_eval_table(tmp_path):
    losses = {"baseline": 6.5, "cut": 6.25, "gate": 6.375}
    for name, loss in losses.items():
        write_log(tmp_path / name / "log.jsonl", [
            {"type": "run", "iter": 0},
            {"type": "eval", "iter": 0, "val_loss": 10.8, "alphas": [0.75] * 4},
            {"type": "eval", "iter": 300, "val_loss": loss, "alphas": [0.9, 0.8, 0.7, 0.6], "misalignment": loss / 10},
            {"type": "end", "iter": 300, "reason": "max_iters"},
        ])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.md").write_text("| benchmark | metric |\n| --- | --- |\n| Demo | loss |\n")
    bpb = {"baseline": 2.8, "cut": 2.1, "gate": 2.25}
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"models": {n: {"demo": {"bpb": b}} for n, b in bpb.items()}}))
    floors = {"unigram": {"nats": 6.48, "bpb": 2.93}, "bigram": {"nats": 5.08, "bpb": 2.3}, "val_targets": 128834,
              "val_bytes": 410380, "tokenizer": "gpt2"}
    samples = {"baseline": "Thou art a villain.\nGo to.", "cut": "Ay, my lord.", "gate": "What, ho!"}
    text = demo.summarize(str(tmp_path), {"train baseline": 12.0, "total": 30.0}, threads=1, floors=floors,
                          samples=samples)
    assert "| baseline | 6.5000 | 300 | 0.650 -> 0.650 |" in text and "| cut | 6.2500 | 300 | 0.625 -> 0.625 |" in text
    # bits per byte from the eval, against the floors, which are stated
    assert "| baseline | 6.5000 | 300 | 0.650 -> 0.650 | 2.8000 | above bigram floor |" in text
    assert "| cut | 6.2500 | 300 | 0.625 -> 0.625 | 2.1000 | 0.200 below bigram floor |" in text
    assert "unigram floor: 6.480 nats/token, 2.930 bits/byte; bigram floor: 5.080 nats/token, 2.300 bits/byte" in text
    assert "410,380 bytes" in text
    assert "| iter 0 | 0.750 | 0.750 | 0.750 | 0.750 |" in text
    assert "| iter 300 | 0.900 | 0.800 | 0.700 | 0.600 |" in text
    assert "Most attenuation is on block 3 (alpha 0.600; uniform is 0.750)" in text
    assert "| Demo | loss |" in text and "| total | 30 |" in text
    assert "1 torch thread(s) per process" in text and "not which mode is better" in text  # says what it shows
    assert "a 257-token vocabulary, 2,000 steps of 768 bytes" in text  # the recipe it describes
    # a generated sample per model, verbatim (indented), after the prompt they continue
    assert "#### What each model writes after '\\n\\nKing.\\n'" in text
    assert "baseline:\n\n    Thou art a villain.\n    Go to.\n" in text and "gate:\n\n    What, ho!" in text
    without = demo.summarize(str(tmp_path), {"total": 30.0}, threads=1)  # no floors known: none stated, no label
    assert "| baseline | 6.5000 | 300 | 0.650 -> 0.650 | 2.8000 | - |" in without and "bigram floor:" not in without
    assert "What each model writes" not in without  # no samples given: no section
    byte_floors = dict(floors, tokenizer="bytes", val_targets=410382)
    assert "(410,382 byte tokens, 410,380 bytes)" in demo.summarize(str(tmp_path), {"total": 30.0}, 1, byte_floors)


def test_a_generated_sample_is_the_models_continuation_decoded_with_its_tokenizer(tmp_path):
    model = tiny_gpt(vocab_size=257, block_size=16)
    run = write_checkpoint(model, tmp_path / "bytes-run", tokenizer={"name": "bytes", "id": "bytes", "vocab_size": 257})
    text = demo.generate_sample(run, prompt="King.\n", new_tokens=40)
    assert text == demo.generate_sample(run, prompt="King.\n", new_tokens=40)  # seeded: the same every time
    assert text != demo.generate_sample(run, prompt="King.\n", new_tokens=40, seed=1)
    assert 0 < len(text.encode("utf-8", errors="surrogatepass")) <= 40 * 3  # <= 40 bytes, each shown as <= 3
    assert not text.startswith("King.")  # the continuation only, not the prompt


def test_the_demo_trains_the_bytes_recipe_on_the_data_it_prepares(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs exec each other by their paths from the root
    runs = {name: configure(train.DEFAULTS, [config]) for name, config in demo.RUNS.items()}
    for name, c in runs.items():
        assert (c["data_dir"], c["tokenizer"], c["vocab_size"]) == (demo.DEMO_DATA, "bytes", 257), name
        assert (c["n_layer"], c["n_embd"], c["block_size"], c["total_batch_tokens"], c["max_iters"]) == (
            4, 128, 64, 768, 2000), name  # nanoGPT's CPU recipe (config/recipe_nanogpt.py), as bytes
        assert c["track_alignment"] and c["track_sequences"] > 0, name  # the shift over training
    assert (runs["cut"]["residual_mode"], runs["gate"]["residual_mode"]) == ("cut", "gate")
    assert demo.PREPARE == ["prepare_fineweb.py", "--demo", "--tokenizer=bytes", f"--out_dir={demo.DEMO_DATA}"]


def test_no_floors_without_prepared_data(tmp_path, capsys):
    assert demo.floors_or_none(str(tmp_path / "absent")) is None
    assert "no n-gram floors for" in capsys.readouterr().err


def test_failing_step_stops_the_demo_with_its_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.run([sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], "boom", str(tmp_path))
    assert stop.value.code == 3
    assert (tmp_path / "logs" / "boom.log").read_text().strip() == "about to fail"
    assert "step failed (exit 3)" in capsys.readouterr().err


def test_unknown_step_is_rejected():
    result = subprocess.run([sys.executable, "demo.py", "--steps=train,plot"], capture_output=True, text=True)
    assert result.returncode == 2 and "config error: unknown demo step(s) ['plot']" in result.stderr
