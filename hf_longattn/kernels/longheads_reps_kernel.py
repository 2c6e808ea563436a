"""The Triton kernel of LongHeads' chunk representatives; longheads_chunks.py holds the description, the PyTorch
reference (`chunk_representatives_reference`) and the launcher. One program = one (chunk, query head): the chunk's
queries attend to its keys (non-causally) a tile of rows at a time, and only the column means of the probabilities
are kept (the mean of the outputs is those means times the values); that summary then scores the chunk's keys turned
back to the chunk's frame, and their weighted mean is the representative. A program per query head rather than per
key/value head (which would read the keys once for its group) and small query tiles: 2.95 ms against 3.55 for 512
chunks of Llama-3-8B's heads on an H200 (benchmarks/results/H200_RUNS.md).
"""

import triton
import triton.language as tl

from .rope_kernel import cos_sin, turn_halves


@triton.jit
def _halves(X, base, rows, ok, f, stride_l, stride_d, HALF: tl.constexpr):
    """Rows `rows` of one [L, D] matrix as two [len(rows), HALF_P2] halves (zeros where not ok)."""
    mask = ok[:, None] & (f[None, :] < HALF)
    ptrs = X + base + rows[:, None].to(tl.int64) * stride_l + f[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF * stride_d, mask=mask, other=0.0)


@triton.jit
def chunk_representatives_kernel(
    Q, K, V, CHUNK, INV_FREQ, OUT,
    stride_qp, stride_qh, stride_ql, stride_qd, stride_kp, stride_kh, stride_kl, stride_kd,
    stride_vp, stride_vh, stride_vl, stride_vd, stride_op, stride_oh, stride_od,
    chunk_size, scale, softcap,
    G: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, L_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # the key/value head
    hq = h * G + tl.program_id(2)
    f = tl.arange(0, HALF_P2)
    j = tl.arange(0, L_PAD)
    key_ok = j < chunk_size
    k1, k2 = _halves(K, p * stride_kp + h.to(tl.int64) * stride_kh, j, key_ok, f, stride_kl, stride_kd, HALF)
    q_base = p * stride_qp + hq.to(tl.int64) * stride_qh
    # Column means of the chunk's attention probabilities.
    mean_prob = tl.zeros([L_PAD], tl.float32)
    for t0 in range(0, chunk_size, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        q1, q2 = _halves(Q, q_base, t, t < chunk_size, f, stride_ql, stride_qd, HALF)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s = (s + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale
        if SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # softcap * tanh(s / softcap)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        prob = tl.exp(s - tl.max(s, axis=1)[:, None])
        prob = prob / tl.sum(prob, axis=1)[:, None]
        mean_prob += tl.sum(tl.where((t < chunk_size)[:, None], prob, 0.0), axis=0)
    mean_prob = mean_prob / chunk_size
    # The mean output (the summary), then the chunk's keys in its own frame scored by it.
    v1, v2 = _halves(V, p * stride_vp + h.to(tl.int64) * stride_vh, j, key_ok, f, stride_vl, stride_vd, HALF)
    s1 = tl.sum(mean_prob[:, None] * v1.to(tl.float32), axis=0)
    s2 = tl.sum(mean_prob[:, None] * v2.to(tl.float32), axis=0)
    start = tl.load(CHUNK + p).to(tl.float32) * chunk_size
    cos, sin = cos_sin(-start * tl.load(INV_FREQ + f, mask=f < HALF, other=0.0))
    l1, l2 = turn_halves(k1.to(tl.float32), k2.to(tl.float32), cos[None, :], sin[None, :])
    e = scale * (tl.sum(l1 * s1[None, :], axis=1) + tl.sum(l2 * s2[None, :], axis=1))
    e = tl.where(key_ok, e, float("-inf"))
    w = tl.exp(e - tl.max(e, axis=0))
    w = w / tl.sum(w, axis=0)
    out = OUT + p * stride_op + hq.to(tl.int64) * stride_oh
    tl.store(out + f * stride_od, tl.sum(w[:, None] * l1, axis=0), mask=f < HALF)
    tl.store(out + (f + HALF) * stride_od, tl.sum(w[:, None] * l2, axis=0), mask=f < HALF)
