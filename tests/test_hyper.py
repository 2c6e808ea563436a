"""HyperAttention: config, LSH and Gray order, the causal recursion, the sorted layout, the whole method against a
naive statement of the algorithm, the sampled residual's unbiasedness, exactness where it must be exact, the model."""

import functools
import math
import os
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported (the kernels import it lazily)

import hf_longattn.methods.hyper as hyper_module
from hf_longattn import ConfigError, patch_model, patched
from hf_longattn.kernels import dense_attention, sparse_attention
from hf_longattn.kernels.dense import attention_logits
from hf_longattn.kernels.hyper_layout import causal_tree, level_geometry, level_layout
from hf_longattn.kernels.hyper_lsh import counter_hash, gray_rank, lsh_buckets, lsh_projections, sort_within_segments
from hf_longattn.kernels.hyper_merge import merge_by_lse, merge_level_reference, merge_level_triton
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.hyper import Hyper, HyperConfig
from tiny_models import FULL_BUDGET, assert_prefill_matches_unpatched, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)
# Tiny sizes on which the recursion has several levels: leaves of 16-31 tokens, blocks of 8.
SMALL = dict(min_seq_len=16, block_size=8, last_layers="all", sink=0)
COVERING = dict(SMALL, sample_size=1 << 20)  # samples every key: HyperAttention is then exact


def _qkv(batch=2, hq=4, hkv=2, q_len=100, k_len=100, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, hq, q_len, dim, generator=gen), torch.randn(batch, hkv, k_len, dim, generator=gen),
            torch.randn(batch, hkv, k_len, dim, generator=gen))


def _call(dim=16, kv_start=None, softcap=None, layer_idx=0):
    return AttentionCall(layer_idx, dim**-0.5, softcap, kv_start, {})


# --- config -------------------------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    c = HyperConfig()
    assert (c.min_seq_len, c.block_size, c.sample_size, c.hash_bits, c.last_layers) == (4096, 256, 256, 7, "half")
    assert c.sink == 16  # not the paper's: attention sinks kept exact (see the module docstring)
    assert HyperConfig.from_options("hyper", c.options()) == c


@pytest.mark.parametrize("options,message", [
    ({"min_seq_len": 1000}, "use min_seq_len=768"),
    ({"block_size": 0}, "positive"),
    ({"hash_bits": 30}, "use hash_bits <= 24"),
    ({"sample_size": -1}, ">= 0"),
    ({"last_layers": "first"}, "last_layers='first'"),
    ({"last_layers": 0}, "last_layers=0"),
    ({"buckets": 8}, "no option buckets"),
])
def test_bad_options_fail_with_a_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        patch_model(make_model("llama"), "hyper", **options)


# --- hashing and sorting ------------------------------------------------------------------------------------------

def _gray_sequence(bits):
    """The reflected Gray sequence built by reflection: 0, 1, 3, 2, 6, 7, 5, 4, ..."""
    sequence = [0]
    for bit in range(bits):
        sequence += [code | (1 << bit) for code in reversed(sequence)]
    return sequence


@pytest.mark.parametrize("bits", [1, 3, 7, 10])
def test_gray_rank_orders_patterns_so_that_neighbours_differ_in_one_bit(bits):
    codes = torch.arange(2**bits)
    ranks = gray_rank(codes)
    assert sorted(ranks.tolist()) == codes.tolist()
    order = torch.argsort(ranks)  # the bit patterns in bucket order
    assert order.tolist() == _gray_sequence(bits)
    flips = [(a ^ b).bit_count() for a, b in zip(order.tolist(), order[1:].tolist())]
    assert flips == [1] * (2**bits - 1)
    if bits >= 3:  # the reference's map (the Gray code itself) breaks it
        reference_order = torch.argsort(codes ^ (codes >> 1)).tolist()
        assert max((a ^ b).bit_count() for a, b in zip(reference_order, reference_order[1:])) > 1


def test_lsh_puts_close_vectors_together_and_is_seeded_per_layer():
    base = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    planes = lsh_projections(seed=0, layer_idx=5, head_dim=64, bits=7)
    assert abs(planes.mean()) < 0.15 and abs(planes.std() - 1) < 0.15  # standard normal draws (448 of them)
    near = base + 1e-4 * torch.randn(20, 64, generator=torch.Generator().manual_seed(4))
    assert lsh_buckets(near, planes).unique().tolist() == lsh_buckets(base, planes).tolist()
    assert lsh_buckets(-base, planes).item() != lsh_buckets(base, planes).item()  # opposite: every sign flips
    torch.manual_seed(123)  # global RNG state plays no part
    assert torch.equal(planes, lsh_projections(seed=0, layer_idx=5, head_dim=64, bits=7))
    assert not torch.equal(planes, lsh_projections(seed=0, layer_idx=6, head_dim=64, bits=7))
    assert not torch.equal(planes, lsh_projections(seed=1, layer_idx=5, head_dim=64, bits=7))


def test_counter_hash_is_uniform_enough_and_deterministic():
    draws = counter_hash(7, 3, torch.arange(100_000))
    assert torch.equal(draws, counter_hash(7, 3, torch.arange(100_000)))
    assert draws.unique().numel() == 100_000 and 0 <= int(draws.min()) and int(draws.max()) < 2**32
    counts = torch.bincount((draws * 16) >> 32, minlength=16).float()  # 16 equal bins: chi-square, 15 d.o.f.
    assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 45  # p ~ 1e-4


def test_sort_within_segments_keeps_segments_and_ties():
    values = torch.tensor([[3, 1, 1, 0, 2, 2, 0]])
    segment = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert sort_within_segments(values, segment, 2, 2).tolist() == [[1, 2, 0, 3, 6, 4, 5]]


# --- the causal recursion and the sorted layout --------------------------------------------------------------------

@pytest.mark.parametrize("length,min_seq_len,block",
                         [(100, 16, 8), (64, 16, 8), (257, 32, 8), (40, 16, 16), (31, 8, 8)])
def test_recursion_covers_every_causal_pair_exactly_once(length, min_seq_len, block):
    tree = causal_tree(length, min_seq_len, block)
    cover = torch.zeros(length, length, dtype=torch.int)
    for start, end in tree.leaves:
        cover[start:end, start:end] += torch.ones(end - start, end - start, dtype=torch.int).tril()
    for pairs in tree.levels:
        for start, mid, end in pairs:
            assert start % block == 0 and mid % block == 0 and mid - start >= max(end - mid, min_seq_len)
            cover[mid:end, start:mid] += 1
    assert torch.equal(cover, torch.ones(length, length, dtype=torch.int).tril())


def test_layout_sorts_each_pair_and_gives_each_live_query_its_own_slot():
    q, k, _ = _qkv(q_len=52, k_len=100)
    planes = lsh_projections(0, 0, 16, 3)
    qb, kb = lsh_buckets(q, planes), lsh_buckets(k, planes)
    kv_start = torch.tensor([0, 61])
    pairs = causal_tree(100, 16, 8).levels[0]  # (0, 56, 100): 56 keys, queries 48.. of which 56.. are in the pair
    layout = level_layout(qb, kb, level_geometry(pairs, 48, torch.device("cpu")), kv_start, 3)
    for b, start in enumerate(kv_start.tolist()):
        for h in range(2):
            keys = layout.key_index[b, h].tolist()
            pads = [j for j in keys if j < start]
            assert keys[: len(pads)] == pads and sorted(keys) == list(range(56))
            real = keys[len(pads):]
            assert [kb[b, h, j] for j in real] == sorted(kb[b, h, j] for j in real)
    rows = layout.geometry.query_rows.tolist()
    assert rows == list(range(8, 52))  # positions 56..99
    live = layout.query_live
    assert live[0].all() and live[1].tolist() == [56 + i >= 61 for i in range(44)]
    for b in range(2):
        for h in range(4):
            slots = layout.query_slot[b, h][live[b]]
            assert slots.unique().numel() == slots.numel()  # one slot per live query
            served = layout.geometry.query_rows[live[b]]
            assert torch.equal(layout.query_source[b, h][slots], served)
            by_rank = slots[torch.argsort(qb[b, h][served], stable=True)]
            assert torch.all(by_rank.diff() > 0)  # sorted queries take ascending slots (quantiles)


# --- the method against a naive statement of the algorithm ---------------------------------------------------------

def naive_hyper(q, k, v, config: HyperConfig, layer_idx=0, kv_start=None, softcap=None):
    """HyperAttention stated per query with Python loops: a weight per (query, key) - 1 for the exact parts (leaf,
    own sorted block), the importance weight for a sampled key outside the own block, 0 otherwise - then the
    weighted softmax. Buckets from the planes and the Gray sequence, sorting by Python's sorted()."""
    batch, hq, q_len, dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    q0, bs, c = k_len - q_len, config.block_size, config
    planes = lsh_projections(c.seed, layer_idx, dim, c.hash_bits)
    rank = {code: r for r, code in enumerate(_gray_sequence(c.hash_bits))}
    def buckets(x):  # [B, H, L] nested lists
        codes = (((x @ planes) > 0).long() * 2 ** torch.arange(c.hash_bits)).sum(-1)
        return [[[rank[int(code)] for code in row] for row in head] for head in codes]
    qb, kb = buckets(q), buckets(k)
    tree = causal_tree(k_len, c.min_seq_len, bs)
    weight = torch.zeros(batch, hq, q_len, k_len)
    for b in range(batch):
        first = 0 if kv_start is None else int(kv_start[b])
        approximated = first + c.sink  # padding and sink keys take no part in the pairs
        for h in range(hq):
            g = h * hkv // hq
            for start, end in tree.leaves:
                for p in range(max(start, q0), end):
                    weight[b, h, p - q0, max(start, first): p + 1] = 1
                    weight[b, h, p - q0, first:min(approximated, p + 1)] = 1
            for pairs in tree.levels:
                for start, mid, end in pairs:
                    keys = sorted(range(start, mid), key=lambda j: (kb[b][g][j] if j >= approximated else -1, j))
                    queries = sorted(range(max(mid, q0, first), end), key=lambda p: (qb[b][h][p - q0], p))
                    # One uniform draw in each stratum of `stride` sorted keys, the same for every query of the pair.
                    stride = -(-(mid - start) // c.sample_size) if c.sample_size else 0
                    strata = range(-(-(mid - start) // stride)) if stride else range(0)
                    drawn = [t * stride + (int(counter_hash(c.seed, layer_idx, start, g, t)) * stride >> 32)
                             for t in strata]
                    for r, p in enumerate(queries):
                        own = r * (mid - start) // len(queries) // bs
                        for j in keys[own * bs:(own + 1) * bs]:
                            if j >= approximated:
                                weight[b, h, p - q0, j] = 1
                        for place in drawn:
                            if place < mid - start and place // bs != own and keys[place] >= approximated:
                                weight[b, h, p - q0, keys[place]] = stride
            weight[b, h, :, :first] = 0
    scores = attention_logits(torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(hq // hkv, 1)), dim**-0.5, softcap)
    scores = (scores + weight.log()).softmax(-1)
    return torch.einsum("bhqk,bhkd->bqhd", scores.nan_to_num(0.0), v.repeat_interleave(hq // hkv, 1))


@pytest.mark.parametrize("q_len,padded,softcap,sample_size,sink", [
    (100, False, None, 0, 0), (100, False, None, 4, 0), (100, False, None, 1 << 20, 0), (100, True, 2.0, 4, 0),
    (100, True, 2.0, 1 << 20, 3), (52, True, None, 4, 0), (100, True, None, 4, 5), (52, False, None, 0, 20),
], ids=["prefill-blocks-only", "prefill", "prefill-covering", "left-padded-softcap", "left-padded-softcap-covering-sink",
        "chunked-padded", "left-padded-sink", "chunked-sink-blocks-only"])
def test_method_matches_the_naive_algorithm(q_len, padded, softcap, sample_size, sink):
    q, k, v = _qkv(q_len=q_len)
    kv_start = torch.tensor([0, 61]) if padded else None
    config = HyperConfig(**dict(SMALL, sample_size=sample_size, hash_bits=3, seed=5, sink=sink))
    out = Hyper(config).attend(q, k, v, _call(kv_start=kv_start, softcap=softcap, layer_idx=2))
    expected = naive_hyper(q, k, v, config, layer_idx=2, kv_start=kv_start, softcap=softcap)
    torch.testing.assert_close(out, expected, **TOL)
    if sample_size > 100:  # every key sampled: the estimate is exact attention
        torch.testing.assert_close(out, dense_attention(q, k, v, softcap=softcap, kv_start=kv_start), **TOL)


def test_triton_kernels_run_the_parts_as_the_reference_does(monkeypatch):
    q, k, v = _qkv(q_len=64, k_len=64)
    call = _call(kv_start=torch.tensor([0, 21]), softcap=3.0)
    method = Hyper(HyperConfig(**dict(SMALL, sample_size=4)))
    reference = method.attend(q, k, v, call)
    monkeypatch.setattr(hyper_module, "sparse_attention", functools.partial(sparse_attention, backend="triton"))
    torch.testing.assert_close(method.attend(q, k, v, call), reference, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_realistic_shapes(dtype, monkeypatch):
    """Llama-3-8B heads at 8K with smaller recursion leaves: covering sample = dense; default sample = reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 8192, 128, device="cuda", dtype=dtype, generator=gen) for h in (32, 8, 8))
    call, tol = _call(dim=128), (dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3))
    covering = Hyper(HyperConfig(min_seq_len=1024, block_size=128, sample_size=1 << 20, last_layers="all"))
    torch.testing.assert_close(covering.attend(q, k, v, call), dense_attention(q, k, v), **tol)
    method = Hyper(HyperConfig(min_seq_len=1024, block_size=128, last_layers="all"))
    out = method.attend(q, k, v, call)
    monkeypatch.setattr(hyper_module, "sparse_attention", functools.partial(sparse_attention, backend="reference"))
    torch.testing.assert_close(out, method.attend(q, k, v, call), **tol)


def test_decode_and_unaligned_calls_are_exact_dense():
    q, k, v = _qkv(q_len=5, k_len=100)
    method = Hyper(HyperConfig(**dict(SMALL, sample_size=2)))
    for rows in (1, 5):  # one query (decode), and queries that do not start on a block boundary
        out = method.attend(q[:, :, -rows:], k, v, _call())
        assert torch.equal(out, dense_attention(q[:, :, -rows:], k, v))


def test_seed_fixes_the_output():
    q, k, v = _qkv()
    outputs = [Hyper(HyperConfig(**dict(SMALL, sample_size=4, seed=s))).attend(q, k, v, _call()) for s in (0, 0, 1)]
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


def test_merge_by_lse_is_attention_over_the_union_and_keeps_empty_rows_empty():
    q, k, v = _qkv(batch=1, hq=1, hkv=1, q_len=3, k_len=6)
    logits = k[0, 0] @ q[0, 0, 0] * 0.25  # one query
    def part(keys):
        lse = torch.logsumexp(logits[keys], -1)
        return (logits[keys] - lse).exp() @ v[0, 0, keys], lse
    (out_a, lse_a), (out_b, lse_b), (out_all, lse_all) = part([0, 2, 3]), part([1, 4, 5]), part(list(range(6)))
    out, lse = merge_by_lse(out_a.view(1, 1, 1, -1), lse_a.view(1, 1, 1), out_b.view(1, 1, 1, -1), lse_b.view(1, 1, 1))
    torch.testing.assert_close(out.view(-1), out_all.view(-1))
    torch.testing.assert_close(lse.view(-1), lse_all.view(-1))
    empty = torch.full((1, 1, 1), -torch.inf)
    out, lse = merge_by_lse(torch.zeros(1, 1, 1, 4), empty, torch.zeros(1, 1, 1, 4), empty)
    assert torch.all(out == 0) and torch.all(lse == -torch.inf)


@pytest.mark.parametrize("two_parts", [True, False])
def test_merge_level_kernel_matches_reference(two_parts):
    gen = torch.Generator().manual_seed(0)
    batch, q_len, heads, dim, slots = 2, 40, 3, 24, 32
    out, lse = torch.randn(batch, q_len, heads, dim, generator=gen), torch.randn(batch, heads, q_len, generator=gen)
    lse[0, 0, :5] = -torch.inf  # rows that saw nothing so far
    parts = [(torch.randn(batch, slots, heads, dim, generator=gen), torch.randn(batch, heads, slots, generator=gen))
             for _ in range(2 if two_parts else 1)]
    parts[0][1][1, 2, :] = -torch.inf  # a part that saw nothing
    rows = torch.tensor([0, 1, 2, 3, 7, 11, 20, 21, 22, 39])
    slot = torch.randint(0, slots, (batch, heads, len(rows)), generator=gen)
    live = torch.rand(batch, len(rows), generator=gen) > 0.3
    expected_out, expected_lse = out.clone(), lse.clone()
    merge_level_reference(expected_out, expected_lse, rows, slot, live, parts)
    merge_level_triton(out, lse, rows, slot, live, parts)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(lse, expected_lse, **TOL)
    assert not torch.equal(out[:, rows], torch.zeros_like(out[:, rows]))


# --- the sampled residual is unbiased ------------------------------------------------------------------------------

def test_sampled_residual_is_an_unbiased_estimate_of_the_mass_outside_the_own_block():
    """Mean over seeds of the residual's partition function exp(lse) and numerator exp(lse) * out, against the exact
    sums over the pair's keys outside each slot's own block. Bound: z * (standard deviation over seeds) / sqrt(n),
    z Bonferroni-corrected for every quantity tested at a 1e-4 false-alarm rate. Also shows the bound has power: the
    double-counting estimate (own block included) lies outside it."""
    q, k, v = _qkv(batch=1, hq=2, hkv=1, q_len=128, k_len=128, dim=8, seed=1)
    config = HyperConfig(min_seq_len=64, block_size=8, sample_size=8, hash_bits=3)  # one pair: 64 queries x 64 keys
    pairs = causal_tree(128, 64, 8).levels[0]
    assert pairs == ((0, 64, 128),)
    planes = lsh_projections(0, 0, 8, 3)
    layout = level_layout(lsh_buckets(q, planes), lsh_buckets(k, planes), level_geometry(pairs, 0, torch.device("cpu")),
                          None, 3)
    qs, ks, vs = Hyper.sorted_inputs(q, k, v, layout)
    call, seeds = _call(dim=8), 200
    estimates = []
    for seed in range(seeds):
        out, lse = Hyper(HyperConfig(**{**config.options(), "seed": seed})).residual(qs, ks, vs, layout, call)
        mass = lse.exp()  # [1, Hq, K]
        estimates.append(torch.cat([mass.unsqueeze(-1), mass.unsqueeze(-1) * out.transpose(1, 2)], -1))
    estimates = torch.stack(estimates).double()  # [seeds, 1, Hq, K, 1 + D]
    mean, std = estimates.mean(0), estimates.std(0)

    scores = (torch.einsum("bhqd,bkd->bhqk", qs, ks[:, 0]) * 8**-0.5).exp().double()
    own = (torch.arange(64) // 8).view(-1, 1) == (torch.arange(64) // 8).view(1, -1)
    def exact(mask):
        s = scores * mask
        return torch.cat([s.sum(-1, keepdim=True), s @ vs[:, 0].double().unsqueeze(1)], -1)
    outside, everything = exact(~own), exact(torch.ones_like(own))

    z = NormalDist().inv_cdf(1 - 1e-4 / (2 * mean.numel()))
    bound = z * std / math.sqrt(seeds)
    assert torch.all((mean - outside).abs() <= bound), float(((mean - outside).abs() / bound).max())
    # Double counting (the reference's bug) would be rejected for most slots.
    assert ((mean - everything).abs() > bound)[..., 0].float().mean() > 0.5


# --- layer policy and the model ------------------------------------------------------------------------------------

def test_last_layers_policy():
    method = Hyper(HyperConfig(last_layers="half"))
    def patched_layers(choice, num_layers=30):
        method.config.last_layers = choice
        module = SimpleNamespace(config=LlamaConfig(num_hidden_layers=num_layers))
        calls = [SimpleNamespace(layer_idx=i, module=module) for i in range(num_layers)]
        return [call.layer_idx for call in calls if method.patches_layer(call)]
    assert patched_layers("half") == list(range(15, 30))
    assert patched_layers("all") == list(range(30))
    assert patched_layers(4) == [26, 27, 28, 29]
    assert patched_layers(40) == list(range(30))


def test_without_a_layer_count_every_layer_is_patched_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr("hf_longattn.attention._warned", set())
    with caplog.at_level("WARNING", logger="hf_longattn"):
        assert Hyper(HyperConfig()).patches_layer(SimpleNamespace(layer_idx=0, module=None))
    assert "patches every layer" in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_full_budget_is_dense(family):
    assert_prefill_matches_unpatched(make_model(family), "hyper", FULL_BUDGET["hyper"], **TOL)
    assert_prefill_matches_unpatched(make_model(family), "hyper", COVERING, **TOL)  # through every part


def test_generate_with_covering_sample_matches_unpatched():
    model = make_model("llama")
    ids, mask = random_batch(length=24)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
        with patched(model, "hyper", **COVERING):
            out = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), **TOL)


def test_model_small_sample_approximates():
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=64, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
        with patched(model, "hyper", **SMALL, sample_size=2):
            logits = model(ids).logits
    torch.testing.assert_close(logits[:, :16], reference[:, :16], **TOL)  # the first leaf is exact
    assert not torch.allclose(logits[:, 16:], reference[:, 16:], atol=1e-3)

