"""analyze.py on HuggingFace models: a transformers GPT-2 gives the same metrics as the same weights in
our model; Llama-style (tied) and Gemma-2 (sqrt(d) embedding scale, soft-capped logits, tied or untied)
models run, with the reference vectors exactly where the definitions put them."""

import json

import pytest
import torch

import analyze
from conftest import write_checkpoint
from nanoshift.lens import METRICS, LensOptions, analyze_model
from nanoshift.lm import load_lm
from nanoshift.hf import from_pretrained

transformers = pytest.importorskip("transformers")

WORDS = ("the of and to in a is was for on that with as by it at from his an were are which this be or "
         "first also new after two had who their she him its most").split()


def write_texts(folder, n_docs=3, n_words=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(exist_ok=True)
    for i in range(n_docs):
        picks = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in picks) + ".\n")
    return str(folder / "*.txt")


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A random transformers GPT-2 saved with save_pretrained, and the same weights as our checkpoint."""
    tmp = tmp_path_factory.mktemp("gpt2_pair")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp / "hf-gpt2")
    ours = from_pretrained(str(tmp / "hf-gpt2"))
    write_checkpoint(ours, tmp / "ours")
    return tmp, write_texts(tmp / "texts")


def run_cli(*argv):
    analyze.main([*argv, "--progress=False"])


def test_hf_gpt2_and_our_checkpoint_of_the_same_weights_give_the_same_metrics(gpt2_pair):
    tmp, texts = gpt2_pair
    common = ["--data_files", texts, "--num_sequences=6", "--seq_len=24", "--batch_size=4", "--mid"]
    run_cli("--hf", str(tmp / "hf-gpt2"), "--out_dir", str(tmp / "a-hf"), *common)
    run_cli("--ckpt", str(tmp / "ours" / "ckpt.pt"), "--out_dir", str(tmp / "a-ours"), *common)
    hf = json.loads((tmp / "a-hf" / "metrics.json").read_text())["models"][0]
    ours = json.loads((tmp / "a-ours" / "metrics.json").read_text())["models"][0]
    assert (hf["label"], ours["label"]) == ("hf-gpt2", "ours")
    assert hf["positions"] == ours["positions"] == 6 * 24
    assert len(hf["layers"]) == len(ours["layers"]) == 2 * 2 + 1
    for a, b in zip(hf["layers"], ours["layers"]):
        assert (a["kind"], a["layer"]) == (b["kind"], b["layer"])
        for name, _ in METRICS:
            assert a[name] == pytest.approx(b[name], abs=1e-4), (name, a["layer"])
    assert hf["shift_depth"]["first_win_hist"] == ours["shift_depth"]["first_win_hist"]


def test_hf_and_ckpt_overlay_in_one_run(gpt2_pair):
    tmp, texts = gpt2_pair
    run_cli("--hf", str(tmp / "hf-gpt2"), "--ckpt", str(tmp / "ours"), "--out_dir", str(tmp / "overlay"),
            "--data_files", texts, "--num_sequences=4", "--seq_len=16")
    data = json.loads((tmp / "overlay" / "metrics.json").read_text())
    assert [m["label"] for m in data["models"]] == ["ours", "hf-gpt2"]  # --ckpt models first, then --hf
    rows = (tmp / "overlay" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 and rows[1].startswith("ours,ckpt:")


def tiny_tokenizer():
    """A word-level tokenizer with a BOS it adds by default, like Llama's and Gemma's (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def save_hf(model, path, tokenizer=None):
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def small_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return save_hf(transformers.LlamaForCausalLM(cfg), tmp_path / "llama", tiny_tokenizer())


def small_gemma2(tmp_path, tied):
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0)
    return save_hf(transformers.Gemma2ForCausalLM(cfg), tmp_path / f"gemma2-{'tied' if tied else 'untied'}",
                   tiny_tokenizer())


def test_llama_tied_runs_on_text_with_its_own_tokenizer_and_bos(tmp_path):
    path = small_llama(tmp_path)
    texts = write_texts(tmp_path / "texts")
    run_cli("--hf", path, "--data_files", texts, "--num_sequences=5", "--seq_len=20", "--out_dir",
            str(tmp_path / "out"), "--space=normed")
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"][0]
    assert result["tied"] and result["embed_scale"] == 1.0 and result["space"] == "normed"
    layer0 = result["layers"][0]
    # no position embedding: h_0 is the input embedding itself, in either space
    assert layer0["cos_input"] == pytest.approx(1, abs=1e-5) and layer0["projection"] == pytest.approx(0, abs=1e-5)
    lm = load_lm(hf=path)
    windows = analyze.text_windows(lm, ["the of and", "to in a is"], [(0, 0)], 10)
    assert windows[0].tolist() == [1, 3, 4, 5, 1, 6, 7, 8, 9, 1]  # BOS first and between documents


@pytest.mark.parametrize("tied", [False, True])
def test_gemma2_embedding_scale_softcap_and_reference_vectors(tmp_path, tied, capsys):
    path = small_gemma2(tmp_path, tied)
    lm = load_lm(hf=path)
    assert lm.tied == tied
    assert ("not tied" in capsys.readouterr().out) == (not tied)  # untied: said at load
    assert lm.embed_scale == pytest.approx(32 ** 0.5)
    toks = torch.randint(3, 64, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resid, _ = lm.hidden_states(toks[:, :-1])
        model_logits = lm.model(toks[:, :-1]).logits
    # h_0 = sqrt(d) * E[t]: exactly the input reference vector
    assert torch.allclose(resid[0], lm.input_vectors(toks[:, :-1]), atol=1e-6)
    expected_target = (lm.in_embedding * lm.embed_scale) if tied else lm.out_embedding
    assert torch.equal(lm.target_vectors(toks[:, 1:]), expected_target[toks[:, 1:]])
    assert lm.logit_softcap == 30.0 and torch.allclose(lm.decode(resid[-1]), model_logits, atol=1e-5)
    for space in ("raw", "normed"):
        r = analyze_model(lm, analyze.batched(toks, 2), LensOptions(space=space), progress=False)
        layer0, last = r["layers"][0], r["layers"][lm.n_layer]
        assert layer0["cos_input"] == pytest.approx(1, abs=1e-5)
        assert layer0["projection"] == pytest.approx(0, abs=1e-5)
        # the last layer's lens is the model's own (soft-capped) prediction
        ce = torch.nn.functional.cross_entropy(model_logits.reshape(-1, 64), toks[:, 1:].reshape(-1)).item()
        assert last["lens_ce"] == pytest.approx(ce, abs=1e-4) and last["kl_final"] == pytest.approx(0, abs=1e-6)
    # and from the command line, on text with its own tokenizer, mid-block states included
    run_cli("--hf", path, "--data_files", write_texts(tmp_path / "texts"), "--num_sequences=3", "--seq_len=16",
            "--mid", "--out_dir", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"][0]
    assert result["tied"] == tied and len(result["layers"]) == 2 * lm.n_layer + 1
    assert result["embed_scale"] == pytest.approx(32 ** 0.5)


def test_shards_are_refused_for_a_model_with_another_tokenizer(tmp_path, capsys):
    import numpy as np

    from nanoshift.data import write_shard

    write_shard(tmp_path / "d_val_000000.bin", np.arange(500, dtype=np.uint16))
    path = small_llama(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli("--hf", path, "--shards", str(tmp_path / "*.bin"), "--seq_len=16", "--out_dir", str(tmp_path / "o"))
    assert e.value.code == 1
    assert "llama uses another tokenizer" in capsys.readouterr().err


def test_model_without_usable_embedding_is_refused(tmp_path, capsys):
    """OPT-350m-style: a 16-wide embedding projected into a 32-wide residual stream."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=1,
                                 ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)
    path = save_hf(transformers.OPTForCausalLM(cfg), tmp_path / "opt")
    with pytest.raises(SystemExit) as e:
        run_cli("--hf", path, "--out_dir", str(tmp_path / "o"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "opt" in err and "no usable embedding" in err and "(100, 16)" in err
    from nanoshift.lm import HFCausalLM

    with pytest.raises(ValueError, match="no usable output embedding"):  # a base model: no LM head at all
        HFCausalLM(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)), "base")
