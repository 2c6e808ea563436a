"""The Triton kernel of LongHeads' decode step; longheads_decode.py holds the description, the PyTorch reference and
the launcher. One program = one slot of the compact key sequence of one (row, pattern head): it works out which chunk
its slot holds (a far slot after the first one runs the selection; every such program of a head computes the same),
attends to that chunk with the query turned by minus the chunk's shift, and the last program of the head to arrive
merges the slots' partial outputs (triton_decode._finish_split).
"""

import triton
import triton.language as tl

from .launch import fast_launch
from .rope_kernel import cos_sin
from .triton_decode import _finish_split
from .triton_prefill import _load_kv, _scores, _softmax_step


@triton.jit
def _turn(x, x_swapped, angle, d, HALF: tl.constexpr):
    """x (rotate_half layout: dims f and f + HALF pair up) turned by `angle`; x_swapped is x with its halves swapped."""
    cos, sin = cos_sin(angle)
    return x * cos + tl.where(d < HALF, -1.0, 1.0) * x_swapped * sin


@triton.jit
def _selected_chunk(Q, REPS, SCORES, b, ph, target, p, start, lo, n_select, d, d_ok, swapped, inv_freq,
                    stride_qb, stride_qh, stride_rb, stride_rh, stride_rc, scale, G: tl.constexpr,
                    G_SEL: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr, HALF: tl.constexpr):
    """The target-th (ascending) of the n_select chunks among 1 .. lo - 1 with the best probability over the group's
    query heads (longheads_chunks.select_chunks); SCORES: this program's [G_SEL, C_PAD] scratch."""
    g_idx = tl.arange(0, G_SEL)
    g_ok = g_idx < G
    heads = (ph * G + g_idx).to(tl.int64)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptrs + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_sw = tl.load(q_ptrs + swapped[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_local = _turn(q, q_sw, -(p - start).to(tl.float32) * inv_freq[None, :], d[None, :], HALF)  # chunk-local frame
    rep_base = REPS + b.to(tl.int64) * stride_rb + heads * stride_rh
    c_off = tl.arange(0, BLOCK_C)
    m_i = tl.full([G_SEL], float("-inf"), tl.float32)
    l_i = tl.zeros([G_SEL], tl.float32)
    # All heads of the group at once: each candidate's score (kept in SCORES) and each head's log-sum-exp over them;
    # then a chunk's score is its best log-probability over the heads.
    for c0 in tl.range(1, lo, BLOCK_C, num_stages=2):
        c = c0 + c_off
        ok = g_ok[:, None] & (c < lo)[None, :]
        reps = tl.load(rep_base[:, None, None] + c[None, :, None].to(tl.int64) * stride_rc + d[None, None, :],
                       mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
        s = tl.where(ok, scale * tl.sum(reps * q_local[:, None, :], axis=2), float("-inf"))
        tl.store(SCORES + g_idx[:, None] * C_PAD + c[None, :], s, mask=ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # (the padding heads see nothing)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(g_ok, m_i + tl.log(tl.where(g_ok, l_i, 1.0)), 0.0)
    tl.debug_barrier()
    c_all = tl.arange(0, C_PAD)
    candidate = (c_all >= 1) & (c_all < lo)
    scores = tl.load(SCORES + g_idx[:, None] * C_PAD + c_all[None, :], mask=(g_idx[:, None] < G) & candidate[None, :],
                     other=float("-inf"))
    x = tl.max(scores - lse[:, None], axis=0)
    # The best n_select by repeated argmax (ties: the lower chunk), then the target-th of them in ascending order.
    selected = c_all < 0
    for _ in range(n_select):
        pick = tl.min(tl.where(x == tl.max(x, axis=0), c_all, C_PAD), axis=0)
        selected = selected | (c_all == pick)
        x = tl.where(c_all == pick, float("-inf"), x)
    rank = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    return tl.sum(tl.where(selected & (rank == target), c_all, 0), axis=0)


# The key length changes at every step, and with it the cache's strides: no specialising on them.
@fast_launch
@triton.jit(do_not_specialize=["k_len", "stride_kb", "stride_kh", "stride_vb", "stride_vh"])
def longheads_decode_kernel(
    Q, K, V, REPS, START, INV_FREQ, SCORES, Out, Lse, Partials, Arrivals,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_rb, stride_rh, stride_rc, stride_ob, stride_oh,
    k_len, num_heads, chunk_size, scale, score_scale, softcap_log2,
    G: tl.constexpr, G_PAD: tl.constexpr, G_SEL: tl.constexpr, KV_GROUP: tl.constexpr, M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, D_PAD: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    slot = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    ph = bh % num_heads
    FAR: tl.constexpr = M - 2

    # The geometry of the query at p = k_len - 1 (longheads_chunks.block_geometry, a block of one query).
    start = tl.load(START + b).to(tl.int32)
    p = k_len - 1
    own = tl.maximum(p - start, 0) // chunk_size
    lo = tl.maximum(own - 1, 0)
    n_select = tl.maximum(M - 2 - own + lo, 0)
    n_cand = tl.maximum(lo - 1, 0)
    n_far = (lo >= 1).to(tl.int32) + tl.minimum(n_cand, n_select)
    local_start = start + lo * chunk_size

    # This slot's chunk (-1: none). Far slots are right-aligned: chunk 0, then the selected ones ascending (all of
    # 1 .. lo - 1 when they fit, so far-list entry r is chunk r); then the local chunks lo .. own.
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    swapped = (d + HALF) % (2 * HALF)
    inv_freq = tl.load(INV_FREQ + d % HALF, mask=d_ok, other=0.0)
    r = slot - (FAR - n_far)
    chunk = tl.where(slot >= FAR, tl.where(lo + slot - FAR <= own, lo + slot - FAR, -1), tl.where(r >= 0, r, -1))
    if (slot < FAR) & (r >= 1) & (n_cand > n_select):
        scratch = SCORES + (bh * (M + 1) + slot).to(tl.int64) * (G_SEL * C_PAD)
        chunk = _selected_chunk(Q, REPS, scratch, b, ph, r - 1, p, start, lo, n_select, d, d_ok, swapped, inv_freq,
                                stride_qb, stride_qh, stride_rb, stride_rh, stride_rc, scale, G, G_SEL, BLOCK_C, C_PAD,
                                HALF)

    # The chunk moves by delta = its new start - its old one. Turning the query by -delta instead of every key by
    # delta gives the same scores (RoPE rotations are orthogonal) at no per-key cost.
    src = start + chunk * chunk_size
    delta = local_start + (slot - FAR) * chunk_size - src
    offs_m = tl.arange(0, G_PAD)
    row_ok = offs_m < G
    head = ph * G + offs_m
    q_ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _turn(tl.load(q_ptrs + d[None, :], mask=q_mask, other=0.0).to(tl.float32),
              tl.load(q_ptrs + swapped[None, :], mask=q_mask, other=0.0).to(tl.float32),
              -delta.to(tl.float32) * inv_freq[None, :], d[None, :], HALF).to(K.dtype.element_ty)
    kv_head = (ph * G) // KV_GROUP
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if chunk >= 0:
        for t0 in range(0, chunk_size, BLOCK_N):
            pos = src + t0 + offs_n
            k, v = _load_kv(k_base, v_base, pos, d, stride_kl, stride_vl, k_len, HEAD_DIM, D_PAD)
            s = _scores(q, k, score_scale, softcap_log2, SOFTCAP, PRECISION)
            s = tl.where(((t0 + offs_n < chunk_size) & (pos <= p))[None, :], s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)
    _finish_split(Out, Lse, Partials, Arrivals, acc, m_i, l_i, b, bh, slot, M + 1, head, offs_m * 0, row_ok, offs_m,
                  d, stride_ob, 0, stride_oh, num_heads * G, 1, HEAD_DIM, G_PAD, D_PAD, 4)
