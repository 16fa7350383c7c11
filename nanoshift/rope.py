"""
Rotary position embeddings' frequency tables (arch='llama'), computed exactly as transformers does, and the
validation of a rope_scaling dict. A library module; model.py builds its (cos, sin) tables from these.

    from nanoshift.rope import rope_inv_freq, rope_scaling_type
    rope_scaling_type({"rope_type": "linear", "factor": 2.0})   # 'linear' (ValueError naming rope_scaling if bad)
    inv_freq = rope_inv_freq(config)                            # [head_dim // 2] float32, from a GPTConfig

Supported: plain RoPE (rope_scaling=None), 'linear' (positions divided by factor) and 'llama3' (Llama 3.1's
wavelength-dependent scaling). Both functions take a GPTConfig-like object (n_embd, n_head, rope_theta,
rope_scaling, block_size) and import nothing from the project, so model.py can import them.
"""

import math

import torch


_ROPE_SCALING_KEYS = {  # rope type -> (required keys, optional keys), as in transformers' rope_scaling dicts
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, {"original_max_position_embeddings"}),
}


def rope_scaling_type(scaling):
    """'default' for None, else the dict's rope_type ('llama3' or 'linear'); ValueError naming rope_scaling."""
    def fail(msg):
        raise ValueError(f"GPTConfig: rope_scaling {msg}")

    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        fail(f"must be None or a dict like transformers' (e.g. {{'rope_type': 'llama3', 'factor': 32.0, "
             f"...}}), got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != scaling["rope_type"]:
        fail(f"has type={scaling['type']!r} and rope_type={scaling['rope_type']!r}")
    if kind not in _ROPE_SCALING_KEYS:
        fail(f"has unsupported rope type {kind!r}: supported are {tuple(_ROPE_SCALING_KEYS)} "
             f"(rope_scaling=None for plain RoPE)")
    required, optional = _ROPE_SCALING_KEYS[kind]
    missing = sorted(required - set(scaling))
    if missing:
        fail(f"of type {kind!r} is missing {missing}")
    unknown = sorted(set(scaling) - required - optional - {"rope_type", "type", "partial_rotary_factor"})
    if unknown:
        fail(f"of type {kind!r} has keys it does not use: {unknown}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        fail(f"partial_rotary_factor={scaling['partial_rotary_factor']} is not supported (only 1.0)")
    for key in required | (optional & set(scaling)):
        v = scaling[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            fail(f"{key} must be a positive number, got {v!r}")
    if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        fail(f"needs low_freq_factor < high_freq_factor, got {scaling['low_freq_factor']} and "
             f"{scaling['high_freq_factor']}")
    return kind


def rope_inv_freq(config, device=None):
    """[head_dim // 2] float32 inverse frequencies, the same numbers as transformers' rope init functions
    (default, 'linear', 'llama3'). A function of the config only, so no buffer to save, cast or shard."""
    dim = config.n_embd // config.n_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / dim))
    kind, s = rope_scaling_type(config.rope_scaling), config.rope_scaling
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_context_len = s.get("original_max_position_embeddings", config.block_size)
        low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low) / (high - low)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq
