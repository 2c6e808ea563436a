"""`blocktopk`: the naive block selector, a baseline for HiP at the same budget.

Every key block is summarised by its mean key and every query block by its mean query; a query block keeps the k /
block_size_k key blocks whose mean key scores highest against its mean query, plus the sink and the sliding window.
Mean pooling blurs a single relevant token (a needle) into its block's average: that loss is what HiP's max-based
hierarchical search avoids. The score table is (Lq / block_size_q) x (Lk / block_size_k) per head, never Lq x Lk.
The selection is shared by the query heads of a key/value head (their mean queries are averaged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodConfig, non_negative, positive
from ..kernels import SparsePattern
from ..kernels.hip_mask import candidate_block_range
from .base import SparseMethod

# Score elements of the block table materialised at once.
_MAX_SCORE_ELEMENTS = 1 << 26


@dataclass
class BlockTopKConfig(MethodConfig):
    # Same budget as HiP's defaults: k selected tokens + window + sink.
    k: int = 512
    block_size_q: int = 64
    block_size_k: int = 64
    window: int = 256
    sink: int = 16

    def validate(self):
        positive(self, "k", "block_size_q", "block_size_k")
        non_negative(self, "window", "sink")
        if self.k % self.block_size_k:
            raise ConfigError(
                f"k={self.k} must be a multiple of block_size_k={self.block_size_k} (k counts whole key blocks); "
                f"use k={max(self.block_size_k, self.k // self.block_size_k * self.block_size_k)}"
            )


class BlockTopK(SparseMethod):
    name = "blocktopk"
    Config = BlockTopKConfig

    def select(self, query: torch.Tensor, key: torch.Tensor, call) -> SparsePattern:
        c = self.config
        batch, num_q_heads, q_len, dim = query.shape
        num_kv_heads, k_len = key.shape[1], key.shape[2]
        n_qb, n_kb = -(-q_len // c.block_size_q), -(-k_len // c.block_size_k)
        n_sel = c.k // c.block_size_k

        # Mean query per (kv head, query block) over the group's heads and the block's queries; mean key per block.
        q = torch.nn.functional.pad(query.float(), (0, 0, 0, n_qb * c.block_size_q - q_len))
        q_sum = q.view(batch, num_kv_heads, -1, n_qb, c.block_size_q, dim).sum((2, 4))
        q_rows = torch.clamp(q_len - torch.arange(n_qb, device=query.device) * c.block_size_q, max=c.block_size_q)
        q_mean = q_sum / q_rows.view(1, 1, -1, 1)
        k = torch.nn.functional.pad(key.float(), (0, 0, 0, n_kb * c.block_size_k - k_len))
        k_rows = torch.clamp(k_len - torch.arange(n_kb, device=key.device) * c.block_size_k, max=c.block_size_k)
        k_mean = k.view(batch, num_kv_heads, n_kb, c.block_size_k, dim).sum(3) / k_rows.view(1, 1, -1, 1)

        lo, hi = candidate_block_range(
            batch, q_len, k_len, c.block_size_q, c.block_size_k, c.sink, c.window, call.kv_start, query.device
        )
        block = torch.arange(n_kb, device=query.device)
        ids = torch.empty(batch, num_kv_heads, n_qb, min(n_sel, n_kb), dtype=torch.long, device=query.device)
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * num_kv_heads * n_kb))
        for c0 in range(0, n_qb, chunk):
            rows = slice(c0, min(n_qb, c0 + chunk))
            scores = torch.einsum("bhqd,bhnd->bhqn", q_mean[:, :, rows], k_mean)
            candidate = (block >= lo[:, rows].unsqueeze(-1)) & (block < hi[:, rows].unsqueeze(-1))
            scores = scores.masked_fill(~candidate.unsqueeze(1), -torch.inf)
            ids[:, :, rows] = torch.topk(scores, ids.shape[-1], dim=-1, sorted=False).indices
        # Top-k fills up with non-candidates when there are fewer candidates than k: count and order the live ones.
        live = (ids >= lo.view(batch, 1, -1, 1)) & (ids < hi.view(batch, 1, -1, 1))
        counts = live.sum(-1)
        ids = torch.sort(torch.where(live, ids, n_kb), dim=-1).values
        ids = torch.where(torch.arange(ids.shape[-1], device=query.device) < counts.unsqueeze(-1), ids, 0)
        return SparsePattern(ids.to(torch.int32), counts.to(torch.int32), c.block_size_q, c.block_size_k, c.sink,
                             c.window)

