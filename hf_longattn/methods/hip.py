"""`hip`: Hierarchical Attention Pruning (Lee et al., "HiP Attention", arXiv 2406.09827, ICLR version).

Each query block attends to an attention sink, a sliding window and the top-k key blocks that a hierarchical search
finds (kernels/hip_mask.py), in O(T log T) time and without any Lq x Lk tensor.

GQA: by default one selection is shared by the query heads of a key/value head (``shared_kv_heads=True``; a half is
scored by the max over the group's heads). The sparse kernel then loads every selected key block once per group
instead of once per query head, and the mask search runs once per kv head: with Llama-3-8B's 4 query heads per kv
head that is 4x fewer programs for the same work per program. ``shared_kv_heads=False`` selects per query head, as
the paper does for models without GQA.

Decode (a call with at most one query block): by default every step searches afresh for its own queries
(``refresh_interval=1``). A step then depends on nothing but its inputs: exact under beam search, static caches,
torch.compile and CUDA graphs. To make that affordable the decode search is sliced (``decode_slices``; see
hip_mask.py): independent searches per kv head, one short GPU program each whose rounds stay in registers, instead of
one chain of dependent rounds through memory. It searches ``decode_oversample`` times as many groups as it keeps, and
the last slice to finish keeps the best survivors of all slices: on SmolLM2 passkey prompts at 8K this kept more of
the exact attention than the paper's single beam (0.987 vs 0.980 on the default budget, 0.901 vs 0.867 on the
paper's). The paper refreshes the selection every few steps instead (preset "paper": every 8); reusing a selection
made for one answer token for the next ones lost answer digits on passkey prompts (" 247." for 24718), which is why
the default searches every step. With ``refresh_interval > 1`` the search lists ahead of time the key blocks that
will leave the sliding window before the next search, so no key visible at the search is dropped and a reused step
costs nothing but the attention; the state lives in `AttentionCall.state`, which the patcher empties whenever a call
does not continue the previous one. A static cache (``AttentionCall.q_offset``) always searches every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodConfig, non_negative, positive
from ..kernels import SparsePattern
from ..kernels.hip_mask import SCORES, SLICE_TILE_KEYS, default_slices, hip_mask, slice_layout, slice_tile_keys
from .base import SparseMethod

# Named settings. "paper": the paper's budget (512 selected tokens, a 256-token window) and its decode refresh (a search
# every 8 steps). "retrieval": a 4x larger budget searched at every decode step - the default, so that needle-style
# answers survive at 4K-8K on small models, where the paper budget loses most of them (README, HiP accuracy).
# decode_oversample: groups a decode search runs per block it keeps (kernels/hip_mask.py). At 8K on SmolLM2, 2x on the
# retrieval budget and 4x on the paper's kept more of the exact attention than the paper's single beam
# (benchmarks/results/hip_decode_recall_8k.md).
HIP_PRESETS = {
    "paper": {"k": 512, "window": 256, "refresh_interval": 8, "decode_oversample": 4},
    "retrieval": {"k": 2048, "window": 1024, "refresh_interval": 1, "decode_oversample": 2},
}
DEFAULT_PRESET = "retrieval"


@dataclass
class HipConfig(MethodConfig):
    # A name from HIP_PRESETS; `k`, `window` and `refresh_interval` given explicitly override it.
    preset: str = DEFAULT_PRESET
    # Tokens selected per query block (k / block_size_k key blocks), beyond sink and window.
    k: int | None = None
    # The budget of prefill calls (more queries than one block), where it differs from decode's; None: k (window
    # likewise).
    prefill_k: int | None = None
    prefill_window: int | None = None
    # Queries that share one selection, and every query_stride-th of them scores the candidate blocks. Blocks of 128
    # scored by every 4th query score as many queries as blocks of 64 by every 2nd (the earlier default) in half the
    # searches: a 128K prompt's search takes half the time, finding dense's passkeys on 165 prompts (blocks of 64 found
    # one more) for 0.01-0.04 points of prompt recall, 0.2-0.3 at the paper's budget
    # (benchmarks/results/hip_query_blocks_h200/, hip_prefill_recall.md).
    block_size_q: int = 128
    block_size_k: int = 2
    query_stride: int = 4
    window: int | None = None
    sink: int = 16
    # Decode steps between two searches; 1 searches at every step (stateless).
    refresh_interval: int | None = None
    # A decode search (one query block) runs as this many independent slices of its groups (hip_mask.py), one GPU
    # program each. None: slices of 16 groups (64 for the paper budget, 128 for retrieval; fewer groups when their
    # halves would not fit one program's tile); 1 is the paper's single beam, whose dependent rounds then run in one
    # program per kv head.
    decode_slices: int | None = None
    # A decode search splits the candidates into decode_oversample x k / block_size_k groups, and the best k /
    # block_size_k survivors of all slices are kept: slices then share the budget by merit, not in equal parts.
    decode_oversample: int | None = None
    shared_kv_heads: bool = True
    # How a half is ranked: "probability" = max over the scored queries of the softmax probability the key would get
    # (logit minus an estimate of the query's log-sum-exp; see kernels/hip_mask.py); "logit" = the paper's raw q.k.
    score: str = "probability"

    def validate(self):
        if self.preset not in HIP_PRESETS:
            raise ConfigError(f"preset={self.preset!r} is unknown; choose one of {', '.join(HIP_PRESETS)}")
        for name, value in HIP_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.prefill_k = self.k if self.prefill_k is None else self.prefill_k
        self.prefill_window = self.window if self.prefill_window is None else self.prefill_window
        positive(self, "k", "prefill_k", "block_size_q", "block_size_k", "query_stride", "refresh_interval")
        non_negative(self, "window", "prefill_window", "sink")
        for name in ("k", "prefill_k"):
            if getattr(self, name) % self.block_size_k:
                fixed = max(self.block_size_k, getattr(self, name) // self.block_size_k * self.block_size_k)
                raise ConfigError(
                    f"{name}={getattr(self, name)} must be a multiple of block_size_k={self.block_size_k} ({name} "
                    f"counts whole key blocks); use {name}={fixed}"
                )
        if self.query_stride > self.block_size_q:
            raise ConfigError(
                f"query_stride={self.query_stride} skips past the whole query block (block_size_q="
                f"{self.block_size_q}); use a stride <= block_size_q"
            )
        positive(self, "decode_oversample")
        n_sel = self.k // self.block_size_k * self.decode_oversample  # groups of a decode search
        if self.decode_slices is None:
            self.decode_slices = default_slices(n_sel, self.block_size_k)
        positive(self, "decode_slices")
        sliced = slice_layout(n_sel, self.decode_slices)[1] > 1 or self.decode_oversample > 1
        if sliced and slice_tile_keys(n_sel, self.decode_slices, self.block_size_k) > SLICE_TILE_KEYS:
            fits = next((s for s in range(self.decode_slices, n_sel + 1)
                         if slice_tile_keys(n_sel, s, self.block_size_k) <= SLICE_TILE_KEYS), None)
            raise ConfigError(f"decode_slices={self.decode_slices} gives each slice more groups than one program "
                              f"scores at once (k={self.k}, block_size_k={self.block_size_k}, decode_oversample="
                              f"{self.decode_oversample}); use " + (f"decode_slices={fits} or more, or " if fits else "")
                              + "decode_slices=1 with decode_oversample=1 (one beam)")
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r} is unknown; choose one of {', '.join(SCORES)}")
        if not isinstance(self.shared_kv_heads, bool):
            raise ConfigError(f"shared_kv_heads={self.shared_kv_heads!r} must be True or False")

    def search_options(self, decoding: bool) -> dict:
        """hip_mask's options for a decode step or a prefill call (each with its budget; slices only in decode)."""
        return dict(k=self.k if decoding else self.prefill_k, block_size_q=self.block_size_q,
                    block_size_k=self.block_size_k, query_stride=self.query_stride, sink=self.sink,
                    window=self.window if decoding else self.prefill_window, shared_kv_heads=self.shared_kv_heads,
                    score=self.score, slices=self.decode_slices if decoding else 1,
                    oversample=self.decode_oversample if decoding else 1)


class Hip(SparseMethod):
    name = "hip"
    Config = HipConfig
    supports_query_offset = True

    def select(self, query: torch.Tensor, key: torch.Tensor, call) -> SparsePattern:
        c = self.config
        q_len, k_len = query.shape[2], key.shape[2]
        decoding = q_len <= c.block_size_q
        reuse = decoding and c.refresh_interval > 1
        if reuse and call.q_offset is not None:
            from ..attention import warn_once

            if not torch.compiler.is_compiling():
                warn_once("hf_longattn: hip's refresh_interval > 1 keeps a selection across steps, which a static "
                          "cache (fixed key length, torch.compile) cannot follow; hip searches at every decode step "
                          "there.")
            reuse = False
        state = call.state.get("hip") if reuse else None
        if (state is not None and state["batch"] == query.shape[0] and state["age"] + 1 < c.refresh_interval
                and k_len <= state["covers"]):
            state["age"] += 1
            return state["pattern"]

        pattern = hip_mask(query, key, **c.search_options(decoding), kv_start=call.kv_start, scale=call.scale,
                           softcap=call.softcap, q_offset=call.q_offset)
        if reuse:
            # Steps until the next search add about q_len keys each; list now the blocks they push out of the window.
            covers = k_len + (c.refresh_interval - 1) * q_len
            pattern = self._with_blocks_leaving_window(pattern, k_len, covers)
            call.state["hip"] = {"pattern": pattern, "covers": covers, "age": 0, "batch": query.shape[0]}
        elif c.refresh_interval > 1:
            call.state.pop("hip", None)
        return pattern

    def _window_start_block(self, k_len: int) -> int:
        """End of the candidate blocks of the last query (candidate_block_range's hi, without the per-row sink)."""
        c = self.config
        return -(-max(k_len - c.window, 0) // c.block_size_k)

    def _with_blocks_leaving_window(self, pattern: SparsePattern, k_len: int, covers: int) -> SparsePattern:
        """The selection plus the key blocks that leave the sliding window while the key length grows to `covers`.

        Until the next search the same pattern then serves every step (no per-step work, and a fixed shape for CUDA
        graphs): a listed block still inside the window or past the query counts once, as the pattern contract
        says, so listing it early changes nothing, and no key visible at the search is ever dropped.
        """
        first_new = self._window_start_block(k_len)
        n_new = self._window_start_block(covers) - first_new
        if n_new <= 0:
            return pattern
        counts = pattern.block_counts.unsqueeze(-1)  # [B, H, 1, 1]
        slot = torch.arange(pattern.max_blocks + n_new, device=counts.device)
        padded = torch.nn.functional.pad(pattern.block_indices, (0, n_new))
        ids = torch.where(slot < counts, padded, first_new + slot - counts)
        new_counts = pattern.block_counts + n_new
        ids = torch.where(slot < new_counts.unsqueeze(-1), ids, 0).to(torch.int32)
        return SparsePattern(ids, new_counts.to(torch.int32), pattern.block_size_q, pattern.block_size_k,
                             pattern.sink_tokens, pattern.window_tokens)
