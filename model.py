"""
GPT in one file, with residual attenuation (arXiv 2602.14760). Two block families (arch):

    gpt2   LayerNorm, learned position table, GELU MLP, biases, tied embeddings (GPT-2 exactly)
    llama  RMSNorm, rotary positions (HF Llama's rotate_half layout), SwiGLU MLP, no biases,
           grouped-query attention (n_kv_head), tied or untied embeddings (LlamaForCausalLM exactly)

Every block is written as  x_{l+1} = alpha_l * x_l + F_l(x_l),  F_l(x) = block_l(x) - x,
where block_l is the ordinary pre-norm block (attention then MLP) of either arch. alpha_l = 1
for every layer is bit-for-bit the standard model. residual_mode picks the residual variant, one
registered class each in the "residual variants" section below (same for both archs):

    none   alpha_l = 1
    cut    alpha_l = cut_alpha at the layer(s) cut_layer, 1 elsewhere
    gate   alpha_l = 1 - (1 - gate_alpha_min) * p_l, with p from gate_mode:
             layer   p = softmax(g), g in R^L learnable, init 0 (the paper's gate)
             token   p(t) = softmax(W LN(x_0[t]) + b), W = b = 0 at init (per-token)
             scalar  alpha_l = sigmoid(w_l), independent, init near 1

and the field's own residual methods, so the paper's attenuation meets its competitors on equal terms:

    lambdas            x = resid_λ_l x + x0_λ_l x0 before each block, learned (nanochat, modded-nanogpt)
    rezero             x + α_l F(x), α = 0 at init (Bachlechner et al. 2020)
    layerscale         x + diag(λ_l) F(x) per sublayer, small init (CaiT, Touvron et al. 2021)
    deepnorm           post-LN, LN(α x + F(x)), α and the init scaled by depth (DeepNet, Wang et al. 2022)
    value_residual     each layer's attention values mixed with the first layer's (ResFormer, 2024)
    hyper_connections  n residual streams, learned read / write / mixing (Zhu et al. 2025; mHC: Sinkhorn)
    denseformer        after each block, a learned average of the embeddings and every earlier block output

A new variant is one class there (its formula, settings, checks, optimizer rule, alphas and label);
train.py, analyze.py, bench.py and the HF import learn about it from the registry (RESIDUALS).

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
    model.residual_alphas()                            # alpha per layer, as training logs it
    model = GPT.from_checkpoint("out/ckpt.pt")         # ours or karpathy/nanoGPT's
    # pretrained GPT-2 / Llama weights: nanoshift.hf.from_pretrained("gpt2", residual_mode="gate")
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
from nanoshift.rope import rope_inv_freq, rope_scaling_type

ARCHS = ("gpt2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names settings use


def dtype_from_name(name, setting="dtype", also=()):
    """The torch dtype a settings name stands for; a SettingError naming the setting and the choices
    (`also`: further words the caller handles itself, e.g. "auto", listed in the message)."""
    if name not in DTYPES:
        raise SettingError(f"{setting} must be one of {list(also) + list(DTYPES)}, got {name!r}")
    return DTYPES[name]


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
    residual_mode: str = "none"  # a name in RESIDUALS; the settings below belong to the variants that read them
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
    # issue #23's stream variants (value_residual, hyper_connections, denseformer); old checkpoints take the defaults
    value_residual_learned: bool = True  # value_residual: lambdas learned from 0.5/0.5 (False: fixed 0.5/0.5)
    hc_streams: int = 4  # hyper_connections: number of residual streams n
    hc_sinkhorn_iters: int = 0  # hyper_connections: Sinkhorn iterations on the stream mixing (mHC); 0 = plain HC
    cut_layers: tuple = field(init=False, repr=False)  # cut_layer normalised to indices >= 0 (Cut sets it)
    # issue #23's scalar variants (an old checkpoint without these fields loads with the defaults)
    rezero_norm: bool = True  # rezero: keep the pre-norms ln_1 / ln_2 inside F (False: F reads the raw x, the paper's)
    layerscale_init: Optional[float] = None  # layerscale: initial lambda; None = CaiT's rule by depth (0.1 up to 18 layers)

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
        if self.residual_mode not in RESIDUALS:
            fail(f"unknown residual_mode={self.residual_mode!r}, expected one of {tuple(RESIDUALS)}")
        for variant in RESIDUALS.values():  # every variant's settings, the unused ones too: a typo fails early
            variant.check_config(self)

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


# ---- residual variants: how each block's output joins the residual stream ----
#
# One registered class per residual_mode. Everything else asks the registry: GPTConfig (which modes exist,
# their checks), GPT (the trunk, alphas, optimizer groups), the HF import (the parameters a pretrained
# model lacks), train.py (residual_settings, residual_config_keys), analyze.py (residual_label,
# initial_alphas) and bench.py (residual_examples).

RESIDUALS = {}  # residual_mode -> its class, in registration order


def register_residual(cls):
    """Class decorator: cls becomes the residual variant GPTConfig(residual_mode=cls.name) builds. A test can
    add a variant for a while and take it out again with RESIDUALS.pop(cls.name)."""
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be a Python identifier (the model holds the variant at "
                         f"model.<name>), got {name!r}")
    if RESIDUALS.get(name, cls) is not cls:
        raise ValueError(f"residual_mode {name!r} is already registered, by {RESIDUALS[name].__name__}")
    known = {f.name for f in fields(GPTConfig) if f.init}
    unknown = [s for s in cls.settings if s not in known]
    if unknown:
        raise ValueError(f"{cls.__name__} reads {unknown}, which are not GPTConfig fields: add them to GPTConfig "
                         "(and to train.py's settings) first")
    RESIDUALS[name] = cls
    return cls


def residual_settings():
    """{setting: the residual modes that read it}: every GPTConfig field a variant reads, and each variant's
    learning-rate multiplier (a training setting, e.g. gate_lr_mult). train.py warns about a setting changed
    in a mode that ignores it."""
    owners = {}
    for name, variant in RESIDUALS.items():
        for setting in variant.settings + ((variant.lr_mult_setting,) if variant.lr_mult_setting else ()):
            owners.setdefault(setting, []).append(name)
    return {setting: tuple(modes) for setting, modes in owners.items()}


def residual_config_keys():
    """The GPTConfig fields a retrofit or fine-tune takes from its settings (its shape comes from the
    weights): dropout, residual_mode and every field a registered variant reads."""
    keys = ["dropout", "residual_mode"]
    for variant in RESIDUALS.values():
        keys += [s for s in variant.settings if s not in keys]
    return tuple(keys)


def _settings(config):
    """A GPTConfig as its constructor arguments; a mapping (a run's logged config, maybe partial) as is."""
    return config.to_dict() if isinstance(config, GPTConfig) else dict(config)


def residual_label(config):
    """A short text for the residual mode of a GPTConfig or a run's config dict, for plots and tables, e.g.
    'layer gate, alpha_min 0.5'. A mode this model.py does not know is shown by its name."""
    settings = _settings(config)
    mode = settings.get("residual_mode", "?")
    return RESIDUALS[mode].label(settings) if mode in RESIDUALS else str(mode)


def initial_alphas(config):
    """The alpha per layer a learned variant starts training from (a GPTConfig or a run's config dict;
    missing settings take GPTConfig's defaults), or None when the alphas are not learned (they are then
    what residual_alphas logs at every step) or the mode is unknown."""
    settings = _settings(config)
    mode = settings.get("residual_mode", "none")
    return RESIDUALS[mode].initial_alphas(settings) if mode in RESIDUALS else None


def residual_examples():
    """{label: GPTConfig keyword arguments}: the settings of each variant worth comparing (its `examples`);
    bench.py times each one, the tests run each one."""
    examples = {}
    for name, variant in RESIDUALS.items():
        for example in variant.examples:
            settings = {"residual_mode": name, **example}
            examples[residual_label(settings)] = settings
    return examples


def _setting(settings, name):
    """settings[name], or GPTConfig's default for it."""
    return settings.get(name, GPTConfig.__dataclass_fields__[name].default)


def record(resid, mids, state, mid):
    """What forward_blocks keeps of a block, where asked (lists, or None): the residual state after it (what the
    lens reads) and its mid-block state."""
    if resid is not None:
        resid.append(state)
    if mids is not None:
        mids.append(mid)


class Residual(nn.Module):
    """A residual variant: how the blocks' outputs join the residual stream. This base class is the
    standard residual, x_{l+1} = block_l(x_l), and the machinery of the alpha family.

    A subclass sets
        name              the residual_mode that selects it; the model holds it at model.<name>, so its
                          parameters are '<name>.…' in the state_dict (the gate's 'gate.logits')
        settings          the GPTConfig fields it reads (a new setting is a new GPTConfig field)
        lr_mult_setting   the training setting that multiplies its parameters' learning rate, or None
        decays            whether its parameters take weight decay (False: decay would pull them to 0)
        examples          settings worth comparing (bench.py times each, the tests run each)
    and overrides what it changes:
        check_config(config)      ValueError('GPTConfig: ...') for a bad value of its settings; may set a
                                  derived field (cut: cut_layers). Runs for every config, whatever its mode
        label(settings)           short text for plots and tables
        initial_alphas(settings)  per-layer alphas a learned variant starts from (None: not learned)
        reset_parameters()        its own init, run after GPT's (GPT's init draws for every Linear first)
        alphas(x0)                the alpha family: per-layer alpha for this forward, None (standard
                                  residual), a float or a tensor (0-d or [B, T, 1]); x0 = the embeddings
        alpha_values()            the same as floats, for logging (token-level alphas: their mean)
        forward_blocks(...)       the trunk's wiring: runs the blocks from the embeddings, applies the
                                  attenuation ramp, and appends the residual state after each block (what
                                  the lens reads) and the mid-block state. Override it for variants whose
                                  wiring is not x_{l+1} = alpha_l x_l + F_l(x_l)
        optimizer_groups(...)     AdamW groups for its parameters (default: one group, per decays and
                                  lr_mult_setting)
        init_blocks(blocks)       adjust the blocks' own weights after GPT's init (deepnorm's beta scaling)
        check_ramp(settings)      SettingError if the variant cannot take the attenuation ramp (a < 1);
                                  GPT.set_attenuation calls it

    The attenuation ramp: with attenuation a in [0, 1] (None: a = 1), a variant must be the configured
    variant at a = 1 and the plain model, bit for bit, at a = 0 (retrofits start from pretrained weights).
    The alpha family gets this from alpha -> 1 - a (1 - alpha); a variant that cannot become the plain model
    (deepnorm's post-LN) refuses a < 1 with a clear error.

    How issue #23's variants map onto this interface (each is implemented below, in its own class):
        lambdas      (class Lambdas below) x = resid_λ_l x + x0_λ_l x0 before each block (nanochat): forward_blocks
                     keeps x0 and mixes before calling block(x, None, rope); the ramp scales (λ - identity)
                     by a; alpha_values logs resid_λ; two optimizer groups (x0_λ, resid_λ at 0.01x its lr)
        rezero       (class ReZero) x + α_l F(x) per sublayer, α = 0 at init (Bachlechner et al. 2020): a
                     wiring run inside Block.forward scales each sublayer's update; the ramp moves α towards 1
        layerscale   (class LayerScale) x + diag(λ_l) F(x) per sublayer, small init (CaiT): as rezero with vectors
        deepnorm     (class DeepNorm) post-LN, x = LN(α x + F(x)), α and the init scale set by depth (DeepNet):
                     a wiring uses block.ln_1 / ln_2 as the post-norms; init_blocks sets the β init; the
                     ramp is refused (check_ramp)
        value resid  each layer's attention values mixed with the first layer's (ResFormer, Zhou et al.
                     2024): forward_blocks captures layer 0's values and hands them to the later blocks;
                     this needs the attention to accept the values to mix (an optional argument of
                     CausalSelfAttention / LlamaAttention), the one change outside this section
        hyper-conn.  n residual streams with learnable mixing (Zhu et al. 2024; mHC: doubly stochastic):
                     forward_blocks expands x to [n, B, T, C], feeds each block a weighted sum of the streams
                     and writes its update back with learned weights; it appends the streams' sum to resid
        denseformer  after block l, x = weighted average of the embeddings and every earlier block output
                     (Pagliardini et al. 2024), identity at init: forward_blocks keeps the outputs and the
                     weights [L, L + 1]; what it appends to resid is the averaged state the next block reads
    """

    name = None
    settings = ()
    lr_mult_setting = None
    decays = False
    examples = ({},)

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def fail(cls, message):
        raise ValueError(f"GPTConfig: {message}")

    @classmethod
    def check_config(cls, config):
        pass

    @classmethod
    def label(cls, settings):
        return cls.name

    @classmethod
    def initial_alphas(cls, settings):
        return None

    def reset_parameters(self):
        pass

    def init_blocks(self, blocks):
        pass

    @classmethod
    def check_ramp(cls, settings):
        pass

    def alphas(self, x0):
        return [None] * self.config.n_layer

    def alpha_values(self):
        return [1.0] * self.config.n_layer

    def effective_alpha_values(self, attenuation=None):
        """alpha_values with the ramp (attenuation a float, None for a = 1): what training logs."""
        alphas = self.alpha_values()
        if attenuation is None:
            return alphas
        return [1.0 - attenuation * (1.0 - alpha) for alpha in alphas]

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        """Run the blocks on the embeddings x; returns the last residual state. attenuation: the ramp's
        value as a tensor, None for a = 1 (a tensor, so a changing value never recompiles a compiled model).
        Appends the state after each block to resid and the mid-block state to mids (lists, or None)."""
        alphas = self.alphas(x)
        if attenuation is not None:
            alphas = [None if alpha is None else 1 - attenuation * (1 - alpha) for alpha in alphas]
        for block, alpha in zip(blocks, alphas):
            x, mid = block(x, alpha, rope)
            record(resid, mids, x, mid)
        return x

    def optimizer_groups(self, weight_decay, lr_mults):
        """AdamW parameter groups for this variant's own parameters; lr_mults: {training setting: value}."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        lr_mult = lr_mults.get(self.lr_mult_setting, 1.0) if self.lr_mult_setting else 1.0
        return [{"params": params, "weight_decay": weight_decay if self.decays else 0.0, "lr_mult": lr_mult}]


@register_residual
class Plain(Residual):
    """none: the standard residual, alpha_l = 1 for every layer (GPT-2 / Llama exactly)."""

    name = "none"

    @classmethod
    def label(cls, settings):
        return "no attenuation"


@register_residual
class Cut(Residual):
    """cut: a fixed attenuation, alpha_l = cut_alpha at the block(s) cut_layer, 1 elsewhere (the paper's fixed
    cut, arXiv 2602.14760). cut_layer: a block index or a list of them, negative counting from the end.
    0 < cut_alpha <= 1: the paper reports that alpha = 0 (removing the residual) breaks optimisation."""

    name = "cut"
    settings = ("cut_layer", "cut_alpha")
    examples = (dict(cut_layer=-1, cut_alpha=0.5),)

    @staticmethod
    def layers(cut_layer, n_layer):
        """cut_layer (an int or a list of ints, negative from the end) as sorted block indices >= 0."""
        layers = cut_layer if isinstance(cut_layer, (list, tuple)) else [cut_layer]
        if not layers:
            Cut.fail("cut_layer is an empty list")
        norm = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                Cut.fail(f"cut_layer must be an int or a list of ints, got {cut_layer!r}")
            if not -n_layer <= layer < n_layer:
                Cut.fail(f"cut_layer={layer} is out of range for n_layer={n_layer} (valid: {-n_layer}..{n_layer - 1})")
            norm.append(layer % n_layer)
        return tuple(sorted(set(norm)))

    @classmethod
    def check_config(cls, config):
        if not 0.0 < config.cut_alpha <= 1.0:
            cls.fail(f"cut_alpha must be in (0, 1], got {config.cut_alpha} (alpha <= 0 removes the residual path)")
        config.cut_layers = cls.layers(config.cut_layer, config.n_layer)

    @classmethod
    def label(cls, settings):
        return f"cut at block {settings.get('cut_layer')}, alpha {settings.get('cut_alpha')}"

    def alphas(self, x0):
        cfg = self.config
        return [cfg.cut_alpha if l in cfg.cut_layers else None for l in range(cfg.n_layer)]

    def alpha_values(self):
        cfg = self.config
        return [cfg.cut_alpha if l in cfg.cut_layers else 1.0 for l in range(cfg.n_layer)]


@register_residual
class Gate(Residual):
    """gate: learned attenuation with a fixed budget, alpha_l = 1 - (1 - gate_alpha_min) * p_l, p by gate_mode:
        layer   p = softmax(g), g in R^L, init 0: uniform (the paper's gate, arXiv 2602.14760)
        token   p(t) = softmax(W LN(x_0[t]) + b), W = b = 0 at init: uniform for every token, like 'layer'
        scalar  alpha_l = sigmoid(w_l), independent per layer, init near 1 (no budget)
    Its parameters are never weight-decayed and their lr is learning_rate * gate_lr_mult. Called as a module,
    it returns alpha as [L] or, for 'token', [B, T, L]."""

    name = "gate"
    settings = ("gate_mode", "gate_alpha_min")
    lr_mult_setting = "gate_lr_mult"
    MODES = ("layer", "token", "scalar")
    SCALAR_INIT_ALPHA = 0.98  # "near 1": the standard residual at init, but with a gradient
    examples = tuple(dict(gate_mode=mode) for mode in MODES)

    @classmethod
    def check_config(cls, config):
        if config.gate_mode not in cls.MODES:
            cls.fail(f"unknown gate_mode={config.gate_mode!r}, expected one of {cls.MODES}")
        if not 0.0 <= config.gate_alpha_min < 1.0:
            cls.fail(f"gate_alpha_min must be in [0, 1), got {config.gate_alpha_min}")

    @classmethod
    def label(cls, settings):
        floor = settings.get("gate_alpha_min")
        return f"{settings.get('gate_mode')} gate" + ("" if floor is None else f", alpha_min {floor}")

    @classmethod
    def initial_alphas(cls, settings):
        n_layer = _setting(settings, "n_layer")
        if _setting(settings, "gate_mode") == "scalar":
            return [cls.SCALAR_INIT_ALPHA] * n_layer
        return [1 - (1 - _setting(settings, "gate_alpha_min")) / n_layer] * n_layer  # uniform over the layers

    def __init__(self, config):
        super().__init__(config)
        self.mode = config.gate_mode
        self.budget = 1.0 - config.gate_alpha_min  # total attenuation shared over the layers
        L = config.n_layer
        if self.mode == "layer":
            self.logits = nn.Parameter(torch.zeros(L))
        elif self.mode == "token":
            self.ln = make_norm(config)  # LayerNorm (gpt2) or RMSNorm (llama) of x_0
            self.proj = nn.Linear(config.n_embd, L)
        else:  # scalar
            a = self.SCALAR_INIT_ALPHA
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

    def alphas(self, x0):
        alpha = self(x0)
        if alpha.dim() == 1:
            return list(alpha.unbind(0))
        return list(alpha.to(x0.dtype).unsqueeze(-1).unbind(-2))  # L tensors of [B, T, 1]

    def alpha_values(self):
        L = self.config.n_layer
        if self.mode == "token":
            if self.last_token_mean is None:  # no forward yet: W = 0 means uniform for every token
                return [1.0 - self.budget / L] * L
            return self.last_token_mean.float().tolist()  # the ramp is linear, so it maps the mean too
        alphas = self(None).float()
        if hasattr(alphas, "full_tensor"):  # FSDP shards the gate's parameters: gather (a collective)
            alphas = alphas.full_tensor()
        return alphas.tolist()


# ---- issue #23's scalar variants: lambdas, rezero, layerscale, deepnorm ----

def _whole(t):
    """A variant's parameter as a whole tensor: between steps FSDP holds only this rank's shard (a DTensor;
    gathering it is a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ramped(scale, attenuation):
    """The attenuation ramp applied to a residual scale: 1 - a (1 - scale), exactly 1.0 at a = 0 (then 1.0 * t
    == t, bit for bit); the scale itself when attenuation is None (a = 1)."""
    return scale if attenuation is None else 1 - attenuation * (1 - scale)


@register_residual
class Lambdas(Residual):
    """lambdas: before block l, x = resid_λ_l · x + x0_λ_l · x0, then x = block_l(x); x0 = the embeddings as the
    trunk gets them (after dropout); resid_λ and x0_λ learned per layer. Source: nanochat's nanochat/gpt.py
    (GPT.forward, GPT.init_weights, setup_optimizer; dev/LOG.md 2026-01-11, -0.0077 bpb at d12), itself from
    modded-nanogpt's train_gpt.py. Init as nanochat's code: resid_λ_l = 1.15 - 0.10 l / (L - 1) (1.15 at the
    first layer, 1.05 at the last) and x0_λ_l = 0.20 - 0.15 l / (L - 1) (0.20 to 0.05).

    Learning rate: x0_λ at learning_rate * lambdas_lr_mult, resid_λ at RESID_LR_RATIO (0.01) times that, as
    nanochat (scalar_lr for x0_λ, scalar_lr * 0.01 for resid_λ: "multiplying the residual compounds through
    layers"). One multiplier and a fixed ratio rather than two settings: the ratio is nanochat's finding, the
    multiplier is what a comparison tunes. No weight decay (decay pulls resid_λ towards 0, an attenuation of
    its own; nanochat's current code decays resid_λ by 0.05 and x0_λ not at all: here neither is decayed).

    Against the paper's attenuation (x_{l+1} = α_l x_l + F_l(x_l)): resid_λ < 1 attenuates the residual path
    as α < 1 does, but before the block, so F_l reads the scaled state too: x_{l+1} = r x_l + c x0 +
    F_l(r x_l + c x0). A pre-norm F is blind to the scale (LN(r x) = LN(x) for r > 0, up to eps), so with
    x0_λ = 0 this is the paper's learned α family with α_l = resid_λ_l; x0_λ adds a learned shortcut from the
    embeddings, and nanochat starts resid_λ above 1 (amplifying, not attenuating). The lens reads the block
    outputs x_{l+1} (before the next layer's mixing), the last of which is what ln_f reads; alphas logs resid_λ.

    The ramp: resid_λ -> 1 - a (1 - resid_λ), x0_λ -> a x0_λ, so a = 0 is the plain model bit for bit."""

    name = "lambdas"
    lr_mult_setting = "lambdas_lr_mult"
    RESID_LR_RATIO = 0.01  # nanochat: resid_λ's lr is scalar_lr * 0.01

    @classmethod
    def label(cls, settings):
        return "lambdas (nanochat)"

    @staticmethod
    def init_schedule(n_layer):
        """(resid_λ, x0_λ) at init, lists over the layers: nanochat's linear ramps over depth."""
        span = max(n_layer - 1, 1)
        return ([1.15 - 0.10 * l / span for l in range(n_layer)], [0.20 - 0.15 * l / span for l in range(n_layer)])

    @classmethod
    def initial_alphas(cls, settings):
        return cls.init_schedule(_setting(settings, "n_layer"))[0]

    def __init__(self, config):
        super().__init__(config)
        self.resid = nn.Parameter(torch.ones(config.n_layer))
        self.x0 = nn.Parameter(torch.zeros(config.n_layer))
        self.reset_parameters()

    def reset_parameters(self):
        resid, x0 = self.init_schedule(self.config.n_layer)
        with torch.no_grad():
            self.resid.copy_(torch.tensor(resid))
            self.x0.copy_(torch.tensor(x0))

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        x0 = x
        resid_scales = _ramped(self.resid, attenuation)
        x0_scales = self.x0 if attenuation is None else attenuation * self.x0  # exactly 0 at a = 0
        for l, block in enumerate(blocks):
            x, mid = block(resid_scales[l] * x + x0_scales[l] * x0, None, rope)
            record(resid, mids, x, mid)
        return x

    def alpha_values(self):
        return _whole(self.resid).float().tolist()

    def optimizer_groups(self, weight_decay, lr_mults):
        lr_mult = lr_mults.get(self.lr_mult_setting, 1.0)
        return [{"params": [self.x0], "weight_decay": 0.0, "lr_mult": lr_mult},
                {"params": [self.resid], "weight_decay": 0.0, "lr_mult": lr_mult * self.RESID_LR_RATIO}]


@register_residual
class ReZero(Residual):
    """rezero: every sublayer's update scaled by one learned scalar per layer, α_l = 0 at init (Bachlechner et
    al. 2020, "ReZero is all you need", arXiv 2003.04887; their transformer layer applies the same α to the
    attention and the feed-forward update):
        mid = x + α_l attn(N1(x)),   x_{l+1} = mid + α_l mlp(N2(mid))
    rezero_norm=True keeps the pre-norms (N = ln_1, ln_2); False drops them (N = identity, F reads the raw x as
    in the paper; ln_1 / ln_2 stay in the checkpoint but are frozen, requires_grad False, so DDP never waits for
    their gradients). ln_f before the output layer stays in both. At α = 0 the trunk is the embedding path:
    every residual state equals the embeddings. lr: learning_rate * rezero_lr_mult; no weight decay (it would
    pull α back to 0). alphas logs α_l. The lens reads x_{l+1}.

    The ramp: α -> 1 - a (1 - α); a = 0 is the plain model bit for bit with rezero_norm=True. Without the
    norms there is no plain model to ramp from: refused."""

    name = "rezero"
    settings = ("rezero_norm",)
    lr_mult_setting = "rezero_lr_mult"
    examples = (dict(rezero_norm=True), dict(rezero_norm=False))

    @classmethod
    def check_config(cls, config):
        if not isinstance(config.rezero_norm, bool):
            cls.fail(f"rezero_norm must be True or False, got {config.rezero_norm!r}")

    @classmethod
    def label(cls, settings):
        return "rezero" + ("" if _setting(settings, "rezero_norm") else ", no norm")

    @classmethod
    def initial_alphas(cls, settings):
        return [0.0] * _setting(settings, "n_layer")

    @classmethod
    def check_ramp(cls, settings):
        if not _setting(settings, "rezero_norm"):
            raise SettingError("residual_mode='rezero' with rezero_norm=False has no attenuation ramp (a < 1, "
                               "attenuation_warmup_iters > 0): without ln_1 / ln_2 no value of alpha is the plain "
                               "model; use rezero_norm=True or attenuation_warmup_iters=0")

    def __init__(self, config):
        super().__init__(config)
        self.alpha = nn.Parameter(torch.zeros(config.n_layer))

    def reset_parameters(self):
        nn.init.zeros_(self.alpha)

    def init_blocks(self, blocks):
        if not self.config.rezero_norm:
            for block in blocks:
                block.ln_1.requires_grad_(False)
                block.ln_2.requires_grad_(False)

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        scales = _ramped(self.alpha, attenuation)
        for l, block in enumerate(blocks):
            x, mid = block(x, None, rope, self.sublayers, (scales[l],))
            record(resid, mids, x, mid)
        return x

    def sublayers(self, block, x, rope, scale):
        """One block's two updates, each scaled by the layer's alpha (run inside Block.forward)."""
        norm = self.config.rezero_norm
        mid = x + scale * block.attn(block.ln_1(x) if norm else x, rope)
        return mid + scale * block.mlp(block.ln_2(mid) if norm else mid), mid

    def alpha_values(self):
        return _whole(self.alpha).float().tolist()


@register_residual
class LayerScale(Residual):
    """layerscale: each sublayer's update scaled per channel by a learned vector (Touvron et al. 2021, "Going
    deeper with image transformers" (CaiT), arXiv 2103.17239; one vector for the attention update and one for
    the MLP's, as CaiT's layer has):
        mid = x + diag(λ^attn_l) attn(ln_1(x)),   x_{l+1} = mid + diag(λ^mlp_l) mlp(ln_2(mid))
    Init: every entry layerscale_init, or by CaiT's rule when it is None: 0.1 up to 18 layers, 1e-5 up to 24,
    1e-6 deeper. lr: learning_rate * layerscale_lr_mult; no weight decay (CaiT's 1-D parameters take none).
    alphas logs each layer's mean over its 2 n_embd scales. The lens reads x_{l+1}.

    The ramp: λ -> 1 - a (1 - λ) per channel; a = 0 is the plain model bit for bit."""

    name = "layerscale"
    settings = ("layerscale_init",)
    lr_mult_setting = "layerscale_lr_mult"

    @classmethod
    def init_value(cls, settings):
        value = _setting(settings, "layerscale_init")
        if value is not None:
            return float(value)
        n_layer = _setting(settings, "n_layer")
        return 0.1 if n_layer <= 18 else 1e-5 if n_layer <= 24 else 1e-6

    @classmethod
    def check_config(cls, config):
        value = config.layerscale_init
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            cls.fail(f"layerscale_init must be None (CaiT's rule by depth) or a positive number, got {value!r}")

    @classmethod
    def label(cls, settings):
        value = _setting(settings, "layerscale_init")
        return "layerscale" + (" (CaiT init)" if value is None else f", init {value}")

    @classmethod
    def initial_alphas(cls, settings):
        return [cls.init_value(settings)] * _setting(settings, "n_layer")

    def __init__(self, config):
        super().__init__(config)
        self.attn_scale = nn.Parameter(torch.empty(config.n_layer, config.n_embd))
        self.mlp_scale = nn.Parameter(torch.empty(config.n_layer, config.n_embd))
        self.reset_parameters()

    def reset_parameters(self):
        value = self.init_value(self.config.to_dict())
        nn.init.constant_(self.attn_scale, value)
        nn.init.constant_(self.mlp_scale, value)

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        attn_scales, mlp_scales = _ramped(self.attn_scale, attenuation), _ramped(self.mlp_scale, attenuation)
        for l, block in enumerate(blocks):
            x, mid = block(x, None, rope, self.sublayers, (attn_scales[l], mlp_scales[l]))
            record(resid, mids, x, mid)
        return x

    @staticmethod
    def sublayers(block, x, rope, attn_scale, mlp_scale):
        """One block's two updates, each scaled per channel (run inside Block.forward)."""
        mid = x + attn_scale * block.attn(block.ln_1(x), rope)
        return mid + mlp_scale * block.mlp(block.ln_2(mid)), mid

    def alpha_values(self):
        return torch.cat((_whole(self.attn_scale), _whole(self.mlp_scale)), dim=1).float().mean(dim=1).tolist()


@register_residual
class DeepNorm(Residual):
    """deepnorm: post-LN with an up-weighted residual (Wang et al. 2022, "DeepNet: scaling transformers to 1,000
    layers", arXiv 2203.00555), per sublayer:
        mid = ln_1(α x + attn(x)),   x_{l+1} = ln_2(α mid + mlp(mid))
    with, for a decoder-only model of N = n_layer blocks, α = (2N)^(1/4) and β = (8N)^(-1/4). Init (the paper's
    deepnorm_init): Xavier normal with gain β for the feed-forward weights and the attention's value and output
    projections, gain 1 for the query and key projections (gpt2's fused c_attn: each of its q, k, v blocks on
    its own); biases 0, embeddings as GPT's. ln_1 / ln_2 are the post-norms, so the blocks' own parameters are
    all it has (α is a constant: nothing of its own to learn, no optimizer group). ln_f still follows the last
    block (a second norm on an already normed state: harmless, and the output layer is unchanged).

    The lens reads the post-LN state after each block (resid) and after each attention sublayer (mids): unit
    scale at every depth, unlike a pre-LN stream whose norm grows. alphas logs α (the same at every layer).
    No ramp: a post-LN model is not the pre-LN plain model at any α, so a < 1 is refused (SettingError)."""

    name = "deepnorm"

    @staticmethod
    def constants(n_layer):
        """(α, β) of an n_layer-block decoder-only model."""
        return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25

    @classmethod
    def label(cls, settings):
        return "deepnorm (post-LN)"

    @classmethod
    def check_ramp(cls, settings):
        raise SettingError("residual_mode='deepnorm' has no attenuation ramp (a < 1, attenuation_warmup_iters > 0): "
                           "its post-LN blocks are not the plain pre-LN model at any alpha; use "
                           "attenuation_warmup_iters=0")

    def init_blocks(self, blocks):
        _, beta = self.constants(self.config.n_layer)
        for block in blocks:
            attn, mlp = block.attn, block.mlp
            if self.config.arch == "gpt2":
                C = self.config.n_embd
                q, k, v = attn.c_attn.weight.split(C, dim=0)  # views: the init writes into c_attn.weight
                gains = ((q, 1.0), (k, 1.0), (v, beta), (attn.c_proj.weight, beta), (mlp.c_fc.weight, beta),
                         (mlp.c_proj.weight, beta))
            else:
                gains = ((attn.q_proj.weight, 1.0), (attn.k_proj.weight, 1.0), (attn.v_proj.weight, beta),
                         (attn.o_proj.weight, beta), (mlp.gate_proj.weight, beta), (mlp.up_proj.weight, beta),
                         (mlp.down_proj.weight, beta))
            for weight, gain in gains:
                nn.init.xavier_normal_(weight, gain=gain)

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        alpha, _ = self.constants(self.config.n_layer)
        for block in blocks:
            x, mid = block(x, None, rope, self.sublayers, (alpha,))
            record(resid, mids, x, mid)
        return x

    @staticmethod
    def sublayers(block, x, rope, alpha):
        """One post-LN block (run inside Block.forward)."""
        mid = block.ln_1(alpha * x + block.attn(x, rope))
        return block.ln_2(alpha * mid + block.mlp(mid)), mid

    def alpha_values(self):
        return [self.constants(self.config.n_layer)[0]] * self.config.n_layer


# ---- issue #23's variants that change what flows between the blocks: value residual, hyper-connections,
# denseformer. Each replaces constants of the plain model (a weight 1 or 0) by learned parameters, which
# hyper-connections and denseformer start at those constants (the plain model) and value residual at ResFormer's
# 0.5 / 0.5; the attenuation ramp moves every such parameter from its constant (a = 0: the plain model bit for
# bit) to its learned value (a = 1) by _toward_identity.

def _gathered(tensor):
    """A parameter's full value: FSDP holds the variant's parameters as shards (DTensors) outside the forward
    pass, and gathering them is a collective (every rank calls it, as training's logging does)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _toward_identity(learned, identity, attenuation):
    """The ramp for a parameter that stands in for a plain-model constant: identity + a (learned - identity).
    a = 0 gives `identity` exactly (0 * finite = 0), attenuation None (a = 1) the learned value itself."""
    if attenuation is None:
        return learned
    return identity + attenuation * (learned - identity)


def mix_values(v, value_residual):
    """ResFormer's value mix, value_residual = (v_first, weight_own, weight_first): returns (the values to attend
    with, the values to hand to the later layers). The first layer (v_first None) attends with its own values and
    hands on a copy of them (a view leaving an FSDP-wrapped block draws FSDP's in-place warning); every later
    layer attends with weight_own * v + weight_first * v_first and hands on nothing."""
    v_first, weight_own, weight_first = value_residual
    if v_first is None:
        return v, v.clone()
    return weight_own * v + weight_first * v_first, None


@register_residual
class ValueResidual(Residual):
    """value_residual: ResFormer (Zhou et al. 2024, arXiv 2410.17897). Every layer l > 0 attends with its own
    values mixed with the first layer's:  V'_l = λ_own,l V_l + λ_first,l V_0  (V_0: layer 0's values, computed
    from layer 0's own input; layer 0 itself is unchanged). Only the values change: queries, keys, the
    residual stream and every block are the plain model's, so the lens reads the usual residual states.

    The lambdas, [n_layer - 1, 2], start at ResFormer's 0.5 / 0.5. value_residual_learned=True (the default)
    learns them (no weight decay: decay would pull both towards 0, shrinking the values): the learned form
    contains the paper's fixed mix as its start and lets a layer choose how much of V_0 it wants (what
    modded-nanogpt's value residual and ResFormer's learnable variant do); False keeps them fixed at 0.5 / 0.5
    (ResFormer's main form). At (λ_own, λ_first) = (1, 0) the model is the plain model exactly, which is where
    the ramp takes it at a = 0. The alphas logged are λ_own per layer (1.0 for layer 0): how much of its own
    values a layer keeps. Cost: two multiply-adds of the values per layer."""

    name = "value_residual"
    settings = ("value_residual_learned",)
    INIT = 0.5  # ResFormer's λ_own = λ_first
    examples = (dict(value_residual_learned=True),)

    @classmethod
    def check_config(cls, config):
        if not isinstance(config.value_residual_learned, bool):
            cls.fail(f"value_residual_learned must be True or False, got {config.value_residual_learned!r}")
        if config.residual_mode == cls.name and config.n_layer < 2:
            cls.fail(f"residual_mode='value_residual' needs n_layer >= 2 (layers after the first mix in the "
                     f"first layer's values), got n_layer={config.n_layer}")

    @classmethod
    def label(cls, settings):
        if _setting(settings, "value_residual_learned"):
            return "value residual, learned lambdas"
        return "value residual, lambdas 0.5/0.5"

    @classmethod
    def initial_alphas(cls, settings):
        if not _setting(settings, "value_residual_learned"):
            return None
        return [1.0] + [cls.INIT] * (_setting(settings, "n_layer") - 1)

    def __init__(self, config):
        super().__init__(config)
        init = torch.full((config.n_layer - 1, 2), self.INIT)  # row l - 1: (λ_own, λ_first) of layer l
        if config.value_residual_learned:
            self.lambdas = nn.Parameter(init)
        else:  # not a parameter, not in checkpoints: the fixed mix is the setting
            self.register_buffer("lambdas", init, persistent=False)

    def reset_parameters(self):
        with torch.no_grad():
            self.lambdas.fill_(self.INIT)

    def mix_weights(self, attenuation=None):
        """(λ_own, λ_first), each [n_layer - 1], with the ramp: (1, 0) at a = 0."""
        own, first = self.lambdas.unbind(-1)
        return _toward_identity(own, 1.0, attenuation), _toward_identity(first, 0.0, attenuation)

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        own, first = self.mix_weights(attenuation)
        v_first = None
        for l, block in enumerate(blocks):
            mix = (None, None, None) if l == 0 else (v_first, own[l - 1], first[l - 1])
            x, mid, values = block(x, None, rope, value_residual=mix)
            if l == 0:
                v_first = values
            record(resid, mids, x, mid)
        return x

    def alpha_values(self):
        return [1.0] + _gathered(self.lambdas.detach())[:, 0].float().tolist()


def sinkhorn(logits, iters):
    """Sinkhorn-Knopp: exp(logits) scaled towards a doubly stochastic matrix (non-negative, rows and columns
    summing to 1) by `iters` rounds of row then column normalisation (the columns sum to 1 exactly after the
    last round, the rows to within the method's convergence). Over the last two dimensions."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))  # the shift cancels in the normalisations
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


@register_residual
class HyperConnections(Residual):
    """hyper_connections: n residual streams H = (H_0 .. H_{n-1}) instead of one (Zhu et al., ICLR 2025,
    arXiv 2409.19606), the static form (learned per-layer matrices, not input-dependent). Block l reads
    h = Σ_j m_lj H_j (width connections `read`, [n_layer, n]), and its update F = block(h) - h is written back
    into each stream with learned weights b_l (depth connections `write`, [n_layer, n]) while the streams mix
    by the residual matrix R_l (`mix`, [n_layer, n, n], R[j, i]: stream j into stream i):

        H'_i = Σ_j R_l[j, i] H_j + b_li F(h).

    mHC (Xie et al. 2025, arXiv 2512.24880): hc_sinkhorn_iters > 0 makes R_l = sinkhorn(mix_l) doubly
    stochastic (mix then holds its logits), so the streams are only redistributed: their sum is carried with
    weight 1 (only R is constrained here; read and write stay free as in plain HC).

    Init (the plain model exactly, "stream 0 gets everything"): H = (embeddings, 0, .., 0), read = write = e_0
    and R = I, so stream 0 is the plain residual stream and the others stay 0. (The paper's init copies the
    embeddings into every stream and writes F into all of them: the same function up to the final norm of a
    sum n times larger; ours makes the sum the plain state, bit for bit.) mHC cannot reach I with finite
    logits: they start at 0 on the diagonal and MHC_OFF_LOGIT off it, so R_l is I within ~n e^-8 and the model
    is the plain one to about that. The update is computed as H'_i = Σ_j (R[j, i] - m_j b_i) H_j + b_i block(h),
    the same sum with the block's own output: at the init stream 0 is then block(h) itself, so the model is
    the plain model bit for bit (for plain HC; for any form at ramp a = 0, where read, write and R are exactly
    e_0, e_0 and I).

    What the lens reads (resid) and the final norm reads: the streams' sum Σ_i H_i. The paper's output is the
    sum of the streams through the final norm and unembedding, and the lens decodes each state with that same
    norm and unembedding, so the sum is the only state whose decoding after the last block is the model's own
    prediction; at init it is the plain residual state. The mid-block state is the sum as it would be had the
    block written its attention update alone: (Σ_i H_i - β h) + β mid_block, β = Σ_i b_i. The alphas logged:
    per layer the carry of the streams' sum, (1/n) Σ_{j,i} R[j, i] (the factor the sum is carried by if the
    streams were equal; 1 for the identity, and always 1 for mHC, whose initial_alphas is therefore None: not
    learned). All parameters take no weight decay.
    Cost: n times the residual state in memory (activations saved per layer), and O(n^2) multiply-adds of the
    state per layer for the mixing."""

    name = "hyper_connections"
    settings = ("hc_streams", "hc_sinkhorn_iters")
    MHC_OFF_LOGIT = -8.0  # mHC's off-diagonal logits at init: exp(-8) = 3e-4 of the diagonal
    examples = (dict(hc_streams=4, hc_sinkhorn_iters=0), dict(hc_streams=4, hc_sinkhorn_iters=20))

    @classmethod
    def check_config(cls, config):
        for setting, least in (("hc_streams", 1), ("hc_sinkhorn_iters", 0)):
            value = getattr(config, setting)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                cls.fail(f"{setting} must be an int >= {least}, got {value!r}")

    @classmethod
    def label(cls, settings):
        iters = _setting(settings, "hc_sinkhorn_iters")
        kind = f"mHC, sinkhorn {iters}" if iters else "HC"
        return f"hyper-connections, {_setting(settings, 'hc_streams')} streams ({kind})"

    @classmethod
    def initial_alphas(cls, settings):
        if _setting(settings, "hc_sinkhorn_iters"):
            return None  # mHC: the carry is 1 by the constraint, not learned
        return [1.0] * _setting(settings, "n_layer")

    def __init__(self, config):
        super().__init__(config)
        n, L = config.hc_streams, config.n_layer
        self.n, self.sinkhorn_iters = n, config.hc_sinkhorn_iters
        self.read = nn.Parameter(torch.empty(L, n))
        self.write = nn.Parameter(torch.empty(L, n))
        self.mix = nn.Parameter(torch.empty(L, n, n))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.read.zero_()[:, 0] = 1.0
            self.write.zero_()[:, 0] = 1.0
            if self.sinkhorn_iters:
                self.mix.fill_(self.MHC_OFF_LOGIT).diagonal(dim1=-2, dim2=-1).fill_(0.0)
            else:
                self.mix.zero_().diagonal(dim1=-2, dim2=-1).fill_(1.0)

    def connections(self, attenuation=None):
        """(read [L, n], write [L, n], R [L, n, n]) for this forward, the ramp applied."""
        mix = sinkhorn(self.mix, self.sinkhorn_iters) if self.sinkhorn_iters else self.mix
        e0 = torch.zeros_like(self.read[0])
        e0[0] = 1.0
        eye = torch.eye(self.n, device=mix.device, dtype=mix.dtype)
        return (_toward_identity(self.read, e0, attenuation), _toward_identity(self.write, e0, attenuation),
                _toward_identity(mix, eye, attenuation))

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        read, write, mix = self.connections(attenuation)
        n = self.n
        streams = torch.cat((x.unsqueeze(0), x.new_zeros((n - 1, *x.shape))))  # [n, B, T, C]
        total = x
        for l, block in enumerate(blocks):
            # elementwise products and sums, not matmuls: autocast would round the float32 streams to bf16
            r, w = read[l].view(n, 1, 1, 1), write[l].view(n, 1, 1, 1)
            h = (r * streams).sum(0)
            out, mid = block(h, None, rope)
            carry = mix[l] - read[l][:, None] * write[l][None, :]  # [j, i]: R minus h's share, which out brings back
            streams = (carry.view(n, n, 1, 1, 1) * streams.unsqueeze(1)).sum(0) + w * out
            if mids is not None:
                beta = write[l].sum()
                mids.append((total - beta * h) + beta * mid)
            total = streams.sum(0)
            if resid is not None:
                resid.append(total)
        return total

    def alpha_values(self):
        with torch.no_grad():
            mix = _gathered(self.mix.detach()).float()
            R = sinkhorn(mix, self.sinkhorn_iters) if self.sinkhorn_iters else mix
            return (R.sum(dim=(-2, -1)) / self.n).tolist()


@register_residual
class DenseFormer(Residual):
    """denseformer: depth-weighted averages (Pagliardini et al. 2024, arXiv 2402.02622). With X_0 the embeddings
    and X_{l+1} = block_l(x_l) the output of block l, the state after block l is

        x_{l+1} = Σ_{j=0..l+1} w_lj X_j,

    the input of block l + 1 and, after the last block, of the final norm (DenseFormer's DWA after every block,
    dilation and period 1). weights [n_layer, n_layer + 1]: row l's first l + 2 entries are used (the rest stay
    0 and unused). Init w_l,l+1 = 1, the rest 0: the plain model, bit for bit (the sum's other terms are exact
    zeros); the ramp moves w from that identity at a = 0 to the learned weights at a = 1. No weight decay
    (it would pull w_l,l+1 from 1 towards 0). The lens reads the averaged state x_{l+1}: the state the next block
    (or the final norm) reads, as in the plain model; the mid-block state is block l's own (its input plus its
    attention). The alphas logged: w_l,l+1, the weight on the block's own output, which carries the previous
    state through the block's residual (1 at init, like the plain model's alpha). Cost: (l + 2) multiply-adds
    of the state after block l, O(L^2 / 2) in all, and every block output kept for the averages."""

    name = "denseformer"

    @classmethod
    def initial_alphas(cls, settings):
        return [1.0] * _setting(settings, "n_layer")

    def __init__(self, config):
        super().__init__(config)
        self.weights = nn.Parameter(torch.empty(config.n_layer, config.n_layer + 1))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weights.zero_().diagonal(offset=1).fill_(1.0)

    def forward_blocks(self, blocks, x, rope, attenuation=None, resid=None, mids=None):
        identity = torch.eye(self.config.n_layer + 1, device=x.device, dtype=self.weights.dtype)[1:]
        weights = _toward_identity(self.weights, identity, attenuation)
        outputs = [x]  # X_0, X_1, ..
        for l, block in enumerate(blocks):
            out, mid = block(x, None, rope)
            outputs.append(out)
            x = weights[l, 0] * outputs[0]
            for j in range(1, l + 2):  # a running sum, not a stack: no copy of every output per layer
                x = x + weights[l, j] * outputs[j]
            record(resid, mids, x, mid)
        return x

    def alpha_values(self):
        return _gathered(self.weights.detach()).diagonal(offset=1).float().tolist()


# ---- rotary position embeddings (llama), computed exactly as transformers does ----

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

    def forward(self, x, rope=None, value_residual=None):  # rope: unused (GPT-2 adds positions to the embeddings)
        """value_residual: None (the standard attention), or (v_first, weight_own, weight_first) for ResFormer's
        value mix (mix_values); then returns (output, the first layer's own values, None in later layers)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if value_residual is not None:
            v, first_values = mix_values(v, value_residual)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y if value_residual is None else (y, first_values)


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

    def forward(self, x, rope, value_residual=None):
        """value_residual: as CausalSelfAttention's (the values mixed are the key/value heads', before
        grouped-query attention repeats them)."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if value_residual is not None:
            v, first_values = mix_values(v, value_residual)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_head != self.n_head:  # query head h reads key/value head h // (n_head // n_kv_head)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        y = self.resid_dropout(self.o_proj(y))
        return y if value_residual is None else (y, first_values)


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

    def forward(self, x, alpha=None, rope=None, wiring=None, wiring_args=(), value_residual=None):
        """Returns (x_next, mid): x_next = alpha * x + (block(x) - x), mid = the state after attention.

        alpha=None is the standard block. The update F = attn + mlp is added to alpha * x
        in the standard block's own order, so alpha = 1 gives bit-identical results.
        rope: (cos, sin), each [T, head_dim], for llama (see rope_cos_sin); None for gpt2.
        wiring: a residual variant's own use of the sublayers, wiring(block, x, rope, *wiring_args) -> (x_next,
        mid), run here rather than by the variant so FSDP gathers this block's weights and activation
        checkpointing recomputes it.
        value_residual: None, or what the attention mixes its values with (ValueResidual); then returns
        (x_next, mid, the first layer's attention values or None).
        """
        if self.activation_checkpointing and torch.is_grad_enabled():
            # inside forward, not a wrapper module: the parameter names (and so every checkpoint) stay the
            # same, and FSDP's hooks on this module gather the weights before the recomputation runs
            return recompute_in_backward(self._forward, x, alpha, rope, wiring, wiring_args, value_residual,
                                         use_reentrant=False)
        return self._forward(x, alpha, rope, wiring, wiring_args, value_residual)

    def _forward(self, x, alpha, rope, wiring=None, wiring_args=(), value_residual=None):
        if wiring is not None:
            return wiring(self, x, rope, *wiring_args)
        attn_out = self.attn(self.ln_1(x), rope, value_residual)
        if value_residual is not None:
            attn_out, values = attn_out
        mid = x + attn_out
        mlp_out = self.mlp(self.ln_2(mid))
        x_next = mid + mlp_out if alpha is None else (alpha * x + attn_out) + mlp_out
        return (x_next, mid) if value_residual is None else (x_next, mid, values)


SCALED_INIT_SUFFIXES = ("c_proj.weight", "o_proj.weight", "down_proj.weight")  # the residual output projections


def scaled_init_std(config):
    """GPT-2's init std of the residual output projections: 0.02 / sqrt(2 L), so the residual sum does not grow
    with depth (nanoshift/parallel.py replays it shard by shard under FSDP)."""
    return 0.02 / math.sqrt(2 * config.n_layer)


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
        # the residual variant, at model.<residual_mode> (model.gate: its parameters are 'gate.…' in checkpoints)
        if hasattr(type(self), config.residual_mode) or config.residual_mode in self._modules:
            raise ValueError(f"residual variant {config.residual_mode!r}: GPT already has an attribute of that "
                             "name; rename the variant")
        setattr(self, config.residual_mode, RESIDUALS[config.residual_mode](config))
        # the attenuation ramp (module docstring): the value, and whether it is exactly 1 (the mode as configured)
        self.register_buffer("attenuation", torch.ones(()), persistent=False)
        self._attenuation_full = True

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual output projections
            if name.endswith(SCALED_INIT_SUFFIXES):
                nn.init.normal_(p, mean=0.0, std=scaled_init_std(config))
        self.residual.reset_parameters()
        self.residual.init_blocks(self.transformer.h)

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
        if value < 1.0:
            self.residual.check_ramp(self.config.to_dict())
        self.attenuation.fill_(value)
        self._attenuation_full = value == 1.0

    @property
    def residual(self):
        """The residual variant: an instance of RESIDUALS[config.residual_mode], held at model.<residual_mode>."""
        return getattr(self, self.config.residual_mode)

    def residual_state_keys(self):
        """The state_dict keys of the residual variant's own parameters and buffers (what a pretrained model lacks)."""
        return {f"{self.config.residual_mode}.{key}" for key in self.residual.state_dict()}

    @torch.no_grad()
    def residual_alphas(self):
        """Current effective alpha per layer as a list of floats, the attenuation ramp included (token
        mode: mean over the last forward's tokens)."""
        return self.residual.effective_alpha_values(None if self._attenuation_full else float(self.attenuation))

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
        if resid is not None:
            resid.append(x)
        attenuation = None if self._attenuation_full else self.attenuation  # a tensor: the ramp never recompiles
        return self.residual.forward_blocks(self.transformer.h, x, rope, attenuation, resid, mids)

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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lr_mults=None):
        """AdamW: decay on >= 2-D weights only; the residual variant's parameters in its own groups
        (Residual.optimizer_groups: the gate's are never decayed, their lr is x gate_lr_mult).

        lr_mults: {training setting: value} for the variants' lr multipliers, e.g. {"gate_lr_mult": 10.0}
        (other variants' settings are ignored); a bare number is this model's variant's multiplier (the
        older positional gate_lr_mult). Each group carries 'lr_mult'; a schedule sets
        group['lr'] = lr * group['lr_mult'].
        """
        variant = self.residual
        if isinstance(lr_mults, (int, float)):
            lr_mults = {variant.lr_mult_setting: lr_mults}
        own = {id(p) for p in variant.parameters()}
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad or id(p) in own:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        ] + variant.optimizer_groups(weight_decay, lr_mults or {})
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
