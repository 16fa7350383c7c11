"""
GPT-2 in one file, with residual attenuation (arXiv 2602.14760).

Every block is written as  x_{l+1} = alpha_l * x_l + F_l(x_l),  F_l(x) = block_l(x) - x,
where block_l is the ordinary pre-LN GPT-2 block (attention then MLP). alpha_l = 1 for
every layer is bit-for-bit standard GPT-2. residual_mode picks alpha:

    none   alpha_l = 1
    cut    alpha_l = cut_alpha at the layer(s) cut_layer, 1 elsewhere
    gate   alpha_l = 1 - (1 - gate_alpha_min) * p_l, with p from gate_mode:
             layer   p = softmax(g), g in R^L learnable, init 0 (the paper's gate)
             token   p(t) = softmax(W LN(x_0[t]) + b), W = b = 0 at init (per-token)
             scalar  alpha_l = sigmoid(w_l), independent, init near 1

Usage:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=12, residual_mode="gate", gate_mode="layer"))
    logits, loss = model(idx, targets)
    resid, mid = model.hidden_states(idx, mid=True)   # for analysis
    model = GPT.from_checkpoint("out/ckpt.pt")         # ours or karpathy/nanoGPT's
    model = GPT.from_pretrained("gpt2")                # or a local save_pretrained dir
"""

import inspect
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Union

import torch
import torch.nn as nn
from torch.nn import functional as F

from checkpoint import load_checkpoint
from common import InputError, SettingError

RESIDUAL_MODES = ("none", "cut", "gate")
GATE_MODES = ("layer", "token", "scalar")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names settings use


def dtype_from_name(name, setting="dtype", also=()):
    """The torch dtype a settings name stands for; a SettingError naming the setting and the choices
    (`also`: further words the caller handles itself, e.g. "auto", listed in the message)."""
    if name not in DTYPES:
        raise SettingError(f"{setting} must be one of {list(also) + list(DTYPES)}, got {name!r}")
    return DTYPES[name]
SCALAR_GATE_INIT_ALPHA = 0.98  # "near 1": standard residual at init, but with a gradient


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    gelu_approx: str = "tanh"  # GPT-2's own GELU; karpathy/nanoGPT checkpoints use "none"
    residual_mode: str = "none"
    cut_layer: Union[int, list] = -1  # block index (or list), negative counts from the end
    cut_alpha: float = 0.5
    gate_mode: str = "layer"
    gate_alpha_min: float = 0.5
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

    def to_dict(self):
        """The constructor arguments (what checkpoints store as 'model_args')."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
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


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, alpha=None):
        """Returns (x_next, mid): x_next = alpha * x + (block(x) - x), mid = the state after attention.

        alpha=None is the standard block. The update F = attn + mlp is added to alpha * x
        in GPT-2's own order, so alpha = 1 gives bit-identical results.
        """
        attn_out = self.attn(self.ln_1(x))
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
            self.ln = nn.LayerNorm(config.n_embd, bias=config.bias)
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
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.gate = ResidualGate(config) if config.residual_mode == "gate" else None

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
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
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---- residual attenuation ----

    def _layer_alphas(self, x0):
        """Per-layer alpha for this forward: a list of None (standard residual), floats or tensors."""
        cfg = self.config
        if cfg.residual_mode == "none":
            return [None] * cfg.n_layer
        if cfg.residual_mode == "cut":
            return [cfg.cut_alpha if l in cfg.cut_layers else None for l in range(cfg.n_layer)]
        alpha = self.gate(x0)
        if alpha.dim() == 1:
            return list(alpha.unbind(0))
        return list(alpha.to(x0.dtype).unsqueeze(-1).unbind(-2))  # L tensors of [B, T, 1]

    @torch.no_grad()
    def residual_alphas(self):
        """Current alpha per layer as a list of floats (token mode: mean over the last forward's tokens)."""
        cfg = self.config
        if cfg.residual_mode == "none":
            return [1.0] * cfg.n_layer
        if cfg.residual_mode == "cut":
            return [cfg.cut_alpha if l in cfg.cut_layers else 1.0 for l in range(cfg.n_layer)]
        if cfg.gate_mode == "token":
            if self.gate.last_token_mean is None:  # no forward yet: W = 0 means uniform for every token
                return [1.0 - self.gate.budget / cfg.n_layer] * cfg.n_layer
            return self.gate.last_token_mean.float().tolist()
        return self.gate(None).float().tolist()

    # ---- forward ----

    def trunk(self, idx, resid=None, mids=None):
        """Embeddings and blocks; returns the last residual state (before ln_f).

        If lists are given, appends the residual states (embeddings + after each block) and
        the mid-block states (after attention) to them.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        alphas = self._layer_alphas(x)
        if resid is not None:
            resid.append(x)
        for block, alpha in zip(self.transformer.h, alphas):
            x, mid = block(x, alpha)
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
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """GPT-2 weights through transformers (a hub name or a local save_pretrained dir).

        overrides set GPTConfig fields (residual_mode, dropout, ...); residual parameters that
        GPT-2 lacks start as configured.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("GPT.from_pretrained needs the optional package transformers: "
                              "pip install transformers") from None
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        hc = hf.config
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or getattr(hc, "reorder_and_upcast_attn", False):
            raise ValueError(f"{name_or_dir}: GPT-2 variants with rescaled/reordered attention are not supported")
        args = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                    vocab_size=hc.vocab_size, bias=True, dropout=0.0,
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
