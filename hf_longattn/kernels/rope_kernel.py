"""RoPE in Triton, shared by the LongHeads kernels: accurate cos/sin of large angles, and the turn of a vector given
in transformers' rotate_half layout (dims f and f + D/2 pair up) by its two halves."""

import triton
import triton.language as tl

# 2 pi in three parts (Cody-Waite): k * _TWO_PI_HI is exact for |k| < 2^15, so reducing an angle of a position up to
# ~200K keeps it accurate to a few ulps, and sin/cos then see |x| <= pi (where even fast approximations are exact).
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_MID = tl.constexpr(0.0019353071693331003)  # float32-exact
_TWO_PI_LO = tl.constexpr(1.0253131677018246e-11)


@triton.jit
def cos_sin(angle):
    """(cos, sin) of float32 angles of any size, as accurate as torch's on the same float32 angles."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    x = angle - k * _TWO_PI_HI
    x = x - k * _TWO_PI_MID
    x = x - k * _TWO_PI_LO
    return tl.cos(x), tl.sin(x)


@triton.jit
def turn_halves(x1, x2, cos, sin):
    """The halves of x turned by the angles whose (cos, sin) are given: R(angle) x in the rotate_half layout."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin
