"""DHSA: config, the chunker on inputs whose chunks are known, batched selection vs the loop reference, exactness at a
budget that covers the context, and decode: the kept chunks extended step by step equal a recomputation from scratch,
also after beam search reorders the cache rows."""

import math

import pytest
import torch

from hf_longattn import ConfigError, patch_model, patched
from hf_longattn.kernels import dense_attention
from hf_longattn.kernels.dhsa_chunks import (
    Chunking, chunk_layout, chunk_starts_reference, closed_prefix, extend_layout, padded_block_count,
)
from hf_longattn.kernels.dhsa_select import dhsa_select, dhsa_select_reference
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.dhsa import DHSA_PRESETS, Dhsa, DhsaConfig
from tiny_models import FULL_BUDGET, assert_prefill_matches_unpatched, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)
FULL = FULL_BUDGET["dhsa"]
SMALL = dict(FULL, budget=8)  # two 4-token blocks per query block: most candidates are left out


def _qk(batch=2, hq=4, hkv=2, q_len=48, k_len=48, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, hq, q_len, dim, generator=gen), torch.randn(batch, hkv, k_len, dim, generator=gen)


def _starts(layout):
    return [torch.nonzero(row).flatten().tolist() for row in layout.starts]


def _same(a, b):
    """Two patterns list the same blocks (compared on the CPU; dead slots ignored)."""
    counts, ids = a.block_counts.cpu(), a.block_indices.cpu()
    live = torch.arange(a.max_blocks) < counts.unsqueeze(-1)
    return torch.equal(counts, b.block_counts.cpu()) and torch.equal(
        torch.where(live, ids, 0), torch.where(live, b.block_indices.cpu(), 0))


# --- config -------------------------------------------------------------------------------------------------------

def test_defaults_match_hips_budget_and_the_presets():
    from hf_longattn.methods.hip import HIP_PRESETS, HipConfig

    c = DhsaConfig()
    assert (c.budget, c.window, c.sink, c.block_size_q, c.block_size_k) == (2048, 1024, 16, 64, 32)
    hip = HipConfig()  # the same tokens a query block reads, so that the two compare at one budget
    assert (hip.k, hip.window, hip.sink) == (c.budget, c.window, c.sink)
    small = DhsaConfig(preset="small")
    assert (small.budget, small.window) == (HIP_PRESETS["paper"]["k"], HIP_PRESETS["paper"]["window"])
    p = DhsaConfig(preset="paper")
    assert {k: getattr(p, k) for k in DHSA_PRESETS["paper"]} == DHSA_PRESETS["paper"]
    assert DhsaConfig(preset="paper", budget=64).budget == 64  # explicit options win over the preset
    assert DhsaConfig.from_options("dhsa", p.options()) == p
    assert c.chunker() == Chunking(32, radius=2, threshold=0.0, max_blocks=16)
    assert DhsaConfig(chunking="fixed", chunk_size=64).chunker() == Chunking(32, 0, math.inf, 2)


@pytest.mark.parametrize("options,message", [
    ({"budget": 100}, "budget=100 must be a multiple of block_size_k=32.*use budget=96"),
    ({"budget": 16}, "use budget=32"),
    ({"chunk_size": 48}, "chunk_size=48 must be a multiple"),
    ({"max_chunk": 64}, "max_chunk=64 is shorter than chunk_size=128"),
    ({"chunking": "semantic"}, "chunking='semantic' is unknown"),
    ({"threshold": 2.5}, r"threshold=2.5 must be a number in \[0, 2\)"),
    ({"preset": "fast"}, "preset='fast' is unknown"),
    ({"block_size_k": 0}, "block_size_k=0 must be a positive integer"),
    ({"window": -1}, ">= 0"),
    ({"shared_kv_heads": "yes"}, "shared_kv_heads"),
    ({"k": 512}, "no option k"),
])
def test_bad_options_fail_with_a_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        patch_model(make_model("llama"), "dhsa", **options)


# --- the chunker --------------------------------------------------------------------------------------------------

def _segmented_keys(lengths, dim=8, noise=0.0, seed=0):
    """One kv head, each segment a different axis: 1 - cos is 1 across a segment start and 0 inside a segment."""
    segments = [torch.zeros(n, dim).index_fill_(1, torch.tensor([i % dim]), 1.0) for i, n in enumerate(lengths)]
    keys = torch.cat(segments).view(1, 1, -1, dim)
    return keys + noise * torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed))


def test_boundaries_fall_where_the_keys_change_and_long_chunks_are_split():
    keys = _segmented_keys([16, 8, 40, 12, 4], noise=0.01)  # segments start at blocks 0, 4, 6, 16, 19 (4 tokens)
    layout = chunk_layout(keys, Chunking(4, radius=1, threshold=0.5, max_blocks=6), None)
    # Blocks 4, 6 and 16 start segments; the 10-block segment from block 6 is split after 6 blocks, at block 12.
    # Block 19, the last, has no right-hand neighbour to be compared with yet: its boundary is still pending.
    assert _starts(layout) == [[0, 4, 6, 12, 16]]
    longer = torch.cat([keys, _segmented_keys([8], noise=0.01)[..., [4, 5, 6, 7, 0, 1, 2, 3]]], 2)  # segment 4 goes on
    assert _starts(chunk_layout(longer, Chunking(4, 1, 0.5, 6), None)) == [[0, 4, 6, 12, 16, 19]]


def test_fixed_chunks_start_at_each_rows_first_real_block():
    keys = torch.randn(2, 2, 70, 8)
    layout = chunk_layout(keys, Chunking(4, 0, math.inf, 3), torch.tensor([0, 9]), padded_blocks=3)
    assert _starts(layout) == [[0, 3, 6, 9, 12, 15], [2, 5, 8, 11, 14, 17]]


@pytest.mark.parametrize("seed", range(6))
def test_batched_boundaries_match_the_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    length = int(torch.randint(30, 200, (), generator=gen))
    keys = torch.randn(2, 2, length, 8, generator=gen)
    keys[:, :, length // 3:] += torch.randn(2, 2, 1, 8, generator=gen)  # one real shift among noise
    chunking = Chunking(4, radius=seed % 3, threshold=0.05 * seed, max_blocks=2 + seed)
    kv_start = torch.tensor([0, 3 + 5 * seed])
    layout = chunk_layout(keys, chunking, kv_start, padded_blocks=padded_block_count(kv_start, 4))
    assert _starts(layout) == chunk_starts_reference(keys, chunking, kv_start)


def test_chunk_representation_is_the_mean_real_key_times_sqrt_length():
    keys = torch.randn(2, 3, 50, 8)
    kv_start = torch.tensor([0, 6])
    layout = chunk_layout(keys, Chunking(4, 1, 0.0, 4), kv_start, padded_blocks=2)
    rep = layout.block_rep()
    for b, starts in enumerate(_starts(layout)):
        for first, end in zip(starts, starts[1:] + [13]):
            real = keys[b, :, max(first * 4, int(kv_start[b])): min(end * 4, 50)]
            expected = real.mean(1) * real.shape[1] ** 0.5
            for block in range(first, end):
                torch.testing.assert_close(rep[b, :, block], expected, **TOL)
    assert rep[1, :, 0].abs().max() == 0  # a block of padding only: no representation


@pytest.mark.parametrize("chunking", [Chunking(4, 1, 0.0, 4), Chunking(4, 2, 0.1, 3), Chunking(8, 0, math.inf, 2)])
def test_extending_the_closed_chunks_equals_chunking_from_scratch(chunking):
    keys = torch.randn(2, 2, 160, 8, generator=torch.Generator().manual_seed(1))
    kv_start = torch.tensor([0, 13])
    padded = padded_block_count(kv_start, chunking.block_size)
    first = chunk_layout(keys[:, :, :70], chunking, kv_start, padded_blocks=padded)
    prefix = closed_prefix(first, kv_start // chunking.block_size, 70, chunking, padded)
    assert 0 < prefix.closed_blocks < 70 // chunking.block_size
    for length in range(70, 161, 9):
        scratch = chunk_layout(keys[:, :, :length], chunking, kv_start, padded_blocks=padded)
        extended = extend_layout(keys[:, :, :length], prefix, chunking, kv_start)
        assert torch.equal(extended.starts, scratch.starts)
        torch.testing.assert_close(extended.block_rep(), scratch.block_rep(), **TOL)


# --- the selection ------------------------------------------------------------------------------------------------

SELECT_CASES = [  # (batch, hq, hkv, q_len, k_len, options)
    (2, 4, 2, 48, 48, dict(budget=8, block_size_q=8, chunking=Chunking(4, 1, 0.0, 4), sink=2, window=4)),
    (2, 4, 2, 1, 70, dict(budget=12, block_size_q=8, chunking=Chunking(4, 1, 0.0, 3), sink=2, window=4)),  # decode
    (2, 4, 2, 33, 60, dict(budget=6, block_size_q=8, chunking=Chunking(2, 2, 0.05, 5), sink=1, window=0,
                           shared_kv_heads=False)),
    (1, 2, 1, 64, 64, dict(budget=16, block_size_q=16, chunking=Chunking(8, 0, math.inf, 2), sink=0, window=8)),
    (2, 2, 2, 20, 40, dict(budget=0, block_size_q=4, chunking=Chunking(4, 1, 0.0, 4), sink=3, window=2)),
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=["prefill", "decode", "per-head", "fixed", "no-budget"])
def test_batched_selection_matches_the_loop_reference(case):
    batch, hq, hkv, q_len, k_len, options = case
    q, k = _qk(batch, hq, hkv, q_len, k_len, seed=q_len)
    kv_start = torch.tensor([0, 7][:batch])
    got, _ = dhsa_select(q, k, kv_start=kv_start, **options)
    assert _same(got, dhsa_select_reference(q, k, kv_start=kv_start, **options))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", SELECT_CASES + [
    (1, 8, 2, 700, 900, dict(budget=128, block_size_q=64, chunking=Chunking(32, 2, 0.0, 16), sink=16, window=64)),
    (2, 8, 2, 1, 900, dict(budget=128, block_size_q=64, chunking=Chunking(32, 2, 0.0, 16), sink=16, window=64)),
])
def test_selection_on_the_gpu_matches_the_loop_reference(case):
    batch, hq, hkv, q_len, k_len, options = case
    q, k = _qk(batch, hq, hkv, q_len, k_len, dim=64, seed=q_len)
    kv_start = torch.tensor([0, 7][:batch])
    got, _ = dhsa_select(q.cuda().bfloat16(), k.cuda().bfloat16(), kv_start=kv_start.cuda(), **options)
    expected = dhsa_select_reference(q.bfloat16().float(), k.bfloat16().float(), kv_start=kv_start, **options)
    assert _same(got, expected)


def test_the_chunk_that_matches_the_query_is_selected_and_a_cut_chunk_keeps_its_later_blocks():
    keys = _segmented_keys([32, 12, 20, 32])  # chunks start at blocks 0, 8, 11, 16 (4-token blocks)
    query = torch.zeros(1, 1, 8, 8)
    query[..., 1] = 1.0  # the direction of the second segment (blocks 8 .. 10)
    options = dict(block_size_q=8, chunking=Chunking(4, 1, 0.5, 16), sink=0, window=8, kv_start=None)
    pattern, _ = dhsa_select(query, keys, budget=12, **options)
    assert pattern.block_indices[0, 0, 0].tolist() == [8, 9, 10]
    pattern, _ = dhsa_select(query, keys, budget=8, **options)  # the budget cuts the chunk: its later blocks win
    assert pattern.block_indices[0, 0, 0].tolist() == [9, 10]


@pytest.mark.parametrize("shared_kv_heads", [True, False])
def test_attention_with_full_budget_is_dense(shared_kv_heads):
    q, k = _qk(q_len=40, k_len=56)
    v = torch.randn_like(k)
    kv_start = torch.tensor([0, 11])
    method = Dhsa(DhsaConfig(**FULL, shared_kv_heads=shared_kv_heads))
    out = method.attend(q, k, v, AttentionCall(0, 0.3, 20.0, kv_start))
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3, 20.0, kv_start=kv_start), **TOL)
    # The check can fail: a small budget drops keys and changes the output.
    out = Dhsa(DhsaConfig(**SMALL)).attend(q, k, v, AttentionCall(0, 0.3, 20.0, kv_start))
    assert (out - dense_attention(q, k, v, 0.3, 20.0, kv_start=kv_start)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("chunking", ["adaptive", "fixed"])
def test_model_with_full_budget_matches_dense(family, chunking):
    assert_prefill_matches_unpatched(make_model(family), "dhsa", dict(FULL, chunking=chunking), **TOL)


# --- decode -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_full_budget_matches_dense(family):
    model = make_model(family)
    ids, mask = random_batch(length=24)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, pad_token_id=0)
        with patched(model, "dhsa", **FULL):
            out = model.generate(ids, **kwargs)
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                                              pad_token_id=0), beams)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), **TOL)


def _select(method, q, k, state, kv_start=None):
    return method.select(q, k, AttentionCall(0, 0.35, None, kv_start, state))


def test_decode_steps_extend_the_prefill_chunks_and_equal_a_recomputation(monkeypatch):
    import hf_longattn.kernels.dhsa_select as select_module

    extended = []
    extend = select_module.extend_layout
    monkeypatch.setattr(select_module, "extend_layout", lambda *a: extended.append(a[0].shape[2]) or extend(*a))
    method = Dhsa(DhsaConfig(**dict(SMALL, window=32)))
    q, k = _qk(q_len=140, k_len=140, seed=3)
    kv_start = torch.tensor([0, 9])
    state = {}
    _select(method, q[:, :, :100], k[:, :, :100], state, kv_start)  # the prefill keeps its closed chunks
    prefix = state["dhsa"]["prefix"]
    for length in range(101, 141):
        step = _select(method, q[:, :, length - 1: length], k[:, :, :length], state, kv_start)
        assert state["dhsa"]["prefix"] is prefix  # decode reads the kept chunks and adds nothing per row
        assert _same(step, _select(method, q[:, :, length - 1: length], k[:, :, :length], {}, kv_start))
    # The first steps select among closed chunks only; later ones chunk the open end again.
    assert 101 not in extended and 140 in extended


def test_decode_stays_exact_when_beam_search_reorders_the_cache_rows():
    # Two beams of one prompt: a step after the rows are swapped (and one beam duplicated) still selects what a
    # recomputation from the reordered cache selects, because the kept chunks are the prompt's, shared by both rows.
    method = Dhsa(DhsaConfig(**SMALL))
    q, k = _qk(batch=1, q_len=100, k_len=100, seed=4)
    q, k = q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1)
    state = {}
    _select(method, q, k, state)
    generated_q, generated_k = _qk(batch=2, q_len=30, k_len=30, seed=5)
    keys = torch.cat([k, generated_k], 2)
    for beam_idx in ([0, 1], [1, 0], [1, 1], [0, 0]):
        keys = keys[beam_idx]
        for length in range(101, 131, 7):
            step = _select(method, generated_q[:, :, length - 101: length - 100], keys[:, :, :length], state)
            assert _same(step, _select(method, generated_q[:, :, length - 101: length - 100], keys[:, :, :length], {}))


def test_a_new_sequence_chunks_from_scratch(monkeypatch):
    import hf_longattn.methods.dhsa as dhsa_module

    prefixes = []
    select = dhsa_module.dhsa_select
    monkeypatch.setattr(dhsa_module, "dhsa_select",
                        lambda q, k, **o: prefixes.append(o["prefix"] is None) or select(q, k, **o))
    model = make_model("llama")
    with torch.no_grad(), patched(model, "dhsa", **SMALL):
        for seed in (1, 2):
            ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(seed))
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # Per generate(): 4 layers chunk the prompt from scratch, then 2 decode steps per layer extend it.
    assert prefixes == ([True] * 4 + [False] * 8) * 2
