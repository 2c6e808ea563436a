"""Exact dense attention with the same inputs as the sparse path: the reference every method is measured against.

Used for the `dense` method, for layers a policy keeps dense (leading layers, short inputs, local sliding-window
layers) and as the fallback for masks a sparse kernel cannot honour. Without softcap it is torch's SDPA (flash or
cuDNN on GPUs); Gemma 2's tanh softcap is not supported by SDPA, so that case runs in query chunks in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Score elements per chunk of the softcap path (B x Hq x chunk x Lk).
_MAX_SCORE_ELEMENTS = 1 << 26
# Scores a masked dense call may hold at once (float32: 1 GiB).
_MAX_MASKED_SCORES = 1 << 28


def attention_logits(qk: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention logits from q.k: scaled, then passed through Gemma 2's tanh softcap when there is one."""
    logits = qk * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def visibility_mask(
    q_len: int, k_len: int, kv_start: torch.Tensor | None, window: int | None, device, q_rows: slice | None = None,
    q_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B|1, 1, Lq, Lk] mask of what each query may see (causal, window, first valid key).

    Queries are the last Lq of the Lk keys, or start at key position ``q_offset[b]`` ([B] tensor, read on the device:
    a static cache whose tail is still empty).
    """
    rows = range(q_len)[q_rows] if q_rows is not None else range(q_len)
    q_pos = torch.arange(rows.start, rows.stop, device=device).view(1, 1, -1, 1)
    q_pos = q_pos + (k_len - q_len if q_offset is None else q_offset.to(device).view(-1, 1, 1, 1))
    k_pos = torch.arange(k_len, device=device).view(1, 1, 1, -1)
    mask = k_pos <= q_pos
    if window:
        mask = mask & (k_pos > q_pos - window)
    if kv_start is not None:
        mask = mask & (k_pos >= kv_start.to(device).view(-1, 1, 1, 1))
    return mask


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    kv_start: torch.Tensor | None = None,
    window: int | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    q_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> out [B, Lq, Hq, D].

    Queries are the last Lq keys, or start at key position ``q_offset`` [B] (see `visibility_mask`). ``mask`` is an
    explicit boolean [B|1, 1, Lq, Lk] mask (True = attend) that replaces the causal/window/padding description, for
    masks such as Gemma 3's bidirectional image spans.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if softcap is not None:
        return _softcapped_attention(query, key, value, scale, softcap, kv_start, window, mask, causal, q_offset)
    is_causal = False
    if mask is None and causal:
        if kv_start is None and q_offset is None and not window and q_len in (1, k_len):
            is_causal = q_len > 1  # SDPA's own causal flag suffices: no mask to build
        else:
            mask = visibility_mask(q_len, k_len, kv_start, window, query.device, q_offset=q_offset)
    grouped = query.shape[1] != key.shape[1]
    if grouped and query.is_cuda and (mask is not None or query.dtype == torch.float32):
        # SDPA's CUDA kernels with enable_gqa (flash) take neither a mask nor float32: either falls back to the math
        # path, which materialises every head's Lq x Lk scores (99 GiB for 11 float32 rows of 16K on SmolLM2).
        # Repeated kv heads let the memory-efficient kernel run instead.
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        grouped = False
    if mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=grouped)
        return out.transpose(1, 2)
    # With a mask, SDPA may take its math path, whose scores for every head and row exist at once (99 GiB for 11
    # float32 rows of 16K on SmolLM2): run the query rows in chunks of bounded scores instead (rows are independent).
    rows = max(1, _MAX_MASKED_SCORES // (query.shape[0] * query.shape[1] * k_len))
    chunks = [
        F.scaled_dot_product_attention(query[:, :, i:i + rows], key, value, scale=scale, enable_gqa=grouped,
                                       attn_mask=mask[:, :, i:i + rows] if mask.shape[2] > 1 else mask)
        for i in range(0, q_len, rows)
    ]
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return _zero_rows_without_keys(out, mask).transpose(1, 2)


def _zero_rows_without_keys(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # SDPA returns NaN for a query that may see no key (a padding query); the sparse kernels return 0 there.
    if mask is None:
        return out
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def _softcapped_attention(query, key, value, scale, softcap, kv_start, window, mask, causal, q_offset):
    batch, num_q_heads, q_len, _ = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    group = num_q_heads // num_kv_heads
    q = query.float().view(batch, num_kv_heads, group, q_len, -1)
    k, v = key.float(), value.float()
    out = torch.empty(batch, num_kv_heads, group, q_len, value.shape[-1], device=query.device)
    chunk = max(1, _MAX_SCORE_ELEMENTS // (batch * num_q_heads * k_len))
    for start in range(0, q_len, chunk):
        rows = slice(start, min(q_len, start + chunk))
        if mask is not None:
            visible = mask[:, :, rows]
        elif causal:
            visible = visibility_mask(q_len, k_len, kv_start, window, query.device, q_rows=rows, q_offset=q_offset)
        else:
            visible = None
        scores = attention_logits(torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, rows], k), scale, softcap)
        if visible is not None:
            scores = scores.masked_fill(~visible.unsqueeze(2), -math.inf)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", probs, v)
    return out.view(batch, num_q_heads, q_len, -1).transpose(1, 2).to(query.dtype)
