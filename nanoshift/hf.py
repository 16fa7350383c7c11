"""
Pretrained weights from transformers into model.py's GPT: GPT-2 (GPT2LMHeadModel) and Llama (LlamaForCausalLM:
SmolLM2, TinyLlama, Llama-3.x, ...), from a hub name or a local save_pretrained directory. A library module.

    from nanoshift.hf import from_pretrained
    model = from_pretrained("gpt2")                                           # or a local save_pretrained dir
    model = from_pretrained("HuggingFaceTB/SmolLM2-135M", residual_mode="gate")  # any LlamaForCausalLM

overrides set GPTConfig fields (residual_mode, dropout, ...). The residual variant's own parameters (the
gate's, for instance) are the ones a pretrained model lacks: they start as the variant initialises them
(GPT.residual_state_keys names them), every other weight must come from the pretrained model.

transformers is optional: it is imported when a model is loaded, with a message saying how to install it.
"""


import json
import os

import torch

from model import GPT, GPTConfig


def _hf_config(name_or_dir):
    """transformers' config of a hub name or a save_pretrained directory (no weights are read)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("nanoshift.hf.from_pretrained needs the optional package transformers: "
                          "pip install transformers") from None
    return AutoConfig.from_pretrained(name_or_dir)


def pretrained_config(name_or_dir, **overrides):
    """The GPTConfig from_pretrained builds for these weights, from the HF config alone (no weights are read):
    dispatches on model_type ('gpt2' or 'llama'); ValueError naming name_or_dir for what GPT cannot represent."""
    hc = _hf_config(name_or_dir)
    model_type = getattr(hc, "model_type", None)
    if model_type == "gpt2":
        args = _gpt2_args(hc, name_or_dir)
    elif model_type == "llama":
        args = _llama_args(hc, name_or_dir)
    else:
        raise ValueError(f"{name_or_dir}: model_type={model_type!r} is not supported "
                         f"(from_pretrained imports 'gpt2' and 'llama')")
    args.update(overrides)
    try:
        return GPTConfig(**args)
    except ValueError as e:
        raise ValueError(f"{name_or_dir}: {e}") from None


def from_pretrained(name_or_dir, **overrides):
    """A GPT holding GPT-2 or Llama weights (the whole model, in float32, on the CPU)."""
    config = pretrained_config(name_or_dir, **overrides)
    model = GPT(config)
    if config.arch == "gpt2":
        _load_hf_gpt2(model, name_or_dir)
    else:
        _load_hf_llama(model, name_or_dir)
    return model


def _gpt2_args(hc, name_or_dir):
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or getattr(hc, "reorder_and_upcast_attn", False):
        raise ValueError(f"{name_or_dir}: GPT-2 variants with rescaled/reordered attention are not supported")
    return dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                vocab_size=hc.vocab_size, bias=True, dropout=0.0, norm_eps=hc.layer_norm_epsilon,
                gelu_approx="tanh" if hc.activation_function in ("gelu_new", "gelu_pytorch_tanh") else "none")


def _llama_args(hc, name_or_dir):
    def unsupported(what):
        raise ValueError(f"{name_or_dir}: {what} is not supported (arch='llama' has none)")

    if getattr(hc, "attention_bias", False):
        unsupported("attention_bias=True")
    if getattr(hc, "mlp_bias", False):
        unsupported("mlp_bias=True")
    if getattr(hc, "hidden_act", "silu") != "silu":
        raise ValueError(f"{name_or_dir}: hidden_act={hc.hidden_act!r} is not supported (arch='llama' is SwiGLU)")
    head_dim = getattr(hc, "head_dim", None)
    if head_dim is not None and head_dim != hc.hidden_size // hc.num_attention_heads:
        raise ValueError(f"{name_or_dir}: head_dim={head_dim} is not hidden_size // num_attention_heads = "
                         f"{hc.hidden_size // hc.num_attention_heads}, which arch='llama' needs")
    rope_theta, rope_scaling = _hf_rope_settings(hc, name_or_dir)
    # transformers ties lm_head to the input embedding exactly when the config says so
    tied = bool(getattr(hc, "tie_word_embeddings", False))
    return dict(arch="llama", n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
                n_kv_head=getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads,
                n_embd=hc.hidden_size, intermediate_size=hc.intermediate_size,
                block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, rope_theta=rope_theta,
                rope_scaling=rope_scaling, norm_eps=hc.rms_norm_eps, tie_embeddings=tied,
                bias=False, dropout=0.0)


def _load_hf_gpt2(model, name_or_dir):
    from transformers import GPT2LMHeadModel

    hf_sd = GPT2LMHeadModel.from_pretrained(name_or_dir).state_dict()
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in hf_sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k not in sd:
                continue
            sd[k].copy_(v.t() if k.endswith(GPT2_CONV1D) else v)  # HF's Conv1D stores W transposed
    residual = model.residual_state_keys()
    missing = [k for k in sd if k not in hf_sd and k not in residual and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")


def _load_hf_llama(model, name_or_dir):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(name_or_dir)
    tied = hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    if tied != model.config.tie_embeddings:  # _llama_args read it from the config: transformers must agree
        raise ValueError(f"{name_or_dir}: the weights are {'' if tied else 'not '}tied but the config's "
                         f"tie_word_embeddings says otherwise")
    sd = model.state_dict()
    done = set()
    with torch.no_grad():
        for k, v in hf.state_dict().items():
            ours = _llama_key(k)
            if ours not in sd:
                raise ValueError(f"{name_or_dir}: no place for the weight {k} (shape {tuple(v.shape)})")
            if sd[ours].shape != v.shape:
                raise ValueError(f"{name_or_dir}: {k} has shape {tuple(v.shape)}, expected {tuple(sd[ours].shape)}")
            sd[ours].copy_(v)
            done.add(ours)
    if tied and done & {"lm_head.weight", "transformer.wte.weight"}:  # one tensor under two names
        done |= {"lm_head.weight", "transformer.wte.weight"}
    residual = model.residual_state_keys()
    missing = [k for k in sd if k not in done and k not in residual]
    if missing:
        raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")


# transformers' GPT-2 stores these as Conv1D weights: [in, out], the transpose of our nn.Linear's [out, in]
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# our parameter names <-> transformers' LlamaForCausalLM names, as name fragments (the same Linear layouts: no
# transposes; lm_head.weight is called the same). The one table for import (here) and export (hf_export.py).
LLAMA_NAMES = (
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.ln_f.", "model.norm."),
    (".ln_1.", ".input_layernorm."),
    (".ln_2.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    ("transformer.h.", "model.layers."),
)


def llama_name_to_hf(name):
    """Our parameter name as transformers' LlamaForCausalLM calls it."""
    for ours, theirs in LLAMA_NAMES:
        name = name.replace(ours, theirs)
    return name


def _llama_key(k):
    """transformers' LlamaForCausalLM parameter name as ours."""
    for ours, theirs in LLAMA_NAMES:
        k = k.replace(theirs, ours)
    return k


# -----------------------------------------------------------------------------
# Shard-wise import (parallelism='fsdp'): the weights read one tensor at a time from the safetensors files, so a
# sharded model built on the meta device (pretrained_config) takes them without any rank holding the whole model.

def safetensors_files(name_or_dir):
    """{HF tensor name: its .safetensors file} of a local save_pretrained directory (one file, or several with
    model.safetensors.index.json), or None where there are none (a hub name, or .bin weights only)."""
    if not os.path.isdir(name_or_dir):
        return None
    index = os.path.join(name_or_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(name_or_dir, file) for k, file in weight_map.items()}
    single = os.path.join(name_or_dir, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _hf_sources(ours, arch):
    """The HF tensor names our parameter may be stored under, first found wins."""
    if arch == "llama":
        names = [llama_name_to_hf(ours)]
        if ours == "lm_head.weight":  # tied: save_pretrained stores the embedding only
            names.append(llama_name_to_hf("transformer.wte.weight"))
        return names
    names = [ours, ours.removeprefix("transformer.")]  # the hub's gpt2 files name the base model's weights
    if ours == "lm_head.weight":  # GPT-2 ties lm_head to wte
        names += ["transformer.wte.weight", "wte.weight"]
    return names


def pretrained_tensors(name_or_dir, model):
    """(our parameter name, its full tensor in our layout) for every parameter of `model` (GPT(pretrained_config
    (name_or_dir, ...)), on any device, the meta device or sharded included) but the residual variant's, read
    from the directory's safetensors files one tensor at a time (safe_open reads a tensor when asked for it);
    GPT-2's Conv1D weights transposed. A tied parameter comes once, under its first name. The same checks as
    from_pretrained (ValueError naming the directory) run on names and shapes before any tensor is read."""
    from safetensors import safe_open

    files = safetensors_files(name_or_dir)
    if files is None:
        raise ValueError(f"{name_or_dir}: no .safetensors weights to read tensor by tensor")
    arch = model.config.arch
    residual = model.residual_state_keys()
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    plan, missing = [], []
    for name, p in model.named_parameters():
        if name in residual:
            continue
        # a tied tensor: from_pretrained's last write to it is its last name's (lm_head.weight)
        source = next((hf_name for alias in reversed(aliases[id(p)]) for hf_name in _hf_sources(alias, arch)
                       if hf_name in files), None)
        if source is None:
            missing.append(name)
        else:
            plan.append((name, p.shape, source))
    if missing:
        raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")
    def read(source, what):
        """One tensor, or its shape, from its file. The file is opened for it alone: safe_open memory-maps the
        file, and the pages read stay resident (in this process's RSS) until it is closed."""
        with safe_open(files[source], framework="pt") as f:
            return f.get_tensor(source) if what == "tensor" else tuple(f.get_slice(source).get_shape())

    if arch == "llama":  # from_pretrained places every weight of a Llama, or refuses
        ours = {name for names in aliases.values() for name in names}
        for k in files:
            if _llama_key(k) not in ours and not k.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"{name_or_dir}: no place for the weight {k} (shape {read(k, 'shape')})")
    for name, shape, source in plan:
        found = read(source, "shape")
        if arch == "gpt2" and source.endswith(GPT2_CONV1D):
            found = found[::-1]
        if found != tuple(shape):
            raise ValueError(f"{name_or_dir}: {source} has shape {found}, expected {tuple(shape)}")
    for name, _, source in plan:  # no local name keeps a tensor once it is yielded: one at a time
        yield name, read(source, "tensor").t() if arch == "gpt2" and source.endswith(GPT2_CONV1D) else \
            read(source, "tensor")


def _hf_rope_settings(hc, name):
    """(rope_theta, rope_scaling) from a transformers Llama config: transformers >= 5 keeps both in
    config.rope_parameters; 4.x has config.rope_theta and config.rope_scaling (None when unscaled)."""
    params = getattr(hc, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hc, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hc, "rope_theta", 10000.0))
    params = dict(params)
    theta = params.pop("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{name}: partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                         f"(arch='llama' rotates the whole head)")
    if kind == "default":
        return theta, None
    if kind == "llama3":  # transformers falls back to max_position_embeddings too
        params.setdefault("original_max_position_embeddings", hc.max_position_embeddings)
    return theta, params
