"""export_checkpoint.py --hf (nanoshift/hf_export.py), offline on tiny models: the transformers directory loads
with AutoModelForCausalLM and no custom code (gpt2 -> GPT2LMHeadModel, llama -> LlamaForCausalLM, tied and
untied, grouped-query attention, scaled RoPE), its logits equal ours, its tokenizer is the model's; attenuated
models are refused with the reason; bad inputs are clear errors.

    python -m pytest -q -p no:xdist tests/test_export.py
"""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import export_checkpoint
from conftest import save_tiny_tokenizer, tiny_gpt, write_checkpoint
from nanoshift.checkpoint import SHARDED_POINTER, TRAIN_STATE, save_checkpoint
from nanoshift.common import InputError, SettingError, write_json
from nanoshift.data import get_tokenizer
from nanoshift.hf import from_pretrained
from model import GPT

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Photosynthesis converts light energy into chemical energy, and the Calvin cycle fixes CO2."


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only cost time on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A small Llama-style HF tokenizer (BOS <s> added by default, EOS </s>), not GPT-2's."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def llama_run(folder, tokenizer_dir, seed=0, **config):
    """A tiny llama checkpoint that reads tokenizer_dir's tokens, the way train.py records a retrofit's: the
    tokenizer in the checkpoint's record and a copy in out_dir/tokenizer."""
    enc = get_tokenizer(tokenizer_dir)
    model = tiny_gpt(seed=seed, arch="llama", bias=False, vocab_size=enc.n_vocab, **config)
    enc.hf.save_pretrained(os.path.join(folder, "tokenizer"))
    record = {"name": tokenizer_dir, "id": enc.tokenizer_id, "vocab_size": enc.n_vocab}
    return model, write_checkpoint(model, folder, iter_num=7, tokenizer=record)


def assert_same_logits(model, hf_dir, vocab):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, vocab, (2, model.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.eval()(idx, torch.zeros_like(idx))
        theirs = hf(input_ids=idx).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    return hf


@pytest.mark.parametrize("config", [
    dict(),
    dict(gelu_approx="none", bias=False, vocab_size=50257, block_size=24),
], ids=["gpt2", "gpt2-exact-gelu-no-bias"])
def test_gpt2_exports_to_gpt2lmheadmodel_with_equal_logits(config, tmp_path):
    model = tiny_gpt(seed=1, **config)
    run = write_checkpoint(model, tmp_path / "run", iter_num=3)
    out = export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}"])
    hf = assert_same_logits(model, out, model.config.vocab_size)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.activation_function == ("gelu_new" if model.config.gelu_approx == "tanh" else "gelu")
    assert hf.config.vocab_size == model.config.vocab_size and hf.config.n_positions == model.config.block_size
    # the tokenizer is GPT-2's, from the offline BPE files; generation stops at <|endoftext|>
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == get_tokenizer().encode_ordinary(TEXT)
    assert tok.model_max_length == model.config.block_size
    assert tok.eos_token_id == 50256 == transformers.GenerationConfig.from_pretrained(out).eos_token_id
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary folder left behind
    assert_same_import(model, out)


def assert_same_import(model, hf_dir):
    """The export comes back in through our own HF import (nanoshift.hf.from_pretrained, train.py --init_from) unchanged."""
    back = from_pretrained(hf_dir)
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(idx, idx)[0], model(idx, idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("config", [
    dict(tie_embeddings=True),
    dict(tie_embeddings=False, n_head=4, n_kv_head=2, intermediate_size=40, norm_eps=1e-6, rope_theta=50000.0),
    dict(tie_embeddings=False, n_head=4, n_kv_head=1, rope_theta=500000.0, block_size=48,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),
], ids=["tied", "untied-gqa", "llama3-rope-mqa"])
def test_llama_exports_to_llamaforcausallm_with_equal_logits(config, hf_tokenizer_dir, tmp_path):
    model, run = llama_run(tmp_path / "run", hf_tokenizer_dir, **config)
    out = export_checkpoint.run([os.path.join(run, "ckpt.pt"), f"--hf={tmp_path / 'hf'}"])
    hf = assert_same_logits(model, out, model.config.vocab_size)
    assert type(hf).__name__ == "LlamaForCausalLM"
    c = hf.config
    assert (c.num_key_value_heads, c.intermediate_size, c.rms_norm_eps, c.tie_word_embeddings) == (
        model.config.kv_heads, model.config.mlp_size, model.config.norm_eps, model.config.tie_embeddings)
    tied = hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    assert tied == model.config.tie_embeddings
    # the model's own tokenizer (not GPT-2's), BOS and EOS as the tokenizer has them
    ours = get_tokenizer(hf_tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ours.encode_ordinary(TEXT)
    assert (c.bos_token_id, c.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) != (None, None)
    assert_same_import(model, out)


def write_sharded(run, model, iter_num, tokenizer=None):
    """A sharded (DCP) checkpoint of model in run, as an FSDP run leaves it (the weights, train_state.pt, the
    pointer), written in this one process: what export_checkpoint.py reads."""
    import torch.distributed.checkpoint as dcp

    name = f"ckpt-{iter_num:08d}.dcp"
    folder = os.path.join(run, name)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)
    save_checkpoint({"model_args": model.config.to_dict(), "iter_num": iter_num, "best_val_loss": 9.0, "config": {},
                     "weights_from": "scratch", "tokenizer": tokenizer}, os.path.join(folder, TRAIN_STATE))
    write_json(os.path.join(run, SHARDED_POINTER), {"dir": name, "iter_num": iter_num, "world_size": 2})
    return folder


def test_a_sharded_checkpoint_exports_from_its_run_or_its_folder(tmp_path):
    """An FSDP run: its newest sharded checkpoint when that is further on than its ckpt.pt, else the ckpt.pt."""
    old, new = tiny_gpt(seed=1), tiny_gpt(seed=2)
    run = write_checkpoint(old, tmp_path / "run", iter_num=100)
    folder = write_sharded(run, new, iter_num=250)
    assert_same_logits(new, export_checkpoint.run([run, f"--hf={tmp_path / 'a'}"]), new.config.vocab_size)
    assert_same_logits(new, export_checkpoint.run([folder, f"--hf={tmp_path / 'b'}"]), new.config.vocab_size)
    write_checkpoint(old, run, iter_num=250)  # the run ended: its final ckpt.pt is as far on as the pointer
    assert_same_logits(old, export_checkpoint.run([run, f"--hf={tmp_path / 'c'}"]), old.config.vocab_size)


@pytest.mark.parametrize("residual", [
    dict(residual_mode="cut", cut_layer=1, cut_alpha=0.5),
    dict(residual_mode="gate", gate_mode="layer"),
    dict(residual_mode="gate", gate_mode="token"),
], ids=["cut", "gate-layer", "gate-token"])
def test_attenuated_models_are_refused_with_the_reason(residual, tmp_path):
    run = write_checkpoint(tiny_gpt(**residual), tmp_path / "run", iter_num=5)
    with pytest.raises(InputError, match=f"residual_mode='{residual['residual_mode']}'.*no residual scale"):
        export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}"])
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("arch, residual, iter_num", [
    ("gpt2", dict(residual_mode="cut", cut_layer=[0, 1], cut_alpha=0.3), 5),
    ("llama", dict(residual_mode="gate", gate_mode="layer", n_head=4, n_kv_head=2, tie_embeddings=False), 5),
    ("gpt2", dict(residual_mode="gate", gate_mode="scalar"), 3),  # the ramp at 3 / 10: alpha = 1 - 0.3 (1 - a)
], ids=["gpt2-cut", "llama-gate-layer", "gpt2-gate-scalar-ramp"])
def test_remote_code_reproduces_an_attenuated_model(arch, residual, iter_num, hf_tokenizer_dir, tmp_path):
    if arch == "llama":
        model, run = llama_run(tmp_path / "run", hf_tokenizer_dir, seed=3, **residual)
        record = {"name": hf_tokenizer_dir, "id": get_tokenizer(hf_tokenizer_dir).tokenizer_id}
    else:
        model, record = tiny_gpt(seed=3, **residual), None
        run = str(tmp_path / "run")
    if model.config.residual_mode == "gate":  # away from the uniform init, so a wrong layer order shows
        with torch.no_grad():
            model.gate.logits.copy_(torch.randn(model.config.n_layer))
    write_checkpoint(model, run, iter_num=iter_num, config={"attenuation_warmup_iters": 10}, tokenizer=record)
    ours = GPT.from_checkpoint(os.path.join(run, "ckpt.pt"))  # at the checkpoint's attenuation
    alphas = ours.residual_alphas()
    assert min(alphas) < 0.95  # attenuated: a plain export would differ
    out = export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}", "--remote_code"])
    assert "modeling_nanoshift.py" in os.listdir(out)
    with pytest.raises(Exception):  # without trust_remote_code, transformers refuses it: never a plain model
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.config.residual_alphas == pytest.approx(alphas, abs=0)
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
        mine = ours(idx, torch.zeros_like(idx))[0]
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
        assert (hf(input_ids=idx, use_cache=True).logits - theirs).abs().max() == 0
        ours.set_attenuation(0.0)  # and the alphas matter: the same weights with a plain residual differ
        assert (ours(idx, torch.zeros_like(idx))[0] - mine).abs().max() > 1e-3


def test_remote_code_refuses_a_per_token_gate_and_leaves_a_plain_model_plain(tmp_path):
    run = write_checkpoint(tiny_gpt(residual_mode="gate", gate_mode="token"), tmp_path / "token", iter_num=5)
    with pytest.raises(InputError, match="gate_mode='token'.*per token"):
        export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}", "--remote_code"])
    plain = tiny_gpt(seed=2)
    out = export_checkpoint.run([write_checkpoint(plain, tmp_path / "plain"), f"--hf={tmp_path / 'plain_hf'}",
                                 "--remote_code"])
    assert "modeling_nanoshift.py" not in os.listdir(out)
    assert type(assert_same_logits(plain, out, plain.config.vocab_size)).__name__ == "GPT2LMHeadModel"


def test_a_retrofit_at_step_0_is_the_plain_model_and_exports(hf_tokenizer_dir, tmp_path):
    """A gate whose attenuation ramp is still 0 (iter 0 of attenuation_warmup_iters) does nothing: exportable."""
    model, run = llama_run(tmp_path / "run", hf_tokenizer_dir, residual_mode="gate", gate_mode="token")
    write_checkpoint(model, run, iter_num=0, config={"attenuation_warmup_iters": 100},
                     tokenizer={"name": hf_tokenizer_dir, "id": get_tokenizer(hf_tokenizer_dir).tokenizer_id})
    loaded = GPT.from_checkpoint(os.path.join(run, "ckpt.pt"))  # attenuation 0, as from_checkpoint sets it
    out = export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}"])
    assert_same_logits(loaded, out, loaded.config.vocab_size)
    write_checkpoint(model, run, iter_num=1, config={"attenuation_warmup_iters": 100})  # ramp 0.01: refused
    with pytest.raises(InputError, match="attenuation 0.01"):
        export_checkpoint.run([run, f"--hf={tmp_path / 'hf2'}"])


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        export_checkpoint.run([str(tmp_path / "missing"), f"--hf={tmp_path / 'hf'}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no checkpoint"):
        export_checkpoint.run([str(empty), f"--hf={tmp_path / 'hf'}"])
    run = write_checkpoint(tiny_gpt(), tmp_path / "run")
    with pytest.raises(SettingError, match="not both"):
        export_checkpoint.run([run, f"--hf={tmp_path / 'hf'}", "--out=x.pt"])

    # an existing, non-empty folder: refused without --overwrite; an earlier export is replaced with it
    out = tmp_path / "hf"
    export_checkpoint.run([run, f"--hf={out}"])
    with pytest.raises(SettingError, match="already exists and is not empty.*--overwrite"):
        export_checkpoint.run([run, f"--hf={out}"])
    (out / "stale.txt").write_text("from an older export")
    export_checkpoint.run([run, f"--hf={out}", "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".old"))]  # nothing left aside
    # a folder that is not an export is never deleted, --overwrite or not
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(SettingError, match="holds no config.json"):
        export_checkpoint.run([run, f"--hf={other}", "--overwrite"])
    assert (other / "thesis.tex").read_text() == "keep me"


def test_the_command_line_reports_errors_in_one_line_with_the_exit_status(tmp_path):
    run = write_checkpoint(tiny_gpt(residual_mode="cut", cut_layer=0), tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    script = os.path.join(ROOT, "export_checkpoint.py")
    for args, status, message in (([run, f"--hf={tmp_path / 'hf'}"], 1, "error: .*no residual scale"),
                                  ([str(tmp_path / "nope"), "--hf=x"], 1, "error: not found"),
                                  ([run, f"--hf={tmp_path / 'full'}"], 2, "config error: hf=.*--overwrite")):
        out = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == status, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert re.match(message, out.stderr), out.stderr
