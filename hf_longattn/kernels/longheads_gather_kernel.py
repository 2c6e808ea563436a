"""The Triton kernel of LongHeads' gather + rotate; longheads_gather.py holds the description, the PyTorch reference
and the launcher. One program copies a tile of one slot's chunk: keys in the `rotate_half` layout (pair f = dims f
and f + D/2) turned by delta * inv_freq[f], values as they are, zeros where the slot is unused or past the cache.
"""

import triton
import triton.language as tl

from .rope_kernel import cos_sin, turn_halves


# Lengths change at every decode step: specialising on them would recompile the kernel each time.
@triton.jit(do_not_specialize=["k_len"])
def gather_rotate_kernel(
    K, V, OUT_K, OUT_V, SRC_START, DELTA, INV_FREQ,
    stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd,
    k_len, slots, chunk_size, num_heads, n_blocks, num_kv_heads,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.arange(0, HALF_P2)
    start = tl.load(SRC_START + row * slots + slot)
    delta = tl.load(DELTA + row * slots + slot).to(tl.float32)
    b = (row // (num_heads * n_blocks)).to(tl.int64)  # rows are [B, H, nQB]
    head = (row // n_blocks) % num_heads
    h = (head * num_kv_heads // num_heads).to(tl.int64)  # the pattern head's kv head

    pos = start + t
    in_chunk = t < chunk_size
    live = in_chunk & (pos < k_len) & (t * 0 + start >= 0)  # (a scalar mask does not broadcast in the interpreter)
    f_ok = f < HALF
    load_mask = live[:, None] & f_ok[None, :]
    k_rows = K + b * stride_kb + h * stride_kh + pos[:, None].to(tl.int64) * stride_kl
    k1 = tl.load(k_rows + f[None, :] * stride_kd, mask=load_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_rows + (f[None, :] + HALF) * stride_kd, mask=load_mask, other=0.0).to(tl.float32)
    cos, sin = cos_sin(delta * tl.load(INV_FREQ + f, mask=f_ok, other=0.0))
    cos, sin = cos[None, :], sin[None, :]
    v_rows = V + b * stride_vb + h * stride_vh + pos[:, None].to(tl.int64) * stride_vl
    v1 = tl.load(v_rows + f[None, :] * stride_vd, mask=load_mask, other=0.0)
    v2 = tl.load(v_rows + (f[None, :] + HALF) * stride_vd, mask=load_mask, other=0.0)

    # The output is contiguous [B * nQB, H, slots * chunk_size, 2 * HALF].
    out_seq = (b * n_blocks + row % n_blocks) * num_heads + head
    out_row = (out_seq * slots * chunk_size + slot * chunk_size + t)[:, None] * (2 * HALF)
    store_mask = in_chunk[:, None] & f_ok[None, :]
    t1, t2 = turn_halves(k1, k2, cos, sin)
    tl.store(OUT_K + out_row + f[None, :], t1.to(OUT_K.dtype.element_ty), mask=store_mask)
    tl.store(OUT_K + out_row + HALF + f[None, :], t2.to(OUT_K.dtype.element_ty), mask=store_mask)
    tl.store(OUT_V + out_row + f[None, :], v1, mask=store_mask)
    tl.store(OUT_V + out_row + HALF + f[None, :], v2, mask=store_mask)
