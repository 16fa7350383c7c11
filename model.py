"""
GPT in one file, with residual attenuation (arXiv 2602.14760). Two block families (arch):

    gpt2   LayerNorm, learned position table, GELU MLP, biases, tied embeddings (GPT-2 exactly)
    llama  RMSNorm, rotary positions (HF Llama's rotate_half layout), SwiGLU MLP, no biases,
           grouped-query attention (n_kv_head), tied or untied embeddings (LlamaForCausalLM exactly)

Every block is written as  x_{l+1} = alpha_l * x_l + F_l(x_l),  F_l(x) = block_l(x) - x,
where block_l is the ordinary pre-norm block (attention then MLP) of either arch. alpha_l = 1
for every layer is bit-for-bit the standard model. residual_mode picks alpha (same for both archs):

    none   alpha_l = 1
    cut    alpha_l = cut_alpha at the layer(s) cut_layer, 1 elsewhere
    gate   alpha_l = 1 - (1 - gate_alpha_min) * p_l, with p from gate_mode:
             layer   p = softmax(g), g in R^L learnable, init 0 (the paper's gate)
             token   p(t) = softmax(W LN(x_0[t]) + b), W = b = 0 at init (per-token)
             scalar  alpha_l = sigmoid(w_l), independent, init near 1

Attenuation ramp (for retrofits: step 0 must be the pretrained model): model.set_attenuation(a), a in
[0, 1], makes every mode's effective alpha_l = 1 - a * (1 - alpha_l). a = 1 (the default) is the mode
as configured, a = 0 the plain model bit for bit (alpha is then exactly 1.0, and 1.0 * x == x).
train.py sets a = attenuation_ramp(iter, attenuation_warmup_iters) = min(1, iter / warmup) before
every step (derived from iter_num, so a resume is exact), and from_checkpoint sets it from the
checkpoint's iter_num and settings, so analysis sees the model as it was trained at that step. It is a non-persistent buffer: not in checkpoints, and torch.compile sees a
tensor whose value changes, not a new constant every step (one recompile at most, when a reaches 1).

Usage:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=12, residual_mode="gate", gate_mode="layer"))
    logits, loss = model(idx, targets)
    resid, mid = model.hidden_states(idx, mid=True)   # for analysis
    model = GPT.from_checkpoint("out/ckpt.pt")         # ours or karpathy/nanoGPT's
    model = GPT.from_pretrained("gpt2")                # or a local save_pretrained dir
    model = GPT.from_pretrained("HuggingFaceTB/SmolLM2-135M", residual_mode="gate")  # any LlamaForCausalLM
"""

import inspect
import math
import re
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from nanoshift.checkpoint import load_checkpoint
from nanoshift.common import InputError, SettingError

RESIDUAL_MODES = ("none", "cut", "gate")
GATE_MODES = ("layer", "token", "scalar")
ARCHS = ("gpt2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names settings use


def dtype_from_name(name, setting="dtype", also=()):
    """The torch dtype a settings name stands for; a SettingError naming the setting and the choices
    (`also`: further words the caller handles itself, e.g. "auto", listed in the message)."""
    if name not in DTYPES:
        raise SettingError(f"{setting} must be one of {list(also) + list(DTYPES)}, got {name!r}")
    return DTYPES[name]
SCALAR_GATE_INIT_ALPHA = 0.98  # "near 1": standard residual at init, but with a gradient


def attenuation_ramp(iter_num, warmup_iters):
    """The attenuation a at an iteration: min(1, iter_num / warmup_iters); 1 from the start when warmup_iters is 0."""
    return 1.0 if not warmup_iters else min(1.0, iter_num / warmup_iters)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # gpt2 only: llama has no biases (its from_pretrained sets False)
    gelu_approx: str = "tanh"  # gpt2 only: GPT-2's own GELU; karpathy/nanoGPT checkpoints use "none"
    residual_mode: str = "none"
    cut_layer: Union[int, list] = -1  # block index (or list), negative counts from the end
    cut_alpha: float = 0.5
    gate_mode: str = "layer"
    gate_alpha_min: float = 0.5
    # block family; an old checkpoint without these fields loads as gpt2 (the defaults)
    arch: str = "gpt2"  # 'gpt2' | 'llama'
    n_kv_head: Optional[int] = None  # llama: key/value heads (grouped-query attention); None = n_head
    intermediate_size: Optional[int] = None  # llama: SwiGLU width; None = 8/3 * n_embd rounded up to 64
    rope_theta: float = 10000.0  # llama: rotary base
    rope_scaling: Optional[dict] = None  # llama: None or transformers' dict, rope_type 'llama3' or 'linear'
    norm_eps: float = 1e-5  # LayerNorm (gpt2) / RMSNorm (llama) epsilon
    tie_embeddings: bool = True  # lm_head shares the token embedding (always for gpt2)
    cut_layers: tuple = field(init=False, repr=False)  # cut_layer normalised to indices >= 0

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"GPTConfig: {msg}")

        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            fail(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu_approx not in ("tanh", "none"):
            fail(f"gelu_approx must be 'tanh' or 'none', got {self.gelu_approx!r}")
        if self.residual_mode not in RESIDUAL_MODES:
            fail(f"unknown residual_mode={self.residual_mode!r}, expected one of {RESIDUAL_MODES}")
        if self.gate_mode not in GATE_MODES:
            fail(f"unknown gate_mode={self.gate_mode!r}, expected one of {GATE_MODES}")
        if not 0.0 < self.cut_alpha <= 1.0:
            # the paper reports that alpha = 0 (removing the residual) breaks optimisation
            fail(f"cut_alpha must be in (0, 1], got {self.cut_alpha} (alpha <= 0 removes the residual path)")
        if not 0.0 <= self.gate_alpha_min < 1.0:
            fail(f"gate_alpha_min must be in [0, 1), got {self.gate_alpha_min}")
        layers = self.cut_layer if isinstance(self.cut_layer, (list, tuple)) else [self.cut_layer]
        if not layers:
            fail("cut_layer is an empty list")
        norm = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                fail(f"cut_layer must be an int or a list of ints, got {self.cut_layer!r}")
            if not -self.n_layer <= layer < self.n_layer:
                fail(f"cut_layer={layer} is out of range for n_layer={self.n_layer} "
                     f"(valid: {-self.n_layer}..{self.n_layer - 1})")
            norm.append(layer % self.n_layer)
        self.cut_layers = tuple(sorted(set(norm)))

        if self.arch not in ARCHS:
            fail(f"unknown arch={self.arch!r}, expected one of {ARCHS}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            fail(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not isinstance(self.tie_embeddings, bool):
            fail(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.n_kv_head is not None and (isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int)
                                           or self.n_kv_head <= 0):
            fail(f"n_kv_head must be None or a positive int, got {self.n_kv_head!r}")
        if self.intermediate_size is not None and (isinstance(self.intermediate_size, bool)
                                                   or not isinstance(self.intermediate_size, int)
                                                   or self.intermediate_size <= 0):
            fail(f"intermediate_size must be None or a positive int, got {self.intermediate_size!r}")
        if (isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float))
                or not self.rope_theta > 0):
            fail(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        if self.arch == "gpt2":  # settings GPT-2 has no use for are errors, not silently ignored
            if not self.tie_embeddings:
                fail("tie_embeddings=False is not supported for arch='gpt2' (GPT-2's input and output "
                     "embeddings are always tied); use arch='llama' for untied embeddings")
            if self.n_kv_head not in (None, self.n_head):
                fail(f"n_kv_head={self.n_kv_head} needs arch='llama' (GPT-2 has no grouped-query attention)")
            if self.intermediate_size is not None:
                fail(f"intermediate_size={self.intermediate_size} needs arch='llama' (GPT-2's MLP is 4 * n_embd)")
            if self.rope_theta != 10000.0 or self.rope_scaling is not None:
                fail("rope_theta / rope_scaling need arch='llama' (GPT-2 has a learned position table)")
        else:
            if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
                fail(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (grouped-query attention)")
            if (self.n_embd // self.n_head) % 2:
                fail(f"head size n_embd // n_head = {self.n_embd // self.n_head} must be even for rotary embeddings")
            rope_scaling_type(self.rope_scaling)  # raises ValueError naming rope_scaling

    @property
    def kv_heads(self):
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_size(self):
        """The MLP's hidden width: 4 * n_embd for gpt2; intermediate_size for llama, by default SwiGLU's
        8/3 * n_embd (same parameters as a 4x GELU MLP) rounded up to a multiple of 64."""
        if self.arch == "gpt2":
            return 4 * self.n_embd
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-8 * self.n_embd // (3 * 64)) * 64

    def to_dict(self):
        """The constructor arguments (what checkpoints store as 'model_args')."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# ---- rotary position embeddings (llama), computed exactly as transformers does ----

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


def rope_cos_sin(config, T, device=None):
    """(cos, sin), each [T, head_dim] float32, for positions 0..T-1 (transformers' LlamaRotaryEmbedding)."""
    freqs = torch.arange(T, device=device)[:, None].float() * rope_inv_freq(config, device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalised in float32, then weight * x.to(input dtype)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(config):
    """The arch's norm: LayerNorm for gpt2, RMSNorm for llama."""
    if config.arch == "llama":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, rope=None):  # rope: unused (GPT-2 adds positions to the embeddings)
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approx)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class LlamaAttention(nn.Module):
    """transformers' LlamaAttention: no biases, rotary q/k (rotate_half), grouped-query k/v heads."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, rope):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_head != self.n_head:  # query head h reads key/value head h // (n_head // n_kv_head)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    """transformers' LlamaMLP: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_size, bias=False)
        self.down_proj = nn.Linear(config.mlp_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        llama = config.arch == "llama"
        self.ln_1 = make_norm(config)
        self.attn = LlamaAttention(config) if llama else CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if llama else MLP(config)
        self.activation_checkpointing = False  # GPT.set_activation_checkpointing

    def forward(self, x, alpha=None, rope=None):
        """Returns (x_next, mid): x_next = alpha * x + (block(x) - x), mid = the state after attention.

        alpha=None is the standard block. The update F = attn + mlp is added to alpha * x
        in the standard block's own order, so alpha = 1 gives bit-identical results.
        rope: (cos, sin), each [T, head_dim], for llama (see rope_cos_sin); None for gpt2.
        """
        if self.activation_checkpointing and torch.is_grad_enabled():
            # inside forward, not a wrapper module: the parameter names (and so every checkpoint) stay the
            # same, and FSDP's hooks on this module gather the weights before the recomputation runs
            return recompute_in_backward(self._forward, x, alpha, rope, use_reentrant=False)
        return self._forward(x, alpha, rope)

    def _forward(self, x, alpha, rope):
        attn_out = self.attn(self.ln_1(x), rope)
        mid = x + attn_out
        mlp_out = self.mlp(self.ln_2(mid))
        if alpha is None:
            return mid + mlp_out, mid
        return (alpha * x + attn_out) + mlp_out, mid


class ResidualGate(nn.Module):
    """Learnable alphas for residual_mode='gate'. Returns alpha as [L] or, for 'token', [B, T, L]."""

    def __init__(self, config):
        super().__init__()
        self.mode = config.gate_mode
        self.budget = 1.0 - config.gate_alpha_min  # total attenuation shared over the layers
        L = config.n_layer
        if self.mode == "layer":
            self.logits = nn.Parameter(torch.zeros(L))
        elif self.mode == "token":
            self.ln = make_norm(config)  # LayerNorm (gpt2) or RMSNorm (llama) of x_0
            self.proj = nn.Linear(config.n_embd, L)
        else:  # scalar
            a = SCALAR_GATE_INIT_ALPHA
            self.logits = nn.Parameter(torch.full((L,), math.log(a / (1 - a))))
        self.reset_parameters()
        self.last_token_mean = None  # mean alpha over the tokens of the last forward ('token' mode)

    def reset_parameters(self):
        if self.mode == "token":  # zero: every token starts uniform, exactly like 'layer'
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x0):
        if self.mode == "scalar":
            return torch.sigmoid(self.logits)
        if self.mode == "layer":
            return 1.0 - self.budget * torch.softmax(self.logits, dim=-1)
        p = torch.softmax(self.proj(self.ln(x0)).float(), dim=-1)
        alpha = 1.0 - self.budget * p
        self.last_token_mean = alpha.detach().mean(dim=(0, 1))
        return alpha


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.arch == "gpt2":  # llama has no position table: rotary positions inside attention
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.gate = ResidualGate(config) if config.residual_mode == "gate" else None
        # the attenuation ramp (module docstring): the value, and whether it is exactly 1 (the mode as configured)
        self.register_buffer("attenuation", torch.ones(()), persistent=False)
        self._attenuation_full = True

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual output projections
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.gate is not None:
            self.gate.reset_parameters()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the tables that are only looked up (the position
        table; the input embedding when untied), as nanoGPT does. A tied embedding stays in: it is lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    # ---- residual attenuation ----

    def set_attenuation(self, value):
        """The ramp value a in [0, 1]: effective alpha_l = 1 - a * (1 - alpha_l) (module docstring)."""
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"attenuation must be in [0, 1], got {value}")
        self.attenuation.fill_(value)
        self._attenuation_full = value == 1.0

    def _layer_alphas(self, x0):
        """Per-layer alpha for this forward: a list of None (standard residual), floats or tensors."""
        cfg = self.config
        if cfg.residual_mode == "none":
            return [None] * cfg.n_layer
        if cfg.residual_mode == "cut":
            alphas = [cfg.cut_alpha if l in cfg.cut_layers else None for l in range(cfg.n_layer)]
        else:
            alpha = self.gate(x0)
            if alpha.dim() == 1:
                alphas = list(alpha.unbind(0))
            else:
                alphas = list(alpha.to(x0.dtype).unsqueeze(-1).unbind(-2))  # L tensors of [B, T, 1]
        if self._attenuation_full:
            return alphas
        a = self.attenuation  # a tensor, so the ramp's changing value never recompiles a compiled model
        return [None if alpha is None else 1 - a * (1 - alpha) for alpha in alphas]

    @torch.no_grad()
    def residual_alphas(self):
        """Current effective alpha per layer as a list of floats, the attenuation ramp included (token
        mode: mean over the last forward's tokens)."""
        cfg = self.config
        if cfg.residual_mode == "none":
            return [1.0] * cfg.n_layer
        if cfg.residual_mode == "cut":
            alphas = [cfg.cut_alpha if l in cfg.cut_layers else 1.0 for l in range(cfg.n_layer)]
        elif cfg.gate_mode == "token":
            if self.gate.last_token_mean is None:  # no forward yet: W = 0 means uniform for every token
                alphas = [1.0 - self.gate.budget / cfg.n_layer] * cfg.n_layer
            else:  # the raw alphas' mean; the ramp below is linear, so it maps the mean too
                alphas = self.gate.last_token_mean.float().tolist()
        else:
            alphas = self.gate(None).float()
            if hasattr(alphas, "full_tensor"):  # FSDP shards the gate's parameters: gather (a collective)
                alphas = alphas.full_tensor()
            alphas = alphas.tolist()
        if self._attenuation_full:
            return alphas
        a = float(self.attenuation)
        return [1.0 - a * (1.0 - alpha) for alpha in alphas]

    def set_activation_checkpointing(self, on):
        """Keep only each block's input during the forward pass and recompute the rest in the backward pass:
        activation memory of ~1 block instead of all of them, for ~1/3 more compute. Same results."""
        for block in self.transformer.h:
            block.activation_checkpointing = bool(on)

    # ---- forward ----

    def trunk(self, idx, resid=None, mids=None):
        """Embeddings and blocks; returns the last residual state (before ln_f).

        If lists are given, appends the residual states (embeddings + after each block) and
        the mid-block states (after attention) to them.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size={self.config.block_size}")
        if self.config.arch == "gpt2":
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            rope = None
        else:
            x = self.transformer.drop(self.transformer.wte(idx))
            # in the residual stream's dtype, as transformers does: float32 under autocast, bf16 in a bf16 model
            rope = tuple(t.to(x.dtype) for t in rope_cos_sin(self.config, T, idx.device))
        alphas = self._layer_alphas(x)
        if resid is not None:
            resid.append(x)
        for block, alpha in zip(self.transformer.h, alphas):
            x, mid = block(x, alpha, rope)
            if resid is not None:
                resid.append(x)
            if mids is not None:
                mids.append(mid)
        return x

    def forward(self, idx, targets=None):
        """nanoGPT's contract: with targets, logits for every position and the mean loss
        (targets == -1 are ignored); without, logits for the last position only."""
        x = self.transformer.ln_f(self.trunk(idx))
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, mid=False):
        """(resid, mids): resid = [embeddings, after block 1, ..., after block L] (L+1 raw states,
        none normed); mids = the L mid-block states after attention (empty unless mid=True)."""
        resid, mids = [], ([] if mid else None)
        self.trunk(idx, resid, mids)
        return resid, (mids or [])

    # ---- training helpers ----

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, gate_lr_mult=1.0):
        """AdamW: decay on >= 2-D weights only; gate parameters never decayed, lr x gate_lr_mult.

        Each group carries 'lr_mult'; a schedule sets group['lr'] = lr * group['lr_mult'].
        """
        decay, no_decay, gate = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("gate."):
                gate.append(p)
            elif p.dim() >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        ]
        if gate:
            groups.append({"params": gate, "weight_decay": 0.0, "lr_mult": gate_lr_mult})
        for g in groups:
            g["lr"] = learning_rate * g["lr_mult"]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx

    # ---- loading ----

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", **overrides):
        """Rebuild a model from a training checkpoint: ours or karpathy/nanoGPT's ('model_args' + 'model').

        path may also be a checkpoint dict already loaded (train.py's resume reads the rest of it too).
        """
        if isinstance(path, dict):
            ckpt, path = path, "the checkpoint"
        else:
            ckpt = load_checkpoint(path, map_location)  # weights-only: never runs code from the file
        if "model" not in ckpt or "model_args" not in ckpt:
            raise InputError(f"{path} is not a training checkpoint (needs 'model' and 'model_args', "
                             f"has {list(ckpt)[:8]})")
        args = dict(ckpt["model_args"])
        if "residual_mode" not in args:  # written by karpathy/nanoGPT, which uses the exact GELU
            args.setdefault("gelu_approx", "none")
        args.update(overrides)
        known = {f.name for f in fields(GPTConfig) if f.init}
        model = cls(GPTConfig(**{k: v for k, v in args.items() if k in known}))
        state = {}
        for k, v in ckpt["model"].items():
            k = k.removeprefix("_orig_mod.").removeprefix("module.")
            if re.search(r"\.attn\.bias$", k) or k.endswith(".attn.masked_bias"):
                continue  # nanoGPT's causal-mask buffer (non-flash path), not a parameter
            state[k] = v
        model.load_state_dict(state)
        warmup = (ckpt.get("config") or {}).get("attenuation_warmup_iters", 0)
        model.set_attenuation(attenuation_ramp(ckpt.get("iter_num", 0), warmup))  # the model as trained at that step
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """GPT-2 or Llama weights through transformers (a hub name or a local save_pretrained dir).

        Dispatches on the HF config's model_type: 'gpt2' (GPT2LMHeadModel) or 'llama' (LlamaForCausalLM:
        SmolLM2, TinyLlama, Llama-3.x, ...). overrides set GPTConfig fields (residual_mode, dropout, ...);
        residual parameters that the pretrained model lacks start as configured.
        """
        try:
            from transformers import AutoConfig
        except ImportError:
            raise ImportError("GPT.from_pretrained needs the optional package transformers: "
                              "pip install transformers") from None
        model_type = getattr(AutoConfig.from_pretrained(name_or_dir), "model_type", None)
        if model_type == "gpt2":
            return cls._from_hf_gpt2(name_or_dir, overrides)
        if model_type == "llama":
            return cls._from_hf_llama(name_or_dir, overrides)
        raise ValueError(f"{name_or_dir}: model_type={model_type!r} is not supported "
                         f"(GPT.from_pretrained imports 'gpt2' and 'llama')")

    @classmethod
    def _from_hf_gpt2(cls, name_or_dir, overrides):
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        hc = hf.config
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or getattr(hc, "reorder_and_upcast_attn", False):
            raise ValueError(f"{name_or_dir}: GPT-2 variants with rescaled/reordered attention are not supported")
        args = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                    vocab_size=hc.vocab_size, bias=True, dropout=0.0, norm_eps=hc.layer_norm_epsilon,
                    gelu_approx="tanh" if hc.activation_function in ("gelu_new", "gelu_pytorch_tanh") else "none")
        args.update(overrides)
        model = cls(GPTConfig(**args))
        sd = model.state_dict()
        hf_sd = hf.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in hf_sd.items():
                if k.endswith((".attn.bias", ".attn.masked_bias")) or k not in sd:
                    continue
                sd[k].copy_(v.t() if k.endswith(transposed) else v)  # HF's Conv1D stores W transposed
        missing = [k for k in sd if k not in hf_sd and not k.startswith("gate.") and k != "lm_head.weight"]
        if missing:
            raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")
        return model

    @classmethod
    def _from_hf_llama(cls, name_or_dir, overrides):
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
            model = cls(GPTConfig(**args))
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
        missing = [k for k in sd if k not in done and not k.startswith("gate.")]
        if missing:
            raise ValueError(f"{name_or_dir}: weights missing for {missing[:5]}")
        return model


_LLAMA_KEYS = [  # transformers' LlamaForCausalLM names -> ours (the same Linear layouts: no transposes)
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"transformer.h.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"transformer.h.\1.mlp."),
]


def _llama_key(k):
    for pattern, repl in _LLAMA_KEYS:
        if re.match(pattern, k):
            return re.sub(pattern, repl, k)
    return k  # lm_head.weight is called the same


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


def residual_settings():
    """{GPTConfig field or training setting: the residual modes that read it} (bridge until the registry lands)."""
    return {"cut_layer": ("cut",), "cut_alpha": ("cut",), "gate_mode": ("gate",), "gate_alpha_min": ("gate",),
            "gate_lr_mult": ("gate",)}


def residual_config_keys():
    """The GPTConfig fields a fine-tune takes from the settings (its shape comes from the pretrained weights)."""
    return ("dropout", "residual_mode", "cut_layer", "cut_alpha", "gate_mode", "gate_alpha_min")
