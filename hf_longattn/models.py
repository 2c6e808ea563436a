"""Which model families hf_longattn supports, and where their decoder attention lives.

The families differ in ways the registered attention function receives as call arguments (Gemma 2's softcap and
query_pre_attn_scalar scaling arrive as `softcap` and `scaling`; sliding-window layers arrive with `sliding_window`;
Llama 3.1's rope scaling is already applied to q and k), so an adapter only has to say which config holds the
decoder and whether the family is known to work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    description: str
    # Name of the sub-config holding the text decoder, for multimodal wrappers (None: the model's own config).
    text_config: str | None = None


FAMILIES = {
    f.model_type: f
    for f in [
        ModelFamily("llama", "Llama 1/2/3/3.1/3.2 (incl. Llama 3.1 rope scaling), SmolLM"),
        ModelFamily("mistral", "Mistral (with or without a sliding window)"),
        ModelFamily("gemma", "Gemma 1 (head_dim 256)"),
        ModelFamily("gemma2", "Gemma 2 (logit softcap, query_pre_attn_scalar, alternating local layers)"),
        ModelFamily("gemma3_text", "Gemma 3 text (local/global layers)"),
        ModelFamily("gemma3", "Gemma 3 multimodal (the text decoder is patched)", text_config="text_config"),
    ]
}


class UnsupportedModelError(ValueError):
    pass


def family_of(model: torch.nn.Module) -> ModelFamily:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = "; ".join(f"{f.model_type}: {f.description}" for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"hf_longattn does not support model_type '{model_type}' ({type(model).__name__}). Supported: {supported}"
        )
    return FAMILIES[model_type]


def text_config_of(model: torch.nn.Module):
    """The config of the model's text decoder (the sub-config of a multimodal wrapper, else the model's own)."""
    family = family_of(model)
    return getattr(model.config, family.text_config) if family.text_config else model.config


def decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's self-attention modules (those transformers calls with a layer_idx), in layer order."""
    text_config = text_config_of(model)
    modules = [
        m for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj") and getattr(m, "config", None) is text_config
    ]
    if not modules:
        raise UnsupportedModelError(f"found no decoder attention layers in {type(model).__name__}")
    return sorted(modules, key=lambda m: m.layer_idx)
