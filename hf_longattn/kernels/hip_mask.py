"""HiP mask estimation: hierarchical top-k key-block search (Lee et al., "HiP Attention", arXiv 2406.09827).

For each query block, the key blocks that lie past the sink and before its sliding window (the candidates) are split
into ``n = k / block_size_k`` contiguous groups. Every iteration splits each group into two halves, scores each half
by its centre ("representative") key block - the max over the block's tokens, the query block's strided queries
(counted back from its last query) and, with a shared selection, the GQA group's query heads - and keeps the ``n``
best of the ``2n`` halves. The largest group halves each round, so after ceil(log2(candidates / n)) rounds every
survivor is one key block: the selection. Work per query block is O(n x iterations), never O(Lk); no Lq x Lk tensor
exists at any step.

What is maximised (``score``): the paper's raw logit q.k, or by default ("probability") the logit minus an estimate
of the query's log-sum-exp - the log of the softmax probability the key would get. The estimate adds the exact mass
of the sink and the query's window to the candidates' mass sampled by the first round's representatives, each
weighted by the size of its half (a stratified sample; no extra key is read). Raw logits are not comparable across
queries and heads: one head with large logits everywhere picks the blocks for its whole group. On SmolLM2 passkey
prompts (2K, a 512-token budget, 20 prompts) an exhaustive top-k of 2-token blocks found 8 passkeys by raw max logit,
12 by max probability with only the sink + window mass, 16 with the exact log-sum-exp and 16 with this estimate;
dense found 13 (benchmarks/results/hip_selection_study.md).

`hip_mask_reference` is the PyTorch statement of the algorithm; `hip_mask_triton` runs the whole search for one
(batch, head, query block) in one Triton program (hip_mask_kernel.py, imported on first use so that importing the
package does not import Triton and tests can still choose TRITON_INTERPRET=1). Both break score ties towards the
lower half index, so they agree exactly up to float rounding. `hip_mask` dispatches: Triton on CUDA, the reference
elsewhere.
"""
from __future__ import annotations

import torch

from .dense import attention_logits
from .ops import HAS_TRITON, on_device
from .pattern import SparsePattern, query_block_ranges

# Score of a (query, key) pair that causality hides: finite, so that a half that only such pairs reach still ranks
# above an empty half (-inf). The kernel spells the same value as a literal.
_HIDDEN = -1e30
# Upper bound on the score elements the reference materialises at once.
_MAX_SCORE_ELEMENTS = 1 << 24


def candidate_block_range(
    batch: int, q_len: int, k_len: int, block_size_q: int, block_size_k: int, sink: int, window: int,
    kv_start: torch.Tensor | None, device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each [B, nQB]: the key blocks [lo, hi) a query block chooses from.

    lo is the block holding the first key past the sink; hi ends at the last key that the block's last query does not
    see through its window. Every key a query of the block may see outside sink and window lies in [lo, hi) blocks,
    so selecting all of them is exact dense attention.
    """
    _, last = query_block_ranges(q_len, k_len, block_size_q, device)
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device).long()
    lo = ((start + sink) // block_size_k).view(-1, 1)
    hi = (torch.clamp(last - window + 1, min=0) + block_size_k - 1) // block_size_k
    hi = torch.maximum(hi.view(1, -1), lo)
    return lo.expand(batch, hi.shape[1]), hi


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _head_layout(num_q_heads: int, num_kv_heads: int, shared_kv_heads: bool):
    """(pattern heads, query heads per pattern head)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    return (num_kv_heads, num_q_heads // num_kv_heads) if shared_kv_heads else (num_q_heads, 1)


def _check_inputs(query, key, k, block_size_k):
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(f"hip_mask needs query [B, Hq, Lq, D] and key [B, Hkv, Lk, D]; got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"{query.shape[2]} queries but only {key.shape[2]} keys: queries are the last Lq keys")
    if k < block_size_k or k % block_size_k:
        raise ValueError(f"k={k} must be a positive multiple of block_size_k={block_size_k}")


SCORES = ("probability", "logit")


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")


def _local_lse(q_sel, keys, q_pos, q_live, start, sink, window, block_size_q, scale, softcap) -> torch.Tensor:
    """[B, H, nQB, R]: each scored query's log-sum-exp over the sink and its sliding window (-inf where it sees none).

    That is the part of the query's softmax mass every pattern keeps; `_sampled_lse` estimates the candidates' part.
    """
    batch, heads, n_qb, rows, dim = q_sel.shape
    k_len, device = keys.shape[2], keys.device
    sink_pos = start.view(-1, 1) + torch.arange(sink, device=device)  # [B, sink]
    # Every window of a block lies in the `window + block_size_q - 1` keys that end at its last query.
    span = window + block_size_q - 1 if window else 0
    win_pos = q_pos.max(-1).values.view(-1, 1) - span + 1 + torch.arange(span, device=device)  # [nQB, span]
    positions = torch.cat([sink_pos.unsqueeze(1).expand(-1, n_qb, -1), win_pos.expand(batch, -1, -1)], -1)
    k_vec = torch.gather(keys, 2, positions.clamp(0, k_len - 1).flatten(1).view(batch, 1, -1, 1)
                         .expand(-1, heads, -1, dim)).view(batch, heads, n_qb, -1, dim)
    s = attention_logits(torch.einsum("bhqrd,bhqnd->bhqrn", q_sel, k_vec), scale, softcap)
    pos, qp, first = positions.view(batch, 1, n_qb, 1, -1), q_pos.view(1, 1, n_qb, -1, 1), start.view(-1, 1, 1, 1, 1)
    in_sink = torch.arange(positions.shape[-1], device=device) < sink
    visible = torch.where(in_sink, pos < first + sink, (pos > qp - window) & (pos >= first + sink))
    visible = visible & (pos >= first) & (pos <= qp) & q_live.view(1, 1, n_qb, -1, 1)
    return s.masked_fill(~visible, -torch.inf).logsumexp(-1)


def _sampled_lse(logits, visible, k_pos, q_pos, half_size, start, sink, window) -> torch.Tensor:
    """[B, H, nc, R]: the first round's representative blocks as a stratified sample of the candidates' softmax mass.

    Each half's representative block stands for the half's ``half_size`` blocks; keys a row sees through its window
    or the sink are left out (`_local_lse` counts them exactly).
    """
    weight = torch.log(half_size.float()).repeat_interleave(k_pos.shape[-1] // half_size.shape[-1], -1)
    past_sink = (k_pos >= start.view(-1, 1, 1, 1) + sink).unsqueeze(-2)
    outside = (k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1) - window) & past_sink
    return (logits + weight.unsqueeze(-2)).masked_fill(~(visible & outside), -torch.inf).logsumexp(-1)


def hip_mask_reference(
    query: torch.Tensor, key: torch.Tensor, *, k: int, block_size_q: int, block_size_k: int, query_stride: int,
    sink: int, window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None,
    score: str = "probability", scale: float | None = None, softcap: float | None = None,
) -> SparsePattern:
    """query [B, Hq, Lq, D], key [B, Hkv, Lk, D] -> SparsePattern with k // block_size_k blocks per query block.

    ``score="probability"`` ranks a half by max over queries of (logit - the query's estimated log-sum-exp);
    ``score="logit"`` by the raw max of q.k, as the paper does. ``scale`` (default head_dim ** -0.5) and ``softcap``
    are the attention's own.
    """
    _check_inputs(query, key, k, block_size_k)
    _check_score(score)
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
    q_pos = (q_idx + k_len - q_len).repeat(1, per_head)  # [nQB, R]
    q_live = (q_idx >= first).repeat(1, per_head)
    kv_head = torch.arange(heads, device=device) // (num_q_heads // num_kv_heads // per_head)
    keys = key.float()[:, kv_head]  # [B, H, Lk, D]; a view-free gather only over heads
    scale = dim**-0.5 if scale is None else scale
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device).long()
    lse = torch.zeros(q_sel.shape[:-1], device=device)  # [B, H, nQB, R]
    if score == "probability":
        for c0 in range(0, n_qb, 64):  # a few query blocks at a time bound the local score table
            c = slice(c0, min(n_qb, c0 + 64))
            lse[:, :, c] = _local_lse(q_sel[:, :, c], keys, q_pos[c], q_live[c], start, sink, window, block_size_q,
                                      scale, softcap)

    lo, hi = candidate_block_range(batch, q_len, k_len, block_size_q, block_size_k, sink, window, kv_start, device)
    count = (hi - lo).unsqueeze(1).expand(batch, heads, n_qb)
    i = torch.arange(n_sel + 1, device=device)
    bounds = lo.unsqueeze(-1) + (i * count[:, 0].unsqueeze(-1)) // n_sel  # [B, nQB, n+1]
    starts = bounds[..., :-1].unsqueeze(1).expand(batch, heads, n_qb, n_sel).contiguous()
    ends = bounds[..., 1:].unsqueeze(1).expand(batch, heads, n_qb, n_sel).contiguous()

    largest = int(-(-count.max().item() // n_sel)) if count.numel() else 0
    token = torch.arange(block_size_k, device=device)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * q_pos.shape[1] * 2 * n_sel * block_size_k))
    first_round = True
    while largest > 1:
        mid = starts + (ends - starts + 1) // 2
        half_start = torch.stack([starts, mid], -1).flatten(-2)  # half 2g + side of group g
        half_end = torch.stack([mid, ends], -1).flatten(-2)
        scores = torch.empty(half_start.shape, device=device)
        for c0 in range(0, n_qb, chunk):
            c = slice(c0, min(n_qb, c0 + chunk))
            rep = (half_start[:, :, c] + half_end[:, :, c] - 1).clamp(min=0) // 2
            k_pos = (rep.unsqueeze(-1) * block_size_k + token).flatten(-2)  # [B, H, nc, 2n * bk]
            k_vec = torch.gather(keys, 2, k_pos.clamp(max=k_len - 1).flatten(2).unsqueeze(-1).expand(-1, -1, -1, dim))
            s = attention_logits(torch.einsum("bhqrd,bhqnd->bhqrn", q_sel[:, :, c], k_vec.view(*k_pos.shape, dim)),
                                 scale, softcap)
            causal = k_pos.unsqueeze(-2) <= q_pos[c].unsqueeze(-1)
            visible = causal & q_live[c].unsqueeze(-1) & (k_pos < k_len).unsqueeze(-2)
            if first_round and score == "probability":
                size = half_end[:, :, c] - half_start[:, :, c]
                sampled = _sampled_lse(s, visible, k_pos, q_pos[c], size, start, sink, window)
                lse[:, :, c] = torch.logaddexp(lse[:, :, c], sampled)
                lse[:, :, c] = torch.where(torch.isfinite(lse[:, :, c]), lse[:, :, c], 0.0)
            s = (s - lse[:, :, c].unsqueeze(-1)).masked_fill(~visible, _HIDDEN).amax(-2)
            scores[:, :, c] = s.view(*rep.shape, block_size_k).amax(-1)
        scores = scores.masked_fill(half_end <= half_start, -torch.inf)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_sel]
        starts, ends = half_start.gather(-1, order), half_end.gather(-1, order)
        largest = (largest + 1) // 2
        first_round = False

    live = ends > starts
    ids = torch.sort(torch.where(live, starts, torch.iinfo(torch.int32).max), dim=-1).values
    counts = live.sum(-1)
    ids = torch.where(torch.arange(n_sel, device=device) < counts.unsqueeze(-1), ids, 0)
    return SparsePattern(ids.to(torch.int32), counts.to(torch.int32), block_size_q, block_size_k, sink, window)


# Launch settings of the Triton kernel, for a prefill (thousands of programs: batch x heads x query blocks) and a
# decode step (one program per batch row and head). The fastest of a sweep on an H200 at 128K won both
# (benchmarks/results/hip_mask_sweep_h200.log).
LAUNCH_SETTINGS = {
    "prefill": {"tile_keys": 64, "num_warps": 4, "stages": 2},
    "decode": {"tile_keys": 64, "num_warps": 4, "stages": 2},
}


def hip_mask_triton(
    query: torch.Tensor, key: torch.Tensor, *, k: int, block_size_q: int, block_size_k: int, query_stride: int,
    sink: int, window: int, shared_kv_heads: bool = True, kv_start: torch.Tensor | None = None,
    score: str = "probability", scale: float | None = None, softcap: float | None = None, launch: dict | None = None,
) -> SparsePattern:
    """Same contract and result as `hip_mask_reference`, one Triton program per (batch, head, query block).

    ``launch`` overrides `LAUNCH_SETTINGS` for tuning: ``tile_keys`` (keys scored per tile), ``num_warps`` and
    ``stages`` (key tiles in flight while one is scored).
    """
    from .triton_prefill import score_scaling  # Triton is imported on first use only

    _check_inputs(query, key, k, block_size_k)
    _check_score(score)
    batch, num_q_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    heads, per_head = _head_layout(num_q_heads, num_kv_heads, shared_kv_heads)
    n_sel, device = k // block_size_k, query.device
    n_qb = -(-q_len // block_size_q)
    score_scale, softcap_log2 = score_scaling(dim**-0.5 if scale is None else scale, softcap)
    nq = -(-block_size_q // query_stride)
    # At least 8 groups (16 halves): a score tile must be >= 16 keys wide for tl.dot.
    nsel_p2, bk_p2 = max(8, _next_power_of_2(n_sel)), _next_power_of_2(block_size_k)
    halves = 2 * nsel_p2
    if kv_start is None:
        kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
    programs = batch * heads * n_qb
    groups = torch.empty(programs, halves, dtype=torch.int32, device=device)
    scores = torch.empty(programs, halves, dtype=torch.float32, device=device)
    sorted_keys = torch.empty(programs, halves, dtype=torch.int64, device=device)
    ids = torch.empty(batch, heads, n_qb, n_sel, dtype=torch.int32, device=device)
    counts = torch.empty(batch, heads, n_qb, dtype=torch.int32, device=device)
    settings = dict(LAUNCH_SETTINGS["decode" if n_qb == 1 else "prefill"], **(launch or {}))
    # Halves per tile: a power of two, and a tile at least 16 keys wide for tl.dot.
    chunk = min(halves, max(settings["tile_keys"] // bk_p2, -(-16 // bk_p2)))
    if programs:
        from .hip_mask_kernel import hip_mask_kernel

        hip_mask_kernel[(n_qb, batch * heads)](
            query, key, kv_start.to(device=device, dtype=torch.int32), ids, counts, groups, scores, sorted_keys,
            *query.stride(), *key.stride(), q_len, k_len, heads, n_qb, sink, window, score_scale, softcap_log2,
            PER_HEAD=per_head, KV_DIV=(num_q_heads // num_kv_heads) // per_head, BLOCK_Q=block_size_q,
            STRIDE=query_stride, NQ=nq, ROWS=max(16, _next_power_of_2(per_head * nq)), BK=block_size_k,
            BK_P2=bk_p2, DIM=dim, DIM_P2=max(16, _next_power_of_2(dim)), NSEL=n_sel, NSEL_P2=nsel_p2,
            CHUNK=chunk, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            STAGES=settings["stages"], NORMALIZE=score == "probability", SOFTCAP=softcap is not None,
            num_warps=settings["num_warps"],
        )
    return SparsePattern(ids, counts, block_size_q, block_size_k, sink, window)


def hip_mask(query: torch.Tensor, key: torch.Tensor, **options) -> SparsePattern:
    """HiP's top-k key-block selection: the Triton kernel on CUDA tensors (when Triton is installed), the PyTorch
    reference elsewhere."""
    if query.is_cuda and HAS_TRITON:
        with on_device(query):  # a layer on cuda:1 under device_map
            return hip_mask_triton(query, key, **options)
    return hip_mask_reference(query, key, **options)
