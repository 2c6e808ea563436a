"""`dhsa`: Dynamic Hierarchical Sparse Attention (Xiong et al., "Long-Context Modeling with Dynamic Hierarchical Sparse
Attention for On-Device LLMs", 2025), training-free.

The keys are cut into variable-length chunks where adjacent key blocks stop resembling each other; each chunk is
represented by its mean key times sqrt(its length); a query block scores the chunks with its summed query, the
scores are spread to the chunks' key blocks, and the block keeps the top ``budget`` tokens, plus an attention sink and
a sliding window (kernels/dhsa_chunks.py, kernels/dhsa_select.py). Never an Lq x Lk tensor; the score table is
(query blocks x key blocks), built a few query blocks at a time.

Departures from the paper, and why:
* Chunk boundaries come from a rule, not the paper's trained boundary predictor (no weights to ship or train): the
  largest 1 - cosine between adjacent key blocks' summed keys within ``chunk_size / (2 block_size_k)`` blocks either
  side (non-maximum suppression), above ``threshold``, with chunks split at ``max_chunk``. The rule is local, so
  decode extends the chunks instead of re-cutting them, and a chunk count falls out of the suppression radius
  (chunks of about chunk_size + block_size_k tokens on SmolLM2) instead of being fixed at L / chunk_size in advance.
* Boundaries lie on the key-block grid of the sparse kernel (``block_size_k`` tokens), so a selected chunk is whole
  key blocks and the budget counts blocks, not single tokens; the paper gathers single tokens.
* The sink and the sliding window are per query (the kernel's regions), where the reference keeps the first 128 and
  the last 128 tokens of each query block; a token is never counted twice.
* One selection per key/value head by default (``shared_kv_heads``), per query head as an option; the reference shares
  one selection across all heads. The reference attends densely from its last 64 "instruction" queries; here every
  query block is sparse (use ``dense_layers`` / ``min_seq_len`` for dense parts).
* Decode, which the reference lacks: each step the new queries score the chunks and keep the best plus the window.
  The chunks closed at the last prefill are kept in `AttentionCall.state`; a step re-chunks only the keys from the
  oldest open chunk on (the prompt's end and the tokens generated since), with the same result as chunking the whole
  cache from scratch. Nothing in the state depends on what a row generated, so beam search, which reorders the
  cache rows between steps, stays exact (all rows of a beam group share the prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodConfig, non_negative, positive
from ..kernels import SparsePattern
from ..kernels.dhsa_chunks import Chunking
from ..kernels.dhsa_select import dhsa_select
from .base import SparseMethod

# Named budgets; options given explicitly override them.
DHSA_PRESETS = {
    # HiP's default (retrieval) budget: 16 sink + 1024 window + 2048 selected tokens. At the small budget below, DHSA
    # found 3 of 55 passkeys in SmolLM2's 2K prompts where dense found 24 (benchmarks/results/methods_quality_h200).
    "default": {"budget": 2048, "window": 1024, "sink": 16, "block_size_q": 64},
    # The project's small common budget (hip's paper preset, blocktopk's default): 16 sink + 256 window + 512 tokens.
    "small": {"budget": 512, "window": 256, "sink": 16, "block_size_q": 64},
    # The DHSA repository's needle-in-a-haystack setting: 1024 tokens per 128-query block, 128 of them the first
    # tokens and 128 the most recent.
    "paper": {"budget": 768, "window": 128, "sink": 128, "block_size_q": 128},
}
CHUNKINGS = ("adaptive", "fixed")


@dataclass
class DhsaConfig(MethodConfig):
    # A name from DHSA_PRESETS; budget, window, sink and block_size_q given explicitly override it.
    preset: str = "default"
    # Tokens selected per query block beyond sink and window: budget / block_size_k whole key blocks.
    budget: int | None = None
    block_size_q: int | None = None
    # The key-block grid that chunk boundaries lie on (the sparse kernel's key blocks).
    block_size_k: int = 32
    # "adaptive": boundaries where adjacent key blocks differ most; "fixed": chunks of exactly chunk_size tokens.
    chunking: str = "adaptive"
    # Fixed: the chunk length. Adaptive: sets the suppression radius, chunk_size / (2 block_size_k) blocks.
    chunk_size: int = 128
    # Adaptive chunks are split when they reach this length.
    max_chunk: int = 512
    # Adaptive: a boundary needs 1 - cosine (between adjacent key blocks' summed keys) above this.
    threshold: float = 0.0
    window: int | None = None
    sink: int | None = None
    shared_kv_heads: bool = True

    def validate(self):
        if self.preset not in DHSA_PRESETS:
            raise ConfigError(f"preset={self.preset!r} is unknown; choose one of {', '.join(DHSA_PRESETS)}")
        for name, value in DHSA_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive(self, "block_size_q", "block_size_k", "chunk_size", "max_chunk")
        non_negative(self, "budget", "window", "sink")
        bk = self.block_size_k
        for name in ("budget", "chunk_size", "max_chunk"):
            value = getattr(self, name)
            if value % bk:
                fixed = max(bk, value // bk * bk)
                raise ConfigError(f"{name}={value} must be a multiple of block_size_k={bk} (chunks and the budget are "
                                  f"whole key blocks); use {name}={fixed}")
        if self.chunking not in CHUNKINGS:
            raise ConfigError(f"chunking={self.chunking!r} is unknown; choose one of {', '.join(CHUNKINGS)}")
        if self.chunking == "adaptive" and self.max_chunk < self.chunk_size:
            raise ConfigError(f"max_chunk={self.max_chunk} is shorter than chunk_size={self.chunk_size}; "
                              f"use max_chunk >= {self.chunk_size}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold < 2:
            raise ConfigError(f"threshold={self.threshold!r} must be a number in [0, 2) (1 - cosine lies in [0, 2])")
        if not isinstance(self.shared_kv_heads, bool):
            raise ConfigError(f"shared_kv_heads={self.shared_kv_heads!r} must be True or False")

    def chunker(self) -> Chunking:
        bk = self.block_size_k
        if self.chunking == "fixed":
            return Chunking(bk, radius=0, threshold=math.inf, max_blocks=self.chunk_size // bk)
        return Chunking(bk, radius=self.chunk_size // (2 * bk), threshold=float(self.threshold),
                        max_blocks=self.max_chunk // bk)


class Dhsa(SparseMethod):
    name = "dhsa"
    traces_padded_rows = False  # row starts are read on the host (see SparseMethod)
    Config = DhsaConfig

    def __init__(self, config: DhsaConfig):
        super().__init__(config)
        self.chunking = config.chunker()

    def select(self, query: torch.Tensor, key: torch.Tensor, call) -> SparsePattern:
        c = self.config
        state = call.state.get("dhsa")
        # A decode step (at most one query block) extends the chunks kept from the last prefill of this sequence.
        decoding = query.shape[2] <= c.block_size_q and state is not None and state["batch"] == query.shape[0]
        pattern, prefix = dhsa_select(
            query, key, budget=c.budget, block_size_q=c.block_size_q, chunking=self.chunking, sink=c.sink,
            window=c.window, shared_kv_heads=c.shared_kv_heads, kv_start=call.kv_start,
            prefix=state["prefix"] if decoding else None,
        )
        if not decoding:
            call.state["dhsa"] = {"prefix": prefix, "batch": query.shape[0]}
        return pattern
