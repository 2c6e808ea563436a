"""The Triton kernels of LongHeads' chunk selection and layout; longheads_chunks.py holds the description, the PyTorch
reference (`select_layout_reference`) and the launcher (`select_layout_triton`), which runs two kernels:

- `select_scores_kernel`, one program per (row, pattern head, query block, query head of the group, tile of its
  queries): the queries turned back by their positions once, two sweeps over the candidate chunks (each query's
  log-sum-exp, then each chunk's best log-probability over the tile), stored in a scratch row of its own. One program
  per tile, not per block: a block's tiles and heads, walked one after another, kept too few programs busy.
- `select_layout_kernel`, one program per (row, pattern head, query block): the best over its tiles and heads, the top
  chunks by repeated argmax, and the slots of the compact key sequence.
"""

import triton
import triton.language as tl

from .rope_kernel import cos_sin, turn_halves


@triton.jit
def _local_queries(Q, q_base, t, p, live, row_start, inv_freq, f, stride_ql, stride_qd, HALF: tl.constexpr):
    """The two halves ([BLOCK_M, HALF_P2] each) of the queries at rows t (positions p), turned back by
    (p - row_start), in float32 as the representatives are."""
    mask = live[:, None] & (f[None, :] < HALF)
    ptrs = Q + q_base + t[:, None].to(tl.int64) * stride_ql
    q1 = tl.load(ptrs + f[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(ptrs + (f[None, :] + HALF) * stride_qd, mask=mask, other=0.0).to(tl.float32)
    cos, sin = cos_sin(-(p - row_start).to(tl.float32)[:, None] * inv_freq[None, :])
    return turn_halves(q1, q2, cos, sin)


@triton.jit
def _scores(qa, qb, REPS, rep_base, c, c_ok, f, stride_rc, stride_rd, scale, HALF: tl.constexpr,
            PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_C]: scale * query . representative for chunks c, one dot per half of the head dimension (each
    half of a representative is a contiguous read)."""
    ptrs = REPS + rep_base + c[None, :].to(tl.int64) * stride_rc + f[:, None] * stride_rd
    mask = c_ok[None, :] & (f[:, None] < HALF)
    r1 = tl.load(ptrs, mask=mask, other=0.0)
    r2 = tl.load(ptrs + HALF * stride_rd, mask=mask, other=0.0)
    s = tl.dot(qa, r1, input_precision=PRECISION) + tl.dot(qb, r2, input_precision=PRECISION)
    return scale * s


@triton.jit
def _geometry(START, b, jb, q_len, k_len, first_block, chunk_size, BQ: tl.constexpr, M: tl.constexpr):
    """(row start, first query position, own_last, lo, n_select, n_cand) of query block jb
    (kernels/longheads_chunks.block_geometry)."""
    start = tl.load(START + b).to(tl.int32)
    p0 = k_len - q_len + (first_block + jb) * BQ
    p1 = tl.minimum(p0 + BQ, k_len) - 1
    own_first = tl.maximum(p0 - start, 0) // chunk_size
    own_last = tl.maximum(p1 - start, 0) // chunk_size
    lo = tl.maximum(own_first - 1, 0)
    n_select = tl.maximum(M - 1 - (own_last - lo + 1), 0)
    n_select = tl.where(p1 >= start, n_select, 0)  # a block of padding only selects nothing
    return start, p0, own_last, lo, n_select, tl.maximum(lo - 1, 0)


# Lengths change at every decode step: specialising on them would recompile the kernel each time.
@triton.jit(do_not_specialize=["q_len", "k_len", "first_block", "n_blocks"])
def select_scores_kernel(
    Q, REPS, START, INV_FREQ, SCORES,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_rb, stride_rh, stride_rc, stride_rd,
    q_len, k_len, first_block, n_blocks, num_heads, chunk_size, scale,
    G: tl.constexpr, BQ: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, C_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    jb = tl.program_id(0)
    bh = tl.program_id(1)
    part = tl.program_id(2)  # (query head of the group, tile of its queries)
    T_TILES: tl.constexpr = (BQ + BLOCK_M - 1) // BLOCK_M
    g = part // T_TILES
    t0 = (part % T_TILES) * BLOCK_M
    b = bh // num_heads
    h = bh % num_heads
    row = bh.to(tl.int64) * n_blocks + jb  # [B, H, nQB] order
    start, p0, own_last, lo, n_select, n_cand = _geometry(START, b, jb, q_len, k_len, first_block, chunk_size, BQ, M)
    if (n_cand > n_select) & (n_select > 0):  # else every candidate fits, or none is wanted: nothing to score
        f = tl.arange(0, HALF_P2)
        inv_freq = tl.load(INV_FREQ + f, mask=f < HALF, other=0.0)
        c_off = tl.arange(0, BLOCK_C)
        q_base = b.to(tl.int64) * stride_qb + (h * G + g).to(tl.int64) * stride_qh
        rep_base = b.to(tl.int64) * stride_rb + (h * G + g).to(tl.int64) * stride_rh
        t = t0 + tl.arange(0, BLOCK_M)
        p = p0 + t
        live = (t < BQ) & (p >= start) & (p < k_len)
        qa, qb = _local_queries(Q, q_base, p - (k_len - q_len), p, live, start, inv_freq, f, stride_ql, stride_qd,
                                HALF)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(1, lo, BLOCK_C):
            c = c0 + c_off
            s = _scores(qa, qb, REPS, rep_base, c, c < lo, f, stride_rc, stride_rd, scale, HALF, PRECISION)
            s = tl.where((c < lo)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        lse = tl.where(live, m_i + tl.log(l_i), float("inf"))
        score_row = SCORES + (row * (G * T_TILES) + part) * C_PAD
        for c0 in range(1, lo, BLOCK_C):
            c = c0 + c_off
            s = _scores(qa, qb, REPS, rep_base, c, c < lo, f, stride_rc, stride_rd, scale, HALF, PRECISION)
            s = tl.where(live[:, None], s - lse[:, None], float("-inf"))
            tl.store(score_row + c, tl.max(s, axis=0), mask=c < lo)


@triton.jit(do_not_specialize=["q_len", "k_len", "first_block", "n_blocks"])
def select_layout_kernel(
    START, SCORES, SRC, DELTA, KV_START, Q_OFFSET,
    q_len, k_len, first_block, n_blocks, num_heads, chunk_size,
    G: tl.constexpr, BQ: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, C_PAD: tl.constexpr,
    F_PAD: tl.constexpr,
):
    jb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    row = bh.to(tl.int64) * n_blocks + jb  # [B, H, nQB] order
    FAR: tl.constexpr = M - 2
    SLOTS: tl.constexpr = M + 1
    T_TILES: tl.constexpr = (BQ + BLOCK_M - 1) // BLOCK_M
    start, p0, own_last, lo, n_select, n_cand = _geometry(START, b, jb, q_len, k_len, first_block, chunk_size, BQ, M)

    c_all = tl.arange(0, C_PAD)
    candidate = (c_all >= 1) & (c_all < lo)
    # (Scalar conditions are broadcast by hand: the interpreter cannot mask with a scalar and a vector.)
    selected = candidate & (c_all * 0 + n_cand <= n_select)  # every candidate fits: no scoring needed
    if (n_cand > n_select) & (n_select > 0):
        score_base = SCORES + row * (G * T_TILES * C_PAD)  # [G * T_TILES, C_PAD] of this block
        x = tl.full([C_PAD], float("-inf"), tl.float32)
        for part in range(G * T_TILES):
            x = tl.maximum(x, tl.load(score_base + part * C_PAD + c_all, mask=candidate, other=float("-inf")))
        # Top n_select by repeated argmax (scores of non-candidates are -inf and never chosen).
        for _ in range(n_select):
            top = tl.max(x, axis=0)
            pick = tl.min(tl.where(x == top, c_all, C_PAD), axis=0)  # the lowest chunk among equal scores
            take = (c_all == pick) & (c_all * 0.0 + top > float("-inf"))
            selected = selected | take
            x = tl.where(take, float("-inf"), x)

    # Layout (kernels/longheads_chunks.chunk_layout): far chunks right-aligned in the first M - 2 slots.
    has_first = (lo >= 1).to(tl.int32)
    n_far = has_first + tl.sum(selected.to(tl.int32), axis=0)
    local_start = start + lo * chunk_size
    out = row * SLOTS
    rank = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    slot_c = FAR - n_far + has_first + rank
    src_c = start + c_all * chunk_size
    tl.store(SRC + out + slot_c, src_c, mask=selected)
    tl.store(DELTA + out + slot_c, local_start + (slot_c - FAR) * chunk_size - src_c, mask=selected)
    slot_f = tl.arange(0, F_PAD)
    unused = slot_f < FAR - n_far
    first_here = (slot_f == FAR - n_far) & (slot_f * 0 + has_first > 0)
    tl.store(SRC + out + slot_f, tl.where(unused, -1, start), mask=unused | first_here)
    tl.store(DELTA + out + slot_f, tl.where(unused, 0, local_start - n_far * chunk_size - start),
             mask=unused | first_here)
    u = tl.arange(0, 4)
    local = lo + u
    tl.store(SRC + out + FAR + u, tl.where(local <= own_last, start + local * chunk_size, -1), mask=u < 3)
    tl.store(DELTA + out + FAR + u, tl.zeros_like(u), mask=u < 3)
    tl.store(KV_START + row, (FAR - n_far) * chunk_size)
    tl.store(Q_OFFSET + row, FAR * chunk_size + p0 - local_start)
