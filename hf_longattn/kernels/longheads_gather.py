"""Copy chunks of the key/value cache into compact per-(row, head, query block) sequences, turning each copied key by
its chunk's position shift (a relative RoPE rotation, see hf_longattn/rope.py); values are copied as they are.

`gather_rotate_reference` is the PyTorch statement; `gather_rotate_triton` does the same in one pass over the copied
keys (longheads_gather_kernel.py, imported on first use); `gather_rotate` dispatches: Triton on CUDA, the reference
elsewhere. Unused slots and positions past the cache are written as zeros, so that a kernel reading a masked key
never meets a NaN.
"""

from __future__ import annotations

import torch

from ..rope import rotate
from .ops import HAS_TRITON


def _check(key, value, batch_index, head_index, src_start, delta):
    if key.dim() != 4 or value.shape != key.shape or key.shape[-1] % 2:
        raise ValueError(f"gather_rotate needs key/value of one shape [B, Hkv, Lk, D] with D even; got "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    rows = batch_index.shape[0]
    if head_index.shape != (rows,) or src_start.dim() != 2 or src_start.shape[0] != rows or delta.shape != src_start.shape:
        raise ValueError("gather_rotate needs batch_index/head_index [R] and src_start/delta [R, S]")


def gather_rotate_reference(key, value, batch_index, head_index, src_start, delta, chunk_size: int, inv_freq):
    """key/value [B, Hkv, Lk, D]; row r copies, into its slot s, the chunk_size keys from position src_start[r, s]
    of (batch_index[r], head_index[r]) (nothing when src_start < 0), keys turned by delta[r, s].

    Returns (keys, values), each [R, 1, S * chunk_size, D] in the cache's dtype.
    """
    _check(key, value, batch_index, head_index, src_start, delta)
    rows, slots = src_start.shape
    k_len = key.shape[2]
    pos = src_start.unsqueeze(-1) + torch.arange(chunk_size, device=key.device)  # [R, S, L]
    live = (src_start.unsqueeze(-1) >= 0) & (pos < k_len)
    b, h = batch_index.view(-1, 1, 1), head_index.view(-1, 1, 1)
    pos = pos.clamp(0, k_len - 1)
    keys = rotate(key[b, h, pos], delta.unsqueeze(-1).expand_as(pos), inv_freq)
    keys = keys.masked_fill(~live.unsqueeze(-1), 0)
    values = value[b, h, pos].masked_fill(~live.unsqueeze(-1), 0)
    return keys.view(rows, 1, slots * chunk_size, -1), values.view(rows, 1, slots * chunk_size, -1)


def gather_rotate_triton(key, value, batch_index, head_index, src_start, delta, chunk_size: int, inv_freq,
                         block_tokens: int = 64, num_warps: int = 4):
    """Same as the reference, one Triton program per (row, slot, tile of block_tokens keys)."""
    import triton

    from .longheads_gather_kernel import gather_rotate_kernel

    _check(key, value, batch_index, head_index, src_start, delta)
    rows, slots = src_start.shape
    dim = key.shape[-1]
    keys = torch.empty(rows, 1, slots * chunk_size, dim, dtype=key.dtype, device=key.device)
    values = torch.empty(rows, 1, slots * chunk_size, value.shape[-1], dtype=value.dtype, device=value.device)
    src_start, delta = src_start.to(torch.int32).contiguous(), delta.to(torch.int32).contiguous()
    batch_index, head_index = batch_index.to(torch.int32).contiguous(), head_index.to(torch.int32).contiguous()
    inv_freq = inv_freq.to(device=key.device, dtype=torch.float32).contiguous()
    block_tokens = min(block_tokens, triton.next_power_of_2(chunk_size))
    grid = (rows, slots, triton.cdiv(chunk_size, block_tokens))
    gather_rotate_kernel[grid](
        key, value, keys, values, batch_index, head_index, src_start, delta, inv_freq,
        *key.stride(), *value.stride(), key.shape[2], slots, chunk_size,
        HALF=dim // 2, HALF_P2=triton.next_power_of_2(dim // 2), BLOCK_T=block_tokens, num_warps=num_warps,
    )
    return keys, values


def gather_rotate(key, value, batch_index, head_index, src_start, delta, chunk_size: int, inv_freq):
    """Dispatch: the Triton kernel for CUDA tensors (when triton is installed), the reference otherwise."""
    if HAS_TRITON and key.is_cuda:
        return gather_rotate_triton(key, value, batch_index, head_index, src_start, delta, chunk_size, inv_freq)
    return gather_rotate_reference(key, value, batch_index, head_index, src_start, delta, chunk_size, inv_freq)
