"""`hyper`: HyperAttention (Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024,
arXiv 2310.05869), causal, on the shared sparse kernel.

The causal recursion (kernels/hyper_layout.py) splits the sequence in halves until a half is shorter than
``min_seq_len``; those leaves are attended exactly, and each off-diagonal pair (the right half's queries against the
left half's keys, all in their past) by the unmasked algorithm: queries and keys hashed by angular LSH (``hash_bits``
hyperplanes, buckets in Gray-code order), sorted by bucket within the pair, each block of ``block_size`` sorted
queries attending exactly to the same block of sorted keys, plus a sample of ``sample_size`` keys of the pair,
importance-weighted, for the rest. The first ``sink`` keys (attention sinks) are attended exactly by every query
and take no part in the pairs. The parts are merged through their log-sum-exp. Every part runs on the shared
kernel (`sparse_attention`): leaves as a block pattern, and per level of the recursion one call for all block
diagonals (queries and keys gathered into sorted order, query block j -> key block j, ``q_offset`` past the keys so
that nothing is causally masked) and one for all samples (one-token key blocks).

Stages a benchmark can time one by one (benchmarks/bench_hyper.py): `Hyper.buckets` (hashing), `level_layout` and
`Hyper.sorted_inputs` (sorting, gathering; `level_geometry` is shape-only and cached), `Hyper.leaves`,
`Hyper.block_diagonal`, `Hyper.residual`, `Hyper.merge_level` (kernels/hyper_merge.py).

What this version adds to the paper: the attention sink. LLMs put a large share of attention on the first token
(SmolLM2-135M: 17-53% of the mass of queries 4096-8191 in layers 15-29 of an 8K essay window). A uniform sample
catches that one key with probability 1 / stride and then weighs it by the stride: on those layers the paper's
algorithm (``sink=0``) has a relative error of 0.29-1.52 on the attention output, ``sink=16`` of 0.01-0.14 (CPU,
defaults otherwise, layers 15/20/25/29). Layers without a sink are unchanged (0.05-0.10 either way, layers 2/10).
On the same window the sorted block holds 6.2-7.3% of a pair's attention, a random block of its size 6.3%: angular
LSH of raw queries and keys finds no heavy entries in this model, whose quality rests on the exact leaves, the sink
and the unbiased sample (benchmarks/results/hyper_study/).

What this version fixes or changes in the reference implementation (insuhan/hyper-attn):
* Sampled keys inside a query's own block were counted twice on GPUs (block part + residual): they are excluded.
* No seed (global RNG): projections and samples are functions of ``seed`` and the layer index (see `sampled_pattern`
  for what else fixes the sample), the same on every run and device.
* The Gray-code map sorted buckets by the Gray code of their bit pattern, not by their rank in the Gray sequence, so
  neighbours in the sorted order could differ in two bits (kernels/hyper_lsh.py).
* GQA: queries are hashed per query head, keys per kv head; the kernel serves a GQA group in one program.
* Left padding: padding keys never enter a part, padding queries take no slot (the kernels' ``kv_start``).
* The sample is stratified (one uniform draw per stratum of each pair's sorted keys): every key has the same
  inclusion probability, hence the same unbiased weight as the paper's uniform sample, with distinct draws.
* The recursion splits at block boundaries (the reference pads odd halves with zero rows and blocks with zero keys,
  which then take attention mass); a shorter right half's queries spread over the left half's blocks by quantile.
* Decode and calls whose queries do not start on a block boundary (speculative steps) run exact dense attention over
  the cache: sortLSH blocks need a block of queries, and one query against the cache is linear already. Chunked
  prefill (queries starting on a block boundary) runs the recursion over the whole cache for the new queries.
* Layers: the paper patches the last layers of the model; ``last_layers`` (default: the last half) says how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodConfig, non_negative, positive
from ..kernels import dense_attention, sparse_attention
from ..kernels.hyper_layout import (
    LevelLayout, block_diagonal_pattern, causal_tree, leaf_pattern, level_geometry, level_layout, sampled_pattern,
)
from ..kernels.hyper_lsh import lsh_buckets, lsh_projections
from ..kernels.hyper_merge import merge_level
from .base import AttentionCall, SparseMethod

LAYER_CHOICES = ("half", "all")


@dataclass
class HyperConfig(MethodConfig):
    # Below this key length attention is exact; the recursion's halves shorter than this are attended exactly, so
    # contexts up to about twice this are exact too (as in the reference). A multiple of block_size.
    min_seq_len: int = 4096
    # Sorted queries and keys per block of the block-diagonal part.
    block_size: int = 256
    # Sampled keys per off-diagonal pair for the residual (0: no residual).
    sample_size: int = 256
    # Hyperplanes of the angular LSH (2**hash_bits buckets).
    hash_bits: int = 7
    # The first keys of the sequence, attended exactly by every query (attention sinks); 0 = the paper's algorithm.
    sink: int = 16
    # Which layers use HyperAttention: "half" (the last half, as the paper's perplexity study), "all", or the last n.
    last_layers: int | str = "half"
    seed: int = 0

    def validate(self):
        positive(self, "block_size", "hash_bits", "min_seq_len")
        non_negative(self, "sample_size", "seed", "sink")
        if self.hash_bits > 24:
            raise ConfigError(f"hash_bits={self.hash_bits} makes 2**{self.hash_bits} buckets; use hash_bits <= 24")
        if self.min_seq_len % self.block_size:
            fixed = max(self.block_size, self.min_seq_len // self.block_size * self.block_size)
            raise ConfigError(
                f"min_seq_len={self.min_seq_len} must be a multiple of block_size={self.block_size} (the recursion "
                f"splits at block boundaries); use min_seq_len={fixed}"
            )
        count = isinstance(self.last_layers, int) and not isinstance(self.last_layers, bool) and self.last_layers > 0
        if not (count or self.last_layers in LAYER_CHOICES):
            raise ConfigError(f"last_layers={self.last_layers!r} must be 'half', 'all' or a positive number of layers")


class Hyper(SparseMethod):
    name = "hyper"
    Config = HyperConfig
    # Calls whose queries sit inside a static cache's buffer (a compiled decode step) run exact dense attention, as
    # every decode step of this method does.
    supports_query_offset = True

    def __init__(self, config: HyperConfig):
        super().__init__(config)
        self._projections: dict = {}

    def attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        c = self.config
        q_len, k_len = query.shape[2], key.shape[2]
        q_start = k_len - q_len
        tree = causal_tree(k_len, c.min_seq_len, c.block_size)
        if (not tree.levels or q_len < c.block_size or q_start % c.block_size or call.q_offset is not None
                or not self.patches_layer(call)):
            return dense_attention(query, key, value, call.scale, call.softcap, kv_start=call.kv_start,
                                   q_offset=call.q_offset)

        q_buckets, k_buckets = self.buckets(query, key, call.layer_idx)
        out, lse = self.leaves(query, key, value, tree, call)  # the running result, updated in place per level
        for pairs in tree.levels:
            pairs = tuple(p for p in pairs if p[2] > q_start)  # pairs with a query in this call
            if not pairs:
                continue
            geometry = level_geometry(pairs, q_start, query.device)
            layout = level_layout(q_buckets, k_buckets, geometry, call.kv_start, c.hash_bits, c.sink)
            q, k, v = self.sorted_inputs(query, key, value, layout)
            parts = [self.block_diagonal(q, k, v, layout, call)]
            if c.sample_size:
                parts.append(self.residual(q, k, v, layout, call))
            self.merge_level(out, lse, parts, layout)
        return out

    def patches_layer(self, call: AttentionCall) -> bool:
        """The layer policy: the last ``last_layers`` layers use the method, the others stay exact."""
        choice = self.config.last_layers
        if choice == "all":
            return True
        config = getattr(call.module, "config", None)
        num_layers = getattr(config.get_text_config() if config is not None else None, "num_hidden_layers", None)
        if num_layers is None:
            from ..attention import warn_once  # attention.py imports the methods

            warn_once("hf_longattn: hyper cannot tell how many layers the model has (the attention module has no "
                      f"config), so last_layers={choice!r} patches every layer")
            return True
        count = num_layers // 2 if choice == "half" else choice
        return call.layer_idx >= num_layers - count

    def buckets(self, query, key, layer_idx: int):
        """LSH buckets of the queries [B, Hq, Lq] and keys [B, Hkv, Lk], with the layer's hyperplanes."""
        c = self.config
        cache_key = (layer_idx, query.shape[-1], query.device, query.dtype)
        if cache_key not in self._projections:  # drawn on the CPU once: the same planes on every device
            planes = lsh_projections(c.seed, layer_idx, query.shape[-1], c.hash_bits)
            self._projections[cache_key] = planes.to(device=query.device, dtype=query.dtype)
        planes = self._projections[cache_key]
        return lsh_buckets(query, planes), lsh_buckets(key, planes)

    def leaves(self, query, key, value, tree, call: AttentionCall):
        """Exact causal attention inside each leaf of the recursion: (out [B, Lq, Hq, D], lse [B, Hq, Lq])."""
        pattern = leaf_pattern(tree, query.shape[2], key.shape[2], self.config.block_size, query.shape[0],
                               key.shape[1], query.device, self.config.sink)
        return sparse_attention(query, key, value, pattern, scale=call.scale, softcap=call.softcap,
                                kv_start=call.kv_start, return_lse=True)

    @staticmethod
    def sorted_inputs(query, key, value, layout: LevelLayout):
        """Queries in slot order [B, Hq, K, D] and keys/values in the level's sorted order [B, Hkv, K, D]."""
        dim = query.shape[-1]
        q = query.gather(2, layout.query_source.unsqueeze(-1).expand(-1, -1, -1, dim))
        index = layout.key_index.unsqueeze(-1).expand(-1, -1, -1, dim)
        return q, key.gather(2, index), value.gather(2, index)

    def _past_keys(self, q, k, v, pattern, layout, call):
        # q_offset past the last key: every listed key lies in the queries' past (no causal mask).
        offset = torch.full((q.shape[0],), k.shape[2], device=q.device, dtype=torch.long)
        return sparse_attention(q, k, v, pattern, scale=call.scale, softcap=call.softcap, kv_start=layout.kv_start,
                                return_lse=True, q_offset=offset)

    def block_diagonal(self, q, k, v, layout: LevelLayout, call: AttentionCall):
        """Slot block j against sorted key block j, for every pair of the level: (out [B, K, Hq, D], lse [B, Hq, K])."""
        pattern = block_diagonal_pattern(layout, self.config.block_size, q.shape[0], k.shape[1])
        return self._past_keys(q, k, v, pattern, layout, call)

    def residual(self, q, k, v, layout: LevelLayout, call: AttentionCall):
        """The sampled keys outside each slot block's own key block, importance-weighted: (out, lse + log weight)."""
        c = self.config
        pattern, log_weight = sampled_pattern(layout, c.block_size, c.sample_size, c.seed, call.layer_idx, q.shape[0],
                                              k.shape[1])
        out, lse = self._past_keys(q, k, v, pattern, layout, call)
        return out, lse + log_weight

    @staticmethod
    def merge_level(out, lse, parts, layout: LevelLayout) -> None:
        """Fold a level's parts (slot order) into the running out [B, Lq, Hq, D] / lse of the rows it serves."""
        merge_level(out, lse, layout.geometry.query_rows, layout.query_slot, layout.query_live, parts)
