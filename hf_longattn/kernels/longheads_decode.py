"""LongHeads' decode step in one launch: chunk selection, re-placement and attention for the one new query.

The prefill path (methods/longheads.py) selects (longheads_chunks.select_layout), copies the chunks into compact key
sequences with their keys turned (longheads_gather.gather_rotate), and runs the shared sparse kernel: three launches
and a dozen small tensors a step, which a decode step launched eagerly pays in host time, and with one query per kv
head the selection kernel keeps only a few programs busy. Here one program per (row, pattern head, slot of the
compact sequence) finds its slot's chunk, attends to it with the query turned by minus the chunk's shift (the same
scores as the turned keys: a RoPE rotation is orthogonal) and the last program of a head merges the slots' partials:
one launch, nothing copied, no host sync. (For a prefill, reading the chunks in place this way was 2x slower on an
H200 than copying them and running the shared kernel: the copy path stays there.)

`longheads_decode_reference` composes the prefill path's PyTorch references for the same step; `longheads_decode_triton`
is the kernel (longheads_decode_kernel.py, imported on first use); `longheads_decode` dispatches (Triton on CUDA, the
reference elsewhere).
"""

from __future__ import annotations

import functools

import torch

from .dense import dense_attention
from .longheads_chunks import chunk_pad, select_layout_reference
from .longheads_gather import gather_rotate_reference
from .ops import HAS_TRITON, on_device
from .workspace import arrival_counters, kept


def longheads_decode_reference(query, key, value, reps, row_start, inv_freq, *, chunk_size: int, num_chunks: int,
                               scale: float, softcap: float | None, heads: int) -> torch.Tensor:
    """query [B, Hq, 1, D] (the newest key's), key/value [B, Hkv, Lk, D] as cached, reps [B, Hq, C, D] float32 (every
    completed chunk's representative), row_start [B]; heads: pattern heads. Returns out [B, 1, Hq, D]."""
    batch, num_q_heads, _, dim = query.shape
    layout = select_layout_reference(query, reps, row_start, inv_freq, k_len=key.shape[2], first_block=0, n_blocks=1,
                                     block_size_q=1, chunk_size=chunk_size, num_chunks=num_chunks, scale=scale,
                                     heads=heads)
    keys, values = gather_rotate_reference(key, value, layout["src_start"], layout["delta"], chunk_size, inv_freq)
    keys, values = (t.reshape(batch * heads, 1, *t.shape[2:]) for t in (keys, values))  # one sequence per (row, head)
    q = query.reshape(batch * heads, num_q_heads // heads, 1, dim)
    out = dense_attention(q, keys, values, scale, softcap, kv_start=layout["kv_start"].reshape(-1),
                          q_offset=layout["q_offset"].reshape(-1))
    return out.reshape(batch, 1, num_q_heads, dim)


@functools.lru_cache(maxsize=64)
def _launch_plan(batch: int, num_q_heads: int, num_kv_heads: int, dim: int, heads: int, chunk_size: int,
                 num_chunks: int, rep_capacity: int, dtype: torch.dtype, scale: float, softcap: float | None,
                 block_c: int, block_n: int, num_warps: int) -> tuple:
    """(slots, scratch sizes, scalar arguments, kernel constants) of a step: the same for every step of a generate(),
    so a step spends no host time working them out (its launch is eager, and bound by host time)."""
    import triton

    from .triton_prefill import dot_precision, score_scaling

    group, slots = num_q_heads // heads, num_chunks + 1
    g_sel = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(dim))
    g_pad = max(16, g_sel)  # tl.dot needs 16 rows
    c_pad = chunk_pad(rep_capacity)
    programs = batch * heads * slots
    sizes = programs * g_sel * c_pad, programs * g_pad * (d_pad + 1), batch * num_q_heads
    constants = dict(
        G=group, G_PAD=g_pad, G_SEL=g_sel, KV_GROUP=num_q_heads // num_kv_heads, M=num_chunks, HEAD_DIM=dim,
        HALF=dim // 2, D_PAD=d_pad, BLOCK_C=block_c, C_PAD=c_pad,
        BLOCK_N=max(16, min(block_n, triton.next_power_of_2(chunk_size))), SOFTCAP=softcap is not None,
        PRECISION=dot_precision(dtype), num_warps=num_warps)
    return slots, sizes, (heads, chunk_size, scale, *score_scaling(scale, softcap)), constants


@functools.cache
def _kernel():
    from .longheads_decode_kernel import longheads_decode_kernel

    return longheads_decode_kernel


def longheads_decode_triton(query, key, value, reps, row_start, inv_freq, *, chunk_size: int, num_chunks: int,
                            scale: float, softcap: float | None, heads: int, block_c: int = 16, block_n: int = 64,
                            num_warps: int = 4) -> torch.Tensor:
    """Same as the reference, in one Triton launch."""
    batch, num_q_heads, q_len, dim = query.shape
    if q_len != 1 or dim % 2 or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"longheads_decode takes one query and caches with contiguous head dims; got query "
                         f"{tuple(query.shape)} strides {query.stride()}, key strides {key.stride()}")
    if inv_freq.numel() != dim // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies for a head dim of {dim}: pass the layer's own "
                         f"({dim // 2}, rope.layer_inv_freq)")
    device = query.device
    reps = reps if reps.stride(-1) == 1 else reps.contiguous()
    slots, (n_scores, n_partials, n_lse), scalars, constants = _launch_plan(
        batch, num_q_heads, key.shape[1], dim, heads, chunk_size, num_chunks, reps.shape[2], query.dtype, scale,
        softcap, block_c, block_n, num_warps)
    scores = kept(device, "longheads decode scores", n_scores, torch.float32)
    partials = kept(device, "decode partials", n_partials, torch.float32)
    lse = kept(device, "decode lse", n_lse, torch.float32)  # the merge writes it; unused (as sparse_decode's)
    out = torch.empty(batch, 1, num_q_heads, dim, dtype=query.dtype, device=device)
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    with on_device(query):
        _kernel()[(slots, batch * heads)](
            query, key, value, reps, row_start, inv_freq, scores, out, lse, partials,
            arrival_counters(device, batch * heads), query.stride(0), query.stride(1), *key.stride()[:3],
            *value.stride()[:3], *reps.stride()[:3], out.stride(0), out.stride(2), key.shape[2], *scalars, **constants,
        )
    return out


def longheads_decode(query, key, value, reps, row_start, inv_freq, **options) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors (when triton is installed), the reference otherwise."""
    run = longheads_decode_triton if HAS_TRITON and query.is_cuda else longheads_decode_reference
    return run(query, key, value, reps, row_start, inv_freq, **options)
