"""DHSA's training-free chunker and its length-normalised chunk representations, on the grid of the key blocks.

Boundaries. Key block g starts a new chunk where the keys stop resembling each other across its start: with S_g the
sum of block g's keys over all key/value heads, d_g = 1 - cos(S_{g-1}, S_g). Block g is a boundary (a peak) when d_g
exceeds ``threshold`` and is the largest d within ``radius`` blocks on either side (non-maximum suppression; equal
values go to the leftmost), and a chunk that reaches ``max_blocks`` blocks is split there. Each row's first chunk
starts at its first real key (left padding). Fixed-size chunks are the same rule without peaks. Boundaries lie on the
key-block grid, so a chunk is whole key blocks of the sparse pattern and selecting it wastes no key.

Locality. Whether block g is a boundary depends only on the keys within ``radius`` blocks of it and on where its
chunk began, so the decision is final once block g + radius is complete; until then a peak does not count (the last
blocks form one provisional chunk). A decode step can therefore recompute only the open end of the sequence and find
exactly the chunks that a computation from scratch finds (see `ChunkPrefix`).

Representations. A chunk's n real keys sum to S; its representation is S / sqrt(n), the paper's mean key times
sqrt(n): keys of unrelated content add up like a random walk, so S / sqrt(n) has the same spread for short and long
chunks, where the plain mean of a short chunk strays further. Each key block carries its chunk's representation.

`chunk_layout` is the batched version (torch ops over all blocks at once, no loop over chunks or tokens);
`chunk_starts_reference` states the boundary rule as a plain loop, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Chunking:
    """How keys are cut into chunks. ``threshold=inf`` gives fixed chunks of ``max_blocks`` key blocks."""

    block_size: int  # tokens per key block (the pattern's block_size_k)
    radius: int  # non-maximum suppression, in blocks either side
    threshold: float  # a boundary needs 1 - cos above this
    max_blocks: int  # longest chunk, in key blocks

    def first_pending(self, k_len: int) -> int:
        """The first block whose peak decision still waits for keys (block g + radius is not complete yet)."""
        return max(k_len // self.block_size - self.radius, 0)


@dataclass
class ChunkLayout:
    """Chunks of a run of key blocks: ``rep[:, :, chunk[b, i]]`` is the representation of block i's chunk."""

    rep: torch.Tensor  # [B, H, slots, D] float32, one slot per chunk id (slot 0: zero, for padding blocks)
    chunk: torch.Tensor  # [B, n] long, chunk id of each block
    starts: torch.Tensor  # [B, n] bool, the blocks that start a chunk

    def block_rep(self) -> torch.Tensor:
        """[B, H, n, D]: each block's chunk representation (spelled out, for tests; the selection gathers scores)."""
        batch, heads, _, dim = self.rep.shape
        return torch.gather(self.rep, 2, self.chunk.view(batch, 1, -1, 1).expand(-1, heads, -1, dim))


@dataclass
class ChunkPrefix:
    """The closed chunks of a sequence, kept across decode steps (one per layer, in `AttentionCall.state`).

    ``layout`` covers blocks 0 .. S-1, whose chunks are closed in every row: their boundaries are final and no later
    key joins them. ``anchor[b]`` is the first block of row b's chunk that holds block S (or of its first real chunk,
    if that lies later); a decode step recomputes from there on.
    """

    layout: ChunkLayout
    anchor: torch.Tensor  # [B] long
    first_anchor: int  # anchor.min(), kept as an int so that a decode step never waits for the GPU
    padded_blocks: int  # blocks below this may hold left padding (they need a masked sum)

    @property
    def closed_blocks(self) -> int:
        return self.layout.chunk.shape[1]


def block_sums(key: torch.Tensor, first_block: int, block_size: int) -> torch.Tensor:
    """[B, H, n, D] float32 key sums of blocks first_block .. ceil(Lk / block_size) - 1 (the last may be partial)."""
    k_len = key.shape[2]
    full = k_len // block_size
    start = min(first_block, full) * block_size
    sums = key[:, :, start: full * block_size].unflatten(2, (-1, block_size)).sum(3, dtype=torch.float32)
    if k_len % block_size and first_block <= full:
        sums = torch.cat([sums, key[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32)], 2)
    return sums


def _real_key_counts(blocks: torch.Tensor, k_len: int, block_size: int, kv_start: torch.Tensor | None) -> torch.Tensor:
    """[B|1, n]: how many keys of each block exist and lie at or past the row's first real key."""
    first = (blocks * block_size).view(1, -1)
    if kv_start is not None:
        first = torch.maximum(first, kv_start.long().view(-1, 1))
    return (torch.clamp((blocks + 1) * block_size, max=k_len).view(1, -1) - first).clamp(min=0)


def dissimilarity(sums: torch.Tensor, blocks: torch.Tensor, k_len: int, block_size: int,
                  kv_start: torch.Tensor | None) -> torch.Tensor:
    """[B, n]: d_g = 1 - cos(S_{g-1}, S_g) over all heads, -inf where either block is not whole and real."""
    prev, cur = sums[:, :, :-1], sums[:, :, 1:]
    dot = (prev * cur).sum((1, 3))
    norms = prev.square().sum((1, 3)).sqrt() * cur.square().sum((1, 3)).sqrt()
    d = 1 - dot / norms.clamp_min(1e-30)
    g = blocks[1:]
    defined = ((g + 1) * block_size <= k_len).view(1, -1)
    if kv_start is not None:
        defined = defined & ((g - 1) * block_size >= kv_start.view(-1, 1))
    d = torch.where(defined, d, -torch.inf)
    return F.pad(d, (1, 0), value=-torch.inf)  # the region's first block has no predecessor in it


def chunk_starts(d: torch.Tensor, blocks: torch.Tensor, anchor: torch.Tensor, k_len: int,
                 chunking: Chunking) -> torch.Tensor:
    """[B, n] bool: which blocks start a chunk, given each row's anchor (a block known to start one)."""
    r = chunking.radius
    peak = (d > chunking.threshold) & (blocks < chunking.first_pending(k_len)) & (blocks > anchor.view(-1, 1))
    if r:
        padded = F.pad(d, (r, r), value=-torch.inf).unsqueeze(1)
        window_max = F.max_pool1d(padded, r, stride=1).squeeze(1)  # [B, n + r + 1]: max of r consecutive values
        left, right = window_max[:, : d.shape[1]], window_max[:, r + 1:]
        peak = peak & (d > left) & (d >= right)
    anchors = peak | (blocks == anchor.view(-1, 1))
    last = torch.where(anchors, blocks, -1).cummax(1).values
    forced = (last >= 0) & (blocks > last) & ((blocks - last) % chunking.max_blocks == 0)
    return anchors | forced


def _padding_sums(key: torch.Tensor, kv_start: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, D] float32: the sum of the padding keys inside the block that holds each row's first real key."""
    batch, heads, k_len, dim = key.shape
    pos = (kv_start.long() // block_size * block_size).view(-1, 1) + torch.arange(block_size, device=key.device)
    padding = (pos < kv_start.view(-1, 1)).to(torch.float32).view(batch, 1, block_size, 1)
    index = pos.clamp(max=k_len - 1).view(batch, 1, block_size, 1).expand(-1, heads, -1, dim)
    return (torch.gather(key, 2, index).float() * padding).sum(2)


def chunk_layout(
    key: torch.Tensor, chunking: Chunking, kv_start: torch.Tensor | None, first_block: int = 0,
    anchor: torch.Tensor | None = None, padded_blocks: int = 0,
) -> ChunkLayout:
    """The chunks of key blocks first_block .. ceil(Lk / block_size) - 1.

    key [B, H, Lk, D]. ``anchor`` [B]: a block known to start a chunk in each row, at or past first_block + radius
    (default: each row's first real block); blocks before it get zero representations and no boundaries.
    ``padded_blocks``: blocks below it may hold left padding (their padding keys are left out of the sums).
    Blocks before a row's anchor get chunk id 0, whose representation is zero.
    """
    batch, heads, k_len, dim = key.shape
    bk, device = chunking.block_size, key.device
    if anchor is None:
        anchor = first_real_blocks(batch, kv_start, bk, device)
    sums = block_sums(key, first_block, bk)
    blocks = torch.arange(first_block, first_block + sums.shape[2], device=device)
    starts = chunk_starts(dissimilarity(sums, blocks, k_len, bk, kv_start), blocks, anchor, k_len, chunking)

    # Only the keys of each row's chunks from its anchor on count: left padding and earlier chunks are left out.
    valid = blocks.view(1, -1) >= anchor.view(-1, 1)
    if kv_start is not None and first_block < padded_blocks:
        # The block that holds a row's first real key also holds its last padding keys: take those out.
        block = kv_start.long() // bk - first_block
        inside = ((block >= 0) & (block < sums.shape[2])).view(-1, 1, 1)
        index = block.clamp(0, sums.shape[2] - 1).view(-1, 1, 1, 1).expand(-1, heads, 1, dim)
        sums = sums.scatter_add(2, index, -(_padding_sums(key, kv_start, bk) * inside).unsqueeze(2))
    counts = torch.where(valid, _real_key_counts(blocks, k_len, bk, kv_start), 0).float()
    sums = torch.where(valid.view(batch, 1, -1, 1), sums, 0.0)

    # Chunk ids 1, 2, ... from each row's anchor on; slot 0 stays zero, for the blocks before the anchor.
    chunk = torch.where(valid, starts.long().cumsum(1), 0)
    index = chunk.view(batch, 1, -1, 1).expand(-1, heads, -1, dim)
    chunk_sum = sums.new_zeros(batch, heads, chunk.shape[1] + 1, dim).scatter_add_(2, index, sums)
    chunk_len = counts.new_zeros(batch, chunk.shape[1] + 1).scatter_add_(1, chunk, counts)
    rep = chunk_sum * torch.where(chunk_len > 0, chunk_len.clamp(min=1).rsqrt(), 0.0).view(batch, 1, -1, 1)
    return ChunkLayout(rep, chunk, starts)


def closed_prefix(layout: ChunkLayout, anchor: torch.Tensor, k_len: int, chunking: Chunking,
                  padded_blocks: int) -> ChunkPrefix:
    """The part of a from-scratch `chunk_layout` (first_block 0) that no later key can change."""
    starts = layout.starts
    blocks = torch.arange(starts.shape[1], device=starts.device)
    pending = chunking.first_pending(k_len)
    final = starts & ((blocks < pending) | (blocks == anchor.view(-1, 1)))
    closed = int(torch.where(final, blocks, 0).amax(1).min()) if starts.numel() else 0
    chunk_of_closed = torch.maximum(torch.where(starts & (blocks <= closed), blocks, -1).amax(1), anchor)
    # Chunk ids grow by at most one per block, so the closed blocks' chunks are slots 0 .. closed.
    closed_layout = ChunkLayout(layout.rep[:, :, : closed + 1], layout.chunk[:, :closed], starts[:, :closed])
    return ChunkPrefix(closed_layout, chunk_of_closed, int(chunk_of_closed.min()), padded_blocks)


def extend_layout(key: torch.Tensor, prefix: ChunkPrefix, chunking: Chunking,
                  kv_start: torch.Tensor | None) -> ChunkLayout:
    """The chunks of the whole cache: the prefix's closed chunks plus the rest recomputed from the keys.

    Only the blocks from the earliest anchor (less the suppression radius) on are read, so a decode step costs the
    open end of the sequence, not the cache; the chunks equal those of a computation from scratch (chunk ids differ).
    """
    first = max(prefix.first_anchor - chunking.radius, 0)
    closed = prefix.closed_blocks
    rest = chunk_layout(key, chunking, kv_start, first, prefix.anchor, prefix.padded_blocks)
    return ChunkLayout(
        torch.cat([prefix.layout.rep, rest.rep], 2),
        torch.cat([prefix.layout.chunk, rest.chunk[:, closed - first:] + prefix.layout.rep.shape[2]], 1),
        torch.cat([prefix.layout.starts, rest.starts[:, closed - first:]], 1),
    )


def first_real_blocks(batch: int, kv_start: torch.Tensor | None, block_size: int, device) -> torch.Tensor:
    """[B] long: the block that holds each row's first real key (where its first chunk starts)."""
    if kv_start is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return kv_start.long() // block_size


def padded_block_count(kv_start: torch.Tensor | None, block_size: int) -> int:
    return 0 if kv_start is None else int(kv_start.max()) // block_size + 1


def chunk_starts_reference(key: torch.Tensor, chunking: Chunking,
                           kv_start: torch.Tensor | None = None) -> list[list[int]]:
    """Per row, the blocks that start a chunk: the boundary rule as a plain loop over blocks (slow, for tests)."""
    batch, _, k_len, _ = key.shape
    bk, r = chunking.block_size, chunking.radius
    n = -(-k_len // bk)
    result = []
    for b in range(batch):
        start = 0 if kv_start is None else int(kv_start[b])
        keys = key[b].double()

        def d(g):  # dissimilarity across the start of block g, None where undefined
            if g < 1 or (g - 1) * bk < start or (g + 1) * bk > k_len:
                return None
            prev, cur = keys[:, (g - 1) * bk: g * bk].sum(1).flatten(), keys[:, g * bk: (g + 1) * bk].sum(1).flatten()
            return 1 - float(prev @ cur / (prev.norm() * cur.norm()))

        first = start // bk
        starts, last = [first], first
        for g in range(first + 1, n):
            dg = d(g)
            final = (g + r + 1) * bk <= k_len
            peak = final and dg is not None and dg > chunking.threshold
            peak = peak and all(d(j) is None or dg > d(j) for j in range(g - r, g))
            peak = peak and all(d(j) is None or dg >= d(j) for j in range(g + 1, g + r + 1))
            if peak or g - last == chunking.max_blocks:
                starts.append(g)
                last = g
        result.append(starts)
    return result
