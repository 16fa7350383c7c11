"""
transformers remote code for an exported attenuated model (residual_mode 'cut', or 'gate' with gate_mode 'layer'
or 'scalar'): export_checkpoint.py --hf=DIR --remote_code copies this file into DIR as modeling_nanoshift.py,
and config.json's auto_map points AutoConfig and AutoModelForCausalLM at its classes:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

It must stand alone (transformers copies it into its module cache and imports it there): torch and transformers
only, nothing of nanoshift. The model is transformers' own GPT2LMHeadModel / LlamaForCausalLM plus the one thing
their blocks lack, the residual scale: our block computes x_{l+1} = alpha_l * x_l + F_l(x_l), theirs x_l + F_l(x_l),
so a forward hook on each decoder layer subtracts (1 - alpha_l) * x_l from its output. The alphas are constants
of the exported model (cut: cut_alpha at the cut layers; gate 'layer' / 'scalar': functions of the gate's weights
only; the attenuation ramp applied), stored in config.json as residual_alphas. Per-token gates (gate_mode 'token')
compute alpha from each token's embedding and are not covered: the export refuses them.
"""
from functools import partial

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def _scale_residual(beta, module, args, kwargs, output):
    """Forward hook: a layer's output x + F(x) becomes (1 - beta) * x + F(x), i.e. alpha * x + F(x)."""
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (output[0] - beta * x,) + tuple(output[1:])
    return output - beta * x


def _attenuate(layers, alphas):
    if alphas is None or len(alphas) != len(layers):
        raise ValueError(f"config.residual_alphas must hold one alpha per layer ({len(layers)}), got {alphas!r}")
    for layer, alpha in zip(layers, alphas):
        if alpha != 1.0:  # alpha = 1 is the plain block: no hook, bit-identical
            layer.register_forward_hook(partial(_scale_residual, 1.0 - float(alpha)), with_kwargs=True)


class AttenuatedGPT2Config(GPT2Config):
    model_type = "nanoshift_gpt2"

    def __init__(self, residual_alphas=None, **kwargs):
        self.residual_alphas = residual_alphas  # alpha_l per layer
        super().__init__(**kwargs)


class AttenuatedGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = AttenuatedGPT2Config

    def __init__(self, config):
        super().__init__(config)
        _attenuate(self.transformer.h, config.residual_alphas)


class AttenuatedLlamaConfig(LlamaConfig):
    model_type = "nanoshift_llama"

    def __init__(self, residual_alphas=None, **kwargs):
        self.residual_alphas = residual_alphas  # alpha_l per layer
        super().__init__(**kwargs)


class AttenuatedLlamaForCausalLM(LlamaForCausalLM):
    config_class = AttenuatedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _attenuate(self.model.layers, config.residual_alphas)
