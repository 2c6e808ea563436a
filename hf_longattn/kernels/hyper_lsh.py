"""HyperAttention's hashing and sorting: angular LSH buckets in Gray-code order, seeded randomness, segment sorts.

Angular LSH (sign of ``bits`` random projections) puts vectors at a small angle into the same bucket with high
probability. Sorting by bucket should also keep *nearby* buckets (one differing bit) next to each other, so that a
block of the sorted order spans similar vectors: buckets are ordered by their rank in the reflected Gray sequence
(0, 1, 3, 2, 6, 7, 5, 4, ...), where neighbours differ in exactly one bit. The reference implementation maps a bit
pattern x to the Gray *code* of x instead of its rank in the Gray sequence; for 3 bits and more that puts patterns
that differ in two bits next to each other (its order for 3 bits is 0, 1, 3, 2, 7, 6, 4, 5: 2 -> 7 flips two bits).

All randomness is a function of (seed, layer, ...) through a counter-based integer hash (`counter_hash`): the
projections (Box-Muller on hashed uniforms) and the sampled columns are the same on every device, nothing depends on
global RNG state or on how many draws came before, and torch.compile traces it (a torch.Generator it cannot).
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def lsh_projections(seed: int, layer_idx: int, head_dim: int, bits: int) -> torch.Tensor:
    """[head_dim, bits] Gaussian hyperplanes of one layer (float32, CPU), the same for queries and keys."""
    draw = torch.arange(2 * head_dim * bits).view(2, head_dim, bits)
    uniform = (counter_hash(seed, layer_idx, 0x15A, draw).double() + 0.5) / 2**32  # in (0, 1)
    return ((-2 * uniform[0].log()).sqrt() * torch.cos(2 * math.pi * uniform[1])).float()


def gray_rank(code: torch.Tensor) -> torch.Tensor:
    """Rank of each bit pattern in the reflected Gray sequence (the inverse Gray code; patterns up to 32 bits)."""
    rank = code.clone()
    for shift in (1, 2, 4, 8, 16):
        rank ^= rank >> shift
    return rank


def lsh_buckets(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """[..., L, D] -> int64 [..., L] buckets in [0, 2**bits), numbered in Gray order (adjacent ids: one bit apart)."""
    bits = projections.shape[1]
    signs = (x @ projections.to(device=x.device, dtype=x.dtype)) > 0
    weights = 2 ** torch.arange(bits, device=x.device, dtype=torch.int32)
    return gray_rank((signs.int() * weights).sum(-1, dtype=torch.int32)).long()


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply; multipliers below 2**31 so int64 products never overflow)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def counter_hash(*fields) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2**32) from integer fields (ints or broadcastable int tensors): the same value for
    the same fields on every device, and independent of any other draw."""
    h = torch.as_tensor(0x2545F491, dtype=torch.long)
    for value in fields:  # ints stay CPU scalars, which combine with device tensors without a host-device copy
        value = torch.as_tensor(value, dtype=torch.long)
        h = mix32(mix32(h ^ value) ^ (value >> 32))
    return h


def sort_within_segments(values: torch.Tensor, segment: torch.Tensor, value_bits: int,
                         num_segments: int) -> torch.Tensor:
    """Indices that sort ``values`` [..., N] (ints in [0, 2**value_bits)) ascending within each segment and keep the
    segments in place; ``segment`` [N] is the non-decreasing segment id (< num_segments) of each entry. Ties keep
    their order. One stable sort of a composite key (int32 when it fits: a radix sort over half the bits)."""
    composite = (segment << value_bits) | values
    if num_segments << value_bits <= 2**31:
        composite = composite.int()
    return torch.sort(composite, dim=-1, stable=True).indices
