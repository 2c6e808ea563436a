"""HiP mask estimation: hierarchical top-k key-block search (Lee et al., "HiP Attention", arXiv 2406.09827).

For each query block, the key blocks that lie past the sink and before its sliding window (the candidates) are split
into ``n = k / block_size_k`` contiguous groups. Every round splits each group into two halves, scores each half by
its centre ("representative") key block - the max over the block's tokens, the query block's strided queries
(counted back from its last query) and, with a shared selection, the GQA group's query heads - and keeps the ``n``
best of the ``2n`` halves. The largest group halves each round, so after ceil(log2(candidates / n)) rounds every
survivor is one key block: the selection. Work per query block is O(n x rounds), never O(Lk); no Lq x Lk tensor
exists at any step.

Slices (``slices``; HiP uses them for decode): the n groups are cut into S runs of consecutive groups, and each run
keeps its own best halves every round (as many as it has groups). That is S independent searches over disjoint
stretches of the context, which a GPU runs side by side - one short program each, whose rounds fit in registers -
where a single wide beam is a chain of dependent rounds through memory. ``slices=1`` is the paper's search, one
beam over the whole context. Alone, slicing gives each stretch exactly its share of the blocks, however the attention
mass falls; ``oversample=c`` lets the stretches compete: the search runs with c x n groups, every survivor (one
block) is scored on its own, and the n best of all slices are kept (ties: the lower block).

What is maximised (``score``): the paper's raw logit q.k, or by default ("probability") the logit minus an estimate
of the query's log-sum-exp - the log of the softmax probability the key would get. The estimate adds the exact mass
of the sink and the query's window to the candidates' mass sampled at the centre blocks of 256 equal parts of the
candidates, each weighted by its part's size (a stratified sample; exact when there are at most 256 candidates).
Raw logits are not comparable across queries and heads: one head with large logits everywhere picks the blocks for
its whole group. On SmolLM2 passkey prompts
(2K, a 512-token budget, 20 prompts) an exhaustive top-k of 2-token blocks found 8 passkeys by raw max logit, 12 by
max probability with only the sink + window mass, 16 with the exact log-sum-exp and 16 with a sampled estimate;
dense found 13 (benchmarks/results/hip_selection_study.md).

Positions: the queries are the last Lq of the Lk keys, or start at ``q_offset[b]`` (a static cache whose tail is still
empty); a key is visible to a query only if it exists (< Lk) and lies at or before the query's position.

`hip_mask_reference` is the PyTorch statement of the algorithm; `hip_mask_triton` runs it in Triton
(hip_mask_kernel.py, imported on first use so that importing the package does not import Triton and tests can still
choose TRITON_INTERPRET=1): a search of many query blocks with one beam runs one program per (batch, head, query
block), a sliced search one program per slice (after a kernel that estimates the log-sum-exp for all slices at
once). Both keep each round's halves in the order they lie and break score ties towards the lower one, so they
agree exactly up to float rounding. `hip_mask` dispatches (Triton on CUDA, the reference elsewhere) and is a torch
custom op under torch.compile.
"""
from __future__ import annotations

import functools

import torch

from .dense import attention_logits
from .ops import HAS_TRITON, on_device
from .pattern import SparsePattern, query_block_ranges
from .workspace import arrival_counters, kept, per_call

# Score of a (query, key) pair that causality hides: finite, so that a half that only such pairs reach still ranks
# above an empty half (-inf). The kernel spells the same value as a literal.
_HIDDEN = -1e30
# Upper bound on the score elements the reference materialises at once.
_MAX_SCORE_ELEMENTS = 1 << 24
# Parts of the candidates whose centre blocks sample their softmax mass (score="probability").
LSE_STRATA = 256
# A sliced search scores all halves of its slice in one tile: at most this many keys (2 x groups per slice x block).
SLICE_TILE_KEYS = 256

SCORES = ("probability", "logit")


def _query_starts(batch: int, q_len: int, k_len: int, q_offset, device) -> torch.Tensor:
    """[B] absolute position of each row's first query."""
    if q_offset is None:
        return torch.full((batch,), k_len - q_len, dtype=torch.long, device=device)
    return q_offset.to(device=device, dtype=torch.long)


def candidate_block_range(
    batch: int, q_len: int, k_len: int, block_size_q: int, block_size_k: int, sink: int, window: int,
    kv_start: torch.Tensor | None, device, q_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each [B, nQB]: the key blocks [lo, hi) a query block chooses from.

    lo is the block holding the first key past the sink; hi ends at the last key that the block's last query does not
    see through its window (and at the last key that exists). Every key a query of the block may see outside sink and
    window lies in [lo, hi) blocks, so selecting all of them is exact dense attention. ``q_offset`` [B]: the first
    query's position (default: the queries are the last q_len keys).
    """
    _, last_row = query_block_ranges(q_len, q_len, block_size_q, device)
    last = _query_starts(batch, q_len, k_len, q_offset, device).view(-1, 1) + last_row.view(1, -1)
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device).long()
    lo = ((start + sink) // block_size_k).view(-1, 1)
    hi = (torch.clamp(last - window + 1, min=0) + block_size_k - 1) // block_size_k
    hi = torch.maximum(torch.clamp(hi, max=-(-k_len // block_size_k)), lo)
    return lo.expand_as(hi), hi


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def slice_layout(n_sel: int, slices: int) -> tuple[int, int]:
    """(groups per slice, number of slices): the n_sel groups in runs of ceil(n_sel / slices); the last may be short."""
    per_slice = -(-n_sel // max(1, min(slices, n_sel)))
    return per_slice, -(-n_sel // per_slice)


# Groups per slice of a decode search by default: narrow slices give short rounds (each ranks 32 halves in registers)
# and more programs. On the H200 at 128K the retrieval search took 63 us in slices of 16 groups, 167 us in the
# fewest slices that fit a tile (64 groups each) (benchmarks/results/hip_decode_search_h200/).
SLICE_GROUPS = 16


def default_slices(n_sel: int, block_size_k: int) -> int:
    """Slices of a decode search by default: SLICE_GROUPS groups each, or more when such a slice's halves do not fit
    one tile."""
    return max(fewest_slices(n_sel, block_size_k), -(-n_sel // SLICE_GROUPS))


def fewest_slices(n_sel: int, block_size_k: int) -> int:
    """The fewest slices whose halves fit one sliced-kernel tile: the widest beams a decode search can run as short
    programs (1 when even a single group does not fit: one beam, in the beam kernel)."""
    groups = SLICE_TILE_KEYS // (2 * _next_power_of_2(block_size_k))
    return -(-n_sel // groups) if groups else 1


def _head_layout(num_q_heads: int, num_kv_heads: int, shared_kv_heads: bool):
    """(pattern heads, query heads per pattern head)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    return (num_kv_heads, num_q_heads // num_kv_heads) if shared_kv_heads else (num_q_heads, 1)


def _check_inputs(query, key, k, block_size_k, q_offset, score, slices, oversample):
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(f"hip_mask needs query [B, Hq, Lq, D] and key [B, Hkv, Lk, D]; got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if q_offset is None and query.shape[2] > key.shape[2]:
        raise ValueError(f"{query.shape[2]} queries but only {key.shape[2]} keys: queries are the last Lq keys "
                         "(pass q_offset to place them elsewhere)")
    if q_offset is not None and (tuple(q_offset.shape) != (query.shape[0],) or q_offset.dtype.is_floating_point):
        raise ValueError(f"q_offset must be a [B] = [{query.shape[0]}] integer tensor of first query positions, got "
                         f"{tuple(q_offset.shape)} {q_offset.dtype}")
    if k < block_size_k or k % block_size_k:
        raise ValueError(f"k={k} must be a positive multiple of block_size_k={block_size_k}")
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")
    for name, value in (("slices", slices), ("oversample", oversample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _even_split(lo: torch.Tensor, hi: torch.Tensor, parts: int) -> torch.Tensor:
    """[..., parts + 1] bounds of `parts` contiguous, nearly equal runs of the blocks [lo, hi)."""
    i = torch.arange(parts + 1, device=lo.device)
    return lo.unsqueeze(-1) + (i * (hi - lo).unsqueeze(-1)) // parts


def _logits(q_sel, keys, k_pos, scale, softcap) -> torch.Tensor:
    """[B, H, nc, R, N]: scores of the strided queries q_sel [B, H, nc, R, D] against the keys at k_pos [B, H|1, nc, N]."""
    batch, heads, n_qb, n = q_sel.shape[0], q_sel.shape[1], q_sel.shape[2], k_pos.shape[-1]
    flat = k_pos.clamp(0, keys.shape[2] - 1).expand(batch, heads, n_qb, n).reshape(batch, heads, -1, 1)
    k_vec = torch.gather(keys, 2, flat.expand(-1, -1, -1, keys.shape[-1])).view(batch, heads, n_qb, n, keys.shape[-1])
    return attention_logits(torch.einsum("bhqrd,bhqnd->bhqrn", q_sel, k_vec), scale, softcap)


def _local_lse(q_sel, keys, q_pos, q_live, start, sink, window, block_size_q, scale, softcap) -> torch.Tensor:
    """[B, H, nQB, R]: each scored query's log-sum-exp over the sink and its sliding window (-inf where it sees none).

    That is the part of the query's softmax mass every pattern keeps; `_sampled_lse` estimates the candidates' part.
    q_pos [B, nQB, R] are the scored queries' positions, q_live [nQB, R] which of them exist.
    """
    k_len, device = keys.shape[2], keys.device
    sink_pos = (start.view(-1, 1) + torch.arange(sink, device=device)).unsqueeze(1)  # [B, 1, sink]
    # Every window of a block lies in the `window + block_size_q - 1` keys that end at its last query.
    span = window + block_size_q - 1 if window else 0
    win_pos = q_pos.amax(-1, keepdim=True) - span + 1 + torch.arange(span, device=device)  # [B, nQB, span]
    positions = torch.cat([sink_pos.expand(-1, q_pos.shape[1], -1), win_pos], -1)  # [B, nQB, n]
    s = _logits(q_sel, keys, positions.unsqueeze(1), scale, softcap)
    pos, qp, first = positions.unsqueeze(-2), q_pos.unsqueeze(-1), start.view(-1, 1, 1, 1)
    in_sink = torch.arange(positions.shape[-1], device=device) < sink
    visible = torch.where(in_sink, pos < first + sink, (pos > qp - window) & (pos >= first + sink))
    visible = visible & (pos >= first) & (pos <= qp) & (pos < k_len) & q_live.unsqueeze(-1)
    return s.masked_fill(~visible.unsqueeze(1), -torch.inf).logsumexp(-1)


def _sampled_lse(q_sel, keys, q_pos, q_live, lo, hi, start, sink, window, block_size_k, scale, softcap):
    """[B, H, nQB, R]: the candidates' softmax mass, sampled at the centre block of each of at most LSE_STRATA equal
    parts of [lo, hi) and weighted by the part's size; keys a row sees through its window or the sink are left out
    (`_local_lse` counts them exactly)."""
    bounds = _even_split(lo, hi, LSE_STRATA)
    first, last = bounds[..., :-1], bounds[..., 1:]  # [B, nQB, P]
    size = last - first
    token = torch.arange(block_size_k, device=lo.device)
    k_pos = ((((first + last - 1).clamp(min=0) // 2).unsqueeze(-1) * block_size_k + token)).flatten(-2)
    s = _logits(q_sel, keys, k_pos.unsqueeze(1), scale, softcap)
    weight = torch.log(size.float()).repeat_interleave(block_size_k, -1).unsqueeze(-2)  # -inf for an empty part
    pos, qp = k_pos.unsqueeze(-2), q_pos.unsqueeze(-1)
    visible = (pos <= qp - window) & (pos >= start.view(-1, 1, 1, 1) + sink) & (pos < keys.shape[2])
    visible = visible & q_live.unsqueeze(-1) & (size > 0).repeat_interleave(block_size_k, -1).unsqueeze(-2)
    return (s + weight.unsqueeze(1)).masked_fill(~visible.unsqueeze(1), -torch.inf).logsumexp(-1)


def _block_scores(q_sel, keys, q_pos, q_live, lse, blocks, block_size_k, scale, softcap):
    """[B, H, nc, n]: each key block's score, the max over its tokens and the scored queries of logit - lse (_HIDDEN
    where no query sees it)."""
    token = torch.arange(block_size_k, device=blocks.device)
    k_pos = (blocks.unsqueeze(-1) * block_size_k + token).flatten(-2)  # [B, H, nc, n * bk]
    s = _logits(q_sel, keys, k_pos, scale, softcap) - lse.unsqueeze(-1)
    visible = (k_pos.unsqueeze(-2) <= q_pos.unsqueeze(1).unsqueeze(-1)) & (k_pos < keys.shape[2]).unsqueeze(-2)
    visible = visible & q_live.unsqueeze(-1)
    return s.masked_fill(~visible, _HIDDEN).amax(-2).view(*blocks.shape, block_size_k).amax(-1)


def _search(q_sel, keys, q_pos, q_live, lo, hi, start, *, n_sel, block_size_q, block_size_k, sink, window, score,
            scale, softcap, slices, oversample=1):
    """(ids [B, H, nc, n_sel], counts [B, H, nc]) for a chunk of nc query blocks."""
    batch, heads, n_qb = q_sel.shape[:3]
    device = q_sel.device
    n_keep, n_sel = n_sel, n_sel * oversample  # the search runs oversample x the groups, the best n_keep survive
    most = int((hi - lo).max().item()) if lo.numel() else 0
    largest = -(-most // n_sel)
    final_ranking = oversample > 1 and most > n_keep
    lse = torch.zeros(q_sel.shape[:-1], device=device)  # [B, H, nc, R]
    if score == "probability" and (largest > 1 or final_ranking):
        lse = torch.logaddexp(
            _local_lse(q_sel, keys, q_pos, q_live, start, sink, window, block_size_q, scale, softcap),
            _sampled_lse(q_sel, keys, q_pos, q_live, lo, hi, start, sink, window, block_size_k, scale, softcap))
        lse = torch.where(torch.isfinite(lse), lse, 0.0)

    per_slice, n_slices = slice_layout(n_sel, slices)
    bounds = _even_split(lo, hi, n_sel)  # [B, nc, n_sel + 1]
    pad = (0, n_slices * per_slice - n_sel)  # the last slice's missing groups are empty
    starts = torch.nn.functional.pad(bounds[..., :-1], pad).unsqueeze(1).expand(batch, heads, -1, -1).contiguous()
    ends = torch.nn.functional.pad(bounds[..., 1:], pad).unsqueeze(1).expand(batch, heads, -1, -1).contiguous()
    # Each slice keeps as many halves as it has groups.
    width = torch.clamp(n_sel - torch.arange(n_slices, device=device) * per_slice, max=per_slice)
    keeps = torch.arange(per_slice, device=device) < width.unsqueeze(-1)  # [slices, per_slice]
    kept = keeps.flatten()
    slice_base = (torch.arange(n_slices, device=device) * 2 * per_slice).unsqueeze(-1)
    while largest > 1:
        mid = starts + (ends - starts + 1) // 2
        half_start = torch.stack([starts, mid], -1).flatten(-2)  # half 2g + side of group g
        half_end = torch.stack([mid, ends], -1).flatten(-2)
        rep = (half_start + half_end - 1).clamp(min=0) // 2
        scores = _block_scores(q_sel, keys, q_pos, q_live, lse, rep, block_size_k, scale, softcap)
        scores = scores.masked_fill(half_end <= half_start, -torch.inf).view(batch, heads, n_qb, n_slices, -1)
        # A slice keeps its `width` best halves (ties: the lower half) in the order they lie: group g of the next
        # round is the g-th of them (the halves it drops sort last, and are emptied).
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :per_slice]
        order = torch.where(keeps, best, 2 * per_slice).sort(dim=-1).values.clamp(max=2 * per_slice - 1)
        order = (order + slice_base).flatten(-2)
        starts, ends = half_start.gather(-1, order), half_end.gather(-1, order)
        ends = torch.where(kept, ends, starts)
        largest = (largest + 1) // 2

    live = ends > starts
    ids = torch.sort(torch.where(live, starts, torch.iinfo(torch.int32).max), dim=-1).values
    counts = live.sum(-1)
    if final_ranking:
        # The survivors compete across slices: the n_keep best blocks by their own score (ties: the lower block).
        alive = torch.arange(ids.shape[-1], device=device) < counts.unsqueeze(-1)
        scores = _block_scores(q_sel, keys, q_pos, q_live, lse, torch.where(alive, ids, 0), block_size_k, scale,
                               softcap).masked_fill(~alive, -torch.inf)
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
        ids = torch.sort(torch.where(alive.gather(-1, best), ids.gather(-1, best), torch.iinfo(torch.int32).max),
                         dim=-1).values
        counts = counts.clamp(max=n_keep)
    ids = ids[..., :n_keep]
    ids = torch.where(torch.arange(n_keep, device=device) < counts.unsqueeze(-1), ids, 0)
    return ids.to(torch.int32), counts.to(torch.int32)


def hip_mask_reference(
    query: torch.Tensor, key: torch.Tensor, *, k: int, block_size_q: int, block_size_k: int, query_stride: int,
    sink: int, window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None,
    score: str = "probability", scale: float | None = None, softcap: float | None = None,
    q_offset: torch.Tensor | None = None, slices: int = 1, oversample: int = 1,
) -> SparsePattern:
    """query [B, Hq, Lq, D], key [B, Hkv, Lk, D] -> SparsePattern with k // block_size_k blocks per query block.

    ``score="probability"`` ranks a half by max over queries of (logit - the query's estimated log-sum-exp);
    ``score="logit"`` by the raw max of q.k, as the paper does. ``scale`` (default head_dim ** -0.5) and ``softcap``
    are the attention's own. ``q_offset`` [B]: first query positions; ``slices``, ``oversample``: independent beams
    whose survivors compete (module doc).
    """
    _check_inputs(query, key, k, block_size_k, q_offset, score, slices, oversample)
    batch, num_q_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    heads, per_head = _head_layout(num_q_heads, num_kv_heads, shared_kv_heads)
    n_sel, device = k // block_size_k, query.device
    n_qb = -(-q_len // block_size_q)

    # Strided queries of every block, the pattern head's query heads side by side: [B, H, nQB, R, D].
    # Strided back from each block's last query, which is always scored (it predicts the token after the block).
    first = torch.arange(n_qb, device=device).view(-1, 1) * block_size_q
    last = torch.clamp(first + block_size_q, max=q_len) - 1
    q_idx = last - torch.arange(0, block_size_q, query_stride, device=device)  # [nQB, NQ]
    q_sel = query.float()[:, :, q_idx.clamp(min=0)]  # [B, Hq, nQB, NQ, D]
    q_sel = q_sel.view(batch, heads, per_head, n_qb, q_idx.shape[1], dim).transpose(2, 3).flatten(3, 4)
    q_pos = _query_starts(batch, q_len, k_len, q_offset, device).view(-1, 1, 1) + q_idx.repeat(1, per_head)
    q_live = (q_idx >= first).repeat(1, per_head)  # [nQB, R]
    kv_head = torch.arange(heads, device=device) // (num_q_heads // num_kv_heads // per_head)
    keys = key.float()[:, kv_head]  # [B, H, Lk, D]
    scale = dim**-0.5 if scale is None else scale
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device).long()
    lo, hi = candidate_block_range(batch, q_len, k_len, block_size_q, block_size_k, sink, window, kv_start, device,
                                   q_offset)

    ids = torch.empty(batch, heads, n_qb, n_sel, dtype=torch.int32, device=device)
    counts = torch.empty(batch, heads, n_qb, dtype=torch.int32, device=device)
    widest = max(2 * n_sel * oversample, LSE_STRATA, sink + window + block_size_q) * block_size_k
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * q_pos.shape[-1] * widest))
    for c0 in range(0, n_qb, chunk):
        c = slice(c0, min(n_qb, c0 + chunk))
        ids[:, :, c], counts[:, :, c] = _search(
            q_sel[:, :, c], keys, q_pos[:, c], q_live[c], lo[:, c], hi[:, c], start, n_sel=n_sel,
            block_size_q=block_size_q, block_size_k=block_size_k, sink=sink, window=window, score=score, scale=scale,
            softcap=softcap, slices=slices, oversample=oversample)
    return SparsePattern(ids, counts, block_size_q, block_size_k, sink, window)


# Launch settings of the Triton kernels: "prefill" for a search of many query blocks with one beam each (thousands of
# programs; the fastest of a sweep on an H200 at 128K, benchmarks/results/hip_mask_sweep_h200.log; transposed and one
# stage since the per-round sort became a select and query blocks hold 128 queries: 10.1 against 12.1 ms for the paper
# budget, 26.8 against 31.8 for retrieval's, H200_RUNS.md), "decode" for a sliced search. tile_keys: keys scored per
# tile (the beam kernel's halves, both kernels' log-sum-exp estimate);
# stages: key tiles in flight while one is scored; transposed (beam kernel): score keys x queries instead of queries x
# keys, which moves the max over the queries from across warps to within them; select_bits (beam kernel) and merge_bits
# (decode): bits of the scores that each pass of a radix select settles (the beam's per-round select of its best
# halves, the oversampled merge's of its best survivors; 0 sorts instead).
LAUNCH_SETTINGS = {
    "prefill": {"tile_keys": 64, "num_warps": 4, "stages": 1, "transposed": True, "select_bits": 2},
    "decode": {"tile_keys": 128, "num_warps": 4, "merge_bits": 2},
}


def slice_tile_keys(n_sel: int, slices: int, block_size_k: int) -> int:
    """Keys a sliced search scores per round in one tile (>= 16, tl.dot's minimum)."""
    per_slice, _ = slice_layout(n_sel, slices)
    return max(16, 2 * _next_power_of_2(per_slice) * _next_power_of_2(block_size_k))


def hip_mask_triton(
    query: torch.Tensor, key: torch.Tensor, *, k: int, block_size_q: int, block_size_k: int, query_stride: int,
    sink: int, window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None,
    score: str = "probability", scale: float | None = None, softcap: float | None = None,
    q_offset: torch.Tensor | None = None, slices: int = 1, oversample: int = 1, launch: dict | None = None,
) -> SparsePattern:
    """Same contract and result as `hip_mask_reference`, in Triton (hip_mask_kernel.py).

    A search in several slices, oversampled, or of a single query block whose beam fits one tile runs the sliced
    kernel (one program per slice; with score="probability" after hip_lse_kernel, which estimates the log-sum-exp for
    all slices at once); any other the beam kernel (one program per query block). ``launch`` overrides
    `LAUNCH_SETTINGS` for tuning.
    """
    _check_inputs(query, key, k, block_size_k, q_offset, score, slices, oversample)
    batch, num_q_heads, q_len, dim = query.shape
    sliced, grid, scratch, constants = _search_plan(
        batch, num_q_heads, key.shape[1], q_len, dim, query.dtype, k, block_size_q, block_size_k, query_stride,
        sink, window, shared_kv_heads, score, softcap is not None, kv_start is not None, q_offset is not None, slices,
        oversample, tuple(sorted((launch or {}).items())))
    device, heads, n_qb, n_sel = query.device, grid[1] // batch, -(-q_len // block_size_q), k // block_size_k
    ids = torch.empty(batch, heads, n_qb, n_sel, dtype=torch.int32, device=device)
    counts = torch.empty(batch, heads, n_qb, dtype=torch.int32, device=device)
    if not ids.numel():
        return SparsePattern(ids, counts.zero_(), block_size_q, block_size_k, sink, window)
    hip_lse_kernel, hip_mask_kernel, hip_slice_kernel, score_scaling, dependent_launch = _triton_modules()
    strides = (*query.stride(), *key.stride())
    # Row b's start and offset are read at pointer + b: a strided view would read another row's.
    common = (query, key, counts if kv_start is None else kv_start.to(device).contiguous(),
              counts if q_offset is None else q_offset.to(device).contiguous())
    sizes = (q_len, key.shape[2], heads, n_qb, sink, window,
             *score_scaling(dim**-0.5 if scale is None else scale, softcap))
    if not sliced:  # the beam kernel's per-program scratch (prefill: large, and a prefill is not launch-bound)
        buffers = [torch.empty(size, dtype=dtype, device=device) for size, dtype in scratch]
        hip_mask_kernel[grid](*common, ids, counts, *buffers, *strides, *sizes, **constants)
        return SparsePattern(ids, counts, block_size_q, block_size_k, sink, window)
    survivors, programs, lse = scratch
    overlap = dependent_launch(device)  # each kernel's launch overlaps the end of the one before it
    # Oversampled slices: their survivors, and arrival counters for the last one to merge them (else not read).
    buffers = ([kept(device, "hip survivors", survivors, torch.int32),
                kept(device, "hip survivor scores", survivors, torch.float32), arrival_counters(device, programs)]
               if survivors else [counts] * 3)
    lse_partials = counts  # not read without the estimate
    if lse is not None:  # the log-sum-exp estimate, in parallel for all slices (hip_lse_kernel)
        lse_grid, lse_size, lse_constants = lse
        lse_partials = kept(device, "hip lse partials", lse_size, torch.float32)
        hip_lse_kernel[lse_grid](*common, lse_partials, *strides, *sizes, **lse_constants, **overlap)
    hip_slice_kernel[grid](*common, ids, counts, *buffers, lse_partials, *strides, *sizes, **constants, **overlap)
    return SparsePattern(ids, counts, block_size_q, block_size_k, sink, window)


@functools.cache
def _triton_modules():
    """Triton is imported on first use only (a test sets TRITON_INTERPRET=1 first); a decode step imports nothing."""
    from .hip_mask_kernel import hip_lse_kernel, hip_mask_kernel, hip_slice_kernel
    from .launch import dependent_launch
    from .triton_prefill import score_scaling

    return hip_lse_kernel, hip_mask_kernel, hip_slice_kernel, score_scaling, dependent_launch


@functools.lru_cache(maxsize=256)
def _search_plan(batch, num_q_heads, num_kv_heads, q_len, dim, dtype, k, block_size_q, block_size_k, query_stride,
                 sink, window, shared_kv_heads, score, has_softcap, has_kv_start, has_q_offset, slices, oversample,
                 launch):
    """(sliced, grid, scratch, kernel constants) of a search; the same at every decode step. scratch: the beam
    kernel's per-program buffers [(numel, dtype)], or for the sliced kernel (survivors' numel, programs, the log-sum-exp
    kernel's (grid, partials' numel, constants) or None)."""
    heads, per_head = _head_layout(num_q_heads, num_kv_heads, shared_kv_heads)
    n_keep, n_qb = k // block_size_k, -(-q_len // block_size_q)
    n_sel = n_keep * oversample  # groups searched
    tile = slice_tile_keys(n_sel, slices, block_size_k)
    several = slice_layout(n_sel, slices)[1] > 1  # (one slice is the single beam, whichever kernel runs it)
    sliced = several or oversample > 1 or (n_qb == 1 and tile <= SLICE_TILE_KEYS)
    if sliced and tile > SLICE_TILE_KEYS:
        raise ValueError(f"slices={slices} leaves {slice_layout(n_sel, slices)[0]} groups a slice, whose halves "
                         f"({tile} keys) do not fit one {SLICE_TILE_KEYS}-key tile; use slices >= "
                         f"{fewest_slices(n_sel, block_size_k)}")
    settings = dict(LAUNCH_SETTINGS["decode" if sliced else "prefill"], **dict(launch))
    # Strided queries a block scores: a power of two up to the whole block (few recompiles for short query blocks).
    nq = min(-(-block_size_q // query_stride), _next_power_of_2(-(-min(q_len, block_size_q) // query_stride)))
    bk_p2 = _next_power_of_2(block_size_k)
    constants = dict(  # those of every kernel
        PER_HEAD=per_head, KV_DIV=(num_q_heads // num_kv_heads) // per_head, BLOCK_Q=block_size_q,
        STRIDE=query_stride, NQ=nq, ROWS=max(16, _next_power_of_2(per_head * nq)), BK=block_size_k, BK_P2=bk_p2,
        DIM=dim, DIM_P2=max(16, _next_power_of_2(dim)), PRECISION="ieee" if dtype == torch.float32 else "tf32",
        SOFTCAP=has_softcap, HAS_KV_START=has_kv_start, HAS_Q_OFFSET=has_q_offset, num_warps=settings["num_warps"],
    )
    lse_tile = max(16, bk_p2, _next_power_of_2(settings["tile_keys"]))
    programs = batch * heads * n_qb
    normalize = score == "probability"
    if sliced:
        per_slice, n_slices = slice_layout(n_sel, slices)
        lse = None
        if normalize:  # one tile of the estimate's keys per program: the sink and windows, then the samples
            span = window + min(q_len, block_size_q) - 1 if window else 0
            local_tiles = -(-(sink + span) // lse_tile)
            parts = local_tiles + -(-LSE_STRATA // (lse_tile // bk_p2))
            lse = ((n_qb * parts, batch * heads), programs * parts * 2 * constants["ROWS"],
                   dict(constants, TILE=lse_tile, STRATA=LSE_STRATA, LOCAL_TILES=local_tiles, LSE_PARTS=parts))
        constants.update(NSEL=n_sel, NORMALIZE=normalize, NKEEP=n_keep, NSEL_P2=_next_power_of_2(n_sel),
                         NLOC=per_slice, NLOC_P2=tile // (2 * bk_p2), SLICES=n_slices,
                         LSE_PARTS=lse[2]["LSE_PARTS"] if lse else 1, DIGIT=settings["merge_bits"])
        survivors = programs * n_sel if oversample > 1 else 0
        return True, (n_qb * n_slices, batch * heads), (survivors, programs, lse), constants
    # At least 8 groups (16 halves), and tiles of halves at least 16 keys wide: tl.dot's minimum.
    nsel_p2 = max(8, _next_power_of_2(n_sel))
    constants.update(NSEL=n_sel, NSEL_P2=nsel_p2, STRATA=LSE_STRATA, STAGES=settings["stages"], NORMALIZE=normalize,
                     CHUNK=min(2 * nsel_p2, max(settings["tile_keys"] // bk_p2, -(-16 // bk_p2))),
                     TRANSPOSED=settings["transposed"], DIGIT=settings["select_bits"])
    scratch = tuple((programs * 2 * nsel_p2, dtype) for dtype in (torch.int32, torch.float32))
    return False, (n_qb, batch * heads), scratch, constants


def _search_eager(query, key, **options) -> SparsePattern:
    if query.is_cuda and HAS_TRITON:
        with on_device(query):  # a layer on cuda:1 under device_map
            return hip_mask_triton(query, key, **options)
    return hip_mask_reference(query, key, **options)


@torch.library.custom_op("hf_longattn::hip_mask", mutates_args=())
def _hip_mask_op(
    query: torch.Tensor, key: torch.Tensor, kv_start: torch.Tensor | None, q_offset: torch.Tensor | None, k: int,
    block_size_q: int, block_size_k: int, query_stride: int, sink: int, window: int, shared_kv_heads: bool,
    score: str, scale: float | None, softcap: float | None, slices: int, oversample: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    with per_call():
        pattern = _search_eager(
            query, key, k=k, block_size_q=block_size_q, block_size_k=block_size_k, query_stride=query_stride,
            sink=sink, window=window, shared_kv_heads=shared_kv_heads, kv_start=kv_start, score=score, scale=scale,
            softcap=softcap, q_offset=q_offset, slices=slices, oversample=oversample)
    return pattern.block_indices, pattern.block_counts


@_hip_mask_op.register_fake
def _(query, key, kv_start, q_offset, k, block_size_q, block_size_k, query_stride, sink, window, shared_kv_heads,
      score, scale, softcap, slices, oversample):
    heads, _ = _head_layout(query.shape[1], key.shape[1], shared_kv_heads)
    n_qb = -(-query.shape[2] // block_size_q)
    ids = query.new_empty(query.shape[0], heads, n_qb, k // block_size_k, dtype=torch.int32)
    return ids, query.new_empty(query.shape[0], heads, n_qb, dtype=torch.int32)


def hip_mask(query: torch.Tensor, key: torch.Tensor, **options) -> SparsePattern:
    """HiP's top-k key-block selection: the Triton kernels on CUDA tensors (when Triton is installed), the PyTorch
    reference elsewhere; under torch.compile one opaque custom op (hf_longattn::hip_mask)."""
    if not torch.compiler.is_compiling():
        return _search_eager(query, key, **options)
    o = dict(dict(shared_kv_heads=True, kv_start=None, score="probability", scale=None, softcap=None, q_offset=None,
                  slices=1, oversample=1), **options)
    ids, counts = _hip_mask_op(
        query, key, o["kv_start"], o["q_offset"], o["k"], o["block_size_q"], o["block_size_k"], o["query_stride"],
        o["sink"], o["window"], o["shared_kv_heads"], o["score"], None if o["scale"] is None else float(o["scale"]),
        None if o["softcap"] is None else float(o["softcap"]), o["slices"], o["oversample"])
    return SparsePattern(ids, counts, o["block_size_q"], o["block_size_k"], o["sink"], o["window"])
