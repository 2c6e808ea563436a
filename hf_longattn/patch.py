"""patch_model / unpatch_model: swap a model's attention for a method through transformers' own registry.

Nothing in the model is replaced: each method is registered once with `AttentionInterface` and
`AttentionMaskInterface` under `longattn_<method>`, the model is switched to it with `set_attn_implementation`, and
each decoder attention module carries a small `hf_longattn_runner` with the method's options. Unpatching switches back
and removes the runners, so the original behaviour returns bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import LayerRunner, longattn_mask, make_attention_function
from .methods import METHODS, get_method
from .models import decoder_attention_modules, family_of, text_config_of

_ORIGINAL = "hf_longattn_original_attn_implementation"


def registered_name(method: str) -> str:
    return f"longattn_{method}"


def register_all() -> None:
    """Register every method under `longattn_<method>`, so `from_pretrained(attn_implementation=...)` finds it."""
    for name in METHODS:
        AttentionInterface.register(registered_name(name), make_attention_function(name))
        AttentionMaskInterface.register(registered_name(name), longattn_mask)


def available_methods() -> list[str]:
    return sorted(METHODS)


def _set_implementation(model, implementation) -> None:
    family = family_of(model)
    if family.text_config and isinstance(implementation, str):
        implementation = {family.text_config: implementation}
    model.set_attn_implementation(implementation)


def patch_model(model: torch.nn.Module, method: str = "hip", **options) -> torch.nn.Module:
    """Make `model`'s decoder attention use `method` (see `available_methods()`), with the method's options.

    Layer policy options shared by every method: `dense_layers` (int n = first n layers, or a list of indices),
    `min_seq_len` (dense below this key length), `keep_sliding_window` (local layers keep their exact window).
    Patching a patched model replaces the previous patch. Returns the model.
    """
    family_of(model)  # unsupported architectures fail here, before anything changes
    method_cls = get_method(method)
    config = method_cls.Config.from_options(method, options)
    if is_patched(model):
        unpatch_model(model)
    modules = decoder_attention_modules(model)
    original = text_config_of(model)._attn_implementation
    register_all()
    instance = method_cls(config)
    for module in modules:
        module.hf_longattn_runner = LayerRunner(instance, module.layer_idx)
    setattr(model, _ORIGINAL, original)
    _set_implementation(model, registered_name(method))
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return hasattr(model, _ORIGINAL)


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch_model`: the previous attention implementation, exactly. A no-op on an unpatched model."""
    if not is_patched(model):
        return model
    _set_implementation(model, getattr(model, _ORIGINAL))
    delattr(model, _ORIGINAL)
    for module in decoder_attention_modules(model):
        if hasattr(module, "hf_longattn_runner"):
            del module.hf_longattn_runner
    return model


@contextmanager
def patched(model: torch.nn.Module, method: str = "hip", **options):
    """`with patched(model, "hip", budget=2048): model.generate(...)`; restores the previous state on exit."""
    previous = _current_patch(model)
    patch_model(model, method, **options)
    try:
        yield model
    finally:
        unpatch_model(model)
        if previous is not None:
            patch_model(model, previous[0], **previous[1])


def _current_patch(model):
    if not is_patched(model):
        return None
    runner = decoder_attention_modules(model)[0].hf_longattn_runner
    return runner.method.name, runner.config.options()
