"""Copy chunks of the key/value cache into compact per-(row, head, query block) sequences, turning each copied key by
its chunk's position shift (a relative RoPE rotation, see hf_longattn/rope.py); values are copied as they are. The
sequences of one (row, query block) are the heads of one batch entry: the shared kernel then reads a block's queries
where they already are (transformers' [B, L, H, D] memory) and writes its output in place (methods/longheads.py).

`gather_rotate_reference` is the PyTorch statement; `gather_rotate_triton` does the same in one pass over the copied
keys (longheads_gather_kernel.py, imported on first use); `gather_rotate` dispatches: Triton on CUDA, the reference
elsewhere. Unused slots and positions past the cache are written as zeros, so that a kernel reading a masked key
never meets a NaN.
"""

from __future__ import annotations

import torch

from ..rope import rotate
from .ops import HAS_TRITON, on_device


def _check(key, value, src_start, delta):
    if key.dim() != 4 or value.shape != key.shape or key.shape[-1] % 2:
        raise ValueError(f"gather_rotate needs key/value of one shape [B, Hkv, Lk, D] with D even; got "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if src_start.dim() != 4 or src_start.shape[0] != key.shape[0] or delta.shape != src_start.shape:
        raise ValueError("gather_rotate needs src_start/delta [B, H, nQB, S] of one shape")
    if src_start.shape[1] % key.shape[1]:
        raise ValueError(f"{src_start.shape[1]} pattern heads are not a multiple of {key.shape[1]} key/value heads")


def gather_rotate_reference(key, value, src_start, delta, chunk_size: int, inv_freq):
    """key/value [B, Hkv, Lk, D]; src_start/delta [B, H, nQB, S] (H: key/value heads, or query heads each reading its
    key/value head). Row (b, h, j) copies, into its slot s, the chunk_size keys from position src_start[b, h, j, s] of
    key/value head h * Hkv // H (nothing when src_start < 0), keys turned by delta[b, h, j, s].

    Returns (keys, values), each [B * nQB, H, S * chunk_size, D] in the cache's dtype.
    """
    _check(key, value, src_start, delta)
    batch, heads, n_blocks, slots = src_start.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    pos = src_start.unsqueeze(-1) + torch.arange(chunk_size, device=key.device)  # [B, H, nQB, S, L]
    live = (src_start.unsqueeze(-1) >= 0) & (pos < k_len)
    b = torch.arange(batch, device=key.device).view(-1, 1, 1, 1, 1)
    h = (torch.arange(heads, device=key.device) * num_kv_heads // heads).view(1, -1, 1, 1, 1)
    pos = pos.clamp(0, k_len - 1)
    keys = rotate(key[b, h, pos], delta.unsqueeze(-1).expand_as(pos), inv_freq)
    keys = keys.masked_fill(~live.unsqueeze(-1), 0)
    values = value[b, h, pos].masked_fill(~live.unsqueeze(-1), 0)
    shape = (batch * n_blocks, heads, slots * chunk_size, -1)
    return keys.transpose(1, 2).reshape(shape), values.transpose(1, 2).reshape(shape)


def gather_rotate_triton(key, value, src_start, delta, chunk_size: int, inv_freq, block_tokens: int = 32,
                         num_warps: int = 4):
    """Same as the reference, one Triton program per (row, slot, tile of block_tokens keys)."""
    import triton

    from .longheads_gather_kernel import gather_rotate_kernel

    _check(key, value, src_start, delta)
    batch, heads, n_blocks, slots = src_start.shape
    rows, dim = batch * heads * n_blocks, key.shape[-1]
    keys = torch.empty(batch * n_blocks, heads, slots * chunk_size, dim, dtype=key.dtype, device=key.device)
    values = torch.empty_like(keys, dtype=value.dtype)
    src_start, delta = src_start.to(torch.int32).contiguous(), delta.to(torch.int32).contiguous()
    inv_freq = inv_freq.to(device=key.device, dtype=torch.float32).contiguous()
    block_tokens = min(block_tokens, triton.next_power_of_2(chunk_size))
    grid = (rows, slots, triton.cdiv(chunk_size, block_tokens))
    with on_device(key):
        gather_rotate_kernel[grid](
            key, value, keys, values, src_start, delta, inv_freq, *key.stride(), *value.stride(), key.shape[2],
            slots, chunk_size, heads, n_blocks, key.shape[1],
            HALF=dim // 2, HALF_P2=triton.next_power_of_2(dim // 2), BLOCK_T=block_tokens, num_warps=num_warps,
        )
    return keys, values


def gather_rotate(key, value, src_start, delta, chunk_size: int, inv_freq):
    """Dispatch: the Triton kernel for CUDA tensors (when triton is installed), the reference otherwise."""
    run = gather_rotate_triton if HAS_TRITON and key.is_cuda else gather_rotate_reference
    return run(key, value, src_start, delta, chunk_size, inv_freq)
