"""The one contract between the methods (who choose keys) and the kernels (who attend to them).

A query at absolute position p (queries are the last Lq positions of the Lk keys, p = Lk - Lq + i, unless the caller
passes ``q_offset[b]``, the position of row b's first query: p = q_offset[b] + i) sees the union of three disjoint key
regions, each further limited by causality (key position <= p), by the keys that exist (position < Lk) and by the
sequence's valid range (key position >= kv_start[b], for left padding):

* sink:     [kv_start, kv_start + sink_tokens)
* window:   [max(sink_end, p - window_tokens + 1), p]
* selected: the key blocks listed for the query's block, minus the sink and window tokens.

The regions are a partition, so a method may list a block that overlaps the sink or the window: no key is counted
twice. A pattern whose window covers the whole context is exact dense attention. ``q_offset`` serves a static cache
whose tail is still empty (queries before the end: the empty keys lie in their future) and attention to keys that
all lie in the queries' past (q_offset >= Lk: every listed key is visible, a non-causal block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparsePattern:
    """Which key blocks each query block visits, per batch row and head.

    block_indices: int32 [B, H, num_query_blocks, max_blocks], key-block ids (key block n covers key positions
        [n * block_size_k, (n + 1) * block_size_k)); entries at and beyond ``block_counts`` are ignored.
        Ids within a row must be distinct; ascending order gives the kernels the best memory locality.
    block_counts: int32 [B, H, num_query_blocks], how many entries of ``block_indices`` are live.
    H is either the number of query heads (one selection per head) or the number of key/value heads (one selection
    shared by the query heads of a GQA group, which lets a kernel load each key block once for the whole group).
    Query block j covers query rows [j * block_size_q, (j + 1) * block_size_q) of the Lq queries.
    """

    block_indices: torch.Tensor
    block_counts: torch.Tensor
    block_size_q: int
    block_size_k: int
    sink_tokens: int = 0
    window_tokens: int = 0

    @property
    def num_heads(self) -> int:
        return self.block_indices.shape[1]

    @property
    def num_query_blocks(self) -> int:
        return self.block_indices.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.block_indices.shape[3]

    def validate(self, batch: int, num_q_heads: int, num_kv_heads: int, q_len: int) -> None:
        """Raise a clear error when the pattern does not fit the tensors it is applied to."""
        if self.block_indices.dim() != 4 or self.block_counts.shape != self.block_indices.shape[:3]:
            raise ValueError(
                "SparsePattern.block_indices must be [B, H, num_query_blocks, max_blocks] and block_counts "
                f"[B, H, num_query_blocks]; got {tuple(self.block_indices.shape)} and {tuple(self.block_counts.shape)}"
            )
        if self.block_indices.shape[0] != batch:
            raise ValueError(f"SparsePattern is for batch {self.block_indices.shape[0]}, the input has batch {batch}")
        if self.num_heads not in (num_q_heads, num_kv_heads):
            raise ValueError(
                f"SparsePattern has {self.num_heads} heads; it must have one per query head ({num_q_heads}) "
                f"or one per key/value head ({num_kv_heads})"
            )
        expected_blocks = -(-q_len // self.block_size_q)
        if self.num_query_blocks != expected_blocks:
            raise ValueError(
                f"SparsePattern has {self.num_query_blocks} query blocks, but {q_len} queries in blocks of "
                f"{self.block_size_q} need {expected_blocks}"
            )
        if self.block_size_q < 1 or self.block_size_k < 1 or self.sink_tokens < 0 or self.window_tokens < 0:
            raise ValueError("SparsePattern block sizes must be >= 1 and sink/window lengths >= 0")


def window_pattern(
    batch: int, num_heads: int, q_len: int, block_size_q: int, block_size_k: int, sink: int, window: int,
    device: torch.device | str = "cpu",
) -> SparsePattern:
    """A pattern with no selected blocks: sink + sliding window only (StreamingLLM; Gemma's local layers)."""
    num_q_blocks = -(-q_len // block_size_q)
    return SparsePattern(
        block_indices=torch.zeros(batch, num_heads, num_q_blocks, 0, dtype=torch.int32, device=device),
        block_counts=torch.zeros(batch, num_heads, num_q_blocks, dtype=torch.int32, device=device),
        block_size_q=block_size_q,
        block_size_k=block_size_k,
        sink_tokens=sink,
        window_tokens=window,
    )


def query_block_ranges(q_len: int, k_len: int, block_size_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute key-space positions of the first and last query of every query block."""
    starts = torch.arange(0, q_len, block_size_q, device=device)
    first = starts + (k_len - q_len)
    last = torch.clamp(starts + block_size_q, max=q_len) - 1 + (k_len - q_len)
    return first, last


def causal_block_limit(q_len: int, k_len: int, block_size_q: int, block_size_k: int, device=None) -> torch.Tensor:
    """For each query block, the number of key blocks that its last query can see (ids 0 .. limit-1)."""
    _, last = query_block_ranges(q_len, k_len, block_size_q, device)
    return last // block_size_k + 1
