"""LongHeads' chunk selection (Lu et al., "LongHeads", arXiv 2402.10685): which chunks each query block attends to,
and where they are placed so that no query-key distance exceeds the cap.

A row's keys are cut into chunks of ``chunk_size`` tokens from its first real key (left padding is not part of any
chunk). A query block attends to ``m = cap / chunk_size`` chunks at most: the first chunk, its own and the previous
chunk (three local chunks when the block straddles a chunk boundary), and the best of the chunks in between, ranked by
query . chunk representative.

Representatives (`chunk_representatives`, computed once per completed chunk): the chunk's tokens attend to each other
(non-causally), the mean of their outputs is used as a query over the chunk's keys, and the attention-weighted mean of
those keys represents the chunk. The keys are read in the chunk's own frame (turned back by the chunk's start
position) and a query is turned back by its own position before the dot product, as the paper scores an un-rotated
query against chunk-local keys. Positions are counted from the row's first real key, as `generate()` numbers them.
`chunk_representatives_reference` states it in PyTorch; `chunk_representatives_triton` reads each chunk's keys and
values once per query head and keeps only the column means of the attention probabilities (the mean output is those
times the values) (longheads_reps_kernel.py); `chunk_representatives` dispatches (Triton on CUDA).

Layout (`chunk_layout`): each (row, head, query block) gets a compact key sequence of ``m + 1`` chunk slots: the far
chunks (first + selected, ascending) right-aligned in the first ``m - 2`` slots, then three slots copying the local
region from the start of the previous chunk. Slot ``s`` starts at position ``local_start + (s - (m - 2)) * chunk_size``,
so the whole sequence is contiguous in the new positions, ends at the query block and spans at most ``cap`` tokens to
any query; a far chunk moves by ``delta = new start - old start`` (0 for the local slots, and for every slot when all
chunks fit, which is then exact dense attention).

`select_layout_reference` composes the steps in PyTorch (`block_geometry`, `select_chunks`, `chunk_layout`);
`select_layout_triton` runs them in two Triton kernels: the scores, one program per tile of a block's queries and
head, then the top chunks and the layout, one program per (row, head, query block) (longheads_select_kernel.py,
imported on first use); `select_layout` dispatches (Triton on CUDA, the reference elsewhere) in rounds of bounded
memory. Both break score ties towards the lower chunk.
"""

from __future__ import annotations

import torch

from ..rope import rotate
from .dense import dense_attention
from .ops import HAS_TRITON, on_device

# Slots after the far chunks: the previous, own and (for a block that straddles a boundary) next chunk.
LOCAL_SLOTS = 3
# Score elements (float32) a selection holds at once, and the query rows of a tile of the selection kernel.
_SELECT_SCORES = 1 << 24
SELECT_BLOCK_M = 128
# The kernels hold a row's chunk scores in a power-of-2 vector, a compile-time size: at least this many (128K tokens in
# chunks of 256), so that a state growing chunk by chunk (chunked prefill, decode) does not recompile the kernels at
# each doubling of its capacity (about a second each on an H200's host).
_MIN_CHUNK_PAD = 512


def chunk_pad(num_chunks: int) -> int:
    """The size of the kernels' vector of a row's chunks."""
    return max(1 << max(num_chunks - 1, 0).bit_length(), _MIN_CHUNK_PAD)


def chunk_representatives_reference(query, key, value, chunk_index, chunk_size: int, inv_freq, scale: float,
                                    softcap: float | None) -> torch.Tensor:
    """[P, Hq, D] float32 representative keys (chunk-local frame) of P chunks.

    query [P, Hq, L, D], key/value [P, Hkv, L, D] as cached (rotated at their absolute positions), chunk_index [P] the
    chunk's number in its row (its start position is chunk_index * L).
    """
    pairs, num_q_heads, length, dim = query.shape
    num_kv_heads = key.shape[1]
    summary = dense_attention(query, key, value, scale, softcap, causal=False).float().mean(1)  # [P, Hq, D]
    local = rotate(key, -(chunk_index * chunk_size).view(-1, 1, 1), inv_freq).float()  # [P, Hkv, L, D]
    summary = summary.view(pairs, num_kv_heads, num_q_heads // num_kv_heads, dim)
    weights = torch.softmax(scale * torch.einsum("pkgd,pkld->pkgl", summary, local), dim=-1)
    return torch.einsum("pkgl,pkld->pkgd", weights, local).reshape(pairs, num_q_heads, dim)


def chunk_representatives_triton(query, key, value, chunk_index, chunk_size: int, inv_freq, scale: float,
                                 softcap: float | None, block_m: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Same as the reference, one Triton program per (chunk, query head) (longheads_reps_kernel.py)."""
    import triton

    from .longheads_reps_kernel import chunk_representatives_kernel
    from .triton_prefill import dot_precision

    pairs, num_q_heads, length, dim = query.shape
    num_kv_heads = key.shape[1]
    if length != chunk_size or dim % 2 or inv_freq.numel() != dim // 2:
        raise ValueError(f"chunk_representatives takes whole chunks of {chunk_size} and the layer's {dim // 2} "
                         f"frequencies; got query {tuple(query.shape)}, {inv_freq.numel()} frequencies")
    out = torch.empty(pairs, num_q_heads, dim, dtype=torch.float32, device=query.device)
    l_pad = max(triton.next_power_of_2(chunk_size), 16)
    with on_device(query):
        group = num_q_heads // num_kv_heads
        chunk_representatives_kernel[(pairs, num_kv_heads, group)](
            query, key, value, chunk_index.to(torch.int32).contiguous(),
            inv_freq.to(device=query.device, dtype=torch.float32).contiguous(), out,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), chunk_size, scale, softcap or 0.0,
            G=group, HALF=dim // 2, HALF_P2=max(triton.next_power_of_2(dim // 2), 16),
            L_PAD=l_pad, BLOCK_M=min(block_m, l_pad), SOFTCAP=softcap is not None,
            PRECISION=dot_precision(query.dtype), num_warps=num_warps,
        )
    return out


def chunk_representatives(query, key, value, chunk_index, chunk_size: int, inv_freq, scale: float,
                          softcap: float | None) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors (when triton is installed), the reference otherwise."""
    run = chunk_representatives_triton if HAS_TRITON and query.is_cuda else chunk_representatives_reference
    return run(query, key, value, chunk_index, chunk_size, inv_freq, scale, softcap)


def block_geometry(first_query: torch.Tensor, last_query: torch.Tensor, row_start: torch.Tensor, chunk_size: int,
                   num_chunks: int) -> dict:
    """Per (row, query block), from absolute positions [B, nQB] and the rows' first real keys [B]:

    local_lo: first local chunk (the previous one, or 0); local_hi: the chunk of the block's last query;
    n_select: how many chunks between the first and the local ones may be selected (the cap minus the first chunk and
    the local chunks).
    """
    start = row_start.view(-1, 1)
    own_first = torch.div(first_query - start, chunk_size, rounding_mode="floor").clamp(min=0)
    own_last = torch.div(last_query - start, chunk_size, rounding_mode="floor").clamp(min=0)
    local_lo = (own_first - 1).clamp(min=0)
    n_local = own_last - local_lo + 1
    return {"local_lo": local_lo, "local_hi": own_last, "n_select": (num_chunks - 1 - n_local).clamp(min=0)}


def select_chunks(query_local: torch.Tensor, reps: torch.Tensor, query_live: torch.Tensor, local_lo: torch.Tensor,
                  n_select: torch.Tensor, max_select: int, scale: float, heads: int):
    """The chunks each (row, pattern head, query block) selects: (ids [B, H, nQB, K] ascending, counts [B, H, nQB]).

    query_local [B, Hq, nQB, Bq, D]: queries turned back by their positions; reps [B, Hq, C, D]; query_live
    [B, nQB, Bq]: real queries; candidates are chunks 1 .. local_lo - 1. A query ranks the candidates by the softmax
    of its scores over them (raw scores are not comparable across queries and heads); a block keeps the best of each
    chunk's probabilities over its queries and the query heads of the pattern head.
    """
    batch, num_q_heads, n_blocks, _, dim = query_local.shape
    num_chunks = reps.shape[2]
    chunk = torch.arange(num_chunks, device=reps.device)
    candidate = (chunk >= 1) & (chunk < local_lo.unsqueeze(-1))  # [B, nQB, C]
    k = min(max_select, num_chunks)
    if k == 0:
        empty = torch.zeros(batch, heads, n_blocks, 0, dtype=torch.long, device=reps.device)
        return empty, empty.sum(-1)
    logits = scale * torch.einsum("bhqtd,bhcd->bhqtc", query_local.float(), reps)
    visible = candidate.unsqueeze(1).unsqueeze(3)  # [B, 1, nQB, 1, C]
    logits = logits.masked_fill(~visible, -torch.inf)
    log_prob = logits - logits.logsumexp(-1, keepdim=True).clamp_min(-1e30)  # finite where there are candidates
    log_prob = log_prob.masked_fill(~(visible & query_live.unsqueeze(1).unsqueeze(-1)), -torch.inf)
    best = log_prob.view(batch, heads, num_q_heads // heads, n_blocks, -1, num_chunks).amax(dim=(2, 4))
    score, ids = best.topk(k, dim=-1)  # [B, H, nQB, k], best first
    keep = (score > -torch.inf) & (torch.arange(k, device=ids.device) < n_select.unsqueeze(1).unsqueeze(-1))
    ids = torch.where(keep, ids, num_chunks).sort(-1).values  # kept ids ascending, then the sentinel
    return ids, keep.sum(-1)


def chunk_layout(ids: torch.Tensor, counts: torch.Tensor, local_lo: torch.Tensor, local_hi: torch.Tensor,
                 row_start: torch.Tensor, first_query: torch.Tensor, chunk_size: int, num_chunks: int) -> dict:
    """Where each slot of the compact key sequence comes from and how far it moves (see the module docstring).

    ids/counts from `select_chunks` ([B, H, nQB, K], [B, H, nQB]); local_lo/local_hi/first_query [B, nQB]. Returns
    src_start [B, H, nQB, S] (first key of the slot's chunk, -1 for an unused slot), delta [B, H, nQB, S],
    kv_start [B, H, nQB] (first valid key of the compact sequence) and q_offset [B, H, nQB] (its first query's index).
    Both are the same for every head of a (row, query block): a block of real queries gives every candidate a finite
    score, so every head keeps min(candidates, n_select) chunks (a block of padding keeps none).
    """
    far_slots = num_chunks - 2
    lo, hi = local_lo.unsqueeze(1), local_hi.unsqueeze(1)  # [B, 1, nQB]
    has_first = lo >= 1
    n_far = has_first.long() + counts
    # The far chunks in order: chunk 0 (when it is not local), then the selected ids.
    far = torch.cat([torch.zeros_like(ids[..., :1]), ids], dim=-1)
    slot = torch.arange(far_slots, device=ids.device)
    j = slot - (far_slots - n_far.unsqueeze(-1))  # index into the far list, negative for an unused slot
    far_chunk = far.gather(-1, (j + (~has_first).long().unsqueeze(-1)).clamp(0, far.shape[-1] - 1))
    far_chunk = torch.where(j >= 0, far_chunk, -1)
    local = lo.unsqueeze(-1) + torch.arange(LOCAL_SLOTS, device=ids.device)
    local = torch.where(local <= hi.unsqueeze(-1), local, -1).expand(*far_chunk.shape[:-1], -1)
    chunks = torch.cat([far_chunk, local], dim=-1)  # [B, H, nQB, S]

    start = row_start.view(-1, 1, 1, 1)
    src_start = torch.where(chunks >= 0, start + chunks * chunk_size, -1)
    local_start = start + lo.unsqueeze(-1) * chunk_size
    new_start = local_start + (torch.arange(chunks.shape[-1], device=ids.device) - far_slots) * chunk_size
    delta = torch.where(chunks >= 0, new_start - src_start, 0)
    return {
        "src_start": src_start,
        "delta": delta,
        "kv_start": (far_slots - n_far) * chunk_size,
        "q_offset": (far_slots * chunk_size + first_query.unsqueeze(1) - local_start.squeeze(-1)).expand_as(n_far),
    }


def select_layout_reference(query, reps, row_start, inv_freq, k_len: int, first_block: int, n_blocks: int,
                            block_size_q: int, chunk_size: int, num_chunks: int, scale: float, heads: int) -> dict:
    """The compact key layout of query blocks [first_block, first_block + n_blocks) of the call's queries.

    query [B, Hq, Lq, D] (the last Lq of k_len keys, as cached), reps [B, Hq, C, D] float32, row_start [B] (first real
    key of each row); heads: pattern heads (key/value heads for a shared selection, else query heads). Returns
    `chunk_layout`'s dict, each tensor [B, heads, n_blocks(, slots)].
    """
    batch, num_q_heads, q_len, dim = query.shape
    device = query.device
    q0, q1 = first_block * block_size_q, min((first_block + n_blocks) * block_size_q, q_len)
    q = torch.nn.functional.pad(query[:, :, q0:q1], (0, 0, 0, n_blocks * block_size_q - (q1 - q0)))
    first = (k_len - q_len + q0 + torch.arange(n_blocks, device=device) * block_size_q).expand(batch, n_blocks)
    last = (first + block_size_q).clamp(max=k_len) - 1
    pos = first.unsqueeze(-1) + torch.arange(block_size_q, device=device)  # [B, nQB, Bq]
    start = row_start.view(-1, 1, 1)
    live = (pos >= start) & (pos < k_len)
    geo = block_geometry(first, last, row_start, chunk_size, num_chunks)
    local_q = rotate(q.view(batch, num_q_heads, n_blocks, block_size_q, dim), -(pos - start).unsqueeze(1), inv_freq)
    ids, counts = select_chunks(local_q, reps, live, geo["local_lo"], geo["n_select"], num_chunks - 3, scale, heads)
    return chunk_layout(ids, counts, geo["local_lo"], geo["local_hi"], row_start, first, chunk_size, num_chunks)


def select_layout_triton(query, reps, row_start, inv_freq, k_len: int, first_block: int, n_blocks: int,
                         block_size_q: int, chunk_size: int, num_chunks: int, scale: float, heads: int,
                         block_m: int = SELECT_BLOCK_M, block_c: int | None = None,
                         num_warps: int | None = None) -> dict:
    """Same as the reference, in two Triton kernels (see the module docstring)."""
    import triton

    from .longheads_select_kernel import select_layout_kernel, select_scores_kernel
    from .triton_prefill import dot_precision

    batch, num_q_heads, q_len, dim = query.shape
    device = query.device
    rows, slots = batch * heads * n_blocks, num_chunks + 1
    group = num_q_heads // heads
    c_pad = chunk_pad(reps.shape[2])
    half_p2 = max(triton.next_power_of_2(dim // 2), 16)  # tl.dot needs 16 at least
    block_m = max(16, min(block_m, triton.next_power_of_2(block_size_q)))
    wide = dim >= 128  # a query tile of 128-dim rows: more warps (registers); best on an H200 at 128K (H200_RUNS.md)
    block_c, num_warps = block_c or 64, num_warps or (8 if wide else 4)
    tiles = triton.cdiv(block_size_q, block_m)
    scores = torch.empty(rows, group * tiles * c_pad, dtype=torch.float32, device=device)
    src = torch.empty(rows, slots, dtype=torch.int32, device=device)
    delta = torch.empty_like(src)
    kv_start = torch.empty(rows, dtype=torch.int32, device=device)
    q_offset = torch.empty_like(kv_start)
    start, lengths = row_start.to(torch.int32), (q_len, k_len, first_block, n_blocks, heads, chunk_size)
    with on_device(query):
        select_scores_kernel[(n_blocks, batch * heads, group * tiles)](
            query, reps, start, inv_freq.to(device=device, dtype=torch.float32), scores, *query.stride(),
            *reps.stride(), *lengths, scale, G=group, BQ=block_size_q, M=num_chunks, HALF=dim // 2, HALF_P2=half_p2,
            BLOCK_M=block_m, BLOCK_C=block_c, C_PAD=c_pad, PRECISION=dot_precision(query.dtype), num_warps=num_warps,
        )
        select_layout_kernel[(n_blocks, batch * heads)](
            start, scores, src, delta, kv_start, q_offset, *lengths, G=group, BQ=block_size_q, M=num_chunks,
            BLOCK_M=block_m, C_PAD=c_pad, F_PAD=triton.next_power_of_2(num_chunks), num_warps=4,
        )
    shape = (batch, heads, n_blocks)
    return {"src_start": src.view(*shape, slots), "delta": delta.view(*shape, slots), "kv_start": kv_start.view(shape),
            "q_offset": q_offset.view(shape)}


def select_layout(query, reps, row_start, inv_freq, first_block: int, n_blocks: int, **options) -> dict:
    """Dispatch: the Triton kernel for CUDA tensors (when triton is installed), the reference otherwise; each in rounds
    of query blocks whose scores stay within _SELECT_SCORES elements (every query's for the reference, every query
    tile's for the kernel)."""
    use_triton = HAS_TRITON and query.is_cuda
    run = select_layout_triton if use_triton else select_layout_reference
    batch, num_q_heads = query.shape[:2]
    block = options["block_size_q"]
    rows, width = (-(-block // SELECT_BLOCK_M), chunk_pad(reps.shape[2])) if use_triton else (block, reps.shape[2])
    per_round = max(1, _SELECT_SCORES // (batch * num_q_heads * rows * max(width, 1)))
    parts = [run(query, reps, row_start, inv_freq, first_block=j0, n_blocks=min(per_round, first_block + n_blocks - j0),
                 **options) for j0 in range(first_block, first_block + n_blocks, per_round)]
    return parts[0] if len(parts) == 1 else {name: torch.cat([p[name] for p in parts], dim=2) for name in parts[0]}
