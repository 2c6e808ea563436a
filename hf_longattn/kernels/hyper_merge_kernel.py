"""The Triton kernel of `hyper_merge.merge_level_triton` (see hyper_merge.py for the contract): one program folds one
or two slot-order parts into the running (out, lse) of a tile of query rows, for one (batch, head)."""

import triton
import triton.language as tl


@triton.jit
def _merge_level_kernel(
    Out, Lse, Rows, Slot, Live, OutA, LseA, OutB, LseB,
    stride_ob, stride_ol, stride_oh, stride_lb, stride_lh, stride_sb, stride_sh, stride_live,
    stride_ab, stride_al, stride_ah, stride_lab, stride_lah,
    stride_bb, stride_bl, stride_bh, stride_lbb, stride_lbh,
    num_heads, num_rows,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HAS_LIVE: tl.constexpr,
    TWO_PARTS: tl.constexpr,
):
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    d = tl.arange(0, D_PAD)
    rd_ok = r_ok[:, None] & (d[None, :] < HEAD_DIM)
    row = tl.load(Rows + r, mask=r_ok, other=0).to(tl.int64)
    slot = tl.load(Slot + b * stride_sb + h * stride_sh + r, mask=r_ok, other=0).to(tl.int64)

    lse0 = tl.load(Lse + b * stride_lb + h * stride_lh + row, mask=r_ok, other=float("-inf"))
    lse1 = tl.load(LseA + b * stride_lab + h * stride_lah + slot, mask=r_ok, other=float("-inf"))
    lse2 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    if TWO_PARTS:
        lse2 = tl.load(LseB + b * stride_lbb + h * stride_lbh + slot, mask=r_ok, other=float("-inf"))
    if HAS_LIVE:
        live = tl.load(Live + b * stride_live + r, mask=r_ok, other=0) != 0
        lse1 = tl.where(live, lse1, float("-inf"))
        lse2 = tl.where(live, lse2, float("-inf"))
    top = tl.maximum(tl.maximum(lse0, lse1), lse2)
    top = tl.where(top == float("-inf"), 0.0, top)  # rows that saw no key stay at out 0, lse -inf
    w0, w1, w2 = tl.exp(lse0 - top), tl.exp(lse1 - top), tl.exp(lse2 - top)
    total = w0 + w1 + w2

    out_ptrs = Out + b * stride_ob + row[:, None] * stride_ol + h * stride_oh + d[None, :]
    acc = tl.load(out_ptrs, mask=rd_ok, other=0.0).to(tl.float32) * w0[:, None]
    part = tl.load(OutA + b * stride_ab + slot[:, None] * stride_al + h * stride_ah + d[None, :], mask=rd_ok, other=0.0)
    acc += part.to(tl.float32) * w1[:, None]
    if TWO_PARTS:
        part = tl.load(OutB + b * stride_bb + slot[:, None] * stride_bl + h * stride_bh + d[None, :], mask=rd_ok,
                       other=0.0)
        acc += part.to(tl.float32) * w2[:, None]
    seen = total > 0.0
    acc = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=rd_ok)
    tl.store(Lse + b * stride_lb + h * stride_lh + row, tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)),
                                                                  float("-inf")), mask=r_ok)
