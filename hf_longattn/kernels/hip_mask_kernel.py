"""The Triton kernels of HiP's mask estimation; hip_mask.py holds the algorithm's description, the PyTorch reference
and the launcher (`hip_mask_triton`).

* `hip_mask_kernel`: one beam per query block (``slices=1``), one program per (batch, pattern head, query block). The
  beam can be wide (the paper's 256 groups = 512 halves a round), so the halves are scored in tiles into a small
  per-program scratch area in global memory, and the best are found there by a radix select, with barriers between
  the phases.
* `hip_slice_kernel`: a sliced search, one program per (batch, pattern head, query block, slice). A slice is narrow
  (at most 64 groups of 2-token blocks), so a round lives in registers: all its halves are scored in one tile and the
  best are kept by rank (each half counts the halves that beat it) instead of a select through memory. A decode step
  is then a few short programs per kv head instead of one long chain of rounds.
* `hip_lse_kernel`: the sliced search's log-sum-exp estimate, launched just before it, one tile of the estimate's
  keys per program; each slice merges the partials instead of reading all of those keys itself.
"""

import triton
import triton.language as tl

from .launch import fast_launch
from .triton_prefill import _after_previous_kernel, _next_kernel_may_start, _scores


@triton.jit
def _lse_update(m_i, l_i, s, visible):
    """Fold a tile of scores (log2 units) into each row's running log-sum-exp (m_i, l_i), over the visible ones."""
    m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, float("-inf")), axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.where(visible, tl.exp2(s - m_safe[:, None]), 0.0), axis=1)
    return m_new, l_i


@triton.jit
def _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM: tl.constexpr):
    return tl.load(kv_base + k_pos[:, None].to(tl.int64) * stride_kl + d[None, :] * stride_kd,
                   mask=k_live[:, None] & (d[None, :] < DIM), other=0.0)


@triton.jit
def _block_keys(rep, live, k_len, BK: tl.constexpr, BK_P2: tl.constexpr, N: tl.constexpr):
    """Key positions of the N key blocks `rep` (BK tokens each, padded to BK_P2) and which of them exist."""
    t = tl.arange(0, BK_P2)
    k_pos = tl.reshape(rep[:, None] * BK + t[None, :], [N * BK_P2])
    k_live = tl.reshape((t[None, :] < BK) & live[:, None], [N * BK_P2]) & (k_pos < k_len)
    return k_pos, k_live


@triton.jit
def _block_max(s, N: tl.constexpr, BK_P2: tl.constexpr):
    """[N]: per key block, the max over its tokens and over the rows of s [ROWS, N * BK_P2]."""
    return tl.max(tl.reshape(tl.max(s, axis=0), [N, BK_P2]), axis=1)


@triton.jit
def _queries(Q, Q_OFFSET, b, h, qb, q_len, k_len, stride_qb, stride_qh, stride_ql, stride_qd, PER_HEAD: tl.constexpr,
             BLOCK_Q: tl.constexpr, STRIDE: tl.constexpr, NQ: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
             DIM_P2: tl.constexpr, HAS_Q_OFFSET: tl.constexpr):
    """The block's strided queries (back from its last query) for the pattern head's query heads: (tile [ROWS, DIM],
    which rows exist, each row's position, the block's last position, how many queries the block has)."""
    r = tl.arange(0, ROWS)
    last_row = tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1
    q_row = last_row - (r % NQ) * STRIDE
    row_live = (r < PER_HEAD * NQ) & (q_row >= qb * BLOCK_Q)
    q_head = h * PER_HEAD + r // NQ
    d = tl.arange(0, DIM_P2)
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + q_row[:, None] * stride_ql + d[None, :] * stride_qd
    q_tile = tl.load(q_ptrs, mask=row_live[:, None] & (d[None, :] < DIM), other=0.0)
    offset = k_len - q_len  # the queries are the last q_len keys, unless the caller places them
    if HAS_Q_OFFSET:
        offset = tl.load(Q_OFFSET + b).to(tl.int32)
    return q_tile, row_live, q_row + offset, last_row + offset, last_row - qb * BLOCK_Q + 1


@triton.jit
def _grid_place(num_heads, num_q_blocks, PARTS: tl.constexpr):
    """Where a program of a (num_q_blocks x PARTS, batch x heads) grid works: (batch row, pattern head, query block,
    its part of the block's work, the index of the (row, head, block) it serves)."""
    qb = tl.program_id(0) // PARTS
    bh = tl.program_id(1)
    return bh // num_heads, bh % num_heads, qb, tl.program_id(0) % PARTS, bh.to(tl.int64) * num_q_blocks + qb


@triton.jit
def _row_keys(K, KV_START, b, h, stride_kb, stride_kh, KV_DIV: tl.constexpr, HAS_KV_START: tl.constexpr):
    """(row b's first valid key, the pattern head's keys)."""
    start = 0
    if HAS_KV_START:
        start = tl.load(KV_START + b).to(tl.int32)
    return start, K + b * stride_kb + (h // KV_DIV) * stride_kh


@triton.jit
def _candidates(start, last_pos, k_len, sink, window, BK: tl.constexpr):
    """Candidate key blocks [lo, lo + n) of a query block (hip_mask.candidate_block_range)."""
    lo = (start + sink) // BK
    hi = tl.minimum((tl.maximum(last_pos - window + 1, 0) + BK - 1) // BK, (k_len + BK - 1) // BK)
    return lo, (tl.maximum(hi, lo) - lo).to(tl.int64)


@triton.jit
def _local_lse_tile(m_i, l_i, t0, q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start, last_pos, span,
                    k_len, sink, window, score_scale, softcap_log2, DIM: tl.constexpr, TILE: tl.constexpr,
                    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys [t0, t0 + TILE) of the sink followed by the `span` keys that end at the block's last query (every
    window of the block) into (m_i, l_i), counting each where its row sees it through the sink or its window."""
    offs = tl.arange(0, TILE)
    in_sink = t0 + offs < sink
    k_pos = tl.where(in_sink, start + t0 + offs, last_pos - span + 1 + t0 + offs - sink)
    k_live = (k_pos >= 0) & (k_pos < k_len) & (t0 + offs < sink + span)
    s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale, softcap_log2,
                SOFTCAP, PRECISION)
    seen = tl.where(in_sink[None, :], k_pos[None, :] < start + sink,
                    (k_pos[None, :] > q_pos[:, None] - window) & (k_pos[None, :] >= start + sink))
    visible = row_live[:, None] & k_live[None, :] & seen & (k_pos[None, :] <= q_pos[:, None])
    return _lse_update(m_i, l_i, s, visible)


@triton.jit
def _sampled_lse_tile(m_i, l_i, p0, q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start, lo, n_cand,
                      k_len, sink, window, score_scale, softcap_log2, BK: tl.constexpr, BK_P2: tl.constexpr,
                      DIM: tl.constexpr, PARTS: tl.constexpr, STRATA: tl.constexpr, SOFTCAP: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Fold the centre blocks of parts [p0, p0 + PARTS) of the STRATA equal parts of the candidates into (m_i, l_i),
    each weighted by its part's size; keys a row sees through its window or the sink are left out."""
    part = p0 + tl.arange(0, PARTS)
    a = lo + (part * n_cand) // STRATA
    z = lo + ((part + 1) * n_cand) // STRATA
    k_pos, k_live = _block_keys(tl.maximum(a + z - 1, 0) // 2, (z > a) & (part < STRATA), k_len, BK, BK_P2, PARTS)
    s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale, softcap_log2,
                SOFTCAP, PRECISION)
    weight = tl.reshape(tl.broadcast_to(tl.log2(tl.maximum(z - a, 1).to(tl.float32))[:, None], [PARTS, BK_P2]),
                        [PARTS * BK_P2])
    visible = (row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None] - window)
               & (k_pos[None, :] >= start + sink))
    return _lse_update(m_i, l_i, s + weight[None, :], visible)


@triton.jit
def _lse_of(m_i, l_i):
    """The log-sum-exp (log2 units) of a running (m_i, l_i); 0 for a row that saw nothing."""
    return tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)


@triton.jit
def _estimated_lse(q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start, last_pos, block_rows, lo, n_cand,
                   k_len, sink, window, score_scale, softcap_log2, BK: tl.constexpr,
                   BK_P2: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                   STRATA: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """Each row's estimated log-sum-exp (log2 units; 0 for a row that sees nothing): the sink and its window exactly
    (hip_mask._local_lse) plus the candidates sampled at the centres of STRATA equal parts (hip_mask._sampled_lse)."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    span = tl.where(window > 0, window + block_rows - 1, 0)  # every window of the block's queries
    for t0 in tl.range(0, sink + span, TILE, num_stages=STAGES):
        m_i, l_i = _local_lse_tile(m_i, l_i, t0, q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start,
                                   last_pos, span, k_len, sink, window, score_scale, softcap_log2, DIM, TILE, SOFTCAP,
                                   PRECISION)
    PARTS: tl.constexpr = TILE // BK_P2
    for p0 in tl.range(0, STRATA, PARTS, num_stages=STAGES):
        m_i, l_i = _sampled_lse_tile(m_i, l_i, p0, q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start,
                                     lo, n_cand, k_len, sink, window, score_scale, softcap_log2, BK, BK_P2, DIM,
                                     PARTS, STRATA, SOFTCAP, PRECISION)
    return _lse_of(m_i, l_i)


@triton.jit
def _halves(groups, half, NSEL_P2: tl.constexpr):
    """Key blocks [a, z) of halves `half` of the beam's groups (half 2g + side of group g; starts at groups[0,
    NSEL_P2), ends at groups[NSEL_P2, 2 NSEL_P2))."""
    gs = tl.load(groups + half // 2)
    ge = tl.load(groups + NSEL_P2 + half // 2)
    mid = gs + (ge - gs + 1) // 2
    return tl.where(half % 2 == 0, gs, mid), tl.where(half % 2 == 0, mid, ge)


# Lengths and positions change at every step: specialising on them would recompile the kernel as they do.
@triton.jit(do_not_specialize=["q_len", "k_len", "num_q_blocks"])
def hip_mask_kernel(
    Q, K, KV_START, Q_OFFSET, OUT_IDX, OUT_COUNT, GROUPS, SCORES,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    q_len, k_len, num_heads, num_q_blocks, sink, window, score_scale, softcap_log2,
    PER_HEAD: tl.constexpr, KV_DIV: tl.constexpr, BLOCK_Q: tl.constexpr, STRIDE: tl.constexpr,
    NQ: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr, BK_P2: tl.constexpr, DIM: tl.constexpr,
    DIM_P2: tl.constexpr, NSEL: tl.constexpr, NSEL_P2: tl.constexpr, CHUNK: tl.constexpr, STRATA: tl.constexpr,
    DIGIT: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, NORMALIZE: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_KV_START: tl.constexpr, HAS_Q_OFFSET: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """One program = one (batch, pattern head, query block) with one beam; the algorithm is in hip_mask.py."""
    b, h, qb, _, program = _grid_place(num_heads, num_q_blocks, 1)
    HALVES: tl.constexpr = 2 * NSEL_P2
    groups = GROUPS + program * HALVES  # starts at [0, NSEL_P2), ends at [NSEL_P2, 2 NSEL_P2)
    scores_ptr = SCORES + program * HALVES

    q_tile, row_live, q_pos, last_pos, block_rows = _queries(
        Q, Q_OFFSET, b, h, qb, q_len, k_len, stride_qb, stride_qh, stride_ql, stride_qd, PER_HEAD, BLOCK_Q, STRIDE,
        NQ, ROWS, DIM, DIM_P2, HAS_Q_OFFSET)
    start, kv_base = _row_keys(K, KV_START, b, h, stride_kb, stride_kh, KV_DIV, HAS_KV_START)
    d = tl.arange(0, DIM_P2)

    # Candidate key blocks, split into NSEL contiguous groups.
    lo, n_cand = _candidates(start, last_pos, k_len, sink, window, BK)
    g = tl.arange(0, NSEL_P2)
    g_start = tl.where(g < NSEL, lo + (g * n_cand) // NSEL, 0)
    g_end = tl.where(g < NSEL, lo + ((g + 1) * n_cand) // NSEL, 0)
    tl.store(groups + g, g_start.to(tl.int32))
    tl.store(groups + NSEL_P2 + g, g_end.to(tl.int32))
    largest = (n_cand + NSEL - 1) // NSEL

    lse = tl.zeros([ROWS], dtype=tl.float32)
    if NORMALIZE:
        if largest > 1:
            lse = _estimated_lse(q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live, start, last_pos,
                                 block_rows, lo, n_cand, k_len, sink, window, score_scale,
                                 softcap_log2, BK, BK_P2, DIM, ROWS, CHUNK * BK_P2, STRATA, SOFTCAP, PRECISION,
                                 STAGES)

    while largest > 1:
        tl.debug_barrier()
        # A runtime loop (short compile); with STAGES > 1 the next chunk's keys load while this chunk is scored.
        for c0 in tl.range(0, HALVES, CHUNK, num_stages=STAGES):
            half = c0 + tl.arange(0, CHUNK)
            a, z = _halves(groups, half, NSEL_P2)
            k_pos, k_live = _block_keys(tl.maximum(a + z - 1, 0) // 2, z > a, k_len, BK, BK_P2, CHUNK)
            k_tile = _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM)
            if TRANSPOSED:
                # Keys as the tile's rows: the max over the queries runs along the dot's N dimension (within warps).
                s = _scores(k_tile, q_tile, score_scale, softcap_log2, SOFTCAP, PRECISION) - lse[None, :]
                visible = k_live[:, None] & row_live[None, :] & (k_pos[:, None] <= q_pos[None, :])
                best = tl.max(tl.reshape(tl.max(tl.where(visible, s, -1e30), axis=1), [CHUNK, BK_P2]), axis=1)
            else:
                s = _scores(q_tile, k_tile, score_scale, softcap_log2, SOFTCAP, PRECISION) - lse[:, None]
                visible = row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None])
                best = _block_max(tl.where(visible, s, -1e30), CHUNK, BK_P2)
            tl.store(scores_ptr + half, tl.where(z > a, best, float("-inf")))
        tl.debug_barrier()

        # Keep the NSEL best halves (ties: the lower half) in the order they lie: group g of the next round is the
        # g-th of them, so the groups stay in ascending order.
        i = tl.arange(0, HALVES)
        a, z = _halves(groups, i, NSEL_P2)
        chosen = _best(tl.load(scores_ptr + i), i < 2 * NSEL, NSEL, DIGIT)
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.debug_barrier()
        tl.store(groups + slot, a, mask=chosen)
        tl.store(groups + NSEL_P2 + slot, z, mask=chosen)
        largest = (largest + 1) // 2

    tl.debug_barrier()
    gs = tl.load(groups + g)
    ge = tl.load(groups + NSEL_P2 + g)
    live = ge > gs
    count = tl.sum(live.to(tl.int32), axis=0)
    # The groups lie in ascending order: their live ones, packed, are the selection in ascending order.
    out = OUT_IDX + program * NSEL
    tl.store(out + tl.cumsum(live.to(tl.int32), axis=0) - 1, gs, mask=live)
    tl.store(out + g, tl.zeros_like(g), mask=(g >= count) & (g < NSEL))
    tl.store(OUT_COUNT + program, count)


@triton.jit
def _bitwise_and(a, b):
    return a & b


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _best(scores, valid, NKEEP: tl.constexpr, DIGIT: tl.constexpr):
    """Which of the scores are the NKEEP best of the valid ones (at least NKEEP; ties go to the lower index): the
    n-th largest score is found DIGIT bits at a time (a radix select), no sort (DIGIT=0: by a sort)."""
    bits = scores.to(tl.int32, bitcast=True)
    key = (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) ^ -2147483648).to(tl.uint32, bitcast=True)  # float order
    key = tl.where(valid, key, 0)
    if DIGIT == 0:  # sorted instead: the threshold is the NKEEP-th key
        at = tl.arange(0, key.shape[0])
        threshold = tl.max(tl.where(at == NKEEP - 1, tl.sort(key, descending=True), 0), axis=0)
    else:
        tl.static_assert(32 % DIGIT == 0, "the radix select takes digits that divide 32 bits")
        digit = tl.arange(0, 1 << DIGIT).to(tl.uint32)
        # The bits all valid keys share are the threshold's too: the select starts at the digit holding the highest
        # bit where they differ (or the one above it, where the float log2 rounds up: one more pass, same result).
        common = tl.reduce(tl.where(valid, key, 0xFFFFFFFF), 0, _bitwise_and)
        mixed = common ^ tl.reduce(key, 0, _bitwise_or)
        top = tl.minimum(tl.log2(tl.maximum(mixed, 1).to(tl.float32)).to(tl.int32), 31)
        shift = tl.where(mixed == 0, -DIGIT, top // DIGIT * DIGIT)  # all valid keys equal: nothing to select
        above_window = (shift + DIGIT).to(tl.uint32)
        threshold = tl.where(mixed == 0, common,
                             tl.where(above_window >= 32, 0, (common >> above_window) << above_window))
        settled = tl.zeros([], tl.int32)
        # Once exactly NKEEP keys lie at or above the threshold, its lower digits change nothing: stop there (on
        # distinct scores, as soon as the digits tell the NKEEP-th from the next).
        while (shift >= 0) & (settled == 0):
            # The largest digit that still leaves NKEEP keys at or above the threshold (counts fall as it grows).
            candidate = threshold | (digit << shift.to(tl.uint32))
            count = tl.sum((key[None, :] >= candidate[:, None]).to(tl.int32), axis=1)
            best = tl.max(tl.where(count >= NKEEP, digit, 0), axis=0)
            threshold = threshold | (best << shift.to(tl.uint32))
            settled = (tl.max(tl.where(digit == best, count, 0), axis=0) == NKEEP).to(tl.int32)
            shift -= DIGIT
    above = valid & (key > threshold)
    tied = valid & (key == threshold)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= NKEEP - tl.sum(above.to(tl.int32), axis=0)))


@triton.jit
def _keep_best(ids, scores, valid, out, NKEEP: tl.constexpr, DIGIT: tl.constexpr):
    """Store, in ascending order, the NKEEP best of the survivors (ids in ascending order, their scores; ties go to
    the lower block; at least NKEEP valid) at out."""
    chosen = _best(scores, valid, NKEEP, DIGIT)
    tl.store(out + tl.cumsum(chosen.to(tl.int32), axis=0) - 1, ids, mask=chosen)


@fast_launch
@triton.jit(do_not_specialize=["q_len", "k_len", "num_q_blocks"])
def hip_lse_kernel(
    Q, K, KV_START, Q_OFFSET, PARTIALS,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    q_len, k_len, num_heads, num_q_blocks, sink, window, score_scale, softcap_log2,
    PER_HEAD: tl.constexpr, KV_DIV: tl.constexpr, BLOCK_Q: tl.constexpr, STRIDE: tl.constexpr,
    NQ: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr, BK_P2: tl.constexpr, DIM: tl.constexpr,
    DIM_P2: tl.constexpr, TILE: tl.constexpr, STRATA: tl.constexpr, LOCAL_TILES: tl.constexpr,
    LSE_PARTS: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KV_START: tl.constexpr,
    HAS_Q_OFFSET: tl.constexpr, PDL: tl.constexpr = False,
):
    """The sliced search's log-sum-exp estimate (`_estimated_lse`), one tile of its keys per program: a program folds
    tile t of LSE_PARTS for one (batch, pattern head, query block) into a partial (m, l) per row, which
    `hip_slice_kernel` merges. Each slice would otherwise read all of the estimate's keys itself, as many times over
    as there are slices."""
    _after_previous_kernel(PDL)
    _next_kernel_may_start(PDL)  # the slices: they wait for this kernel's end, but their launch overlaps it
    b, h, qb, t, program = _grid_place(num_heads, num_q_blocks, LSE_PARTS)
    q_tile, row_live, q_pos, last_pos, block_rows = _queries(
        Q, Q_OFFSET, b, h, qb, q_len, k_len, stride_qb, stride_qh, stride_ql, stride_qd, PER_HEAD, BLOCK_Q, STRIDE,
        NQ, ROWS, DIM, DIM_P2, HAS_Q_OFFSET)
    start, kv_base = _row_keys(K, KV_START, b, h, stride_kb, stride_kh, KV_DIV, HAS_KV_START)
    d = tl.arange(0, DIM_P2)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if t < LOCAL_TILES:  # the sink and the windows (the tiles past them hold no key)
        span = tl.where(window > 0, window + block_rows - 1, 0)
        m_i, l_i = _local_lse_tile(m_i, l_i, t * TILE, q_tile, kv_base, d, stride_kl, stride_kd, q_pos, row_live,
                                   start, last_pos, span, k_len, sink, window, score_scale, softcap_log2, DIM, TILE,
                                   SOFTCAP, PRECISION)
    else:  # the sampled candidates
        lo, n_cand = _candidates(start, last_pos, k_len, sink, window, BK)
        PARTS: tl.constexpr = TILE // BK_P2
        m_i, l_i = _sampled_lse_tile(m_i, l_i, (t - LOCAL_TILES) * PARTS, q_tile, kv_base, d, stride_kl, stride_kd,
                                     q_pos, row_live, start, lo, n_cand, k_len, sink, window, score_scale,
                                     softcap_log2, BK, BK_P2, DIM, PARTS, STRATA, SOFTCAP, PRECISION)
    r = tl.arange(0, ROWS)
    partial = PARTIALS + (program * LSE_PARTS + t) * 2 * ROWS
    tl.store(partial + r, m_i)
    tl.store(partial + ROWS + r, l_i)


@triton.jit
def _merged_lse(PARTIALS, program, NPARTS: tl.constexpr, ROWS: tl.constexpr):
    """Each row's log-sum-exp (log2 units) from the NPARTS partials `hip_lse_kernel` wrote for this program."""
    NPARTS_P2: tl.constexpr = triton.next_power_of_2(NPARTS)
    t = tl.arange(0, NPARTS_P2)
    r = tl.arange(0, ROWS)
    at = PARTIALS + (program * NPARTS + t[:, None]) * 2 * ROWS + r[None, :]
    m = tl.load(at, mask=t[:, None] < NPARTS, other=float("-inf"))
    mass = tl.load(at + ROWS, mask=t[:, None] < NPARTS, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    return _lse_of(m_max, tl.sum(mass * tl.exp2(m - m_safe[None, :]), axis=0))


@fast_launch
@triton.jit(do_not_specialize=["q_len", "k_len", "num_q_blocks"])
def hip_slice_kernel(
    Q, K, KV_START, Q_OFFSET, OUT_IDX, OUT_COUNT, SURVIVORS, SURVIVOR_SCORES, ARRIVALS, LSE_PARTIALS,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    q_len, k_len, num_heads, num_q_blocks, sink, window, score_scale, softcap_log2,
    PER_HEAD: tl.constexpr, KV_DIV: tl.constexpr, BLOCK_Q: tl.constexpr, STRIDE: tl.constexpr,
    NQ: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr, BK_P2: tl.constexpr, DIM: tl.constexpr,
    DIM_P2: tl.constexpr, NSEL: tl.constexpr, NKEEP: tl.constexpr, NSEL_P2: tl.constexpr, NLOC: tl.constexpr,
    NLOC_P2: tl.constexpr, SLICES: tl.constexpr, LSE_PARTS: tl.constexpr, DIGIT: tl.constexpr,
    PRECISION: tl.constexpr, NORMALIZE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KV_START: tl.constexpr,
    HAS_Q_OFFSET: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program = one slice (NLOC consecutive groups of NSEL) of one (batch, pattern head, query block)'s search;
    with oversampling (NSEL > NKEEP) the last slice to finish keeps the NKEEP best survivors of all slices."""
    _after_previous_kernel(PDL)
    b, h, qb, sl, program = _grid_place(num_heads, num_q_blocks, SLICES)
    HALVES: tl.constexpr = 2 * NLOC_P2

    q_tile, row_live, q_pos, last_pos, block_rows = _queries(
        Q, Q_OFFSET, b, h, qb, q_len, k_len, stride_qb, stride_qh, stride_ql, stride_qd, PER_HEAD, BLOCK_Q, STRIDE,
        NQ, ROWS, DIM, DIM_P2, HAS_Q_OFFSET)
    start, kv_base = _row_keys(K, KV_START, b, h, stride_kb, stride_kh, KV_DIV, HAS_KV_START)
    d = tl.arange(0, DIM_P2)

    lo, n_cand = _candidates(start, last_pos, k_len, sink, window, BK)
    g = tl.arange(0, NLOC_P2)
    width = tl.minimum(NLOC, NSEL - sl * NLOC)  # groups of this slice (the last slice may be short)
    first = sl * NLOC  # the slice's first group
    out = OUT_IDX + program * NKEEP
    SHARE: tl.constexpr = (NKEEP + SLICES - 1) // SLICES
    if n_cand <= NKEEP:
        # Every candidate is selected: slot i holds block lo + i (and 0 past the count); each slice writes a share.
        slot = sl * SHARE + g
        tl.store(out + slot, tl.where(slot < n_cand, lo + slot, 0).to(tl.int32), mask=(g < SHARE) & (slot < NKEEP))
        if sl == 0:
            tl.store(OUT_COUNT + program, n_cand.to(tl.int32))
    else:
        gid = (first + g).to(tl.int64)
        gs = tl.where(g < width, lo + (gid * n_cand) // NSEL, 0).to(tl.int32)
        ge = tl.where(g < width, lo + ((gid + 1) * n_cand) // NSEL, 0).to(tl.int32)
        largest = (n_cand + NSEL - 1) // NSEL
        lse = tl.zeros([ROWS], dtype=tl.float32)
        if NORMALIZE:  # estimated by hip_lse_kernel, launched just before
            lse = _merged_lse(LSE_PARTIALS, program, LSE_PARTS, ROWS)
        i = tl.arange(0, HALVES)
        searched = largest > 1
        own = tl.full([NLOC_P2], float("-inf"), tl.float32)  # the survivors' own scores, from the last round
        while largest > 1:
            mid = gs + (ge - gs + 1) // 2
            a = tl.reshape(tl.join(gs, mid), [HALVES])  # half 2g + side of group g
            z = tl.reshape(tl.join(mid, ge), [HALVES])
            k_pos, k_live = _block_keys(tl.maximum(a + z - 1, 0) // 2, z > a, k_len, BK, BK_P2, HALVES)
            s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale,
                        softcap_log2, SOFTCAP, PRECISION) - lse[:, None]
            visible = row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None])
            score = tl.where(z > a, _block_max(tl.where(visible, s, -1e30), HALVES, BK_P2), float("-inf"))
            # A slice keeps as many halves as it has groups: those that fewer than `width` halves beat (a higher score,
            # or the same score and a lower index), in the order they lie: group g of the next round is the g-th. (Each
            # kept half's place is a count: at 128K a scan made the decode search 11 us slower, this 2 us.)
            beats = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (i[None, :] < i[:, None]))
            chosen = tl.sum(beats.to(tl.int32), axis=1) < width
            before = tl.sum((chosen[None, :] & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
            pick = chosen[None, :] & (before[None, :] == g[:, None])
            gs = tl.sum(tl.where(pick, a[None, :], 0), axis=1)
            ge = tl.sum(tl.where(pick, z[None, :], 0), axis=1)
            if NSEL != NKEEP and largest == 2:  # the last round: its halves are single blocks, scored as such
                own = tl.sum(tl.where(pick, score[None, :], 0.0), axis=1)
            largest = (largest + 1) // 2
        # The slice's survivors in ascending order (slot = how many of them lie lower), empty groups after them.
        live = ge > gs
        key = tl.where(live, gs, 2147483647 - g)
        slot = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
        if NSEL == NKEEP:
            tl.store(out + first + slot, gs, mask=live)
            if sl == 0:
                tl.store(OUT_COUNT + program, tl.full([], NKEEP, tl.int32))
        else:
            # Oversampled: every survivor is scored as a block of its own (the last round did, when one ran), and the
            # slices' survivors compete.
            if searched:
                score = tl.where(live, own, float("-inf"))
            else:
                k_pos, k_live = _block_keys(gs, live, k_len, BK, BK_P2, NLOC_P2)
                s = _scores(q_tile, _key_tile(kv_base, k_pos, k_live, d, stride_kl, stride_kd, DIM), score_scale,
                            softcap_log2, SOFTCAP, PRECISION) - lse[:, None]
                visible = row_live[:, None] & k_live[None, :] & (k_pos[None, :] <= q_pos[:, None])
                score = tl.where(live, _block_max(tl.where(visible, s, -1e30), NLOC_P2, BK_P2), float("-inf"))
            survivors = program * NSEL + first + slot
            tl.store(SURVIVORS + survivors, gs, mask=g < width)
            tl.store(SURVIVOR_SCORES + survivors, score, mask=g < width)
            _next_kernel_may_start(PDL)  # the attention: its launch overlaps the merge, which it waits for
            # All of this program's survivors are written before it counts itself in (release); the last slice to
            # arrive reads everyone's (acquire), keeps the best and resets the counter for the next launch.
            tl.debug_barrier()
            if tl.atomic_add(ARRIVALS + program, 1, sem="acq_rel", scope="gpu") == SLICES - 1:
                j = tl.arange(0, NSEL_P2)
                valid = j < NSEL
                ids = tl.load(SURVIVORS + program * NSEL + j, mask=valid, other=0, cache_modifier=".cg")
                scores = tl.load(SURVIVOR_SCORES + program * NSEL + j, mask=valid, other=float("-inf"),
                                 cache_modifier=".cg")
                _keep_best(ids, scores, valid, out, NKEEP, DIGIT)
                tl.store(OUT_COUNT + program, tl.full([], NKEEP, tl.int32))
                tl.atomic_xchg(ARRIVALS + program, 0)
