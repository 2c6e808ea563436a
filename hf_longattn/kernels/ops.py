"""Dispatch of the shared sparse attention, and its torch.library custom op for torch.compile.

Eager calls go straight to an implementation (the custom-op dispatcher costs tens of microseconds, too much for
decode); under torch.compile the same call goes through `hf_longattn::sparse_attention`, whose fake implementation
gives compile the output shapes without running anything. The Triton modules are imported on first use, so that a
test can set TRITON_INTERPRET=1 before Triton compiles anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

from .pattern import SparsePattern
from .reference import sparse_attention_reference
from .workspace import per_call

BACKENDS = ("auto", "triton", "reference")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); use backend='reference'")
    return backend


def check_inputs(query, key, value, pattern: SparsePattern, kv_start, q_offset=None, out=None) -> None:
    """Raise a clear error for inputs the kernels cannot take."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            "sparse_attention expects query [B, Hq, Lq, D] and key/value [B, Hkv, Lk, D] of one shape; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, num_q_heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim or num_q_heads % key.shape[1]:
        raise ValueError(
            f"key/value {tuple(key.shape)} do not match query {tuple(query.shape)}: same batch and head_dim, and the "
            "number of query heads must be a multiple of the number of key/value heads"
        )
    if q_offset is None and q_len > key.shape[2]:
        raise ValueError(f"{q_len} queries but only {key.shape[2]} keys: queries are the last Lq of the Lk keys "
                         "(pass q_offset to place them elsewhere)")
    if kv_start is not None and tuple(kv_start.shape) != (batch,):
        raise ValueError(f"kv_start must be a [B] = [{batch}] tensor of first valid key positions, got {tuple(kv_start.shape)}")
    if q_offset is not None and (tuple(q_offset.shape) != (batch,) or q_offset.dtype.is_floating_point):
        raise ValueError(f"q_offset must be a [B] = [{batch}] integer tensor of first query positions, got "
                         f"{tuple(q_offset.shape)} {q_offset.dtype}")
    pattern.validate(batch, num_q_heads, key.shape[1], q_len)
    if out is not None and (out.shape != (batch, q_len, num_q_heads, head_dim) or out.dtype != query.dtype
                            or out.device != query.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a [B, Lq, Hq, D] = {[batch, q_len, num_q_heads, head_dim]} {query.dtype} tensor "
                         f"on {query.device} with contiguous head dims; got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}, strides {out.stride()}")


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensor's: under accelerate's device_map a layer on
    cuda:1 is called while cuda:0 is current, and its launch would read another GPU's memory. Wrap every launch."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()  # (entering torch.cuda.device costs a decode step microseconds)


@functools.cache
def _triton_kernels():
    from . import triton_decode, triton_prefill

    return triton_prefill, triton_decode


def _triton_attention(query, key, value, pattern, scale, softcap, kv_start, q_offset, out=None, want_lse=True):
    prefill, decode = _triton_kernels()
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 inputs, got {query.dtype}")
    # Kernels index with strides but need each head's vectors contiguous, and one dtype.
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    if key.dtype != query.dtype or value.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    indices, counts = pattern.block_indices, pattern.block_counts
    if indices.dtype != torch.int32 or counts.dtype != torch.int32 or not (indices.is_contiguous() and counts.is_contiguous()):
        pattern = SparsePattern(
            indices.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(), pattern.block_size_q,
            pattern.block_size_k, pattern.sink_tokens, pattern.window_tokens,
        )
    with on_device(query):
        if decode.use_decode(pattern, query.shape[2]):
            return decode.sparse_decode(query, key, value, pattern, scale, softcap, kv_start, q_offset, out=out,
                                        want_lse=want_lse)
        return prefill.sparse_prefill(query, key, value, pattern, scale, softcap, kv_start, q_offset, out=out)


def run_sparse_attention(query, key, value, pattern, scale, softcap, kv_start, backend, q_offset=None, out=None,
                         want_lse=True):
    """(out [B, Lq, Hq, D], lse [B, Hq, Lq]) from the chosen backend, written into `out` if given; inputs checked.
    With want_lse=False the lse may be None (a decode step then allocates none)."""
    if resolve_backend(backend, query.device) == "triton":
        return _triton_attention(query, key, value, pattern, scale, softcap, kv_start, q_offset, out, want_lse)
    result, lse = sparse_attention_reference(
        query, key, value, pattern, scale=scale, softcap=softcap, kv_start=kv_start, return_lse=True,
        q_offset=q_offset,
    )
    return (result, lse) if out is None else (out.copy_(result), lse)


@torch.library.custom_op("hf_longattn::sparse_attention", mutates_args=())
def sparse_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    block_indices: torch.Tensor, block_counts: torch.Tensor, kv_start: torch.Tensor | None,
    q_offset: torch.Tensor | None, block_size_q: int, block_size_k: int, sink_tokens: int, window_tokens: int,
    scale: float, softcap: float | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = SparsePattern(block_indices, block_counts, block_size_q, block_size_k, sink_tokens, window_tokens)
    with per_call():
        out, lse = run_sparse_attention(query, key, value, pattern, scale, softcap, kv_start, backend, q_offset)
    return out.contiguous(), lse.contiguous()


@sparse_attention_op.register_fake
def _(query, key, value, block_indices, block_counts, kv_start, q_offset, block_size_q, block_size_k, sink_tokens,
      window_tokens, scale, softcap, backend):
    batch, num_q_heads, q_len, head_dim = query.shape
    out = query.new_empty(batch, q_len, num_q_heads, head_dim)
    lse = query.new_empty(batch, num_q_heads, q_len, dtype=torch.float32)
    return out, lse


def sparse_attention(query, key, value, pattern, scale=None, softcap=None, kv_start=None, return_lse=False,
                     backend="auto", q_offset=None, out=None):
    check_inputs(query, key, value, pattern, kv_start, q_offset, out)
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    # The kernels read row b's start at pointer + b: a strided view (a column of the mask layout) would read another's.
    if kv_start is not None:
        kv_start = kv_start.to(device=query.device).contiguous()
    if q_offset is not None:
        q_offset = q_offset.to(device=query.device).contiguous()
    if torch.compiler.is_compiling():
        result, lse = sparse_attention_op(
            query, key, value, pattern.block_indices, pattern.block_counts, kv_start, q_offset,
            pattern.block_size_q, pattern.block_size_k, pattern.sink_tokens, pattern.window_tokens, scale, softcap,
            backend,
        )
        if out is not None:
            result = out.copy_(result)
    else:
        result, lse = run_sparse_attention(query, key, value, pattern, scale, softcap, kv_start, backend, q_offset, out,
                                           want_lse=return_lse)
    return (result, lse) if return_lse else result
