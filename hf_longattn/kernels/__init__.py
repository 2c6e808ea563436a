"""Attention kernels behind one contract (pattern.SparsePattern).

`sparse_attention` runs the Triton kernels (triton_prefill.py, triton_decode.py) on CUDA tensors and the PyTorch
reference elsewhere, through ops.py (dispatch + the torch.compile custom op); `dense_attention` is the exact dense path
with the same inputs.
"""

from .dense import dense_attention
from .pattern import SparsePattern, window_pattern
from . import ops
from .reference import sparse_attention_reference

__all__ = ["SparsePattern", "window_pattern", "sparse_attention", "sparse_attention_reference", "dense_attention"]


def sparse_attention(
    query, key, value, pattern: SparsePattern, scale=None, softcap=None, kv_start=None, return_lse=False,
    backend: str = "auto", q_offset=None, out=None,
):
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> out [B, Lq, Hq, D] (and lse [B, Hq, Lq] if asked).

    ``kv_start`` [B]: each row's first valid key (left padding). ``q_offset`` [B]: each row's first query position
    (default: the queries are the last Lq keys); see pattern.py.

    ``backend``: "auto" (Triton for CUDA tensors when triton is installed, the PyTorch reference otherwise),
    "triton" (also on CPU tensors under TRITON_INTERPRET=1, for tests) or "reference". ``out``: a [B, Lq, Hq, D]
    tensor to write the output into instead of a new one (a view with any strides, head_dim contiguous, no two
    elements at one address, not overlapping the inputs).
    """
    return ops.sparse_attention(
        query, key, value, pattern, scale=scale, softcap=softcap, kv_start=kv_start, return_lse=return_lse,
        backend=backend, q_offset=q_offset, out=out,
    )
