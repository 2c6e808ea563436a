"""Triton sparse decode: a few queries (1 to ~16, one query block) against the selected keys of a long cache.

With so few queries the prefill kernel would run one program per head and leave the GPU idle, so the work is split
along the keys instead (split-K): the sink tiles, the flat list of selected tokens and the window tiles form one list
of key tiles, and each program attends to a contiguous share of it for all query heads of its GQA group and all
queries (M = G x queries rows). The shares are merged in the same launch: each program writes its partial output and
log-sum-exp, then counts itself in with an atomic; the last program of a head to arrive merges the partials and
resets the counter. One launch per step, no memset, no host sync: what matters when decode is launched eagerly, as
generate() does, where every launch and allocation costs host time that the GPU waits for (the partials and counters
are kept between launches: workspace.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import dependent_launch, fast_launch
from .triton_prefill import (_after_previous_kernel, _load_kv, _scores, _softmax_step, dot_precision, key_tile_size,
                             score_scaling)
from .workspace import arrival_counters, kept

# Decode runs when the queries fit one query block and are at most this many (else the prefill kernel runs).
MAX_DECODE_QUERIES = 16


@triton.jit
def _store_rows(Out, Lse, acc, m_i, l_i, b, head, q_idx, row_ok, offs_d, stride_ob, stride_ol, stride_oh,
                num_q_heads, q_len, HEAD_DIM: tl.constexpr):
    """Normalise and store the output rows and their natural-log lse; a row that saw no key gets 0 and -inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_ob + q_idx[:, None] * stride_ol + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + (b.to(tl.int64) * num_q_heads + head) * q_len + q_idx, lse, mask=row_ok)


@triton.jit
def _finish_split(Out, Lse, Partials, Arrivals, acc, m_i, l_i, b, bh, split, num_splits, head, q_idx, row_ok, offs_m,
                  offs_d, stride_ob, stride_ol, stride_oh, num_q_heads, q_len, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, MERGE: tl.constexpr):
    """Store the rows of a split-K program (acc, m_i, l_i: its online softmax) in split `split` of `num_splits` for
    the (row, head) program column bh: alone, directly; else as a partial, merged by the last split to arrive, MERGE
    partials at a time (their loads are independent, so they are in flight together)."""
    if num_splits == 1:
        _store_rows(Out, Lse, acc, m_i, l_i, b, head, q_idx, row_ok, offs_d, stride_ob, stride_ol, stride_oh,
                    num_q_heads, q_len, HEAD_DIM)
    else:
        # Partial of this split: normalised output [BLOCK_M, D_PAD], then its log2-sum-exp after all outputs.
        seen = l_i > 0.0
        part = (bh * num_splits + split) * BLOCK_M + offs_m
        lse_base = Partials + tl.num_programs(1).to(tl.int64) * num_splits * BLOCK_M * D_PAD
        tl.store(Partials + part[:, None].to(tl.int64) * D_PAD + offs_d[None, :], acc / tl.where(seen, l_i, 1.0)[:, None])
        tl.store(lse_base + part, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf")))
        # Every thread's partial is written before one thread publishes the arrival (release); the last program to
        # arrive sees all partials (acquire) and merges them.
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for first in range(0, num_splits, MERGE):
                for j in tl.static_range(MERGE):
                    live = offs_m * 0 + (first + j) < num_splits  # (a tensor: a load's mask must be one)
                    part = (bh * num_splits + first + j) * BLOCK_M + offs_m
                    lse_s = tl.load(lse_base + part, mask=live, other=float("-inf"), cache_modifier=".cg")
                    out_s = tl.load(Partials + part[:, None].to(tl.int64) * D_PAD + offs_d[None, :],
                                    mask=live[:, None], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_i, lse_s)
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.math.exp2(m_i - m_use)
                    weight = tl.math.exp2(lse_s - m_use)
                    acc = acc * alpha[:, None] + out_s * weight[:, None]
                    l_i = l_i * alpha + weight
                    m_i = m_new
            _store_rows(Out, Lse, acc, m_i, l_i, b, head, q_idx, row_ok, offs_d, stride_ob, stride_ol, stride_oh,
                        num_q_heads, q_len, HEAD_DIM)
            tl.atomic_xchg(Arrivals + bh, 0)  # ready for the next launch


# Lengths and pattern strides change at every step: specialising on them would recompile the kernel as they do.
@fast_launch
@triton.jit(do_not_specialize=[
    "stride_ib", "stride_ih", "stride_cb", "stride_ch",
    "q_len", "k_len", "tiles_per_split", "num_splits",
])
def _sparse_decode_kernel(
    Q, K, V, Out, Lse, Partials, Arrivals, BlockIdx, BlockCnt, KvStart, QOffset,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_ol, stride_oh,
    stride_ib, stride_ih, stride_cb, stride_ch,
    num_heads, q_len, k_len, sink_tokens, window_tokens, tiles_per_split, num_splits,
    score_scale, softcap_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, KV_GROUP: tl.constexpr, BK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, Q_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_START: tl.constexpr, HAS_Q_OFFSET: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    MERGE: tl.constexpr, PDL: tl.constexpr = False,
):
    _after_previous_kernel(PDL)
    BLOCK_M: tl.constexpr = G_PAD * Q_PAD
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    ph = bh % num_heads
    offset = k_len - q_len  # queries are the last q_len keys, unless the caller places them
    if HAS_Q_OFFSET:
        offset = tl.load(QOffset + b).to(tl.int32)
    q_first = offset
    q_last = offset + q_len - 1
    key_last = k_len - 1  # queries placed past the last key see no further

    offs_m = tl.arange(0, BLOCK_M)
    head = ph * G + offs_m // Q_PAD
    q_idx = offs_m % Q_PAD
    row_ok = (offs_m // Q_PAD < G) & (q_idx < q_len)
    q_pos = tl.minimum(q_idx + offset, q_last)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh \
        + q_idx[:, None].to(tl.int64) * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    kv_head = (ph * G) // KV_GROUP
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    kv_start = 0
    if HAS_KV_START:
        kv_start = tl.load(KvStart + b).to(tl.int32)
    sink_end = kv_start + sink_tokens
    idx_row = BlockIdx + b.to(tl.int64) * stride_ib + ph * stride_ih
    n_tokens = tl.load(BlockCnt + b.to(tl.int64) * stride_cb + ph * stride_ch) * BK
    win_lo = tl.maximum(sink_end, q_first - window_tokens + 1)
    win_hi = tl.where(window_tokens > 0, tl.minimum(q_last, key_last), win_lo - 1)

    # One list of key tiles: sink tiles, then the selected tokens, then the window tiles.
    n_sink = tl.cdiv(tl.maximum(tl.minimum(sink_end, tl.minimum(q_last, key_last) + 1) - kv_start, 0), BLOCK_N)
    n_selected = tl.cdiv(n_tokens, BLOCK_N)
    n_window = tl.cdiv(tl.maximum(win_hi - win_lo + 1, 0), BLOCK_N)
    n_tiles = n_sink + n_selected + n_window

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for i in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, n_tiles)):
        in_sink = i < n_sink
        in_selected = (i >= n_sink) & (i < n_sink + n_selected)
        j = (i - n_sink) * BLOCK_N + offs_n
        live = (j < tl.where(in_selected, n_tokens, 0)) & (j >= 0)
        selected_pos = tl.where(live, tl.load(idx_row + j // BK, mask=live, other=0) * BK + j % BK, -1)
        window_pos = win_lo + (i - n_sink - n_selected) * BLOCK_N + offs_n
        pos = tl.where(in_sink, kv_start + i * BLOCK_N + offs_n, tl.where(in_selected, selected_pos, window_pos))
        k, v = _load_kv(k_base, v_base, pos, offs_d, stride_kl, stride_vl, k_len, HEAD_DIM, D_PAD)
        s = _scores(q, k, score_scale, softcap_log2, SOFTCAP, PRECISION)
        # The region's own rule per token (pattern.py), with causality.
        lo = tl.where(in_sink, kv_start, tl.where(in_selected, sink_end, tl.maximum(sink_end, q_pos - window_tokens + 1)))
        hi = tl.where(in_sink, tl.minimum(sink_end - 1, q_pos), tl.where(in_selected, q_pos - window_tokens, q_pos))
        hi = tl.minimum(hi, key_last)
        visible = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)

    _finish_split(Out, Lse, Partials, Arrivals, acc, m_i, l_i, b, bh, split, num_splits, head, q_idx, row_ok, offs_m,
                  offs_d, stride_ob, stride_ol, stride_oh, num_heads * G, q_len, HEAD_DIM, BLOCK_M, D_PAD, MERGE)


def use_decode(pattern, q_len: int) -> bool:
    return q_len <= MAX_DECODE_QUERIES and pattern.num_query_blocks == 1


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """One wave of programs on the GPU (a small fixed number elsewhere): more splits than that only give the last
    split more partials to merge (H200, 128K: 18.7 us in one wave against 21.8 in two;
    benchmarks/results/hip_decode_search_h200/README.md)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def _launch_plan(device: torch.device, batch: int, num_q_heads: int, num_kv_heads: int, q_len: int, head_dim: int,
                 heads: int, max_blocks: int, block_size_k: int, sink: int, window: int, dtype: torch.dtype,
                 config: tuple) -> tuple[int, int, dict]:
    """(splits, key tiles per split, kernel constants) of a decode launch; the same for every step of a generate()."""
    group = num_q_heads // heads
    g_pad = triton.next_power_of_2(group)
    q_pad = max(triton.next_power_of_2(q_len), triton.cdiv(16, g_pad))  # tl.dot needs M >= 16
    # Tiles of 128 keys for rows of up to 256 bytes (16-bit head_dim <= 128: their K and V tiles take what 64 rows
    # of float32 or of head_dim 256 take, which GPUs of ~100 KB of shared memory still fit); the last split merges 4
    # partials at a time (both: H200, 128K, benchmarks/results/hip_decode_search_h200/README.md).
    row_bytes = head_dim * dtype.itemsize
    defaults = dict(BLOCK_N=128 if row_bytes <= 256 else 64, num_warps=4, num_stages=2, splits=None, MERGE=4)
    cfg = dict(defaults, **dict(config))
    block_n = key_tile_size(cfg.pop("BLOCK_N"), block_size_k)
    # An upper bound of the tiles any row can have, known without reading the counts back from the device.
    max_tiles = (triton.cdiv(sink, block_n) + triton.cdiv(max_blocks * block_size_k, block_n)
                 + triton.cdiv(window + q_len, block_n) + 1)
    splits = cfg.pop("splits") or min(max_tiles, max(1, triton.cdiv(_programs_wanted(device), batch * heads)))
    tiles_per_split = triton.cdiv(max_tiles, splits)
    splits = triton.cdiv(max_tiles, tiles_per_split)
    constants = dict(
        G=group, G_PAD=g_pad, KV_GROUP=num_q_heads // num_kv_heads, BK=block_size_k, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), Q_PAD=q_pad, BLOCK_N=block_n, PRECISION=dot_precision(dtype),
        **cfg)
    return splits, tiles_per_split, constants


def sparse_decode(query, key, value, pattern, scale: float, softcap: float | None, kv_start, q_offset=None,
                  config: dict | None = None, out=None, want_lse: bool = True):
    """query [B, Hq, Lq <= 16, D] in one query block -> (out [B, Lq, Hq, D], lse [B, Hq, Lq] float32, or None when
    not wanted: the kernel then writes it to scratch, and a step allocates only its output)."""
    batch, num_q_heads, q_len, head_dim = query.shape
    heads = pattern.num_heads
    splits, tiles_per_split, constants = _launch_plan(
        query.device, batch, num_q_heads, key.shape[1], q_len, head_dim, heads, pattern.max_blocks,
        pattern.block_size_k, pattern.sink_tokens, pattern.window_tokens, query.dtype,
        tuple(sorted((config or {}).items())))
    rows = constants["G_PAD"] * constants["Q_PAD"]
    if splits > 1:
        partials = kept(query.device, "decode partials", batch * heads * splits * rows * (constants["D_PAD"] + 1),
                        torch.float32)
        arrivals = arrival_counters(query.device, batch * heads)
    else:
        partials = arrivals = query  # not read
    if out is None:
        out = torch.empty(batch, q_len, num_q_heads, head_dim, device=query.device, dtype=query.dtype)
    lse = (torch.empty(batch, num_q_heads, q_len, device=query.device, dtype=torch.float32) if want_lse
           else kept(query.device, "decode lse", batch * num_q_heads * q_len, torch.float32))
    idx, cnt = pattern.block_indices, pattern.block_counts
    _sparse_decode_kernel[(splits, batch * heads)](
        query, key, value, out, lse, partials, arrivals, idx, cnt, kv_start if kv_start is not None else cnt,
        q_offset if q_offset is not None else cnt,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3], *idx.stride()[:2],
        *cnt.stride()[:2], heads, q_len, key.shape[2], pattern.sink_tokens, pattern.window_tokens, tiles_per_split,
        splits, *score_scaling(scale, softcap),
        HAS_KV_START=kv_start is not None, HAS_Q_OFFSET=q_offset is not None, SOFTCAP=softcap is not None,
        **constants, **dependent_launch(query.device),
    )
    return out, lse if want_lse else None
