"""The top-k recall tool: share of the exact attention mass that a pattern keeps, per head and per layer."""

import pytest
import torch

from hf_longattn.kernels import window_pattern
from hf_longattn.recall import attention_recall, causal_lse, model_recall
from tiny_models import make_model


def _qk(batch=2, hq=4, hkv=2, q_len=24, k_len=32, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, hq, q_len, dim, generator=gen), torch.randn(batch, hkv, k_len, dim, generator=gen)


def test_full_pattern_holds_all_the_mass():
    q, k = _qk()
    pattern = window_pattern(2, 2, 24, 8, 8, sink=0, window=32)  # covers all 32 keys
    recall = attention_recall(q, k, pattern, scale=0.4, softcap=5.0, kv_start=torch.tensor([0, 6]))
    torch.testing.assert_close(recall, torch.ones(2, 4))


@pytest.mark.parametrize("sink,window", [(0, 4), (3, 5)])
def test_window_pattern_on_uniform_scores_keeps_its_share_of_keys(sink, window):
    # Zero queries give every visible key the same weight: a query at position p that sees min(p + 1, sink + window)
    # of its p + 1 keys keeps exactly that fraction of the mass.
    q_len = k_len = 20
    q = torch.zeros(1, 2, q_len, 8)
    k = torch.randn(1, 1, k_len, 8)
    recall = attention_recall(q, k, window_pattern(1, 1, q_len, 4, 4, sink, window), per_query=True)
    expected = torch.tensor([min(p + 1, sink + window) / (p + 1) for p in range(q_len)])
    torch.testing.assert_close(recall[0, 0], expected)
    torch.testing.assert_close(attention_recall(q, k, window_pattern(1, 1, q_len, 4, 4, sink, window))[0],
                               expected.mean().repeat(2))


def test_padding_queries_are_left_out_of_the_mean():
    q, k = _qk(batch=1, q_len=16, k_len=16)
    q[:, :, :5] = 0.0  # the padded queries would otherwise change the mean
    kv_start = torch.tensor([5])
    per_query = attention_recall(q, k, window_pattern(1, 2, 16, 4, 4, 0, 3), kv_start=kv_start, per_query=True)
    assert torch.isnan(per_query[..., :5]).all() and torch.isfinite(per_query[..., 5:]).all()
    mean = attention_recall(q, k, window_pattern(1, 2, 16, 4, 4, 0, 3), kv_start=kv_start)
    torch.testing.assert_close(mean, per_query[..., 5:].mean(-1))


def test_causal_lse_matches_a_direct_computation():
    q, k = _qk(batch=1, hq=2, hkv=1, q_len=6, k_len=10)
    scores = torch.einsum("bhqd,bkd->bhqk", q, k[:, 0]) * 0.3
    hidden = torch.arange(10).view(1, -1) > torch.arange(6).view(-1, 1) + 4
    expected = torch.logsumexp(scores.masked_fill(hidden, -torch.inf), -1)
    torch.testing.assert_close(causal_lse(q, k, scale=0.3), expected)


def test_model_recall_per_layer_and_head():
    model = make_model("llama")
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    full = model_recall(model, ids, "hip", k=128, block_size_q=8, block_size_k=2, window=4, sink=2, dense_layers=1)
    assert sorted(full) == [1, 2, 3]  # layer 0 ran dense
    for values in full.values():
        torch.testing.assert_close(values, torch.ones(4))
    small = model_recall(model, ids, "streaming", sink=0, window=4, block_size_q=8)
    assert sorted(small) == [0, 1, 2, 3]
    assert all(((v > 0) & (v < 0.95)).all() for v in small.values())
    assert not hasattr(model, "hf_longattn_original_attn_implementation")  # the model is unpatched afterwards
