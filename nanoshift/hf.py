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


import torch

from model import GPT, GPTConfig


def from_pretrained(name_or_dir, **overrides):
    """A GPT holding GPT-2 or Llama weights; dispatches on the HF config's model_type ('gpt2' or 'llama')."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("nanoshift.hf.from_pretrained needs the optional package transformers: "
                          "pip install transformers") from None
    model_type = getattr(AutoConfig.from_pretrained(name_or_dir), "model_type", None)
    if model_type == "gpt2":
        return _from_hf_gpt2(name_or_dir, overrides)
    if model_type == "llama":
        return _from_hf_llama(name_or_dir, overrides)
    raise ValueError(f"{name_or_dir}: model_type={model_type!r} is not supported "
                     f"(from_pretrained imports 'gpt2' and 'llama')")


def _from_hf_gpt2(name_or_dir, overrides):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
    hc = hf.config
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or getattr(hc, "reorder_and_upcast_attn", False):
        raise ValueError(f"{name_or_dir}: GPT-2 variants with rescaled/reordered attention are not supported")
    args = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                vocab_size=hc.vocab_size, bias=True, dropout=0.0, norm_eps=hc.layer_norm_epsilon,
                gelu_approx="tanh" if hc.activation_function in ("gelu_new", "gelu_pytorch_tanh") else "none")
    args.update(overrides)
    model = GPT(GPTConfig(**args))
    sd = model.state_dict()
    hf_sd = hf.state_dict()
    with torch.no_grad():
        for k, v in hf_sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k not in sd:
                continue
            sd[k].copy_(v.t() if k.endswith(GPT2_CONV1D) else v)  # HF's Conv1D stores W transposed
    residual = model.residual_state_keys()
    missing = [k for k in sd if k not in hf_sd and k not in residual and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")
    return model


def _from_hf_llama(name_or_dir, overrides):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(name_or_dir)
    hc = hf.config

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
    tied = hf.get_input_embeddings().weight.data_ptr() == hf.get_output_embeddings().weight.data_ptr()
    args = dict(arch="llama", n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
                n_kv_head=getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads,
                n_embd=hc.hidden_size, intermediate_size=hc.intermediate_size,
                block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, rope_theta=rope_theta,
                rope_scaling=rope_scaling, norm_eps=hc.rms_norm_eps, tie_embeddings=tied,
                bias=False, dropout=0.0)
    args.update(overrides)
    try:
        model = GPT(GPTConfig(**args))
    except ValueError as e:
        raise ValueError(f"{name_or_dir}: {e}") from None
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
    return model


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
