"""The functions transformers calls: one attention function and one mask function per registered method.

transformers calls the mask function once per forward and mask kind (full / sliding window), or once per decode step
ahead of a compiled forward when the cache is static, and hands what it returns to every attention layer of that kind
with the post-RoPE query [B, Hq, Lq, D] and the whole cached key/value [B, Hkv, Lk, D]. Instead of an Lq x Lk mask it
returns a key layout: a few positions per row (see `key_layout`), like FlashAttention's variable-length inputs. Masks
that are more than causal + sliding window + left padding (right padding, holes, Gemma 3's bidirectional image spans,
packed sequences) are materialised exactly as transformers' SDPA mask would be, and those calls run exact dense
attention with a one-time warning.
"""

from __future__ import annotations

import logging

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask
from transformers.utils import is_tracing

from .config import MethodConfig
from .kernels import dense_attention
from .methods import AttentionCall, SparseMethod, get_method

logger = logging.getLogger("hf_longattn")
_warned: set[str] = set()
_pending: set[str] = set()  # warnings of compiled calls, logged by the next eager call

# Attribute of an eagerly made key layout with what its one host sync read: (real key count or None, whether any row
# is padded, absolute position of the first query).
_HOST_FACTS = "hf_longattn_host_facts"


def warn_once(message: str) -> None:
    """Log `message` the first time. A compiled graph cannot log: it leaves the message to the next eager call."""
    if torch.compiler.is_compiling():
        _pending.add(message)  # dynamo replays this after each run of the graph
        return
    for pending in [*_pending, message]:
        if pending not in _warned:
            _warned.add(pending)
            logger.warning(pending)
    _pending.clear()


def key_layout(kv_start: torch.Tensor, q_start: torch.Tensor | None) -> torch.Tensor:
    """The compact mask: an int64 [B, 1, 1, 1|2] tensor of key positions (4D, so transformers passes it through).

    [..., 0] = kv_start, each row's first valid key (left padding). With a second column the queries are not the last
    Lq of the Lk keys: [..., 1] = q_start, the key position of each row's first query; keys from q_start + Lq on do
    not exist yet (a static cache's empty tail). That is all the layers need, read on the device. An eagerly made
    layout also carries, as a Python attribute, what the mask function read on the host, so that eager layers slice
    the keys to the real ones without a host sync of their own; a compiled graph reads only the tensor.
    """
    columns = [kv_start] if q_start is None else [kv_start, q_start.expand_as(kv_start)]
    return torch.stack(columns, -1).view(kv_start.shape[0], 1, 1, len(columns))


def _is_key_layout(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.int64 and mask.shape[1:3] == (1, 1) and mask.shape[3] in (1, 2)


class LayerRunner:
    """Decides, per call of one attention layer, between the method and exact dense attention."""

    def __init__(self, method: SparseMethod, layer_idx: int):
        self.method = method
        self.config: MethodConfig = method.config
        self.layer_idx = layer_idx
        self.state: dict = {}
        self._next_query = -1  # absolute position of the query that would continue the last call

    def __call__(self, module, query, key, value, attention_mask, scaling, sliding_window, softcap):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if not getattr(module, "is_causal", True):
            raise NotImplementedError("hf_longattn patches causal decoder attention only")
        traced = is_tracing(query)
        if attention_mask is not None and not _is_key_layout(attention_mask):
            warn_once(
                "hf_longattn: an attention mask that is more than causal + sliding window + left padding (right "
                "padding or holes, bidirectional image spans, packed sequences, a 4D mask given to the model) runs "
                "exact dense attention"
            )
            return dense_attention(query, key, value, scale, softcap, mask=_as_bool_mask(attention_mask, key.shape[2]))
        q_len = query.shape[2]
        key, value, kv_start, q_offset, first_query = _read_layout(attention_mask, key, value, q_len, traced)
        # A compiled graph keeps no host-side bookkeeping between its runs: its calls start from an empty state.
        state = {} if traced else self._sequence_state(first_query, q_len)
        k_len = key.shape[2]

        dense = (
            (sliding_window and self.config.keep_sliding_window)
            or self.config.is_dense_layer(self.layer_idx)
            or k_len < self.config.min_seq_len
        )
        if not dense and q_offset is not None and not self.method.supports_query_offset:
            warn_once(
                f"hf_longattn: '{self.method.name}' cannot place the queries inside a static cache's buffer (its "
                "class does not set supports_query_offset), as a compiled decode step needs; those calls run exact "
                "dense attention"
            )
            dense = True
        padded_rows_untraceable = kv_start is not None and not self.method.traces_padded_rows
        if not dense and traced and (padded_rows_untraceable or not self.method.traceable):
            warn_once(
                f"hf_longattn: '{self.method.name}' reads tensors on the host, which torch.compile cannot trace; "
                f"compiled calls{' on a padded batch' if self.method.traceable else ''} run exact dense attention "
                "(eager calls use the method)"
            )
            dense = True
        if dense:
            return dense_attention(query, key, value, scale, softcap, kv_start=kv_start, window=sliding_window,
                                   q_offset=q_offset)
        call = AttentionCall(self.layer_idx, scale, softcap, kv_start, state, q_offset, module=module)
        return self.method.attend(query, key, value, call)

    def _sequence_state(self, first_query: int, q_len: int) -> dict:
        """The layer's state, emptied when this call does not continue the previous one (a new sequence)."""
        if first_query != self._next_query:
            self.state.clear()
        self._next_query = first_query + q_len
        return self.state


def _read_layout(layout: torch.Tensor | None, key, value, q_len: int, traced: bool):
    """(key, value, kv_start, q_offset, absolute position of the first query) from a `key_layout` (or None)."""
    first_query = key.shape[2] - q_len
    if layout is None:
        return key, value, None, None, first_query
    kv_start = layout[:, 0, 0, 0].contiguous()  # kernels read row b's value at pointer + b
    facts = None if traced else getattr(layout, _HOST_FACTS, None)
    if facts is not None:
        key_len, padded, first_query = facts
        if key_len is not None:  # views: the kernels take strides
            key, value = key[:, :, :key_len], value[:, :, :key_len]
        return key, value, kv_start if padded else None, None, first_query
    q_offset = layout[:, 0, 0, 1].contiguous() if layout.shape[-1] == 2 else None
    return key, value, kv_start, q_offset, first_query


def _as_bool_mask(mask: torch.Tensor, k_len: int) -> torch.Tensor:
    if mask.dtype != torch.bool:  # additive float mask
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[..., -k_len:]


def _is_causal_or_sliding(mask_function, local_size, use_vmap, allow_is_causal_skip, q_length, config) -> bool:
    """True when transformers asks for its plain causal mask or its causal sliding-window mask (what kernels honour).

    Decided from what transformers passes, never by looking inside the mask function (dynamo cannot trace a closure
    that was inspected). `create_causal_mask` passes `causal_mask_function` itself unless it composes it with
    something; `create_sliding_window_causal_mask` alone passes `local_size`, and it turns `use_vmap` on (custom
    overlays) or `allow_is_causal_skip` off (packed sequences, block overlays) when it composes, except that it also
    turns the skip off for a one-query step on a compileable cache, which changes nothing about the mask's shape.
    """
    if not getattr(config, "is_causal", True) or use_vmap:
        return False
    if local_size is None:
        return mask_function is causal_mask_function
    return bool(allow_is_causal_skip) or q_length == 1


def longattn_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0, kv_offset: int = 0,
    mask_function=causal_mask_function, attention_mask=None, local_size: int | None = None,
    allow_is_causal_skip: bool = True, use_vmap: bool = False, config=None, **kwargs,
):
    """Mask function registered with transformers' AttentionMaskInterface for every method (see `key_layout`).

    The key tensor holds absolute positions [kv_offset, kv_offset + kv_length); the queries start at q_offset (an int,
    or for a static cache its 0-dim length tensor). Eager: one host sync when there is a padding mask or a static
    cache, none otherwise. Traced: none, so the 2D padding mask cannot be checked and is taken as left padding (what
    generate() needs anyway: padding_side="left").
    """
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")

    def materialised() -> torch.Tensor:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         local_size=local_size, allow_is_causal_skip=False, use_vmap=use_vmap, device=device)

    if _pending and not torch.compiler.is_compiling():
        warn_once(_pending.pop())  # what a compiled step before this one had to say
    if not _is_causal_or_sliding(mask_function, local_size, use_vmap, allow_is_causal_skip, q_length, config):
        return materialised()
    q_start = q_offset - kv_offset  # a new tensor for a static cache, not its live counter (updated before attention)
    valid = None
    if attention_mask is not None:
        valid = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset: kv_offset + kv_length]
    if not isinstance(q_start, torch.Tensor) and q_start + q_length > kv_length:
        return materialised()  # queries past the keys: not a cache layout the kernels know

    if is_tracing(q_start if isinstance(q_start, torch.Tensor) else valid):
        # Inside a compiled graph: no host sync, so any padding is taken as left padding.
        usual = not isinstance(q_start, torch.Tensor) and q_start + q_length == kv_length  # (maybe a SymInt)
        if usual and valid is None:
            return None
        q_start = None if usual else torch.as_tensor(q_start, device=device).reshape(1)
        real = kv_length if usual else q_start + q_length
        kv_start = _first_valid_key(valid, real) if valid is not None else torch.zeros(
            batch_size, dtype=torch.long, device=device)
        return key_layout(kv_start, q_start)

    # Eager: the real key count and whether the padding is left padding, in one host sync. A static cache's layout
    # keeps its shape when the buffer is full, so that a compiled decode step that reads it is not recompiled.
    static = isinstance(q_start, torch.Tensor)
    real = q_start + q_length
    if valid is None:
        real, left_padded, padded = int(real), True, False
        kv_start = torch.zeros(batch_size, dtype=torch.long, device=device)
    else:
        positions = torch.arange(kv_length, device=valid.device)
        kv_start = _first_valid_key(valid, real)
        exists = positions < real
        left_padded = ((valid & exists) == ((positions >= kv_start[:, None]) & exists)).all()
        real, left_padded, padded = torch.stack(
            [torch.as_tensor(real, device=valid.device), left_padded.long(), (kv_start > 0).any().long()]
        ).tolist()
    if not left_padded:
        warn_once("hf_longattn: a padding mask that is not left padding (right padding, or holes) runs exact dense "
                  "attention; under torch.compile it cannot be checked and would be taken as left padding: use "
                  "padding_side='left', as transformers asks for generation")
        return materialised()
    q_start = torch.tensor(real - q_length, device=device) if static or real < kv_length else None
    layout = key_layout(kv_start, q_start)
    setattr(layout, _HOST_FACTS, (real if real < kv_length else None, bool(padded), kv_offset + real - q_length))
    return layout


def _first_valid_key(valid: torch.Tensor, real) -> torch.Tensor:
    """[B] int64 position of each row's first valid key among the first `real` keys (`real` for a row without one)."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    live = valid & (positions < real)
    first = live.long().argmax(1)
    return torch.where(live.any(1), first, torch.as_tensor(real, device=valid.device).expand_as(first))


def make_attention_function(method_name: str):
    """The function registered with AttentionInterface under `longattn_<method>`."""
    def longattn_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                           softcap=None, **kwargs):
        if kwargs.get("output_attentions"):
            warn_once("hf_longattn: output_attentions=True returns no attention maps (a sparse method never forms "
                      "them); unpatch_model(model) and use attn_implementation='eager' to get them")
        runner = getattr(module, "hf_longattn_runner", None)
        if runner is None or runner.method.name != method_name:
            # Loaded with from_pretrained(attn_implementation=...) and never patched: the method's defaults.
            method_cls = get_method(method_name)
            runner = LayerRunner(method_cls(method_cls.Config()), module.layer_idx)
            module.hf_longattn_runner = runner
        return runner(module, query, key, value, attention_mask, scaling, sliding_window, softcap), None

    longattn_attention.__name__ = f"longattn_{method_name}_attention"
    return longattn_attention
