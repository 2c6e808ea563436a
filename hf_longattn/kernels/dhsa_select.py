"""DHSA's selection: chunk-level similarity spread to the key blocks, the top ``budget`` tokens per query block.

A query block is represented by the sum of its queries (and of the query heads that share a selection); its score
for a key block is the dot product with the block's chunk representation (kernels/dhsa_chunks.py), so every block of
a chunk scores alike: the paper's chunk-level similarity upsampled to tokens. Each query block keeps the best
``budget / block_size_k`` blocks among its candidates, the blocks between the sink and its sliding window
(`hip_mask.candidate_block_range`); of equally scored blocks (one chunk cut by the budget) the later ones win. Sink
and window are the pattern's own regions, so no key is counted twice. A budget that covers the candidates selects
them all: exact dense attention.

The paper scales the mean query of a block by sqrt(block length) as it does the keys; a factor that is the same for
every key block of a row changes no ranking, so the plain sum stands for it. Neither do the attention's scale and
softcap, which are monotone.

`dhsa_select` is batched torch (no loop over chunks, blocks or tokens; the block score table exists only for a few
query blocks at a time, never Lq x Lk); `dhsa_select_reference` states the selection as plain loops, for tests.
"""

from __future__ import annotations

import torch

from .dhsa_chunks import (
    Chunking, ChunkPrefix, chunk_layout, chunk_starts_reference, closed_prefix, extend_layout, first_real_blocks,
    padded_block_count,
)
from .hip_mask import candidate_block_range
from .pattern import SparsePattern

# Upper bound on the block score table materialised at once (B x pattern heads x query blocks x key blocks).
_MAX_SCORE_ELEMENTS = 1 << 25


def query_block_sums(query: torch.Tensor, block_size_q: int, group: int) -> torch.Tensor:
    """[B, Hq / group, nQB, D] float32: each query block's sum over its queries and over `group` adjacent heads."""
    q_len = query.shape[2]
    full = q_len // block_size_q * block_size_q
    parts = [query[:, :, :full].unflatten(2, (-1, block_size_q)).sum(3, dtype=torch.float32)] if full else []
    if q_len > full:  # the last block is partial (a decode step's few queries are one)
        parts.append(query[:, :, full:].sum(2, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, 2).unflatten(1, (-1, group)).sum(2)


def top_blocks(q_rep: torch.Tensor, chunk_rep: torch.Tensor, chunk: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               n_sel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pattern head and query block, the n_sel best candidate blocks: (ids [B, H, nQB, n_sel] ascending, counts).

    q_rep [B, H, nQB, D] with H a multiple of chunk_rep's heads [B, Hkv, slots, D]; chunk [B, nKB] the chunk id of each
    key block; lo, hi [B, nQB] the candidate blocks. Ties go to the later block.
    """
    batch, heads, n_qb, dim = q_rep.shape
    kv_heads, n_kb = chunk_rep.shape[1], chunk.shape[1]
    per_kv = heads // kv_heads
    device = q_rep.device
    ids = torch.zeros(batch, heads, n_qb, n_sel, dtype=torch.int32, device=device)
    counts = torch.zeros(batch, heads, n_qb, dtype=torch.int32, device=device)
    if n_sel == 0 or n_kb == 0:
        return ids, counts
    block = torch.arange(n_kb, device=device)
    index = chunk.view(batch, 1, 1, n_kb)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * max(n_kb, chunk_rep.shape[2])))
    for r0 in range(0, n_qb, rows):  # a few query blocks at a time bound the score table
        r = slice(r0, min(n_qb, r0 + rows))
        q = q_rep[:, :, r].unflatten(1, (kv_heads, per_kv)).flatten(2, 3)  # [B, Hkv, per_kv * nr, D]
        chunk_scores = torch.einsum("bhqd,bhcd->bhqc", q, chunk_rep).reshape(batch, heads, -1, chunk_rep.shape[2])
        scores = torch.gather(chunk_scores, 3, index.expand(-1, heads, chunk_scores.shape[2], -1))
        candidate = ((block >= lo[:, r, None]) & (block < hi[:, r, None])).unsqueeze(1)  # [B, 1, nr, nKB]
        scores = scores.masked_fill(~candidate, -torch.inf)
        k = min(n_sel, n_kb)
        nth = scores.topk(k, dim=-1).values[..., -1:]  # the n_sel-th best score; -inf when too few candidates
        above = scores > nth
        tied = candidate & (scores == nth)
        wanted = n_sel - above.sum(-1, keepdim=True)
        from_end = tied.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)  # 1 for the last tied block
        take = above | (tied & (from_end <= wanted))
        # At most n_sel blocks are taken: the k largest of (n_kb - block) over them list them in ascending order.
        taken = torch.where(take, n_kb - block.int(), 0).topk(k, dim=-1).values
        ids[:, :, r, :k] = torch.where(taken > 0, n_kb - taken, 0)
        counts[:, :, r] = (taken > 0).sum(-1).to(torch.int32)
    return ids, counts


def _check(query, key, budget, block_size_k):
    if query.dim() != 4 or key.dim() != 4 or query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"dhsa_select needs query [B, Hq, Lq, D] and key [B, Hkv, Lk, D]; got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"{query.shape[2]} queries but only {key.shape[2]} keys: queries are the last Lq keys")
    if budget < 0 or budget % block_size_k:
        raise ValueError(f"budget={budget} must be a non-negative multiple of block_size_k={block_size_k}")


def dhsa_select(
    query: torch.Tensor, key: torch.Tensor, *, budget: int, block_size_q: int, chunking: Chunking, sink: int,
    window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None, prefix: ChunkPrefix | None = None,
) -> tuple[SparsePattern, ChunkPrefix]:
    """query [B, Hq, Lq, D], key [B, Hkv, Lk, D] (post-RoPE; the queries are the last Lq keys) -> (pattern, prefix).

    Without ``prefix`` the keys are chunked from scratch and the returned prefix holds the closed chunks; with the
    prefix of an earlier call on the same sequence only the open end is chunked again, with the same result, and the
    prefix is returned as it was. One selection per key/value head (``shared_kv_heads``) or per query head.
    """
    _check(query, key, budget, chunking.block_size)
    batch, num_q_heads, q_len, _ = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    if prefix is None:
        padded = padded_block_count(kv_start, chunking.block_size)
        layout = chunk_layout(key, chunking, kv_start, padded_blocks=padded)
        anchor = first_real_blocks(batch, kv_start, chunking.block_size, key.device)
        prefix_out = closed_prefix(layout, anchor, k_len, chunking, padded)
    else:
        # The candidates end where the last query's window begins. While that lies in the closed chunks (the first
        # hundred or so tokens after a prefill), the open chunks cannot be selected and need no work.
        candidates_end = -(-max(k_len - window, 0) // chunking.block_size)
        closed = candidates_end <= prefix.closed_blocks
        layout = prefix.layout if closed else extend_layout(key, prefix, chunking, kv_start)
        prefix_out = prefix
    group = num_q_heads // num_kv_heads if shared_kv_heads else 1
    q_rep = query_block_sums(query, block_size_q, group)
    lo, hi = candidate_block_range(batch, q_len, k_len, block_size_q, chunking.block_size, sink, window, kv_start,
                                   query.device)
    ids, counts = top_blocks(q_rep, layout.rep, layout.chunk, lo, hi, budget // chunking.block_size)
    return SparsePattern(ids, counts, block_size_q, chunking.block_size, sink, window), prefix_out


def dhsa_select_reference(
    query: torch.Tensor, key: torch.Tensor, *, budget: int, block_size_q: int, chunking: Chunking, sink: int,
    window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None,
) -> SparsePattern:
    """The same selection as plain loops over rows, heads and query blocks, in float64 (slow, for tests)."""
    _check(query, key, budget, chunking.block_size)
    batch, num_q_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    bk, n_sel = chunking.block_size, budget // chunking.block_size
    n_kb, n_qb = -(-k_len // bk), -(-q_len // block_size_q)
    group = num_q_heads // num_kv_heads if shared_kv_heads else 1
    heads = num_q_heads // group
    ids = torch.zeros(batch, heads, n_qb, n_sel, dtype=torch.int32)
    counts = torch.zeros(batch, heads, n_qb, dtype=torch.int32)
    for b, starts in enumerate(chunk_starts_reference(key, chunking, kv_start)):
        first_key = 0 if kv_start is None else int(kv_start[b])
        chunk_of = {}  # block -> (first key, end key) of its chunk's real keys
        for a, e in zip(starts, starts[1:] + [n_kb]):
            for g in range(a, e):
                chunk_of[g] = (max(a * bk, first_key), min(e * bk, k_len))
        for h in range(heads):
            kv_head = h * group * num_kv_heads // num_q_heads
            q_heads = range(h * group, (h + 1) * group)
            for j in range(n_qb):
                rows = range(j * block_size_q, min((j + 1) * block_size_q, q_len))
                q_mean = query[b, q_heads][:, rows].double().mean((0, 1))
                last = k_len - q_len + rows[-1]  # the block's last query, which sees the most keys
                # Candidates: blocks holding a key past the sink that the last query sees, but not in its window.
                lo = (first_key + sink) // bk
                hi = max(-(-max(last - window + 1, 0) // bk), lo)
                scores = {}
                for g in range(lo, hi):
                    c0, c1 = chunk_of[g]
                    rep = key[b, kv_head, c0:c1].double().mean(0) * (c1 - c0) ** 0.5
                    scores[g] = float(q_mean @ rep)
                best = sorted(scores, key=lambda g: (scores[g], g), reverse=True)[:n_sel]
                ids[b, h, j, : len(best)] = torch.tensor(sorted(best), dtype=torch.int32)
                counts[b, h, j] = len(best)
    return SparsePattern(ids, counts, block_size_q, bk, sink, window)
