"""Where HyperAttention's parts sit: the causal recursion, each level's sorted layout, and the patterns over them.

The causal recursion (the paper's Algorithm 4): a node [start, end) of the sequence splits at ``mid`` into two halves
that recurse, plus the off-diagonal pair - queries [mid, end) against keys [start, mid), all in the queries' past -
that the unmasked algorithm (sortLSH block-diagonal + sampled residual) approximates. A node whose left half would be
shorter than ``min_seq_len`` is a leaf, attended exactly. ``mid`` is the first block boundary at or after the middle,
so every left half is whole blocks and at least as long as its right half.

One level of the recursion runs as one batched call per part. Its layout puts every pair's left keys, sorted by LSH
bucket, one after the other (whole blocks per pair) and gives each pair as many query *slots*: the pair's queries,
sorted the same way, take the slots at their rank's quantile (slot = rank x keys / queries), so that slot block j meets
key block j, as the paper's equal-quantile blocks do when a pair has fewer queries than keys. Empty slots hold some
query whose output is never read. Left padding and the attention sink: padding keys and the first ``sink`` keys
after them (which the leaves attend to for every query) sort first in their pair (bucket -1), so in the level's key
order they are a prefix the kernels drop through ``kv_start``; padding queries sort last and get no slot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .hyper_lsh import counter_hash, sort_within_segments
from .pattern import SparsePattern


@dataclass(frozen=True)
class CausalTree:
    # [start, end) spans attended exactly (causal), in order.
    leaves: tuple[tuple[int, int], ...]
    # Per depth, (start, mid, end) for every pair: queries [mid, end) attend to keys [start, mid).
    levels: tuple[tuple[tuple[int, int, int], ...], ...]


@functools.lru_cache(maxsize=64)
def causal_tree(length: int, min_seq_len: int, block: int) -> CausalTree:
    """The recursion over [0, length); node starts are multiples of ``block`` (min_seq_len is a multiple of it)."""
    leaves, levels, nodes = [], [], [(0, length)]
    while nodes:  # one round per depth, about log2(length / min_seq_len) of them
        pairs, children = [], []
        for start, end in nodes:
            mid = start + -(-(end - start) // (2 * block)) * block
            if mid - start < min_seq_len or mid >= end:
                leaves.append((start, end))
            else:
                pairs.append((start, mid, end))
                children += [(start, mid), (mid, end)]
        if pairs:
            levels.append(tuple(pairs))
        nodes = children
    return CausalTree(tuple(sorted(leaves)), tuple(levels))


@functools.lru_cache(maxsize=16)
def _leaf_blocks(tree: CausalTree, q_len: int, k_len: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.tensor([s for s, _ in tree.leaves], device=device)
    first_query = k_len - q_len + torch.arange(0, q_len, block, device=device)
    first_block = starts[torch.searchsorted(starts, first_query, right=True) - 1] // block
    counts = first_query // block - first_block + 1
    max_blocks = max(-(-(e - s) // block) for s, e in tree.leaves)
    slot = torch.arange(max_blocks, device=device)
    ids = torch.where(slot < counts.unsqueeze(-1), first_block.unsqueeze(-1) + slot, 0)
    return ids.to(torch.int32), counts.to(torch.int32)


def leaf_pattern(tree: CausalTree, q_len: int, k_len: int, block: int, batch: int, heads: int, device,
                 sink: int = 0) -> SparsePattern:
    """Exact causal attention inside each leaf (query block j lists the key blocks from its leaf's start to itself),
    plus the first ``sink`` keys for every query. The queries are the last q_len positions, from a block boundary."""
    ids, counts = _leaf_blocks(tree, q_len, k_len, block, torch.device(device))
    return SparsePattern(ids.expand(batch, heads, *ids.shape), counts.expand(batch, heads, -1), block, block, sink)


@dataclass
class LevelGeometry:
    """What a level's layout needs that depends only on its pairs and the query range (cached: every layer of a
    forward reuses it, and building it copies from the host)."""

    start: torch.Tensor  # [P] first key of each pair
    n_keys: torch.Tensor  # [P] keys (= slots) of each pair, whole blocks
    offset: torch.Tensor  # [P] first key place / slot of each pair
    pair_of_slot: torch.Tensor  # [K]
    place: torch.Tensor  # [K] index of each key place within its pair
    key_pos: torch.Tensor  # [K] unsorted key position of each place
    first_row: torch.Tensor  # [P] first position of each pair's right half that the query tensor holds
    end: torch.Tensor  # [P]
    n_rows: torch.Tensor  # [P] those positions per pair
    row_offset: torch.Tensor  # [P]
    pair_of_row: torch.Tensor  # [R]
    row_pos: torch.Tensor  # [R] position of each of the level's query rows
    query_rows: torch.Tensor  # [R] their rows in the query tensor
    max_pair_keys: int


def _segments(lengths: torch.Tensor, total: int):
    """(segment id of each of `total` places, offset of each segment, index of each place within its segment)."""
    offsets = torch.cumsum(lengths, 0) - lengths
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
    return segment, offsets, torch.arange(total, device=lengths.device) - offsets[segment]


@functools.lru_cache(maxsize=64)
def level_geometry(pairs: tuple, q_start: int, device) -> LevelGeometry:
    """pairs: (start, mid, end) of one level whose right half holds some query row (position >= q_start)."""
    start, mid, end = torch.tensor(pairs, device=device, dtype=torch.long).unbind(-1)
    n_keys = mid - start
    pair_of_slot, offset, place = _segments(n_keys, sum(m - s for s, m, _ in pairs))
    first_row = mid.clamp(min=q_start)
    n_rows = end - first_row
    pair_of_row, row_offset, row_place = _segments(n_rows, sum(e - max(m, q_start) for _, m, e in pairs))
    row_pos = first_row[pair_of_row] + row_place
    return LevelGeometry(start, n_keys, offset, pair_of_slot, place, start[pair_of_slot] + place, first_row, end,
                         n_rows, row_offset, pair_of_row, row_pos, row_pos - q_start, max(m - s for s, m, _ in pairs))


@dataclass
class LevelLayout:
    """One level of the recursion in sorted order (see the module docstring). K = the level's keys = its slots."""

    geometry: LevelGeometry
    key_index: torch.Tensor  # [B, Hkv, K] key position in each sorted place
    query_source: torch.Tensor  # [B, Hq, K] row of the query tensor in each slot
    query_slot: torch.Tensor  # [B, Hq, R] slot of each of the level's query rows (geometry.query_rows)
    query_live: torch.Tensor | None  # [B, R] False for left-padding queries (their slot means nothing); None: all live
    kv_start: torch.Tensor | None  # [B] padding and sink keys, which lead the level's key order; None: there are none

    @property
    def num_slots(self) -> int:
        return self.geometry.pair_of_slot.shape[0]


def level_layout(q_buckets: torch.Tensor, k_buckets: torch.Tensor, geometry: LevelGeometry,
                 kv_start: torch.Tensor | None, bits: int, sink: int = 0) -> LevelLayout:
    """The sorted layout of one level: q_buckets [B, Hq, Lq], k_buckets [B, Hkv, Lk], LSH buckets in [0, 2**bits).
    Keys before kv_start + sink (padding, and the sink that the leaves attend to for every query) take no part."""
    g = geometry
    num_pairs, total = len(g.start), g.pair_of_slot.shape[0]

    # Keys: each pair's left half, padding and sink keys first (bucket -1 -> 0), then by bucket.
    buckets = k_buckets.index_select(-1, g.key_pos) + 1
    if kv_start is not None:
        kv_start = kv_start.to(device=k_buckets.device, dtype=torch.long)
    level_kv_start = None
    if kv_start is not None or sink:
        first_key = (kv_start if kv_start is not None else torch.zeros(1, dtype=torch.long, device=buckets.device)) + sink
        buckets = buckets.masked_fill(g.key_pos < first_key.view(-1, 1, 1), 0)
        level_kv_start = (first_key.view(-1, 1) - g.start).clamp(min=0).minimum(g.n_keys).sum(1)
        level_kv_start = level_kv_start.expand(buckets.shape[0])
    key_index = g.key_pos[sort_within_segments(buckets, g.pair_of_slot, bits + 1, num_pairs)]

    # Queries: each pair's right half, padding queries last (bucket 2**bits), then slots by quantile of rank.
    buckets = q_buckets.index_select(-1, g.query_rows)
    live = None
    n_live = g.n_rows.view(1, 1, -1)
    if kv_start is not None:
        live = g.row_pos >= kv_start.view(-1, 1)  # [B, R]
        buckets = buckets.masked_fill(~live.unsqueeze(1), 1 << bits)
        n_live = (g.end - torch.maximum(g.first_row, kv_start.view(-1, 1))).clamp(min=0).unsqueeze(1)  # [B, 1, P]
    order = sort_within_segments(buckets, g.pair_of_row, bits + 1, num_pairs)  # [B, Hq, R]
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    rank = rank - g.row_offset[g.pair_of_row]
    slot = g.offset[g.pair_of_row] + rank * g.n_keys[g.pair_of_row] // n_live[..., g.pair_of_row].clamp(min=1)
    query_slot = slot.clamp(max=total - 1)  # padding queries (rank >= live) point anywhere; they are masked

    # The row in each slot: slot t of a pair holds rank ceil(t * live / keys) (empty slots: some row of the pair).
    keys = g.n_keys[g.pair_of_slot]
    place_rank = (g.place * n_live[..., g.pair_of_slot] + keys - 1) // keys
    place_rank = place_rank.minimum(g.n_rows[g.pair_of_slot] - 1) + g.row_offset[g.pair_of_slot]
    query_source = g.query_rows[order.gather(-1, place_rank.expand(order.shape[0], order.shape[1], total))]
    return LevelLayout(geometry, key_index, query_source, query_slot, live, level_kv_start)


def block_diagonal_pattern(layout: LevelLayout, block: int, batch: int, heads: int) -> SparsePattern:
    """Slot block j attends to sorted key block j (pairs are whole blocks, so no block straddles two pairs)."""
    n_blocks = layout.num_slots // block
    ids = torch.arange(n_blocks, device=layout.key_index.device, dtype=torch.int32).view(1, 1, n_blocks, 1)
    counts = torch.ones_like(ids[..., 0]).expand(batch, heads, n_blocks)
    return SparsePattern(ids.expand(batch, heads, n_blocks, 1), counts, block, block)


def sampled_pattern(layout: LevelLayout, block: int, sample_size: int, seed: int, layer_idx: int, batch: int,
                    heads: int) -> tuple[SparsePattern, torch.Tensor]:
    """The residual's key sample: (pattern with one-token key blocks, log importance weight [K] of each slot).

    Each pair's keys (sorted order) are cut into ceil(keys / stride) strata of ``stride = ceil(keys / sample_size)``
    places and one place is drawn uniformly from each, per kv head: every key is drawn with probability 1 / stride,
    so the sum over the sample times ``stride`` is an unbiased estimate of the sum over all keys (the paper's uniform
    sample has the same weight keys / sample_size; strata make the draws distinct, as the kernel contract asks, and
    spread them over the buckets). A slot block lists the sample minus the keys of its own key block, which the
    block-diagonal part already counts exactly. The draws are `counter_hash(seed, layer, pair start, kv head,
    stratum)`: fixed by the seed, the layer, where the pair starts and its length, on every device.
    """
    g = layout.geometry
    device = g.start.device
    n_keys = g.n_keys
    stride = -(-n_keys // sample_size)
    strata = -(-n_keys // stride)
    width = min(sample_size, g.max_pair_keys)  # strata of the longest pair; shorter ones have fewer
    t = torch.arange(width, device=device)
    draw = counter_hash(seed, layer_idx, g.start.view(1, -1, 1), torch.arange(heads, device=device).view(-1, 1, 1),
                        t)  # [H, P, width], uniform in [0, 2**32)
    place = t * stride.view(-1, 1) + ((draw * stride.view(-1, 1)) >> 32)
    drawn = (t < strata.view(-1, 1)) & (place < n_keys.view(-1, 1))

    block_pair = g.pair_of_slot[::block]  # pair of each slot block
    own = torch.arange(len(block_pair), device=device) - g.offset[block_pair] // block
    place, drawn = place[:, block_pair], drawn[:, block_pair]  # [H, blocks, width]
    keep = drawn & (place // block != own.view(-1, 1))
    order = torch.sort((~keep).int(), dim=-1, stable=True).indices  # kept draws first, still ascending
    ids = (g.offset[block_pair].view(-1, 1) + place).gather(-1, order)
    counts = keep.sum(-1)
    ids = torch.where(t < counts.unsqueeze(-1), ids, 0).to(torch.int32)
    counts = counts.to(torch.int32).unsqueeze(0).expand(batch, -1, -1)
    pattern = SparsePattern(ids.unsqueeze(0).expand(batch, *ids.shape), counts, block, 1)
    log_weight = stride.double().log().float()[g.pair_of_slot]
    return pattern, log_weight
