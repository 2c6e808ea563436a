"""The Triton kernel of HiP's mask estimation; hip_mask.py holds the algorithm's description, the PyTorch reference
and the launcher (`hip_mask_triton`). One program = one (batch, pattern head, query block): the whole hierarchical
search runs in registers plus a small per-program scratch area in global memory (the current groups, the halves'
scores, their sorted order), with barriers between the phases that exchange data across threads.
"""

import triton
import triton.language as tl

from .triton_prefill import _scores


@triton.jit
def _lse_update(m_i, l_i, s, visible):
    """Fold a tile of scores (log2 units) into each row's running log-sum-exp (m_i, l_i), over the visible ones."""
    m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, float("-inf")), axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.where(visible, tl.exp2(s - m_safe[:, None]), 0.0), axis=1)
    return m_new, l_i


@triton.jit
def _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM: tl.constexpr):
    return tl.load(kv_base + k_pos[:, None] * stride_kl + d[None, :] * stride_kd,
                   mask=k_live[:, None] & (d[None, :] < DIM), other=0.0)


@triton.jit
def _halves(groups, half, k_len, NSEL_P2: tl.constexpr, BK: tl.constexpr, BK_P2: tl.constexpr, CHUNK: tl.constexpr):
    """Halves `half` of the current groups: their block ranges [a, z) and the key positions of their representative
    (centre) blocks, with which of those keys exist."""
    t = tl.arange(0, BK_P2)
    gs = tl.load(groups + half // 2)
    ge = tl.load(groups + NSEL_P2 + half // 2)
    mid = gs + (ge - gs + 1) // 2
    a = tl.where(half % 2 == 0, gs, mid)
    z = tl.where(half % 2 == 0, mid, ge)
    rep = tl.maximum(a + z - 1, 0) // 2
    k_pos = tl.reshape(rep[:, None] * BK + t[None, :], [CHUNK * BK_P2])
    k_live = tl.reshape((t[None, :] < BK) & (z > a)[:, None], [CHUNK * BK_P2]) & (k_pos < k_len)
    return a, z, k_pos, k_live


# Lengths change at every step: specialising on them would recompile the kernel as they do.
@triton.jit(do_not_specialize=["q_len", "k_len", "num_q_blocks"])
def hip_mask_kernel(
    Q, K, KV_START, OUT_IDX, OUT_COUNT, GROUPS, SCORES, SORTED,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    q_len, k_len, num_heads, num_q_blocks, sink, window, score_scale, softcap_log2,
    PER_HEAD: tl.constexpr, KV_DIV: tl.constexpr, BLOCK_Q: tl.constexpr, STRIDE: tl.constexpr,
    NQ: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr, BK_P2: tl.constexpr, DIM: tl.constexpr,
    DIM_P2: tl.constexpr, NSEL: tl.constexpr, NSEL_P2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    STAGES: tl.constexpr, NORMALIZE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program = one (batch, pattern head, query block); the algorithm is described in hip_mask.py."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    program = bh.to(tl.int64) * num_q_blocks + qb
    HALVES: tl.constexpr = 2 * NSEL_P2
    groups = GROUPS + program * HALVES  # starts at [0, NSEL_P2), ends at [NSEL_P2, 2 NSEL_P2)
    scores_ptr = SCORES + program * HALVES
    sorted_ptr = SORTED + program * HALVES

    # Strided queries of the block for the pattern head's query heads: [ROWS, DIM].
    r = tl.arange(0, ROWS)
    last_row = tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1
    q_row = last_row - (r % NQ) * STRIDE  # strided back from the block's last query, as in the reference
    row_live = (r < PER_HEAD * NQ) & (q_row >= qb * BLOCK_Q)
    q_head = h * PER_HEAD + r // NQ
    d = tl.arange(0, DIM_P2)
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + q_row[:, None] * stride_ql + d[None, :] * stride_qd
    q_tile = tl.load(q_ptrs, mask=row_live[:, None] & (d[None, :] < DIM), other=0.0)
    q_pos = q_row + (k_len - q_len)
    kv_base = K + b * stride_kb + (h // KV_DIV) * stride_kh

    last_pos = last_row + (k_len - q_len)
    start = tl.load(KV_START + b)

    # Candidate key blocks [lo, hi) (candidate_block_range), split into NSEL contiguous groups.
    lo = (start + sink) // BK
    hi = tl.maximum((tl.maximum(last_pos - window + 1, 0) + BK - 1) // BK, lo)
    n_cand = (hi - lo).to(tl.int64)
    g = tl.arange(0, NSEL_P2)
    g_start = tl.where(g < NSEL, lo + (g * n_cand) // NSEL, 0)
    g_end = tl.where(g < NSEL, lo + ((g + 1) * n_cand) // NSEL, 0)
    tl.store(groups + g, g_start.to(tl.int32))
    tl.store(groups + NSEL_P2 + g, g_end.to(tl.int32))
    largest = (n_cand + NSEL - 1) // NSEL

    # score="probability": each row's log-sum-exp (log2 units) over the sink and its window (hip_mask._local_lse)
    # plus the candidates' mass sampled by the first round's representatives (hip_mask._sampled_lse).
    lse = tl.zeros([ROWS], dtype=tl.float32)
    if NORMALIZE:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        offs = tl.arange(0, CHUNK * BK_P2)
        span = tl.where(window > 0, window + BLOCK_Q - 1, 0)
        for t0 in range(0, sink + span, CHUNK * BK_P2):
            in_sink = t0 + offs < sink
            k_pos = tl.where(in_sink, start + t0 + offs, last_pos - span + 1 + t0 + offs - sink)
            k_live = (k_pos >= 0) & (k_pos < k_len) & (t0 + offs < sink + span)
            s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale,
                        softcap_log2, SOFTCAP, PRECISION)
            seen = tl.where(in_sink[None, :], k_pos[None, :] < start + sink,
                            (k_pos[None, :] > q_pos[:, None] - window) & (k_pos[None, :] >= start + sink))
            visible = row_live[:, None] & k_live[None, :] & seen & (k_pos[None, :] <= q_pos[:, None])
            m_i, l_i = _lse_update(m_i, l_i, s, visible)
        if largest > 1:
            tl.debug_barrier()
            for c0 in range(0, HALVES, CHUNK):
                half = c0 + tl.arange(0, CHUNK)
                a, z, k_pos, k_live = _halves(groups, half, k_len, NSEL_P2, BK, BK_P2, CHUNK)
                s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale,
                            softcap_log2, SOFTCAP, PRECISION)
                weight = tl.reshape(tl.broadcast_to(tl.log2(tl.maximum(z - a, 1).to(tl.float32))[:, None],
                                                    [CHUNK, BK_P2]), [CHUNK * BK_P2])
                visible = (row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None] - window)
                           & (k_pos[None, :] >= start + sink))
                m_i, l_i = _lse_update(m_i, l_i, s + weight[None, :], visible)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)

    while largest > 1:
        tl.debug_barrier()
        # A runtime loop (short compile); with STAGES > 1 the next chunk's keys load while this chunk is scored.
        for c0 in tl.range(0, HALVES, CHUNK, num_stages=STAGES):
            half = c0 + tl.arange(0, CHUNK)
            a, z, k_pos, k_live = _halves(groups, half, k_len, NSEL_P2, BK, BK_P2, CHUNK)
            s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale,
                        softcap_log2, SOFTCAP, PRECISION) - lse[:, None]
            visible = row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None])
            best = tl.max(tl.reshape(tl.max(tl.where(visible, s, -1e30), axis=0), [CHUNK, BK_P2]), axis=1)
            tl.store(scores_ptr + half, tl.where(z > a, best, float("-inf")))
        tl.debug_barrier()

        # Keep the NSEL best halves: sort (score, lower index first) packed into one int64 key.
        i = tl.arange(0, HALVES)
        bits = tl.load(scores_ptr + i).to(tl.int32, bitcast=True)
        order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        packed = tl.sort((order.to(tl.int64) << 32) | (HALVES - 1 - i).to(tl.int64), descending=True)
        tl.store(sorted_ptr + i, packed)
        tl.debug_barrier()
        win = HALVES - 1 - (tl.load(sorted_ptr + g) & 0xFFFFFFFF).to(tl.int32)
        gs = tl.load(groups + win // 2)
        ge = tl.load(groups + NSEL_P2 + win // 2)
        mid = gs + (ge - gs + 1) // 2
        a = tl.where(g < NSEL, tl.where(win % 2 == 0, gs, mid), 0)
        z = tl.where(g < NSEL, tl.where(win % 2 == 0, mid, ge), 0)
        tl.debug_barrier()
        tl.store(groups + g, a)
        tl.store(groups + NSEL_P2 + g, z)
        largest = (largest + 1) // 2

    tl.debug_barrier()
    gs = tl.load(groups + g)
    ge = tl.load(groups + NSEL_P2 + g)
    live = ge > gs
    ids = tl.sort(tl.where(live, gs, 2147483647))
    count = tl.sum(live.to(tl.int32), axis=0)
    out = OUT_IDX + program * NSEL
    tl.store(out + g, tl.where(g < count, ids, 0), mask=g < NSEL)
    tl.store(OUT_COUNT + program, count)
