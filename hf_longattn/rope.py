"""A layer's rotary position embedding (RoPE), and the relative rotation that moves an already-rotated key.

transformers caches keys already rotated: k_p = s * R(p) k, where R(p) turns frequency pair f (dims f and f + D/2, the
`rotate_half` layout every supported family uses) by the angle p * inv_freq[f], and s is YaRN's attention scaling (1
otherwise). Rotations compose, R(d) R(p) = R(p + d), so turning a cached key by R(p_new - p_old) gives exactly the key
the model would have cached at p_new, the scaling included, provided inv_freq is one fixed set of frequencies for the
whole sequence. That holds for the default RoPE and for linear, Llama 3, YaRN and proportional scaling, per layer type
where a model has several (Gemma 3's local and global bases). Dynamic NTK recomputes the frequencies as the sequence
grows and LongRoPE switches them past a length, so keys cached at different lengths carry different frequencies: both
are refused rather than approximated.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# RoPE types whose frequencies depend on the sequence length.
LENGTH_DEPENDENT = ("dynamic", "longrope")


class UnsupportedRopeError(ValueError):
    """A layer's RoPE cannot be re-placed exactly by a relative rotation."""


def layer_rope_parameters(config, layer_idx: int) -> tuple[dict, str | None]:
    """(this layer's RoPE parameters, its layer type when the parameters are given per layer type, else None)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # configs written before transformers 5
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    layer_types = getattr(config, "layer_types", None)
    if layer_types and isinstance(params.get(layer_types[layer_idx]), dict):
        return params[layer_types[layer_idx]], layer_types[layer_idx]
    return params, None


def check_rope(config, layer_idx: int | None = None) -> None:
    """Raise UnsupportedRopeError, naming the fix, when a layer's keys cannot be re-placed by a relative rotation.

    layer_idx None checks every layer of the config.
    """
    layers = range(getattr(config, "num_hidden_layers", 1)) if layer_idx is None else [layer_idx]
    for index in layers:
        params, _ = layer_rope_parameters(config, index)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in LENGTH_DEPENDENT:
            raise UnsupportedRopeError(
                f"layer {index} uses rope_type '{rope_type}', whose frequencies change with the sequence length: keys "
                "cached at one length cannot be moved exactly to another position. Load the model with a fixed RoPE "
                "scaling (rope_type 'linear', 'yarn' or 'llama3' in config.rope_parameters) or use another method.")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise UnsupportedRopeError(f"layer {index} uses rope_type '{rope_type}', unknown to this transformers "
                                       f"version (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")


def layer_inv_freq(config, layer_idx: int) -> torch.Tensor:
    """float32 [head_dim / 2]: the angle per position of each frequency pair of layer `layer_idx`, as transformers
    builds it for the layer's rotary embedding (attention scaling left out: a relative rotation keeps it as it is)."""
    check_rope(config, layer_idx)
    params, layer_type = layer_rope_parameters(config, layer_idx)
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    else:
        extra = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, **extra)
    if 2 * inv_freq.numel() != head_dim:
        raise UnsupportedRopeError(
            f"layer {layer_idx} rotates {2 * inv_freq.numel()} of its {head_dim} head dims (partial rotary); "
            "re-placing keys supports RoPE over the whole head only")
    return inv_freq.float().cpu()


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R(delta) x: x [..., D] already rotated, delta [...] (broadcast against x's leading dims) a position shift."""
    angle = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
