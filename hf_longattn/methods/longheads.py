"""`longheads`: LongHeads (Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor", arXiv
2402.10685), a training-free way to read contexts longer than the model was trained on.

Every head attends to at most ``cap`` tokens (default: the model's trained context, at most 4096), in chunks of
``chunk_size``: the first chunk, the chunks its query block picks by query . chunk representative, and the query's own
and previous chunks. The picked chunks are moved next to the local ones, so that no query-key distance exceeds the
cap and every head stays inside the positions it was trained on, while different heads (and layers) read different
parts of a much longer context. The selection, the representatives and the layout are in kernels/longheads_chunks.py.

How positions move: the cache holds keys already rotated at their positions. The query stays where it is; each
selected far chunk (and the first chunk) is copied, with its values, into a compact key sequence per (row, head,
query block) and its keys are turned by RoPE(new position - old position), which equals rotating them at the new
position from scratch (hf_longattn/rope.py says which RoPE variants allow that; the others are refused). The compact
sequences then go through the shared sparse kernel with a window that covers them (kernels/longheads_gather.py copies
and turns in one pass). A context that fits in the cap moves nothing: it runs as exact dense attention.

Departures from the paper, and why:
- Selection per query block (``block_size_q`` queries) instead of per query, with the query heads of a key/value head
  sharing it (``shared_kv_heads``; the paper's Llama 2 has no GQA): one compact key sequence then serves a whole
  block and group, which is what makes it fast. A block keeps, per chunk, the best softmax probability its queries and
  heads give it. Decode steps select per token, as the paper does.
- The query's own key is visible (the reference code leaves it out); its own chunk is read causally.
- A block that straddles a chunk boundary keeps three local chunks and selects one chunk fewer.

Decode: a step (one query) runs as one launch on the GPU (kernels/longheads_decode.py: selection, re-placement by
turning the query instead of copying and turning the keys, attention and merge). Representatives are computed once,
when a chunk completes, from the queries of its tokens; the last ``chunk_size`` queries are kept in
`AttentionCall.state` for that (emptied by a new sequence). Beam search reorders the cache rows between steps: the
state follows by matching each row's newest keys to the rows it saw. Chunks whose queries were never seen (the state
was lost, e.g. a cache rolled back by assisted decoding) are represented with their keys standing in for their
queries, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodConfig, positive
from ..kernels import dense_attention, sparse_attention, window_pattern
from ..kernels.longheads_chunks import LOCAL_SLOTS, chunk_representatives, select_layout
from ..kernels.longheads_decode import longheads_decode
from ..kernels.longheads_gather import gather_rotate
from ..rope import check_rope, layer_inv_freq
from .base import SparseMethod

# The paper's attention length; the default cap is the model's trained context, at most this.
MAX_DEFAULT_CAP = 4096
# A block of 256 queries (a chunk) prefills faster than 128 (half the blocks: half the copies and reads) and found
# nearly as many passkeys (README: the same at 4K, 8K and 32K, one fewer of 55 at 16K). A block that straddles a chunk
# boundary (every block of a left-padded row, when the padding is not a whole chunk) keeps three local chunks and
# selects one fewer.
DEFAULT_BLOCK_SIZE_Q = 256
# Elements of the largest intermediate tensors of one round (compact keys, in-chunk attention), per device type: a
# GPU wants rounds large enough to fill it, a CPU small enough to stay in memory.
_ROUND_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 24}
# Newest keys per row remembered to recognise rows that beam search reordered.
_ROW_MARK_KEYS = 16


def check_cap(cap: int, chunk_size: int) -> None:
    if cap % chunk_size:
        raise ConfigError(f"cap={cap} must be a whole number of chunks of chunk_size={chunk_size}; "
                          f"use cap={max(cap // chunk_size, 4) * chunk_size}")
    if cap < 4 * chunk_size:
        raise ConfigError(f"cap={cap} holds {cap // chunk_size} chunks of {chunk_size}; it needs at least 4 (the first, "
                          f"one selected, the previous and the own chunk): use cap={4 * chunk_size} or a smaller "
                          "chunk_size")


@dataclass
class LongHeadsConfig(MethodConfig):
    # Tokens per chunk (the paper's 256).
    chunk_size: int = 256
    # Tokens each head attends to at most, a multiple of chunk_size; None: the model's trained context
    # (max_position_embeddings), at most 4096, the paper's attention length.
    cap: int | None = None
    # Queries that share one selection in prefill, at most chunk_size; None: 256 or chunk_size if smaller. Decode
    # selects per token.
    block_size_q: int | None = None
    # One selection per key/value head for its GQA group; False selects per query head (the paper, without GQA).
    shared_kv_heads: bool = True

    def validate(self):
        positive(self, "chunk_size")
        if self.block_size_q is None:
            self.block_size_q = min(DEFAULT_BLOCK_SIZE_Q, self.chunk_size)
        positive(self, "block_size_q")
        if self.cap is not None:
            positive(self, "cap")
            check_cap(self.cap, self.chunk_size)
        if self.block_size_q > self.chunk_size:
            raise ConfigError(f"block_size_q={self.block_size_q} is larger than chunk_size={self.chunk_size}: a query "
                              f"block must fit in two chunks; use block_size_q <= {self.chunk_size}")
        if not isinstance(self.shared_kv_heads, bool):
            raise ConfigError(f"shared_kv_heads={self.shared_kv_heads!r} must be True or False")
        if self.min_seq_len:
            raise ConfigError(
                f"min_seq_len={self.min_seq_len}: longheads is already exact dense attention up to `cap` tokens, and "
                "it builds each chunk's representative from the queries of the calls it sees, which min_seq_len would "
                "hide; leave min_seq_len=0")


@dataclass
class ChunkState:
    """What one layer remembers across the calls of one sequence."""

    starts: list[int]  # each row's first real key (left padding), read once per sequence...
    row_start: torch.Tensor  # ...and the same as an int32 [B] tensor on the device
    done: list[int]  # chunks of each row that have a representative
    reps: torch.Tensor  # [B, Hq, C, D] float32 representatives (chunk-local frame)
    ring: torch.Tensor  # [B, Hq, chunk_size, D]: the query at position p sits in slot p % chunk_size, for the
    ring_end: int  # chunk_size positions before ring_end...
    seen_from: int  # ...that are not before the first position whose query this state saw
    marks: torch.Tensor | None  # [B, Hkv, n, D]: each row's newest keys, to follow rows that beam search reorders
    marks_end: int


def _round_elements(device: torch.device) -> int:
    return _ROUND_ELEMENTS.get(device.type, _ROUND_ELEMENTS["cpu"])


def default_cap(config, chunk_size: int) -> int:
    trained = getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_CAP
    cap = min(trained, MAX_DEFAULT_CAP) // chunk_size * chunk_size
    if cap < 4 * chunk_size:
        raise ConfigError(f"the model's trained context ({trained} tokens) holds fewer than 4 chunks of "
                          f"chunk_size={chunk_size}; use a smaller chunk_size")
    return cap


class LongHeads(SparseMethod):
    name = "longheads"
    traceable = False  # per-sequence state and row starts live on the host (see SparseMethod)
    Config = LongHeadsConfig
    # Runs past the model's trained context by design (the eval CLI and the server's context limit read this).
    extends_context = True

    def __init__(self, config: LongHeadsConfig):
        super().__init__(config)
        self._layers: dict = {}

    @staticmethod
    def check_model_config(config) -> None:
        """Raise (naming the fix) for a model whose RoPE this method cannot honour, before the model is loaded."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_rope(text)

    def layer(self, call, device) -> tuple[torch.Tensor, int]:
        """(the layer's RoPE inv_freq on `device`, the cap), read once per layer from the module's config."""
        cached = self._layers.get((call.layer_idx, device))
        if cached is None:
            config = getattr(call.module, "config", None)
            if config is None:
                raise RuntimeError("longheads needs the attention module's config (its RoPE) in AttentionCall.module; "
                                   "transformers passes it when the model is patched with patch_model")
            cap = self.config.cap or default_cap(config, self.config.chunk_size)
            cached = self._layers[(call.layer_idx, device)] = (layer_inv_freq(config, call.layer_idx).to(device), cap)
        return cached

    def attend(self, query, key, value, call):
        inv_freq, cap = self.layer(call, query.device)
        state = self.update_state(query, key, value, call, inv_freq)
        if key.shape[2] - min(state.starts) <= cap:  # every query's context fits: nothing moves
            return dense_attention(query, key, value, call.scale, call.softcap, kv_start=call.kv_start)
        if query.shape[2] == 1:  # a decode step: one launch on the GPU (kernels/longheads_decode.py)
            c = self.config
            return longheads_decode(query, key, value, state.reps, state.row_start, inv_freq, chunk_size=c.chunk_size,
                                    num_chunks=cap // c.chunk_size, scale=call.scale, softcap=call.softcap,
                                    heads=key.shape[1] if c.shared_kv_heads else query.shape[1])
        return self.attend_selected(query, key, value, call, state, inv_freq, cap)

    # --- chunk representatives and the decode state ------------------------------------------------------------

    def update_state(self, query, key, value, call, inv_freq) -> ChunkState:
        """Bring the layer's representatives up to every chunk completed by this call's keys."""
        batch, num_q_heads, q_len, dim = query.shape
        k_len, size = key.shape[2], self.config.chunk_size
        first_query = k_len - q_len
        state = call.state.get("longheads")
        if state is None or len(state.starts) != batch:
            starts = [0] * batch if call.kv_start is None else [int(s) for s in call.kv_start.tolist()]
            state = ChunkState(
                starts, torch.tensor(starts, dtype=torch.int32, device=query.device), [0] * batch,
                reps=query.new_zeros(batch, num_q_heads, 0, dim, dtype=torch.float32),
                ring=query.new_zeros(batch, num_q_heads, size, dim), ring_end=first_query, seen_from=first_query,
                marks=None, marks_end=0)
            call.state["longheads"] = state
        elif batch > 1 and state.marks is not None:
            self._follow_reordered_rows(state, key)
        if state.ring_end != first_query:  # this call does not continue the queries the ring holds
            state.seen_from = first_query

        total = [max(k_len - s, 0) // size for s in state.starts]
        if total != state.done:
            self._add_representatives(state, query, key, value, total, call, inv_freq)
            state.done = total
        tail = min(q_len, size)  # the newest queries go into the ring at their positions (two slices if it wraps)
        first_slot = (k_len - tail) % size
        split = min(tail, size - first_slot)
        state.ring[:, :, first_slot:first_slot + split] = query[:, :, q_len - tail:q_len - tail + split]
        if tail > split:
            state.ring[:, :, : tail - split] = query[:, :, q_len - tail + split:]
        state.ring_end = k_len
        if batch > 1:
            state.marks, state.marks_end = key[:, :, max(k_len - _ROW_MARK_KEYS, 0):].clone(), k_len
        return state

    def _add_representatives(self, state, query, key, value, total, call, inv_freq):
        """Representatives of each row's chunks from state.done to total, in rounds of bounded size. A row's chunks
        are contiguous: their keys, values and this call's queries are read as views, not copied."""
        size = self.config.chunk_size
        num_q_heads, q_len = query.shape[1], query.shape[2]
        first_query = key.shape[2] - q_len
        known_from = max(state.seen_from, first_query - size)  # queries of earlier positions are not known
        if max(total) > state.reps.shape[2]:
            grow = max(max(total), 2 * state.reps.shape[2]) - state.reps.shape[2]
            state.reps = torch.nn.functional.pad(state.reps, (0, 0, 0, grow))
        if any(s + d * size < known_from for s, d, t in zip(state.starts, state.done, total) if t > d):
            from ..attention import warn_once

            warn_once("hf_longattn: longheads did not see the queries of some chunks (the layer's state was lost, "
                      "e.g. by a cache rolled back); their representatives use the chunk's keys as queries")
        per_round = max(1, _round_elements(query.device) // (num_q_heads * size * max(size, query.shape[3])))
        for b, (start, done, end) in enumerate(zip(state.starts, state.done, total)):
            for c0 in range(done, end, per_round):
                c1 = min(c0 + per_round, end)
                p0, p1 = start + c0 * size, start + c1 * size
                unseen_end = min(max(p0, start + -(-(known_from - start) // size) * size), p1)  # whole chunks
                q = self._queries(state, query, key, b, p0, p1, first_query, unseen_end)
                k, v = key[b, :, p0:p1], value[b, :, p0:p1]
                chunked = [x.unflatten(1, (c1 - c0, size)).transpose(0, 1) for x in (q, k, v)]  # [n, H, L, D]
                chunk_index = torch.arange(c0, c1, device=query.device)
                state.reps[b, :, c0:c1] = chunk_representatives(*chunked, chunk_index, size, inv_freq, call.scale,
                                                                call.softcap).transpose(0, 1)

    @staticmethod
    def _queries(state, query, key, b, p0: int, p1: int, first_query: int, unseen_end: int) -> torch.Tensor:
        """[Hq, p1 - p0, D]: the queries of row b's chunks at positions p0..p1. Chunks before unseen_end have keys
        standing in for their queries (the state never saw them); then queries of earlier calls come from the ring of
        the last chunk_size queries, and this call's are a view."""
        parts, size = [], state.ring.shape[2]
        if unseen_end > p0:
            group = query.shape[1] // key.shape[1]
            parts.append(key[b, :, p0:unseen_end].repeat_interleave(group, dim=0).to(query.dtype))
        ring_from = max(p0, unseen_end)
        if ring_from < first_query:
            parts.append(state.ring[b][:, torch.arange(ring_from, min(p1, first_query), device=query.device) % size])
        query_from = max(ring_from, first_query)
        if query_from < p1:
            parts.append(query[b, :, query_from - first_query: p1 - first_query])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def _follow_reordered_rows(state: ChunkState, key: torch.Tensor) -> None:
        """Beam search reorders the cache rows between steps: give each row the state of the row it now continues,
        the one whose newest keys it holds (on device, without a sync)."""
        marks = state.marks
        now = key[:, :, state.marks_end - marks.shape[2]: state.marks_end]
        if now.shape != marks.shape:
            return
        source = torch.cdist(now.flatten(1).float(), marks.flatten(1).float()).argmin(1)
        state.reps, state.ring = state.reps[source], state.ring[source]

    # --- attention over the selected, re-placed chunks ----------------------------------------------------------

    def attend_selected(self, query, key, value, call, state: ChunkState, inv_freq, cap) -> torch.Tensor:
        """query [B, Hq, Lq, D] (the last Lq of the keys), key/value [B, Hkv, Lk, D] -> out [B, Lq, Hq, D]."""
        c = self.config
        size, num_chunks = c.chunk_size, cap // c.chunk_size
        batch, num_q_heads, q_len, dim = query.shape
        k_len, device = key.shape[2], query.device
        heads = key.shape[1] if c.shared_kv_heads else num_q_heads
        block = c.block_size_q  # also for a shorter call, padded: a block size per call length would recompile kernels
        n_blocks = -(-q_len // block)
        slots = num_chunks - 2 + LOCAL_SLOTS  # far chunks, then the local region
        per_round = max(1, _round_elements(device) // (heads * slots * size * dim))  # compact keys of a round

        layout = select_layout(query, state.reps, state.row_start, inv_freq, k_len=k_len, first_block=0,
                               n_blocks=n_blocks, block_size_q=block, chunk_size=size, num_chunks=num_chunks,
                               scale=call.scale, heads=heads)
        # A round runs the query blocks j0 .. j0 + nb of one row as a batch of nb entries, each with its compact
        # sequences as heads: the kernel reads the queries and writes the output where they are in transformers'
        # [B, L, Hq, D] memory.
        queries = _blocked_queries(query, n_blocks * block)
        out = query.new_empty(batch, n_blocks * block, num_q_heads, dim)
        for b in range(batch):
            for j0 in range(0, n_blocks, per_round):
                nb = min(per_round, n_blocks - j0)
                part = {name: t[b:b + 1, :, j0:j0 + nb] for name, t in layout.items()}
                keys, values = gather_rotate(key[b:b + 1], value[b:b + 1], part["src_start"], part["delta"], size,
                                             inv_freq)
                rows = slice(j0 * block, (j0 + nb) * block)
                q_rows = queries[b, rows].view(nb, block, num_q_heads, dim).transpose(1, 2)
                pattern = window_pattern(nb, heads, block, block, size, 0, slots * size, device)  # covers each sequence
                # The far chunks, hence where each sequence starts, are the same for every head of a block
                # (longheads_chunks.chunk_layout): head 0's serve the whole block. (A head whose queries are not
                # finite could keep fewer; the block's output is not finite then anyway.)
                sparse_attention(q_rows, keys, values, pattern, scale=call.scale, softcap=call.softcap,
                                 kv_start=part["kv_start"][0, 0], q_offset=part["q_offset"][0, 0],
                                 out=out[b, rows].view(nb, block, num_q_heads, dim))
        out = out[:, :q_len]
        if call.kv_start is not None and q_len > 1:  # queries on left padding see no key: 0, as dense gives
            positions = torch.arange(k_len - q_len, k_len, device=device)
            out = out.masked_fill((positions < state.row_start.view(-1, 1)).view(batch, q_len, 1, 1), 0)
        return out


def _blocked_queries(query: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length, Hq, D]: the queries in transformers' memory order, padded with zeros to `length` rows; a view of
    query when it already is that (a prefill of whole blocks from a model), else one copy."""
    batch, num_q_heads, q_len, dim = query.shape
    rows = query.transpose(1, 2)
    if q_len == length and rows.is_contiguous():
        return rows
    padded = query.new_empty(batch, length, num_q_heads, dim)
    padded[:, :q_len] = rows
    padded[:, q_len:] = 0
    return padded


__all__ = ["LongHeads", "LongHeadsConfig"]
