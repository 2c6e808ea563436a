"""Triton block-sparse prefill: flash-style online softmax over the three regions of a SparsePattern (see pattern.py).

One program owns one tile of query rows of one query block and one pattern head. When the pattern has one head per
key/value head, the tile stacks the G query heads of that GQA group on top of each other (M = G x rows), so every
key/value tile is loaded once for the whole group: the main saving over FlexAttention, which loads it once per query
head. A program walks, in order: the sink tiles, the listed key blocks as one flat token list (token j of the
selection is key position indices[j // bk] * bk + j % bk), and the window tiles; it applies per-token masks only on
tiles that cross a region or causal boundary.

The small jitted helpers here are shared with the decode kernel (triton_decode.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton without programmatic dependent launch (launch.dependent_launch then never asks for it)
    gdc_launch_dependents = gdc_wait = None


LOG2E = 1.4426950408889634


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """A kernel launched as a programmatic dependent launch (launch.dependent_launch) may start before the previous
    kernel ends: it waits for that kernel's end and writes before touching memory."""
    if PDL:
        gdc_wait()


@triton.jit
def _next_kernel_may_start(PDL: tl.constexpr):
    """Let the next kernel, if launched as a dependent launch, start its programs (they wait for this one's end)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _scores(q, k, score_scale, softcap_log2, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores in log2 units: scale * q.k (times log2 e), or Gemma 2's softcap * tanh(scale * q.k / softcap)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1: tl has no tanh that also runs under the interpreter.
        return (2.0 * tl.sigmoid(2.0 * qk * score_scale) - 1.0) * softcap_log2
    return qk * score_scale


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One online-softmax update with scores s (log2 units, -inf = masked); safe for rows that saw nothing yet."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_kv(k_base, v_base, pos, offs_d, stride_kl, stride_vl, k_len, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Key and value rows at positions pos (clamped into the cache; callers mask what is out of range)."""
    rows = tl.minimum(tl.maximum(pos, 0), k_len - 1).to(tl.int64)
    k_ptrs = k_base + rows[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = v_base + rows[:, None] * stride_vl + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        return tl.load(k_ptrs), tl.load(v_ptrs)
    d_ok = offs_d[None, :] < HEAD_DIM
    return tl.load(k_ptrs, mask=d_ok, other=0.0), tl.load(v_ptrs, mask=d_ok, other=0.0)


@triton.jit
def _key_range(
    acc, m_i, l_i, q, k_base, v_base, start, stop, row_lo, row_hi, offs_n, offs_d, stride_kl, stride_vl, k_len,
    score_scale, softcap_log2, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """Attend to the contiguous keys [start, stop) in tiles; with MASKED, row r sees only keys in [row_lo, row_hi]."""
    for tile_start in range(start, stop, BLOCK_N):
        pos = tile_start + offs_n
        k, v = _load_kv(k_base, v_base, pos, offs_d, stride_kl, stride_vl, k_len, HEAD_DIM, D_PAD)
        s = _scores(q, k, score_scale, softcap_log2, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where((pos[None, :] >= row_lo[:, None]) & (pos[None, :] <= row_hi[:, None]), s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


# Lengths and pattern strides change at every step: specialising on them would recompile the kernel as they do.
@triton.jit(do_not_specialize=[
    "stride_ib", "stride_ih", "stride_iq", "stride_cb",
    "stride_ch", "q_len", "k_len", "tiles_per_qblock",
])
def _sparse_prefill_kernel(
    Q, K, V, Out, Lse, BlockIdx, BlockCnt, KvStart, QOffset,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_ol, stride_oh,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    num_heads, q_len, k_len, block_size_q, tiles_per_qblock, sink_tokens, window_tokens,
    score_scale, softcap_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, KV_GROUP: tl.constexpr, BK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_START: tl.constexpr, HAS_Q_OFFSET: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = G_PAD * BLOCK_Q
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    ph = bh % num_heads
    qblock = tile // tiles_per_qblock
    q0 = qblock * block_size_q + (tile % tiles_per_qblock) * BLOCK_Q  # first query row of this tile
    q_stop = tl.minimum((qblock + 1) * block_size_q, q_len)  # end of this query block
    offset = k_len - q_len  # queries are the last q_len keys, unless the caller places them
    if HAS_Q_OFFSET:
        offset = tl.load(QOffset + b).to(tl.int32)
    q_first = q0 + offset
    q_last = tl.minimum(q0 + BLOCK_Q, q_stop) - 1 + offset
    key_last = k_len - 1  # queries placed past the last key see no further

    # Rows of the tile: G query heads x BLOCK_Q queries.
    offs_m = tl.arange(0, BLOCK_M)
    head = ph * G + offs_m // BLOCK_Q
    q_idx = q0 + offs_m % BLOCK_Q
    row_ok = (offs_m // BLOCK_Q < G) & (q_idx < q_stop)
    q_pos = tl.minimum(q_idx + offset, q_last)  # padded rows borrow a real position (never stored)
    q_see = tl.minimum(q_pos, key_last)  # the last key each row may see
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # 1. Sink: [kv_start, sink_end), causal. Small, always masked.
    acc, m_i, l_i = _key_range(
        acc, m_i, l_i, q, k_base, v_base, kv_start, tl.minimum(sink_end, tl.minimum(q_last, key_last) + 1),
        tl.zeros_like(q_pos) + kv_start, tl.minimum(q_see, sink_end - 1), offs_n, offs_d, stride_kl, stride_vl, k_len,
        score_scale, softcap_log2, HEAD_DIM, D_PAD, BLOCK_N, SOFTCAP, PRECISION, True)

    # 2. Listed blocks, minus the sink and the window: key t is visible to the query at p iff sink_end <= t <= p - W.
    idx_row = BlockIdx + b.to(tl.int64) * stride_ib + ph * stride_ih + qblock * stride_iq
    count = tl.load(BlockCnt + b.to(tl.int64) * stride_cb + ph * stride_ch + qblock)
    selected_hi = tl.minimum(q_first - window_tokens, key_last)  # tiles wholly in [sink_end, this] need no mask
    if BK % BLOCK_N == 0:
        TILES_PER_BLOCK: tl.constexpr = BK // BLOCK_N
        for i in range(0, count * TILES_PER_BLOCK):
            start = tl.load(idx_row + i // TILES_PER_BLOCK) * BK + (i % TILES_PER_BLOCK) * BLOCK_N
            pos = start + offs_n
            k, v = _load_kv(k_base, v_base, pos, offs_d, stride_kl, stride_vl, k_len, HEAD_DIM, D_PAD)
            s = _scores(q, k, score_scale, softcap_log2, SOFTCAP, PRECISION)
            if (start < sink_end) | (start + BLOCK_N - 1 > selected_hi):
                visible = (pos[None, :] >= sink_end) & (pos[None, :] <= tl.minimum(q_pos - window_tokens, key_last)[:, None])
                s = tl.where(visible, s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)
    else:
        # Blocks smaller than (or not a multiple of) a tile: gather BLOCK_N tokens of the flat list per tile.
        n_tokens = count * BK
        for j0 in range(0, n_tokens, BLOCK_N):
            j = j0 + offs_n
            live = j < n_tokens
            pos = tl.load(idx_row + j // BK, mask=live, other=0) * BK + j % BK
            pos = tl.where(live, pos, -1)
            k, v = _load_kv(k_base, v_base, pos, offs_d, stride_kl, stride_vl, k_len, HEAD_DIM, D_PAD)
            s = _scores(q, k, score_scale, softcap_log2, SOFTCAP, PRECISION)
            visible = (pos[None, :] >= sink_end) & (pos[None, :] <= tl.minimum(q_pos - window_tokens, key_last)[:, None])
            s = tl.where(visible, s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)

    # 3. Window: [max(sink_end, p - W + 1), p], walked in tiles from its lowest key. Only the first tiles (below
    # some rows' windows) and the last ones (crossing the diagonal) need the mask: three loops, no branch inside.
    win_lo = tl.maximum(sink_end, q_first - window_tokens + 1)
    win_stop = tl.where(window_tokens > 0, tl.minimum(q_last, key_last) + 1, win_lo)
    full_lo = tl.maximum(sink_end, q_last - window_tokens + 1)  # a tile starting here or later is in every window...
    first_full = win_lo + tl.cdiv(tl.maximum(full_lo - win_lo, 0), BLOCK_N) * BLOCK_N
    span = tl.minimum(q_first, key_last) + 1 - first_full  # ...if it also ends before every row's last key
    end_full = first_full + tl.where(span >= BLOCK_N, span // BLOCK_N, 0) * BLOCK_N
    first_full = tl.minimum(first_full, win_stop)
    end_full = tl.minimum(end_full, win_stop)
    row_lo = tl.maximum(sink_end, q_pos - window_tokens + 1)
    acc, m_i, l_i = _key_range(
        acc, m_i, l_i, q, k_base, v_base, win_lo, first_full, row_lo, q_see, offs_n, offs_d, stride_kl, stride_vl,
        k_len, score_scale, softcap_log2, HEAD_DIM, D_PAD, BLOCK_N, SOFTCAP, PRECISION, True)
    acc, m_i, l_i = _key_range(
        acc, m_i, l_i, q, k_base, v_base, first_full, end_full, row_lo, q_see, offs_n, offs_d, stride_kl, stride_vl,
        k_len, score_scale, softcap_log2, HEAD_DIM, D_PAD, BLOCK_N, SOFTCAP, PRECISION, False)
    acc, m_i, l_i = _key_range(
        acc, m_i, l_i, q, k_base, v_base, end_full, win_stop, row_lo, q_see, offs_n, offs_d, stride_kl, stride_vl,
        k_len, score_scale, softcap_log2, HEAD_DIM, D_PAD, BLOCK_N, SOFTCAP, PRECISION, True)

    # A query that saw no key (left padding) gets 0 and lse -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptrs = Out + b.to(tl.int64) * stride_ob + q_idx[:, None].to(tl.int64) * stride_ol \
        + head[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = Lse + (b.to(tl.int64) * (num_heads * G) + head) * q_len + q_idx
    tl.store(lse_ptrs, lse, mask=row_ok)


def default_prefill_config(head_dim: int, element_size: int = 2) -> dict:
    """Tile sizes for the H200 (BLOCK_M counts stacked rows: group heads x queries)."""
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128 and element_size <= 2:  # best of a sweep at 128K (benchmarks/results/kernels_h200_sweep.md)
        return dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def sparse_prefill(query, key, value, pattern, scale: float, softcap: float | None, kv_start, q_offset=None,
                   config: dict | None = None, out=None):
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> (out [B, Lq, Hq, D], lse [B, Hq, Lq] float32)."""
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    heads = pattern.num_heads
    group = num_q_heads // heads
    g_pad = triton.next_power_of_2(group)
    cfg = dict(default_prefill_config(head_dim, query.element_size()), **(config or {}))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    # Rows per tile: fill BLOCK_M with the group's heads, but never more rows than a query block has.
    rows = triton.next_power_of_2(min(pattern.block_size_q, q_len))
    block_q = max(1, min(block_m // g_pad, rows))
    block_q = max(block_q, 16 // g_pad if g_pad < 16 else 1)  # tl.dot needs M >= 16
    tiles_per_qblock = triton.cdiv(min(pattern.block_size_q, q_len), block_q)
    block_n = key_tile_size(block_n, pattern.block_size_k)

    if out is None:
        out = torch.empty(batch, q_len, num_q_heads, head_dim, device=query.device, dtype=query.dtype)
    lse = torch.empty(batch, num_q_heads, q_len, device=query.device, dtype=torch.float32)
    idx, cnt = pattern.block_indices, pattern.block_counts
    score_scale, softcap_log2 = score_scaling(scale, softcap)
    grid = (pattern.num_query_blocks * tiles_per_qblock, batch * heads)
    _sparse_prefill_kernel[grid](
        query, key, value, out, lse, idx, cnt, kv_start if kv_start is not None else cnt,
        q_offset if q_offset is not None else cnt,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        *idx.stride()[:3], *cnt.stride()[:2],
        heads, q_len, k_len, pattern.block_size_q, tiles_per_qblock, pattern.sink_tokens, pattern.window_tokens,
        score_scale, softcap_log2,
        G=group, G_PAD=g_pad, KV_GROUP=num_q_heads // num_kv_heads, BK=pattern.block_size_k,
        HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_KV_START=kv_start is not None, HAS_Q_OFFSET=q_offset is not None, SOFTCAP=softcap is not None,
        PRECISION=dot_precision(query.dtype), **cfg,
    )
    return out, lse


def key_tile_size(block_n: int, block_size_k: int) -> int:
    """The largest tile of at most block_n keys (>= 16, tl.dot's minimum) that divides the key blocks, so that each
    tile is one contiguous run of keys; block_n itself (gathered tiles) when no such tile exists."""
    tile = block_n
    while tile > 16 and block_size_k % tile:
        tile //= 2
    return tile if block_size_k % tile == 0 else block_n


def score_scaling(scale: float, softcap: float | None) -> tuple[float, float]:
    """(multiplier of q.k, multiplier of tanh) so that scores come out in log2 units."""
    if softcap is None:
        return scale * LOG2E, 1.0
    return scale / softcap, softcap * LOG2E


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs ask for exact float32 products (tf32 would lose about three digits).
    return "ieee" if dtype == torch.float32 else "tf32"
