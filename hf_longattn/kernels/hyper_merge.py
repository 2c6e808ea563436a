"""Merging one level of HyperAttention's recursion into the running output, through the log-sum-exp.

Attention over disjoint key sets combines exactly from each set's (out, lse): out = sum_i exp(lse_i - lse) out_i with
lse = logaddexp(lse_i). A level's parts (block diagonal, sampled residual) come in slot order; each query row the
level serves reads them at its slot and folds them into its running (out, lse), in place. In PyTorch that is a
gather, an index_select, several float32 temporaries and an index_copy per part over half the queries, memory-bound
and the largest cost after the attention itself at long contexts; `merge_level_triton` (hyper_merge_kernel.py) reads
each input once and writes each output once. `merge_level` dispatches: Triton on CUDA, the reference elsewhere.
"""

from __future__ import annotations

import torch

from .ops import HAS_TRITON, on_device


def merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets: out [B, L, H, D] (any float dtype), lse [B, H, L]
    natural-log (float32; -inf = saw no key). Returns (out float32, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    reference = torch.where(torch.isinf(lse), 0.0, lse)  # a query that saw nothing keeps out 0, lse -inf
    weight_a = (lse_a - reference).exp().transpose(1, 2).unsqueeze(-1)
    weight_b = (lse_b - reference).exp().transpose(1, 2).unsqueeze(-1)
    return out_a.float() * weight_a + out_b.float() * weight_b, lse


def merge_level_reference(out, lse, rows, slot, live, parts) -> None:
    """Fold `parts` into the running out [B, Lq, Hq, D] / lse [B, Hq, Lq] of the query rows `rows` [R], in place.

    parts: (out [B, K, Hq, D], lse [B, Hq, K]) in slot order; slot [B, Hq, R] is each row's slot; live [B, R]
    (or None) is False for rows whose slot means nothing (left padding), which keep their running values.
    """
    index = slot.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, out.shape[-1])
    merged_out, merged_lse = out.index_select(1, rows), lse.index_select(2, rows)
    for part_out, part_lse in parts:
        got_lse = part_lse.gather(2, slot)
        if live is not None:
            got_lse = got_lse.masked_fill(~live.unsqueeze(1), -torch.inf)
        merged_out, merged_lse = merge_by_lse(merged_out, merged_lse, part_out.gather(1, index), got_lse)
    out.index_copy_(1, rows, merged_out.to(out.dtype))
    lse.index_copy_(2, rows, merged_lse)


def merge_level_triton(out, lse, rows, slot, live, parts, block_rows: int = 32) -> None:
    """Same contract as `merge_level_reference` (one or two parts), one Triton program per (rows tile, batch, head)."""
    import triton  # imported on first use, so that tests may set TRITON_INTERPRET=1 first

    from .hyper_merge_kernel import _merge_level_kernel

    if not 1 <= len(parts) <= 2:
        raise ValueError(f"merge_level_triton merges one or two parts, got {len(parts)}")
    batch, _, heads, dim = out.shape
    (out_a, lse_a), (out_b, lse_b) = parts[0], parts[-1]
    slot = slot.contiguous()
    grid = (triton.cdiv(rows.shape[0], block_rows), batch * heads)
    with on_device(out):  # a layer on cuda:1 under device_map
        _merge_level_kernel[grid](
            out, lse, rows, slot, live if live is not None else slot, out_a, lse_a, out_b, lse_b,
            *out.stride()[:3], *lse.stride()[:2], *slot.stride()[:2], live.stride(0) if live is not None else 0,
            *out_a.stride()[:3], *lse_a.stride()[:2], *out_b.stride()[:3], *lse_b.stride()[:2],
            heads, rows.shape[0], HEAD_DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)), BLOCK_R=block_rows,
            HAS_LIVE=live is not None, TWO_PARTS=len(parts) == 2,
        )


def merge_level(out, lse, rows, slot, live, parts) -> None:
    if out.is_cuda and HAS_TRITON:
        return merge_level_triton(out, lse, rows, slot, live, parts)
    return merge_level_reference(out, lse, rows, slot, live, parts)
