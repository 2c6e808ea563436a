"""What a method is: a selector that answers "which keys does each query block look at?".

A method implements `select` (q, k -> SparsePattern) and inherits `attend`, which hands the pattern to the shared
kernel. A method whose output is not one pattern (HyperAttention merges a sampled residual through the LSE) overrides
`attend` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import MethodConfig
from ..kernels import SparsePattern, sparse_attention


@dataclass
class AttentionCall:
    """What one layer's attention call knows beyond q, k, v."""

    layer_idx: int
    scale: float
    softcap: float | None
    # [B] first valid key position of each sequence (left padding), or None when nothing is padded.
    kv_start: torch.Tensor | None
    # Per-layer memory across calls of one sequence (e.g. a decode refresh schedule). It is emptied whenever a call
    # does not continue the previous one (new prompt, new generate()), so a method never sees stale state. A call
    # inside a compiled graph gets a fresh empty dict: a graph keeps no host-side bookkeeping between its runs.
    state: dict = field(default_factory=dict)
    # [B] key-tensor position of each row's first query, when the key tensor is longer than the keys seen so far (a
    # static cache read under torch.compile, where its real length is a device tensor; the keys from q_offset + Lq
    # on are its empty tail). None: the queries are the last Lq of the Lk keys (eager calls always see that layout:
    # the keys arrive cut to the real ones). Only methods with `supports_query_offset` receive a value; the others
    # run exact dense attention there. Read it on the device: no host sync in a compiled graph.
    q_offset: torch.Tensor | None = None
    # The attention module transformers called (its `config` and `layer_idx` give the layer's RoPE), or None.
    module: torch.nn.Module | None = None


class SparseMethod:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # True when select()/attend() honour AttentionCall.q_offset (sizes from the key tensor, positions from q_offset,
    # no host sync), so that they run in a compiled static-cache decode step.
    supports_query_offset: ClassVar[bool] = False
    # False when the method cannot run inside a torch.compile graph (it reads tensors on the host for its shapes or
    # keeps host-side state across calls); compiled calls then run exact dense attention, with one warning.
    traceable: ClassVar[bool] = True
    # False when only a padded batch needs such a host read (each row's first real key): compiled calls with a padding
    # mask then run exact dense attention, with one warning.
    traces_padded_rows: ClassVar[bool] = True

    def __init__(self, config: MethodConfig):
        self.config = config

    def select(self, query: torch.Tensor, key: torch.Tensor, call: AttentionCall) -> SparsePattern:
        raise NotImplementedError(f"{type(self).__name__} must implement select() or attend()")

    def attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> [B, Lq, Hq, D]."""
        pattern = self.select(query, key, call)
        return sparse_attention(query, key, value, pattern, scale=call.scale, softcap=call.softcap,
                                kv_start=call.kv_start, q_offset=call.q_offset)
