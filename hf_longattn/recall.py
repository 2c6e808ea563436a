"""Top-k recall: the share of the exact softmax mass that a sparse pattern's keys hold, for any method.

For a query, the mass on a key set S is sum_S exp(s) / sum_all exp(s) = exp(lse_S - lse_all). lse_S comes from the
shared sparse kernel (so the pattern means exactly what attention does with it), lse_all from an exact causal
log-sum-exp taken a few queries at a time: no Lq x Lk tensor is built at once.

    recall = attention_recall(q, k, pattern, scale=...)           # [B, Hq], mean over queries
    per_layer = model_recall(model, input_ids, "hip", k=256)     # {layer: [Hq]}, layers the method ran on
"""

from __future__ import annotations

import math

import torch

from .attention import warn_once
from .kernels import SparsePattern, sparse_attention
from .kernels.dense import attention_logits
from .models import decoder_attention_modules
from .patch import patched

# Score elements of the exact log-sum-exp materialised at once (B x Hq x rows x Lk).
_MAX_SCORE_ELEMENTS = 1 << 25


def causal_lse(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None, softcap: float | None = None,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact natural-log log-sum-exp of causal attention scores, [B, Hq, Lq] (float32; -inf for padding queries)."""
    batch, num_q_heads, q_len, dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    q = query.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, q_len, dim)
    k = key.float()
    k_pos = torch.arange(k_len, device=query.device)
    start = torch.zeros(batch, dtype=torch.long, device=query.device) if kv_start is None else kv_start.long()
    lse = torch.empty(batch, num_q_heads, q_len, device=query.device)
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * num_q_heads * k_len))
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        scores = attention_logits(torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, r0:r1], k), scale, softcap)
        q_pos = torch.arange(r0, r1, device=query.device).view(-1, 1) + (k_len - q_len)
        visible = (k_pos <= q_pos) & (k_pos >= start.view(-1, 1, 1))  # [B, rows, Lk]
        scores = scores.masked_fill(~visible.view(batch, 1, 1, r1 - r0, k_len), -math.inf)
        lse[:, :, r0:r1] = torch.logsumexp(scores, dim=-1).view(batch, num_q_heads, r1 - r0)
    return lse


def attention_recall(
    query: torch.Tensor, key: torch.Tensor, pattern: SparsePattern, scale: float | None = None,
    softcap: float | None = None, kv_start: torch.Tensor | None = None, per_query: bool = False,
) -> torch.Tensor:
    """Share of each query's exact attention mass on the keys `pattern` lets it see.

    query [B, Hq, Lq, D], key [B, Hkv, Lk, D] (post-RoPE, queries are the last Lq keys). Returns [B, Hq], the mean over
    the queries that see any key (padding queries excluded), or [B, Hq, Lq] with ``per_query`` (NaN for padding).
    """
    # The value is irrelevant to the log-sum-exp; the key has the right shape.
    _, sparse = sparse_attention(query, key, key, pattern, scale=scale, softcap=softcap, kv_start=kv_start,
                                 return_lse=True)
    exact = causal_lse(query, key, scale, softcap, kv_start)
    live = torch.isfinite(exact)
    recall = torch.where(live, torch.exp(sparse.float() - torch.where(live, exact, 0.0)), torch.nan)
    if per_query:
        return recall
    return recall.nan_to_num(0.0).sum(-1) / live.sum(-1).clamp(min=1)


class _RecallProbe:
    """Stands in for a layer's method: runs its selection, records the recall, attends through the shared kernel."""

    supports_query_offset = False  # model_recall runs without a cache

    def __init__(self, method, records: dict):
        self.method, self.records = method, records
        self.name, self.config = method.name, method.config

    def attend(self, query, key, value, call):
        try:
            pattern = self.method.select(query, key, call)
        except NotImplementedError:  # a method without a single pattern (e.g. dense): nothing to measure
            return self.method.attend(query, key, value, call)
        recall = attention_recall(query, key, pattern, call.scale, call.softcap, call.kv_start)
        self.records.setdefault(call.layer_idx, []).append(recall.mean(0).cpu())
        return sparse_attention(query, key, value, pattern, scale=call.scale, softcap=call.softcap,
                                kv_start=call.kv_start)


@torch.no_grad()
def model_recall(
    model: torch.nn.Module, input_ids: torch.Tensor, method: str, attention_mask: torch.Tensor | None = None,
    **options,
) -> dict[int, torch.Tensor]:
    """Run `model` once on `input_ids` with `method` patched; recall per layer and query head, {layer: [Hq]}.

    Only layers where the method ran are in the result. Layers that ran exact dense attention are not: those in
    ``dense_layers``, inputs shorter than ``min_seq_len``, and sliding-window layers, which keep their exact window
    by default (``keep_sliding_window=True``). So a model whose every layer is a sliding-window layer (Mistral with a
    window) gives ``{}`` with a warning; pass ``keep_sliding_window=False`` to measure the method on those layers.
    The model's previous patch state is restored afterwards.
    """
    records: dict[int, list[torch.Tensor]] = {}
    with patched(model, method, **options):
        for module in decoder_attention_modules(model):
            module.hf_longattn_runner.method = _RecallProbe(module.hf_longattn_runner.method, records)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if not records:
        warn_once(f"hf_longattn: model_recall measured no layer: '{method}' ran on none (every layer is in "
                  "dense_layers, shorter than min_seq_len, or a sliding-window layer that keeps its exact window; "
                  "pass keep_sliding_window=False to measure those)")
    return {layer: torch.stack(values).mean(0) for layer, values in sorted(records.items())}
