"""PyTorch reference of the shared sparse attention: obviously correct, slow, never builds an Lq x Lk tensor.

It gathers, for each query block, the keys of its three regions (sink, listed blocks, window; see pattern.py), masks
per token, and takes an exact softmax in float32. Work is done a few query blocks at a time so that memory stays at
O(query block x budget), not O(Lq x Lk).
"""

from __future__ import annotations

import math

import torch

from .dense import attention_logits
from .pattern import SparsePattern

# Upper bound on the score elements materialised at once (B x Hq x blocks x block_size_q x keys).
_MAX_SCORE_ELEMENTS = 1 << 25


def _region_positions(pattern: SparsePattern, kv_start: torch.Tensor, block_first_q: torch.Tensor, rows: int, k_len: int):
    """Candidate key positions of the three regions, each [B|1, H|1, nQB|1, n]; block_first_q is [B, nQB]."""
    device = pattern.block_indices.device
    sink = kv_start.view(-1, 1, 1, 1) + torch.arange(min(pattern.sink_tokens, k_len), device=device)
    # A block's windows lie in [first query - window + 1, last query], of which at most k_len keys exist.
    win_len = min(pattern.window_tokens + rows - 1, k_len) if pattern.window_tokens > 0 else 0
    window_lo = (block_first_q - pattern.window_tokens + 1).clamp(min=0)
    window = window_lo.unsqueeze(1).unsqueeze(-1) + torch.arange(win_len, device=device)
    offsets = torch.arange(pattern.block_size_k, device=device)
    selected = (pattern.block_indices.long().unsqueeze(-1) * pattern.block_size_k + offsets).flatten(-2)
    return sink, window, selected


def sparse_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: SparsePattern,
    scale: float | None = None,
    softcap: float | None = None,
    kv_start: torch.Tensor | None = None,
    return_lse: bool = False,
    q_offset: torch.Tensor | None = None,
):
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D]; queries are the last Lq positions, or start at the absolute
    positions ``q_offset`` [B] (see pattern.py).

    Returns out [B, Lq, Hq, D] in query's dtype, and with ``return_lse`` the natural-log log-sum-exp [B, Hq, Lq]
    (float32; -inf for a query that sees no key, whose output is 0).
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    _, num_kv_heads, k_len, _ = key.shape
    pattern.validate(batch, num_q_heads, num_kv_heads, q_len)
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device
    if kv_start is None:
        kv_start = torch.zeros(batch, dtype=torch.long, device=device)
    kv_start = kv_start.to(device=device, dtype=torch.long)

    heads = pattern.num_heads
    group = num_q_heads // heads  # query heads served by one pattern head
    kv_group = num_q_heads // num_kv_heads
    kv_head_of = torch.arange(heads, device=device) * group // kv_group  # kv head of each pattern head
    n_qb = pattern.num_query_blocks
    bq = pattern.block_size_q if n_qb > 1 else q_len  # a single (e.g. decode) block needs no padded rows

    q = query.float()
    q = torch.nn.functional.pad(q, (0, 0, 0, n_qb * bq - q_len)).view(batch, heads, group, n_qb, bq, head_dim)
    k_flat = key.float().reshape(batch * num_kv_heads * k_len, head_dim)
    v_flat = value.float().reshape(batch * num_kv_heads * k_len, value.shape[-1])
    base = ((torch.arange(batch, device=device).view(-1, 1) * num_kv_heads + kv_head_of) * k_len).view(batch, heads, 1, 1)

    offset = torch.full((batch,), k_len - q_len, device=device) if q_offset is None else q_offset.to(device).long()
    qb_first = offset.view(-1, 1) + torch.arange(n_qb, device=device) * bq  # [B, nQB]
    q_pos = qb_first.unsqueeze(-1) + torch.arange(bq, device=device)  # [B, nQB, bq]
    sink_end = (kv_start + pattern.sink_tokens).view(batch, 1, 1, 1, 1)

    n_keys = min(pattern.sink_tokens, k_len) + pattern.max_blocks * pattern.block_size_k
    n_keys += min(pattern.window_tokens + bq - 1, k_len) if pattern.window_tokens > 0 else 0
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * num_q_heads * bq * max(n_keys, 1)))

    block_slot = torch.arange(pattern.max_blocks, device=device).repeat_interleave(pattern.block_size_k)
    out = torch.zeros(batch, heads, group, n_qb, bq, value.shape[-1], device=device)
    lse = torch.full((batch, heads, group, n_qb, bq), -math.inf, device=device)
    for c0 in range(0, n_qb, chunk):
        c1 = min(n_qb, c0 + chunk)
        sub = SparsePattern(
            pattern.block_indices[:, :, c0:c1], pattern.block_counts[:, :, c0:c1], pattern.block_size_q, pattern.block_size_k,
            pattern.sink_tokens, pattern.window_tokens,
        )
        sink, window, selected = _region_positions(sub, kv_start, qb_first[:, c0:c1], bq, k_len)
        nc = c1 - c0
        shape = (batch, heads, nc)
        positions = torch.cat([sink.expand(*shape, -1), selected.expand(*shape, -1), window.expand(*shape, -1)], -1)

        # Per-token membership of each region, broadcast over as few dims as it depends on; the three regions
        # partition the visible keys, and only keys that exist count (queries may lie past the last key).
        qp = q_pos[:, c0:c1].view(batch, 1, nc, bq, 1)
        sink_kp, sel_kp, win_kp = sink.unsqueeze(-2), selected.unsqueeze(-2), window.unsqueeze(-2)
        vis_sink = (sink_kp <= qp) & (sink_kp < k_len)
        live = (block_slot < sub.block_counts.unsqueeze(-1)).unsqueeze(-2)
        vis_sel = live & (sel_kp <= qp - pattern.window_tokens) & (sel_kp >= sink_end) & (sel_kp < k_len)
        vis_win = (win_kp > qp - pattern.window_tokens) & (win_kp <= qp) & (win_kp >= sink_end) & (win_kp < k_len)
        visible = torch.cat([v.expand(*shape, bq, -1) for v in (vis_sink, vis_sel, vis_win)], -1)

        flat_idx = (base + positions.clamp(0, k_len - 1)).reshape(-1)
        keys = k_flat.index_select(0, flat_idx).view(*shape, -1, head_dim)
        values = v_flat.index_select(0, flat_idx).view(*shape, -1, value.shape[-1])

        scores = attention_logits(torch.einsum("bhgqtd,bhqnd->bhgqtn", q[:, :, :, c0:c1], keys), scale, softcap)
        scores.masked_fill_(~visible.unsqueeze(2), -math.inf)
        row_max = scores.amax(-1, keepdim=True).clamp_min(-1e30)  # finite even for a query that sees no key
        probs = scores.sub_(row_max).exp_()
        denom = probs.sum(-1, keepdim=True)
        pv = torch.einsum("bhgqtn,bhqnd->bhgqtd", probs, values)
        out[:, :, :, c0:c1] = pv / denom.clamp_min(1e-30)  # zero where nothing is visible
        chunk_lse = (row_max + denom.log()).squeeze(-1)
        lse[:, :, :, c0:c1] = chunk_lse

    out = out.view(batch, num_q_heads, n_qb * bq, -1)[:, :, :q_len].transpose(1, 2).to(query.dtype)
    if return_lse:
        return out, lse.view(batch, num_q_heads, n_qb * bq)[:, :, :q_len]
    return out
