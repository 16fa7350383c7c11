"""
One view of a causal LM for analysis and evaluation: our checkpoints and HuggingFace models.

    from lm import load_lm
    lm = load_lm(ckpt="out/ckpt.pt")              # ours (or a karpathy/nanoGPT ckpt.pt)
    lm = load_lm(hf="gpt2")                       # any transformers causal LM, hub name or local dir
    resid, mids = lm.hidden_states(idx, mid=True) # L+1 raw residual states, L mid-block states
    logits = lm.decode(resid[3])                  # logit lens: final norm recomputed, then unembed
    logits = lm.logits(idx)                       # the model's own next-token logits, every position

Both kinds go through the same interface so analyze.py and eval_benchmarks.py never special-case
where a model came from. For HF models the states are captured with hooks, not taken from
`output_hidden_states`, because transformers returns the last layer's state *after* the final norm.
"""

import os

import torch


class LanguageModel:
    """Uniform access: hidden_states, final_norm, decode, logits, embeddings, tokenizer."""

    name: str
    n_layer: int
    block_size: int
    vocab_size: int  # rows of the unembedding (may exceed the tokenizer's vocabulary: padding)
    in_embedding: torch.Tensor  # [V, C], what the input token is looked up in
    out_embedding: torch.Tensor  # [V, C], what the target token is scored against
    tied: bool
    device: torch.device

    def hidden_states(self, idx, mid=False):
        raise NotImplementedError

    def final_norm(self, h):
        raise NotImplementedError

    def decode(self, h, norm=True):
        """Logit lens: [..., C] state -> [..., V] float32 logits (final norm recomputed for h)."""
        if norm:
            h = self.final_norm(h)
        logits = (h.to(self.out_embedding.dtype) @ self.out_embedding.T).float()
        cap = getattr(self, "logit_softcap", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self, idx):
        raise NotImplementedError

    def encode(self, text):
        raise NotImplementedError


class OurGPT(LanguageModel):
    def __init__(self, model, name):
        from data import get_tokenizer

        self.model, self.name = model.eval(), name
        cfg = model.config
        self.n_layer, self.block_size, self.vocab_size = cfg.n_layer, cfg.block_size, cfg.vocab_size
        self.in_embedding = self.out_embedding = model.lm_head.weight
        self.tied = True
        self.device = model.lm_head.weight.device
        self._tok = get_tokenizer()
        self.eot = self._tok.eot_token

    def hidden_states(self, idx, mid=False):
        return self.model.hidden_states(idx, mid=mid)

    def final_norm(self, h):
        return self.model.transformer.ln_f(h)

    def logits(self, idx):
        return self.decode(self.model.trunk(idx))

    def encode(self, text):
        return self._tok.encode_ordinary(text)


# module names that, across transformers families, take the mid-block residual (after attention) as input
_MID_INPUT_MODULES = ("ln_2", "pre_feedforward_layernorm", "post_attention_layernorm")


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class HFCausalLM(LanguageModel):
    def __init__(self, model, name, tokenizer=None):
        self.model, self.name = model.eval(), name
        cfg = model.config
        base = model.base_model
        self.layers = next((getattr(base, n) for n in ("layers", "h", "blocks") if hasattr(base, n)), None)
        self.norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm") if hasattr(base, n)), None)
        if self.layers is None or self.norm is None:
            raise ValueError(f"{name}: unsupported architecture {type(model).__name__} "
                             "(no decoder layer list or final norm found)")
        in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
        if in_emb is None or out_emb is None:
            raise ValueError(f"{name}: the model has no usable input/output embedding")
        self.in_embedding, self.out_embedding = in_emb.weight, out_emb.weight
        self.tied = self.in_embedding.data_ptr() == self.out_embedding.data_ptr()
        if not self.tied:
            print(f"{name}: output embedding is not tied; the input side uses the input embedding "
                  "and the target side the output embedding")
        self.n_layer = len(self.layers)
        self.vocab_size = self.out_embedding.shape[0]
        self.block_size = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2
        self.device = self.out_embedding.device
        self._tokenizer = tokenizer
        self._mid_modules = []
        for layer in self.layers:
            mod = next((getattr(layer, n) for n in _MID_INPUT_MODULES if hasattr(layer, n)), None)
            self._mid_modules.append(mod)

    def hidden_states(self, idx, mid=False):
        resid, mids, hooks = [], [], []
        hooks.append(self.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: resid.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        for layer in self.layers:
            hooks.append(layer.register_forward_hook(lambda m, i, o: resid.append(_first_tensor(o))))
        if mid:
            if any(m is None for m in self._mid_modules):
                raise ValueError(f"{self.name}: mid-block states are not supported for this architecture")
            for mod in self._mid_modules:
                hooks.append(mod.register_forward_pre_hook(lambda m, args: mids.append(args[0])))
        try:
            self.model.base_model(input_ids=idx, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return resid, mids

    def final_norm(self, h):
        return self.norm(h)

    def logits(self, idx):
        logits = self.model(input_ids=idx, use_cache=False).logits
        return logits.float()

    def encode(self, text):
        if self._tokenizer is None:
            raise ValueError(f"{self.name}: no tokenizer found next to the model; "
                             "give token shards instead of text, or save a tokenizer with the model")
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def eot(self):
        tok = self._tokenizer
        return tok.eos_token_id if tok is not None else None


def _load_hf(name, device, dtype):
    try:
        import transformers
    except ImportError:
        raise ImportError("loading HuggingFace models needs the optional package transformers: "
                          "pip install transformers") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: give a local directory saved with save_pretrained)" if offline else ""
        raise ValueError(f"could not load HF model {name!r}{hint}: {e}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        if len(tokenizer) < 2:  # transformers builds an empty tokenizer when no vocab files exist
            tokenizer = None
    except Exception:
        tokenizer = None
    if tokenizer is None and model.config.model_type == "gpt2":  # e.g. a GPT-2 saved without tokenizer
        tokenizer = _Gpt2Tokenizer()
    return HFCausalLM(model.to(device), name, tokenizer)


class _Gpt2Tokenizer:
    """Our offline GPT-2 tokenizer behind the small part of the transformers API that HFCausalLM uses."""

    def __init__(self):
        from data import get_tokenizer
        self.enc = get_tokenizer()
        self.eos_token_id = self.enc.eot_token

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.enc.encode_ordinary(text)}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm(ckpt=None, hf=None, device="cpu", dtype="float32", name=None):
    """Load one model: our checkpoint path (ckpt) or a transformers name / local dir (hf)."""
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of ckpt= or hf=")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}, expected one of {list(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if hf is not None:
        return _load_hf(hf, device, torch_dtype)
    from model import GPT

    if os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, "ckpt.pt")
    model = GPT.from_checkpoint(ckpt, map_location=device).to(device=device, dtype=torch_dtype)
    label = name or os.path.basename(os.path.dirname(os.path.abspath(ckpt))) or ckpt
    return OurGPT(model, label)
