"""
One view of a causal LM for analysis and evaluation: our checkpoints and HuggingFace models.

    from nanoshift.lm import load_lm
    lm = load_lm(ckpt="out/ckpt.pt")              # ours (or a karpathy/nanoGPT ckpt.pt)
    lm = load_lm(hf="gpt2")                       # any transformers causal LM, hub name or local dir
    resid, mids = lm.hidden_states(idx, mid=True) # L+1 raw residual states, L mid-block states
    logits = lm.decode(resid[3])                  # logit lens: final norm recomputed, then unembed
    logits = lm.logits(idx)                       # the model's own next-token logits, every position
    e_in, e_out = lm.input_vectors(x), lm.target_vectors(y)  # reference vectors for cosine / projection

Both kinds go through the same interface so analyze.py and eval_benchmarks.py never special-case
where a model came from. For HF models the states are captured with hooks, not taken from
`output_hidden_states`, because transformers returns the last layer's state *after* the final norm.

Embedding details that matter for the alignment metrics:
- Gemma multiplies the looked-up embedding by sqrt(d) (h_0 = sqrt(d) * E[t]); `embed_scale` holds
  that factor (1 elsewhere), so `input_vectors(t)` is exactly the token part of h_0.
- Untied models (Mistral-7B, some Llamas) score targets with a separate output matrix:
  `input_vectors` uses the input embedding, `target_vectors` the output embedding (printed at load).
- Gemma-2's final logit soft-capping is applied by `unembed`, so the lens matches the model's logits.
"""

import os

import torch

from nanoshift.checkpoint import load_checkpoint
from nanoshift.common import InputError
from nanoshift.data import EOT_TOKEN as EOT_GPT2
from nanoshift.data import GPT2_NAME, TOKENIZER_PROBE, HFTokenizer, get_tokenizer
from model import GPT, dtype_from_name


class LanguageModel:
    """Uniform access: hidden_states, final_norm, decode, logits, embeddings, tokenizer."""

    name: str
    n_layer: int
    block_size: int
    vocab_size: int  # rows of the unembedding (may exceed the tokenizer's vocabulary: padding)
    in_embedding: torch.Tensor  # [V, C], what the input token is looked up in
    out_embedding: torch.Tensor  # [V, C], what the target token is scored against
    tied: bool
    embed_scale: float = 1.0  # h_0 = embed_scale * in_embedding[t] (+ positions): sqrt(d) for Gemma
    logit_softcap = None  # Gemma-2: logits = cap * tanh(logits / cap)
    device: torch.device
    source: str  # where the model came from ("ckpt:PATH" / "hf:NAME"), for the outputs

    def hidden_states(self, idx, mid=False):
        raise NotImplementedError

    def final_norm(self, h):
        raise NotImplementedError

    def unembed(self, h, weight=None):
        """[..., C] state (already normed, or not) -> [..., V] float32 logits, soft-capped like the model.

        weight: the unembedding matrix to use instead of out_embedding, e.g. a bfloat16 copy of it for
        a faster (and less exact) logit lens.
        """
        weight = self.out_embedding if weight is None else weight
        logits = (h.to(weight.dtype) @ weight.T).float()
        cap = self.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def decode(self, h, norm=True, weight=None):
        """Logit lens: [..., C] state -> [..., V] float32 logits (final norm recomputed for h)."""
        return self.unembed(self.final_norm(h) if norm else h, weight)

    def input_vectors(self, tokens):
        """The input token's embedding as it enters the residual stream: embed_scale * E_in[t]."""
        return self.in_embedding[tokens] * self.embed_scale

    def target_vectors(self, tokens):
        """The target token's reference vector: the same map as the input side when the embeddings are
        tied (so the segment input -> target lives in one space); the output embedding row otherwise."""
        if self.tied:
            return self.input_vectors(tokens)
        return self.out_embedding[tokens]

    def uses_gpt2_tokens(self):
        """True if the model reads GPT-2 token ids (same encoding, same EOT): our shards are GPT-2 tokens."""
        try:
            ids = list(self.encode(TOKENIZER_PROBE))
        except Exception:
            return False
        return (self.eot == EOT_GPT2 and self.vocab_size > EOT_GPT2
                and ids == get_tokenizer().encode_ordinary(TOKENIZER_PROBE))

    @property
    def bos_prefix(self):
        """Token ids the tokenizer puts before a text by default (Llama/Gemma/Mistral: BOS; GPT-2: none)."""
        return []

    @property
    def doc_separator(self):
        """Token ids placed between two documents of a stream: BOS where the model expects one at the
        start of a text, else the end-of-text token (GPT-2's <|endoftext|>), else nothing."""
        return self.bos_prefix or ([] if self.eot is None else [self.eot])

    @property
    def tokenizer_id(self):
        """Two models with the same tokenizer_id get the same tokens for the same text (a retrofit and its
        original HF model share one: data.py's id of their tokenizer)."""
        if self.uses_gpt2_tokens():
            return GPT2_NAME
        tok = self.text_tokenizer
        return tok.tokenizer_id if tok is not None else f"{type(self).__name__}:{self.source}"

    text_tokenizer = None  # the model's tokenizer in data.py's interface, where it has one

    @property
    def prefix_token(self):
        """The token a text is conditioned on when nothing comes before it (an empty context, the first
        window of a document): the tokenizer's BOS if it has one, else its end-of-text token. lm_eval's `hf`
        model's rule (prefix_token_id); for GPT-2 both are <|endoftext|>."""
        hf = getattr(self.text_tokenizer, "hf", None)  # an HFTokenizer: transformers' own BOS
        bos = None if hf is None else hf.bos_token_id
        return self.eot if bos is None else bos

    def decode_text(self, ids):
        """Generated ids as text, the way lm_eval's `hf` model decodes them (skip_special_tokens=True):
        special tokens (BOS, EOS, padding, ...) and ids the tokenizer does not have (the rows that pad the
        vocabulary to a multiple of 64) are left out."""
        tok = self.text_tokenizer
        if tok is None:
            raise ValueError(f"{self.name}: no tokenizer to decode with")
        hf = getattr(tok, "hf", None)
        ids = [int(i) for i in ids if 0 <= int(i) < tok.n_vocab]
        if hf is not None:
            return hf.decode(ids, skip_special_tokens=True)
        # tiktoken: <|endoftext|>; the byte tokenizer's decode drops its end-of-text id itself
        special = {tok.encode_single_token(t) for t in getattr(tok, "special_tokens_set", ())}
        return tok.decode([i for i in ids if i not in special])

    def logits(self, idx):
        raise NotImplementedError

    def encode(self, text):
        raise NotImplementedError


class OurGPT(LanguageModel):
    """One of our models; tokenizer: the one it was trained on (data.get_tokenizer's interface; GPT-2's
    by default), which load_lm finds from the checkpoint's record."""

    def __init__(self, model, name, tokenizer=None):
        self.model, self.name = model.eval(), name
        cfg = model.config
        self.n_layer, self.block_size, self.vocab_size = cfg.n_layer, cfg.block_size, cfg.vocab_size
        if cfg.tie_embeddings:
            self.in_embedding = self.out_embedding = model.lm_head.weight
        else:  # an untied llama: tokens are looked up in wte, targets scored against lm_head
            self.in_embedding, self.out_embedding = model.transformer.wte.weight, model.lm_head.weight
        self.tied = cfg.tie_embeddings
        self.device = model.lm_head.weight.device
        self.source = "ckpt"
        self.text_tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.eot = self.text_tokenizer.eot_token

    @property
    def bos_prefix(self):
        return list(self.text_tokenizer.bos_prefix)

    @property
    def doc_separator(self):
        """The separator of the model's training shards (data.py: EOT for GPT-2, else BOS, else EOS)."""
        sep = self.text_tokenizer.doc_separator
        return [] if sep is None else [sep]

    def hidden_states(self, idx, mid=False):
        return self.model.hidden_states(idx, mid=mid)

    def final_norm(self, h):
        return self.model.transformer.ln_f(h)

    def logits(self, idx):
        return self.decode(self.model.trunk(idx))

    def encode(self, text):
        return self.text_tokenizer.encode_ordinary(text)


# module names that, across transformers families, take the mid-block residual (after attention) as input
_MID_INPUT_MODULES = ("ln_2", "pre_feedforward_layernorm", "post_attention_layernorm")


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class HFCausalLM(LanguageModel):
    def __init__(self, model, name, tokenizer=None):
        self.model, self.name = model.eval(), name
        cfg = model.config
        # the embeddings first: a model whose embedding rows are not residual-stream vectors (OPT-350m
        # projects a 512-wide embedding into its 1024-wide stream) cannot be measured at all
        in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
        for side, emb in (("input", in_emb), ("output", out_emb)):
            if getattr(emb, "weight", None) is None:
                raise ValueError(f"{name}: the model has no usable {side} embedding "
                                 f"({type(model).__name__} has no {side} embedding matrix)")
        self.in_embedding, self.out_embedding = in_emb.weight, out_emb.weight
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        for side, weight in (("input", self.in_embedding), ("output", self.out_embedding)):
            if weight.dim() != 2 or (hidden is not None and weight.shape[1] != hidden):
                raise ValueError(f"{name}: the {side} embedding has shape {tuple(weight.shape)}, not "
                                 f"[vocab, hidden_size={hidden}]: its rows are not residual-stream vectors, "
                                 "so the model has no usable embedding for the alignment metrics")
        base = model.base_model
        base = getattr(base, "decoder", base)  # OPT keeps its layers and final norm in a decoder
        self.layers = next((getattr(base, n) for n in ("layers", "h", "blocks") if hasattr(base, n)), None)
        self.norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm", "final_layer_norm")
                          if getattr(base, n, None) is not None), None)
        if self.layers is None or self.norm is None:
            raise ValueError(f"{name}: unsupported architecture {type(model).__name__} "
                             "(no decoder layer list or final norm found)")
        self.embed_scale = _embedding_scale(model, in_emb)
        self.tied = self.in_embedding.data_ptr() == self.out_embedding.data_ptr()
        if not self.tied:
            print(f"{name}: output embedding is not tied; the input side uses the input embedding "
                  "and the target side the output embedding")
        self.n_layer = len(self.layers)
        self.vocab_size = self.out_embedding.shape[0]
        self.block_size = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2
        self.device = self.out_embedding.device
        self.source = f"hf:{name}"
        self.text_tokenizer = tokenizer  # data.py's interface (HFTokenizer or GPT-2's), or None
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
        if self.text_tokenizer is None:
            raise ValueError(f"{self.name}: no tokenizer found next to the model; "
                             "give token shards instead of text, or save a tokenizer with the model")
        return self.text_tokenizer.encode_ordinary(text)

    @property
    def eot(self):
        return None if self.text_tokenizer is None else self.text_tokenizer.eot_token

    @property
    def bos_prefix(self):
        return [] if self.text_tokenizer is None else list(self.text_tokenizer.bos_prefix)


def _embedding_scale(model, in_emb):
    """The factor between the embedding table and h_0's token part: sqrt(d) for Gemma, else 1.

    Recent transformers put it on the embedding module (Gemma*ScaledWordEmbedding.embed_scale, applied
    in the weight dtype); older releases multiplied by sqrt(hidden_size) in Gemma's forward instead.
    """
    scale = getattr(in_emb, "embed_scale", None)
    if scale is not None:
        return float(torch.as_tensor(scale).to(in_emb.weight.dtype))
    if model.config.model_type.startswith("gemma"):
        return float(torch.tensor(model.config.hidden_size ** 0.5, dtype=in_emb.weight.dtype))
    return 1.0


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
        tokenizer = HFTokenizer.load(name)  # data.py's one HF tokenizer wrapper
    except InputError:
        tokenizer = None
    if tokenizer is None and model.config.model_type == "gpt2":  # e.g. a GPT-2 saved without tokenizer
        tokenizer = get_tokenizer()
    return HFCausalLM(model.to(device), name, tokenizer)


def load_lm(ckpt=None, hf=None, device="cpu", dtype="float32", name=None):
    """Load one model: our checkpoint path or run dir (ckpt) or a transformers name / local dir (hf).

    name: the label for tables and plots (default: the run folder's name, or the HF name).
    """
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of ckpt= or hf=")
    torch_dtype = dtype_from_name(dtype)
    if hf is not None:
        lm = _load_hf(hf, device, torch_dtype)
        lm.name = name or lm.name
        return lm
    if os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, "ckpt.pt")
    state = load_checkpoint(ckpt, map_location=device)
    tokenizer = checkpoint_tokenizer(state, ckpt)
    model = GPT.from_checkpoint(state).to(device=device, dtype=torch_dtype)
    lm = OurGPT(model, name or os.path.basename(os.path.dirname(os.path.abspath(ckpt))) or ckpt, tokenizer)
    lm.source = f"ckpt:{ckpt}"
    return lm


def checkpoint_tokenizer(state, path):
    """The tokenizer a checkpoint's model reads (train.py records it; older checkpoints are GPT-2): the copy
    in the run folder's tokenizer/ if there is one, else the recorded name. InputError if what loads is not
    the recorded tokenizer."""
    recorded = state.get("tokenizer") or {"name": GPT2_NAME, "id": GPT2_NAME}
    if recorded["id"] == GPT2_NAME:
        return get_tokenizer()
    copy = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    source = copy if os.path.isdir(copy) else recorded["name"]
    try:
        tokenizer = get_tokenizer(source)
    except (InputError, ImportError) as e:
        raise InputError(f"{path}: the model reads the tokenizer {recorded['name']!r}, which cannot be loaded: {e}") from e
    if tokenizer.tokenizer_id != recorded["id"]:
        raise InputError(f"{path}: the model reads the tokenizer {recorded['name']!r} ({recorded['id']}), but "
                         f"{source} is another one ({tokenizer.tokenizer_id})")
    return tokenizer


def model_specs(ckpt=(), hf=()):
    """[(kind, path, name)] for lists of checkpoints and HF models, before anything loads: names for
    tables and plots are a run's folder name, an HF hub name or local folder name, and names that
    clash (two runs in folders called "out") become the paths as given. A missing checkpoint is an
    InputError here, so a long multi-model run fails at once, not at its third model."""
    specs = [("ckpt", p) for p in ckpt] + [("hf", n) for n in hf]
    names = []
    for kind, path in specs:
        if kind == "ckpt":
            file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
            if not os.path.isfile(file):
                raise InputError(f"checkpoint not found: {file}")
            names.append(os.path.basename(os.path.dirname(os.path.abspath(file))) or path)
        else:
            names.append(os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else path)
    return [(kind, path, name if names.count(name) == 1 else path) for (kind, path), name in zip(specs, names)]


def load_models(ckpt=(), hf=(), device="cpu", dtype="float32"):
    """The --ckpt and --hf models that analyze.py and eval_benchmarks.py share, named by model_specs.

    A generator: each model loads when it is asked for (eval frees one before the next loads), and
    every checkpoint path is checked before the first one loads. A model that cannot be loaded is an
    InputError naming it.
    """
    if not ckpt and not hf:
        raise InputError("no models: give --ckpt path(s) and/or --hf name(s)")
    specs = model_specs(ckpt, hf)
    dtype_from_name(dtype)  # a bad dtype fails before anything loads

    def load_each():
        for kind, path, name in specs:
            try:
                yield load_lm(**{kind: path}, device=device, dtype=dtype, name=name)
            except (InputError, OSError, ValueError, KeyError) as e:
                raise InputError(f"could not load {'checkpoint' if kind == 'ckpt' else 'HF model'} {path}: {e}") from e
    return load_each()
