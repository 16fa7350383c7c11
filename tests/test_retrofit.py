"""Retrofits: train.py continues a pretrained HF Llama (a tiny random one saved offline, next to a tiny
tokenizer of its own) with a residual gate brought in by the attenuation ramp. Step 0 is the pretrained
model; resume is exact with the ramp mid-window; the checkpoint analyses next to the original. And the
ramp itself on the model: 0 = the plain model, 1 = the configured mode, in between the formula."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval_benchmarks
from nanoshift.common import InputError
from conftest import pydoc_documents
from nanoshift.data import ShardLoader, get_tokenizer, read_shard
from nanoshift.lm import OurGPT, load_lm
from model import GPT, GPTConfig, rope_cos_sin

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the shape settings (2 layers, 32 wide) are ignored by a retrofit: the weights bring their own
TINY = ["--device=cpu", "--block_size=32", "--batch_size=8", "--total_batch_tokens=256", "--learning_rate=1e-2",
        "--min_lr=1e-3", "--warmup_iters=2", "--eval_interval=1000", "--eval_tokens=1024", "--log_interval=1",
        "--dropout=0.0", "--seed=7", "--residual_mode=gate", "--gate_alpha_min=0.5"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama


def train(out_dir, data, *args, expect=0):
    cmd = [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out_dir}", *TINY, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def rows(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["type"] == kind]


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def hf_loss(hf, x, y):
    with torch.no_grad():
        logits = hf(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)).item()


RAMP = ["--eval_interval=4", "--lr_decay_iters=8", "--attenuation_warmup_iters=6"]


def test_step_0_is_the_pretrained_model_the_ramp_brings_the_gate_in_and_resume_is_exact(llama, tmp_path):
    hf_dir, hf, data = llama
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(full, data, f"--init_from={hf_dir}", *RAMP, "--max_iters=8")
    # step 0: the first train batch and the val budget, read as train.py reads them, through the HF model
    x, y = ShardLoader(os.path.join(data, "*_train_*.bin"), 8, 32, seed=7).next_batch()
    val = ShardLoader(os.path.join(data, "*_val_*.bin"), 8, 32, seed=7, shuffle=False)
    val_loss = sum(hf_loss(hf, *val.next_batch()) for _ in range(4)) / 4
    train_rows, eval_rows = rows(full, "train"), rows(full, "eval")
    assert train_rows[0]["loss"] == pytest.approx(hf_loss(hf, x, y), rel=1e-5)
    assert eval_rows[0]["iter"] == 0 and eval_rows[0]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    # the ramp, logged: a = iter / 6, then 1; the layer gate spends a * (1 - gate_alpha_min) in all
    assert [r["attenuation"] for r in train_rows] == [min(1.0, i / 6) for i in range(8)]
    for r in train_rows + eval_rows:
        assert sum(1 - a for a in r["alphas"]) == pytest.approx(0.5 * r["attenuation"], abs=1e-5)
    assert train_rows[0]["alphas"] == [1.0, 1.0]
    run = rows(full, "run")[0]
    assert run["attenuation"] == 0.0 and run["attenuation_warmup_iters"] == 6
    assert run["tokenizer"]["name"] == hf_dir and run["tokenizer"]["id"] == get_tokenizer(hf_dir).tokenizer_id
    # it trained: the loss moved down, and the checkpoint is a llama of the HF model's shape
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.2
    ckpt = load(full)
    args = ckpt["model_args"]
    assert (args["arch"], args["n_layer"], args["n_embd"], args["n_kv_head"], args["vocab_size"]) == (
        "llama", 2, 32, 2, 400)
    assert ckpt["weights_from"] == hf_dir and ckpt["tokenizer"]["id"] == run["tokenizer"]["id"]

    # stopped at 4 and resumed to 8: iterations 4 and 5 are mid-ramp (a = 4/6, 5/6), 6 reaches 1
    train(resumed, data, f"--init_from={hf_dir}", *RAMP, "--max_iters=4")
    assert load(resumed)["iter_num"] == 4
    train(resumed, data, "--init_from=resume", *RAMP, "--max_iters=8")
    keys = ("iter", "loss", "lr", "grad_norm", "attenuation", "alphas")
    assert [[r[k] for k in keys] for r in rows(resumed, "train")] == [[r[k] for k in keys] for r in train_rows]
    assert [(r["iter"], r["val_loss"]) for r in rows(resumed, "eval")] == [(r["iter"], r["val_loss"])
                                                                          for r in eval_rows]
    a, b = load(full), load(resumed)
    assert a["iter_num"] == b["iter_num"] == 8
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_retrofit_analyses_next_to_its_original(llama, tmp_path):
    hf_dir, _, data = llama
    out = str(tmp_path / "barely")
    # one step at a tiny learning rate, the ramp at 1e-4: the checkpoint is the HF model up to ~1e-4
    train(out, data, f"--init_from={hf_dir}", "--attenuation_warmup_iters=10000", "--max_iters=1",
          "--eval_interval=1", "--warmup_iters=0", "--learning_rate=1e-7", "--min_lr=0")
    ours, theirs = load_lm(ckpt=out), load_lm(hf=hf_dir)
    assert ours.tokenizer_id == theirs.tokenizer_id == get_tokenizer(hf_dir).tokenizer_id
    assert ours.bos_prefix == theirs.bos_prefix == [1] and ours.doc_separator == theirs.doc_separator == [1]
    assert not ours.uses_gpt2_tokens() and ours.eot == theirs.eot == 2
    assert ours.model.residual_alphas() == pytest.approx([1 - 1e-4 * 0.25] * 2, abs=1e-9)  # from iter_num
    # the val shards (the HF tokenizer's tokens) evaluate both; a GPT-2 model is refused for them
    val_shards = sorted(glob.glob(os.path.join(data, "*_val_*.bin")))
    for lm in (ours, theirs):
        (stream,), _ = eval_benchmarks.benchmark_tokens("fineweb_edu", val_shards, lm)
        assert stream.tolist() == read_shard(val_shards[0]).tolist()
    with pytest.raises(InputError, match=f"does not use the tokenizer '{hf_dir}'"):
        eval_benchmarks.benchmark_tokens("fineweb_edu", val_shards, OurGPT(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8,
                                                                                         block_size=8)), "gpt2-model"))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(pydoc_documents()[:6]), encoding="utf-8")
    result = subprocess.run([sys.executable, "analyze.py", "--ckpt", out, "--hf", hf_dir, f"--data_files={text}",
                             "--num_sequences=4", "--seq_len=32", f"--out_dir={tmp_path}/analysis"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "analysis" / "metrics.json") as f:
        models = json.load(f)["models"]
    assert [m["source"] for m in models] == [f"ckpt:{out}/ckpt.pt", f"hf:{hf_dir}"]
    assert models[0]["positions"] == models[1]["positions"] == 4 * 32
    assert models[0]["final_loss"] == pytest.approx(models[1]["final_loss"], abs=1e-3)
    for ours_layer, their_layer in zip(models[0]["layers"], models[1]["layers"]):
        assert ours_layer["lens_ce"] == pytest.approx(their_layer["lens_ce"], abs=1e-3)


# -----------------------------------------------------------------------------
# the ramp on the model


MODES = {
    "cut": dict(residual_mode="cut", cut_layer=[0, 2], cut_alpha=0.3),
    "gate-layer": dict(residual_mode="gate", gate_mode="layer", gate_alpha_min=0.2),
    "gate-scalar": dict(residual_mode="gate", gate_mode="scalar"),
    "gate-token": dict(residual_mode="gate", gate_mode="token", gate_alpha_min=0.2),
}
ARCHS = {"gpt2": dict(arch="gpt2"), "llama": dict(arch="llama", n_kv_head=1, tie_embeddings=False)}


def ramp_model(arch, mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=50, **ARCHS[arch], **MODES[mode]))
    with torch.no_grad():  # a gate away from its (uniform) init, so each layer has its own alpha
        for name, p in model.named_parameters():
            if name.startswith("gate."):
                p.add_(torch.randn_like(p))
    return model.eval()


def hand_written(model, idx, a):
    """x_{l+1} = alpha'_l x_l + (block_l(x_l) - x_l), alpha'_l = 1 - a (1 - alpha_l), computed here."""
    cfg = model.config
    with torch.no_grad():
        x = model.transformer.wte(idx)
        if cfg.arch == "gpt2":
            x = x + model.transformer.wpe(torch.arange(idx.size(1)))
            rope = None
        else:
            rope = rope_cos_sin(cfg, idx.size(1))
        if cfg.residual_mode == "cut":
            alphas = [cfg.cut_alpha if l in cfg.cut_layers else 1.0 for l in range(cfg.n_layer)]
        elif cfg.gate_mode == "token":
            p = torch.softmax(model.gate.proj(model.gate.ln(x)), dim=-1)
            alphas = list((1 - (1 - cfg.gate_alpha_min) * p).unsqueeze(-1).unbind(-2))
        elif cfg.gate_mode == "layer":
            alphas = list(1 - (1 - cfg.gate_alpha_min) * torch.softmax(model.gate.logits, dim=-1))
        else:
            alphas = list(torch.sigmoid(model.gate.logits))
        for block, alpha in zip(model.transformer.h, alphas):
            update = block(x, None, rope)[0] - x
            x = (1 - a * (1 - alpha)) * x + update
        return model.lm_head(model.transformer.ln_f(x))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", list(MODES))
def test_attenuation_ramp(arch, mode):
    model = ramp_model(arch, mode)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        configured, _ = model(idx, idx)
        configured_alphas = model.residual_alphas()
        model.set_attenuation(0.0)
        at_zero, _ = model(idx, idx)
        assert model.residual_alphas() == [1.0] * 3
        model.set_attenuation(0.35)
        between, _ = model(idx, idx)
        ramp_alphas = model.residual_alphas()
        model.set_attenuation(1.0)
        again, _ = model(idx, idx)
    plain = GPT(GPTConfig(**{**model.config.to_dict(), "residual_mode": "none"})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("gate.")})
    with torch.no_grad():
        reference, _ = plain(idx, idx)
    assert torch.equal(at_zero, reference)  # bit for bit the plain model
    assert torch.equal(again, configured)  # 1 = the mode as configured
    assert not torch.allclose(configured, reference, atol=1e-4)  # the mode does act here
    torch.testing.assert_close(between, hand_written(model, idx, 0.35), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(configured, hand_written(model, idx, 1.0), rtol=1e-5, atol=1e-5)
    assert ramp_alphas == pytest.approx([1 - 0.35 * (1 - a) for a in configured_alphas], abs=1e-6)
    with pytest.raises(ValueError, match="attenuation must be in"):
        model.set_attenuation(1.5)


def test_checkpoint_loads_at_its_step_of_the_ramp(tmp_path):
    model = ramp_model("llama", "cut")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict(), "iter_num": 3,
                "config": {"attenuation_warmup_iters": 12}}, path)
    assert GPT.from_checkpoint(str(path)).residual_alphas() == pytest.approx([1 - 0.25 * 0.7, 1.0, 1 - 0.25 * 0.7])
    # no ramp recorded (older checkpoints, karpathy/nanoGPT's): the mode as configured
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict()}, tmp_path / "plain.pt")
    assert GPT.from_checkpoint(str(tmp_path / "plain.pt")).residual_alphas() == pytest.approx([0.3, 1.0, 0.3])


def config_file(name, monkeypatch):
    """The settings a config file sets (it runs with the repository root as the working directory)."""
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(open(os.path.join("config", name)).read(), namespace)
    return namespace


@pytest.mark.parametrize("name, mode", [("llama_baseline.py", "none"), ("llama_cut.py", "cut"),
                                        ("llama_gate.py", "gate")])
def test_llama_configs_match_gpt2_124m_in_parameters_and_budget(name, mode, monkeypatch):
    c, base = config_file(name, monkeypatch), config_file("baseline.py", monkeypatch)
    fields = set(GPTConfig.__dataclass_fields__) - {"cut_layers"}
    with torch.device("meta"):
        llama = GPT(GPTConfig(**{k: v for k, v in c.items() if k in fields}))
        gpt2 = GPT(GPTConfig(**{k: v for k, v in base.items() if k in fields}))
    assert llama.config.arch == "llama" and llama.config.residual_mode == mode and c["tokenizer"] == "gpt2"
    assert llama.num_params(False) == pytest.approx(gpt2.num_params(False), rel=0.005)  # 124.77M vs 124.48M
    for key in ("data_dir", "total_batch_tokens", "max_iters", "learning_rate", "warmup_iters", "block_size"):
        assert c[key] == base[key], key


def test_retrofit_config(monkeypatch):
    c = config_file("retrofit_smollm2.py", monkeypatch)
    assert c["residual_mode"] == "gate" and 0 < c["attenuation_warmup_iters"] < c["max_iters"]
    assert c["attenuation_warmup_iters"] > c["warmup_iters"]  # the lr warmup settles before the ramp is far along
    assert c["max_iters"] * c["total_batch_tokens"] == pytest.approx(2.1e9, rel=0.01)
