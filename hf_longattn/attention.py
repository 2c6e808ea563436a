"""The functions transformers calls: one attention function and one mask function per registered method.

transformers hands the attention function the post-RoPE query [B, Hq, Lq, D], the whole cached key/value
[B, Hkv, Lk, D] and whatever our mask function returned. The mask function returns the compact 2D padding mask (like
FlashAttention's) instead of an Lq x Lk tensor; only masks that are more than causal + window + padding (Gemma 3's
bidirectional image spans, packed sequences) are materialised, and those layers fall back to exact dense attention
with a one-time warning.
"""

from __future__ import annotations

import logging

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .config import MethodConfig
from .kernels import dense_attention
from .kernels.dense import visibility_mask
from .methods import AttentionCall, SparseMethod, get_method

logger = logging.getLogger("hf_longattn")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class LayerRunner:
    """Decides, per call of one attention layer, between the method and exact dense attention."""

    def __init__(self, method: SparseMethod, layer_idx: int):
        self.method = method
        self.config: MethodConfig = method.config
        self.layer_idx = layer_idx
        self.state: dict = {}
        self._last_k_len = -1

    def __call__(self, module, query, key, value, attention_mask, scaling, sliding_window, softcap):
        q_len, k_len = query.shape[2], key.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if not getattr(module, "is_causal", True):
            raise NotImplementedError("hf_longattn patches causal decoder attention only")

        # A call that does not continue the previous one starts a new sequence: forget per-sequence state.
        if k_len != self._last_k_len + q_len:
            self.state.clear()
        self._last_k_len = k_len

        explicit_mask, kv_start = _read_mask(attention_mask, q_len, k_len, sliding_window)
        if explicit_mask is not None:
            warn_once(
                f"hf_longattn: layer {self.layer_idx} received an attention mask that is more than causal + sliding "
                "window + left padding (e.g. bidirectional image spans, packed sequences or holes in the padding "
                "mask); such calls run exact dense attention."
            )
            return dense_attention(query, key, value, scale, softcap, mask=explicit_mask)

        if (
            (sliding_window and self.config.keep_sliding_window)
            or self.config.is_dense_layer(self.layer_idx)
            or k_len < self.config.min_seq_len
        ):
            return dense_attention(query, key, value, scale, softcap, kv_start=kv_start, window=sliding_window)
        call = AttentionCall(self.layer_idx, scale, softcap, kv_start, self.state, module=module)
        return self.method.attend(query, key, value, call)


def _read_mask(attention_mask, q_len: int, k_len: int, sliding_window: int | None):
    """Return (explicit [B|1,1,Lq,Lk] bool mask or None, kv_start [B] or None) from what the mask function produced."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:  # additive float mask
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        return attention_mask[..., -k_len:], None
    valid = attention_mask[:, -k_len:].bool()
    if valid.shape[1] != k_len:
        raise ValueError(f"the 2D attention mask covers {valid.shape[1]} keys but there are {k_len}")
    # Left padding: zeros then ones. Trailing zeros (right-padded prompts) only hide keys that lie after every real
    # query, which causality hides anyway, unless a later real query follows them: that is a hole.
    positions = torch.arange(k_len, device=valid.device)
    kv_start = torch.where(valid.any(1), valid.float().argmax(1), k_len)
    last_real = torch.where(valid.any(1), k_len - 1 - valid.flip(1).float().argmax(1), -1)
    contiguous = valid == ((positions >= kv_start[:, None]) & (positions <= last_real[:, None]))
    if not bool(contiguous.all()):
        mask = valid[:, None, None, :] & visibility_mask(q_len, k_len, None, sliding_window, valid.device)
        return mask, None
    return None, (kv_start if bool((kv_start > 0).any()) else None)


def _is_causal_or_sliding(mask_function) -> bool:
    """True for transformers' plain causal mask function and its sliding-window variant (what the kernels honour)."""
    if mask_function is causal_mask_function:
        return True
    cells = [c.cell_contents for c in (getattr(mask_function, "__closure__", None) or ())]
    parts = next((c for c in cells if isinstance(c, tuple)), ())
    names = sorted(getattr(f, "__qualname__", "") for f in parts)
    return getattr(mask_function, "__name__", "") == "and_mask" and names == [
        "causal_mask_function", "sliding_window_overlay.<locals>.inner_mask"
    ]


def longattn_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function=causal_mask_function, attention_mask=None, **kwargs,
):
    """Mask function registered with transformers' AttentionMaskInterface for every method."""
    if not _is_causal_or_sliding(mask_function):
        kwargs = {k: v for k, v in kwargs.items() if k in ("use_vmap", "device", "local_size")}
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            allow_is_causal_skip=False, **kwargs,
        )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def make_attention_function(method_name: str):
    """The function registered with AttentionInterface under `longattn_<method>`."""
    def longattn_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                           softcap=None, **kwargs):
        runner = getattr(module, "hf_longattn_runner", None)
        if runner is None or runner.method.name != method_name:
            # Loaded with from_pretrained(attn_implementation=...) and never patched: the method's defaults.
            method_cls = get_method(method_name)
            runner = LayerRunner(method_cls(method_cls.Config()), module.layer_idx)
            module.hf_longattn_runner = runner
        return runner(module, query, key, value, attention_mask, scaling, sliding_window, softcap), None

    longattn_attention.__name__ = f"longattn_{method_name}_attention"
    return longattn_attention
