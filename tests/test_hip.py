"""HiP (hierarchical top-k search) and the blocktopk baseline: config, the search itself, kernel vs reference,
exactness against dense at a budget that covers the context, decode refresh state."""

import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported (the kernels import it lazily)

from hf_longattn import ConfigError, patch_model, patched
from hf_longattn.kernels import dense_attention
from hf_longattn.kernels.hip_mask import candidate_block_range, hip_mask_reference, hip_mask_triton
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.blocktopk import BlockTopK, BlockTopKConfig
from hf_longattn.methods.hip import Hip, HipConfig
from tiny_models import assert_prefill_matches_unpatched, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)
# Tiny blocks so that short test inputs have many candidates; "full" covers every test context (<= 128 keys).
SMALL = dict(block_size_q=8, block_size_k=2, query_stride=2, sink=2, window=4)
FULL = dict(SMALL, k=128)


def _qk(batch=1, hq=4, hkv=2, q_len=48, k_len=48, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, hq, q_len, dim, generator=gen), torch.randn(batch, hkv, k_len, dim, generator=gen)


# --- config -------------------------------------------------------------------------------------------------------

def test_defaults_search_every_step_on_the_retrieval_budget_and_paper_preset_is_the_papers():
    c = HipConfig()
    assert (c.preset, c.k, c.window, c.refresh_interval) == ("retrieval", 2048, 1024, 1)
    # 2 x 1024 groups in slices of 16 (SLICE_GROUPS, the fastest on the H200).
    assert (c.decode_oversample, c.decode_slices) == (2, 128)
    assert (c.block_size_q, c.query_stride, c.block_size_k, c.sink, c.score) == (128, 4, 2, 16, "probability")
    p = HipConfig(preset="paper")
    assert (p.k, p.window, p.refresh_interval, p.decode_oversample) == (512, 256, 8, 4)
    assert p.decode_slices == 64  # 4 x 256 groups
    # Blocks of 16 tokens: 16 groups' halves would not fit one 256-key tile, so slices of 8 of the 2 x 128 groups.
    assert HipConfig(k=2048, block_size_k=16).decode_slices == 256 // 8
    assert HipConfig(preset="paper", refresh_interval=1, k=256).refresh_interval == 1  # explicit options win
    assert HipConfig.from_options("hip", p.options()) == p  # options() round-trips


def test_the_prefill_budget_is_the_decode_budget_unless_given():
    assert (HipConfig().prefill_k, HipConfig().prefill_window) == (2048, 1024)
    assert (HipConfig(preset="paper").prefill_k, HipConfig(k=256, window=64).prefill_window) == (512, 64)
    c = HipConfig(prefill_k=512, prefill_window=256)
    assert (c.k, c.window, c.prefill_k, c.prefill_window) == (2048, 1024, 512, 256)


def test_a_prefill_call_searches_with_the_prefill_budget_and_a_decode_step_with_the_decode_budget():
    method = Hip(HipConfig(k=64, window=32, prefill_k=16, prefill_window=8, block_size_q=16, block_size_k=4))
    query, key = _qk(q_len=64, k_len=256)
    prefill = method.select(query, key, AttentionCall(0, 0.25, None, None))
    step = method.select(query[:, :, -1:], key, AttentionCall(0, 0.25, None, None))
    assert (prefill.max_blocks, prefill.window_tokens, step.max_blocks, step.window_tokens) == (4, 8, 16, 32)


@pytest.mark.parametrize("options,message", [
    ({"k": 7}, "multiple of block_size_k"),
    ({"prefill_k": 7}, "prefill_k=7 must be a multiple of block_size_k"),
    ({"prefill_window": -1}, ">= 0"),
    ({"k": 0}, "positive"),
    ({"preset": "fast"}, "preset"),
    ({"window": -1}, ">= 0"),
    ({"query_stride": 256}, "query_stride"),
    ({"refresh_interval": 0}, "refresh_interval"),
    ({"decode_slices": 0}, "decode_slices"),
    ({"decode_oversample": 0}, "decode_oversample"),
    ({"k": 65536, "decode_slices": 32}, "use decode_slices=1024 or more"),
    ({"shared_kv_heads": "yes"}, "shared_kv_heads"),
    ({"score": "mean"}, "score='mean' is unknown"),
    ({"budget": 512}, "no option budget"),
])
def test_bad_options_fail_with_a_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        patch_model(make_model("llama"), "hip", **options)


def test_blocktopk_config_checks_block_multiple():
    with pytest.raises(ConfigError, match="multiple of block_size_k"):
        BlockTopKConfig(k=100, block_size_k=64)


# --- the search ---------------------------------------------------------------------------------------------------

def test_small_candidate_sets_are_taken_whole():
    q, k = _qk(q_len=40, k_len=40)
    pattern = hip_mask_reference(q, k, **FULL)
    lo, hi = candidate_block_range(1, 40, 40, 8, 2, 2, 4, None, "cpu")
    for qb in range(pattern.num_query_blocks):
        expected = list(range(int(lo[0, qb]), int(hi[0, qb])))
        for h in range(2):
            n = int(pattern.block_counts[0, h, qb])
            assert pattern.block_indices[0, h, qb, :n].tolist() == expected


def _peaked_keys(k_len, dim, peak, width=3.0):
    """Keys whose score against the all-ones query falls off smoothly (Gaussian) around position `peak`."""
    pos = torch.arange(k_len, dtype=torch.float32)
    strength = 6.0 * torch.exp(-((pos - peak) / (width * k_len / 64)) ** 2)
    return (strength.view(-1, 1) * torch.ones(dim) / dim).view(1, 1, k_len, dim)


@pytest.mark.parametrize("peak", [37, 150, 230])
def test_search_finds_the_exact_top_blocks_on_a_smooth_score_landscape(peak):
    # Attention locality (neighbouring keys score alike) is HiP's premise; under it the search must be exact.
    k_len, dim, n_sel, bk = 256, 8, 4, 2
    noise = torch.randn(1, 1, k_len, dim, generator=torch.Generator().manual_seed(1))
    key = _peaked_keys(k_len, dim, peak) + 1e-3 * noise
    query = torch.ones(1, 1, 8, dim)
    pattern = hip_mask_reference(query, key, k=n_sel * bk, block_size_q=8, block_size_k=bk, query_stride=1,
                                 sink=0, window=8)
    # Brute force, independent of the search: every candidate block's best token score, exact top-n.
    scores = (key[0, 0] @ query[0, 0].T).amax(-1).view(-1, bk).amax(-1)[: (k_len - 8) // bk]
    expected = sorted(torch.topk(scores, n_sel).indices.tolist())
    assert pattern.block_indices[0, 0, 0].tolist() == expected


def test_each_slice_keeps_the_best_blocks_of_its_own_stretch_unless_oversampled():
    # Two peaks, a strong one in the first half of the candidates and a weak one in the second. One beam spends the
    # whole selection on the strong peak; two slices each take the exact top blocks of their own half; two slices
    # that search twice the groups and keep the best survivors of both spend it on the strong peak again.
    k_len, dim, n_sel, bk = 256, 8, 8, 2
    key = _peaked_keys(k_len, dim, 60) + 0.5 * _peaked_keys(k_len, dim, 190)
    key = key + 1e-3 * torch.randn(1, 1, k_len, dim, generator=torch.Generator().manual_seed(2))
    query = torch.ones(1, 1, 8, dim)
    options = dict(k=n_sel * bk, block_size_q=8, block_size_k=bk, query_stride=1, sink=0, window=8)
    lo, hi = (int(t) for t in candidate_block_range(1, 8, k_len, 8, bk, 0, 8, None, "cpu"))
    scores = (key[0, 0] @ query[0, 0].T).amax(-1).view(-1, bk).amax(-1)
    middle = lo + 4 * (hi - lo) // 8  # the end of groups 0..3: slice 0
    top = lambda a, z, n: sorted((torch.topk(scores[a:z], n).indices + a).tolist())  # noqa: E731
    one_beam = hip_mask_reference(query, key, **options).block_indices[0, 0, 0].tolist()
    two_slices = hip_mask_reference(query, key, **options, slices=2).block_indices[0, 0, 0].tolist()
    assert one_beam == top(lo, hi, 8) and max(one_beam) < middle
    assert two_slices == top(lo, middle, 4) + top(middle, hi, 4)
    assert hip_mask_reference(query, key, **options, slices=2, oversample=2).block_indices[0, 0, 0].tolist() == one_beam


def test_selection_is_causal_distinct_and_ascending():
    q, k = _qk(batch=2, q_len=64, k_len=96)
    kv_start = torch.tensor([0, 9])
    pattern = hip_mask_reference(q, k, **dict(SMALL, k=6), kv_start=kv_start)
    lo, hi = candidate_block_range(2, 64, 96, 8, 2, 2, 4, kv_start, "cpu")
    for b in range(2):
        for h in range(2):
            for qb in range(pattern.num_query_blocks):
                n = int(pattern.block_counts[b, h, qb])
                ids = pattern.block_indices[b, h, qb, :n].tolist()
                assert n == min(3, int(hi[b, qb] - lo[b, qb]))
                assert ids == sorted(set(ids)) and all(lo[b, qb] <= i < hi[b, qb] for i in ids)


def test_strided_queries_include_each_blocks_last_query():
    # Key 15 matters only to query 15, the last of its block (it predicts the next token); key 14 repels every query.
    # Strided from the block's start (rows 8, 10, 12, 14), the search would rank block 7 (keys 14, 15) last.
    q, k = torch.randn(1, 1, 16, 8) * 0.01, torch.randn(1, 1, 16, 8) * 0.01
    q[..., 0] = 1.0
    k[0, 0, 14, 0], k[0, 0, 15, 0] = -100.0, 100.0
    options = dict(k=8, block_size_q=8, block_size_k=2, query_stride=2, sink=0, window=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for search in (hip_mask_reference, hip_mask_triton):
        pattern = search(q.to(device), k.to(device), **options)
        assert 7 in pattern.block_indices[0, 0, 1, : int(pattern.block_counts[0, 0, 1])].tolist()


def test_local_lse_is_the_log_sum_exp_over_sink_and_window():
    from hf_longattn.kernels.hip_mask import _local_lse

    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 2, 40, 8, generator=gen), torch.randn(2, 2, 40, 8, generator=gen)
    block_size_q, sink, window, kv_start = 8, 3, 5, torch.tensor([0, 6])
    first = torch.arange(5).view(-1, 1) * block_size_q
    q_idx = first + block_size_q - 1 - torch.arange(0, block_size_q, 2)  # the kernel's strided rows
    lse = _local_lse(q[:, :, q_idx], keys, q_idx.expand(2, -1, -1), q_idx >= first, kv_start, sink, window,
                     block_size_q, 0.5, None)
    for b in range(2):
        start = int(kv_start[b])
        for h in range(2):
            for j, r in itertools.product(range(5), range(q_idx.shape[1])):
                p = int(q_idx[j, r])
                seen = [t for t in range(start, p + 1) if t < start + sink or t > p - window]
                expected = torch.logsumexp(0.5 * keys[b, h, seen] @ q[b, h, p], 0) if seen else torch.tensor(-torch.inf)
                torch.testing.assert_close(lse[b, h, j, r], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("candidates", [10, 512])
def test_sampled_lse_weights_each_part_by_its_size_and_skips_the_window(candidates):
    from hf_longattn.kernels.hip_mask import LSE_STRATA, _sampled_lse

    # One query at position 560 with a 100-token window: keys 461..560 are its own (counted elsewhere). Blocks of one
    # token; the candidates [0, n) fall into 256 parts: single keys when n <= 256 (the sum is exact), pairs when
    # n = 512, each represented by its first key (the lower centre) with weight 2.
    logits = torch.randn(600, generator=torch.Generator().manual_seed(candidates))
    keys, query = logits.view(1, 1, 600, 1), torch.ones(1, 1, 1, 1, 1)
    lse = _sampled_lse(query, keys, torch.tensor([[[560]]]), torch.tensor([[True]]), torch.tensor([[0]]),
                       torch.tensor([[candidates]]), torch.tensor([0]), 0, 100, 1, 1.0, None)
    step = max(1, candidates // LSE_STRATA)
    sampled = torch.arange(0, candidates, step)
    sampled = sampled[sampled <= 460]
    torch.testing.assert_close(lse.view(()), torch.logsumexp(logits[sampled] + math.log(step), 0))


KERNEL_CASES = [  # (batch, hq, hkv, q_len, k_len, dim, options)
    (1, 4, 2, 40, 40, 16, dict(SMALL, k=8)),
    (2, 4, 2, 1, 50, 16, dict(SMALL, k=8)),  # decode, padded second row
    (1, 4, 2, 33, 60, 16, dict(k=6, block_size_q=8, block_size_k=3, query_stride=2, sink=1, window=0,
                               shared_kv_heads=False)),  # odd block size, no window, per query head
    (1, 2, 1, 64, 64, 32, dict(k=16, block_size_q=16, block_size_k=4, query_stride=3, sink=4, window=8)),
    (1, 2, 2, 24, 30, 8, dict(k=3, block_size_q=4, block_size_k=1, query_stride=1, sink=0, window=2)),
    (2, 4, 2, 40, 50, 16, dict(SMALL, k=8, score="logit")),
    (2, 4, 2, 1, 70, 16, dict(SMALL, k=8, scale=0.3, softcap=5.0)),  # decode, Gemma 2's softcap
    (2, 4, 2, 1, 90, 16, dict(SMALL, k=14, slices=3)),  # 7 groups in slices of 3, 3 and 1
    (2, 4, 2, 3, 90, 16, dict(SMALL, k=12, slices=4, score="logit")),
    (1, 4, 2, 1, 300, 16, dict(SMALL, k=256)),  # one query block whose beam is too wide for the sliced kernel
    (2, 4, 2, 40, 70, 16, dict(SMALL, k=8, slices=2)),  # sliced search of many query blocks
    (2, 4, 2, 1, 90, 16, dict(SMALL, k=8, slices=2, q_offset=[60, 85])),  # a static cache's decode step
    (2, 4, 2, 1, 90, 16, dict(SMALL, k=8, slices=3, oversample=3, score="logit")),  # survivors compete across slices
    (2, 4, 2, 1, 30, 16, dict(SMALL, k=8, slices=4, oversample=4)),  # fewer candidates than groups: no round
    (2, 4, 2, 24, 60, 16, dict(SMALL, k=8, q_offset=[20, 31])),  # a static cache's chunked prefill
]
KERNEL_IDS = ["prefill", "decode-padded", "per-head-odd", "stride3", "token-blocks", "logit", "softcap",
              "sliced-uneven", "sliced-logit", "single-wide-beam", "sliced-prefill", "q-offset-decode",
              "oversampled", "oversampled-no-round", "q-offset-prefill"]


def _compare_kernel(case, device):
    batch, hq, hkv, q_len, k_len, dim, options = case
    q, k = _qk(batch, hq, hkv, q_len, k_len, dim, seed=q_len)
    kv_start = torch.tensor([0, 5][:batch])
    options = dict(options, q_offset=torch.tensor(options["q_offset"])) if "q_offset" in options else options
    expected = hip_mask_reference(q, k, kv_start=kv_start, **options)
    if "q_offset" in options:
        options["q_offset"] = options["q_offset"].to(device)
    got = hip_mask_triton(q.to(device), k.to(device), kv_start=kv_start.to(device), **options)
    assert torch.equal(got.block_counts.cpu(), expected.block_counts)
    assert torch.equal(got.block_indices.cpu(), expected.block_indices)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")
def test_triton_kernel_matches_reference_interpreted(case):
    _compare_kernel(case, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", KERNEL_CASES + [(1, 8, 2, 700, 900, 64, dict(k=64, block_size_q=64, block_size_k=2,
                                                                          query_stride=2, sink=16, window=64))])
def test_triton_kernel_matches_reference_on_gpu(case):
    _compare_kernel(case, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset,q_len", [("retrieval", 1), ("paper", 1), ("paper", 300)])
def test_bf16_search_on_gpu_matches_reference(preset, q_len):
    # Llama-3-8B's heads at 32K in bf16 (the interpreter's bf16 dots are wrong: only the GPU checks them). The kernel's
    # bf16 products sum in another order than the reference's float32 ones, so a near tie may rank the other way:
    # ask for 99% of the same blocks.
    c = HipConfig(preset=preset)
    gen = torch.Generator(device="cuda").manual_seed(q_len)
    q = torch.randn(1, 32, q_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    options = dict(k=c.k, block_size_q=c.block_size_q, block_size_k=c.block_size_k, query_stride=c.query_stride,
                   sink=c.sink, window=c.window, slices=c.decode_slices if q_len == 1 else 1,
                   oversample=c.decode_oversample if q_len == 1 else 1)
    got, expected = hip_mask_triton(q, k, **options), hip_mask_reference(q, k, **options)
    assert torch.equal(got.block_counts, expected.block_counts)
    same = (got.block_indices.unsqueeze(-1) == expected.block_indices.unsqueeze(-2)).any(-1).float().mean()
    assert same >= 0.99, f"only {same:.3f} of the blocks agree"


@pytest.mark.parametrize("launch", [{"tile_keys": 16, "num_warps": 2, "stages": 2, "transposed": False},
                                    {"tile_keys": 256, "num_warps": 8, "stages": 1, "transposed": True}])
def test_triton_kernel_launch_settings_keep_the_selection(launch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(1, 4, 2, 40, 40, 16, seed=3)
    expected = hip_mask_reference(q, k, **SMALL, k=8)
    got = hip_mask_triton(q.to(device), k.to(device), **SMALL, k=8, launch=launch)
    assert torch.equal(got.block_counts.cpu(), expected.block_counts)
    assert torch.equal(got.block_indices.cpu(), expected.block_indices)


@pytest.mark.parametrize("select_bits", [1, 2, 8, 0])
@pytest.mark.parametrize("distinct_keys", [700, 3, 1], ids=["random", "three-keys", "all-tied"])
def test_beam_select_by_digit_keeps_the_selection(select_bits, distinct_keys):
    # The beam kernel keeps each round's best halves by a radix select of select_bits a pass (0: a sort): 64 halves
    # for 32 groups, four rounds. The keys are drawn with repeats from a pool of 700, 3 or 1, so halves tie, also
    # between groups that scored differently in the round before: the lower half must win (the groups kept in the
    # order they lie, not by score).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(1, 4, 2, 20, 700, 16, seed=11)
    k = k[:, :, torch.randint(distinct_keys, (700,), generator=torch.Generator().manual_seed(1))]
    options = dict(SMALL, k=64, q_offset=torch.tensor([680]))
    _assert_same_search(q, k, options, {"select_bits": select_bits}, device)


@pytest.mark.parametrize("oversample", [1, 2])
@pytest.mark.parametrize("distinct_keys", [700, 3], ids=["random", "three-keys"])
def test_sliced_search_with_repeated_keys_keeps_the_selection(oversample, distinct_keys):
    # The sliced kernel's rounds break ties as the beam's do: keys drawn with repeats tie halves of groups that scored
    # differently in the round before, and the lower half must win. Two slices of 8 groups (16 with oversampling).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(2, 4, 2, 1, 700, 16, seed=12)
    k = k[:, :, torch.randint(distinct_keys, (700,), generator=torch.Generator().manual_seed(2))]
    options = dict(SMALL, k=32, slices=2, oversample=oversample, q_offset=torch.tensor([650, 699]))
    _assert_same_search(q, k, options, {}, device)


@pytest.mark.parametrize("launch", [{"tile_keys": 16, "merge_bits": 1}, {"tile_keys": 32, "merge_bits": 2},
                                    {"merge_bits": 8}, {"merge_bits": 0}])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "all-tied"])
def test_oversampled_decode_search_launch_settings_keep_the_selection(launch, ties):
    # A decode search with the log-sum-exp estimate: tile_keys 16 spreads the estimate over many programs' partials
    # (sink, window and samples in tiles of their own); merge_bits is the digit of the merge's radix select (0: a
    # sort). With every key equal, every block ties and the merge must keep the lowest ones.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(2, 4, 2, 1, 200, 16, seed=5)
    if ties:
        k = k[:, :, :1].expand_as(k).contiguous()
    options = dict(SMALL, k=8, slices=3, oversample=3, q_offset=torch.tensor([150, 199]))
    _assert_same_search(q, k, options, launch, device)


@pytest.mark.parametrize("merge_bits", [1, 2, 4, 8])
def test_oversampled_merge_of_many_survivors_keeps_the_best(merge_bits):
    # 192 survivors for 64 kept: the radix select's later passes decide (with few survivors the first pass does).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(1, 4, 2, 1, 700, 16, seed=9)
    options = dict(SMALL, k=128, slices=6, oversample=3, q_offset=torch.tensor([650]))
    _assert_same_search(q, k, options, {"merge_bits": merge_bits}, device)


def _assert_same_search(q, k, options, launch, device):
    expected = hip_mask_reference(q, k, **options)
    options["q_offset"] = options["q_offset"].to(device)
    got = hip_mask_triton(q.to(device), k.to(device), **options, launch=launch)
    assert torch.equal(got.block_counts.cpu(), expected.block_counts)
    assert torch.equal(got.block_indices.cpu(), expected.block_indices)


def test_search_reads_row_starts_given_as_strided_views_per_row():
    # kv_start and q_offset as columns of one [B, 2] tensor, as a static cache's mask layout holds them.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(2, 4, 2, 1, 90, 16, seed=7)
    starts = torch.tensor([[0, 60], [11, 85]])
    options = dict(SMALL, k=8, slices=3, oversample=2)
    expected = hip_mask_reference(q, k, kv_start=starts[:, 0].clone(), q_offset=starts[:, 1].clone(), **options)
    starts = starts.to(device)
    got = hip_mask_triton(q.to(device), k.to(device), kv_start=starts[:, 0], q_offset=starts[:, 1], **options)
    assert torch.equal(got.block_counts.cpu(), expected.block_counts)
    assert torch.equal(got.block_indices.cpu(), expected.block_indices)


# --- exactness ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("instance", [
    Hip(HipConfig(**FULL, shared_kv_heads=True)),
    Hip(HipConfig(**FULL, shared_kv_heads=False)),
    BlockTopK(BlockTopKConfig(k=64, block_size_q=8, block_size_k=4, window=4, sink=2)),
], ids=["hip-shared", "hip-per-head", "blocktopk"])
def test_attention_with_full_budget_is_dense(instance):
    q, k = _qk(batch=2, q_len=40, k_len=56)
    v = torch.randn_like(k)
    kv_start = torch.tensor([0, 11])
    call = AttentionCall(0, 0.3, 20.0, kv_start)
    out = instance.attend(q, k, v, call)
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3, 20.0, kv_start=kv_start), **TOL)


def test_attention_with_small_budget_is_not_dense():
    # The check above must be able to fail: a small budget drops keys and changes the output.
    q, k = _qk(q_len=40, k_len=56)
    v = torch.randn_like(k)
    out = Hip(HipConfig(**SMALL, k=4)).attend(q, k, v, AttentionCall(0, 0.25, None, None))
    assert (out - dense_attention(q, k, v, 0.25)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "mistral"])
@pytest.mark.parametrize("method,options", [("hip", FULL), ("blocktopk", dict(k=64, block_size_q=8, block_size_k=4,
                                                                              window=4, sink=2))])
def test_model_with_full_budget_matches_dense(family, method, options):
    assert_prefill_matches_unpatched(make_model(family), method, options, **TOL)


def test_dense_layers_option_keeps_leading_layers_exact(monkeypatch):
    import hf_longattn.methods.hip as hip_module

    seen = []
    search = hip_module.hip_mask
    monkeypatch.setattr(hip_module, "hip_mask", lambda q, key, **o: seen.append(q.shape) or search(q, key, **o))
    model = make_model("llama")
    with torch.no_grad(), patched(model, "hip", **SMALL, k=4, dense_layers=3):
        model(random_batch()[0])
    assert len(seen) == 1  # 4 layers, the first 3 dense


# --- decode ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("refresh_interval", [1, 3])
def test_generate_with_cache_and_full_budget_matches_dense(refresh_interval):
    model = make_model("llama")
    ids, mask = random_batch(length=24)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
        with patched(model, "hip", **FULL, refresh_interval=refresh_interval):
            out = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), **TOL)


def _count_searches(monkeypatch):
    import hf_longattn.methods.hip as hip_module

    calls = []
    search = hip_module.hip_mask
    monkeypatch.setattr(hip_module, "hip_mask", lambda q, key, **o: calls.append(q.shape[2]) or search(q, key, **o))
    return calls


def test_decode_searches_every_refresh_interval(monkeypatch):
    calls = _count_searches(monkeypatch)
    model = make_model("llama")
    ids = random_batch(batch=1, length=40)[0]
    with torch.no_grad(), patched(model, "hip", **SMALL, k=4, refresh_interval=4):
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    # Per layer: the prefill, then decode steps 1..9 search at steps 1, 5, 9.
    assert calls == [40] * 4 + [1] * 12


def test_new_generate_starts_with_a_fresh_search(monkeypatch):
    # A prompt shorter than one query block runs the decode path from its first call; without the reset the second
    # generate() would reuse the first one's selection.
    calls = _count_searches(monkeypatch)
    model = make_model("llama")
    with torch.no_grad(), patched(model, "hip", **SMALL, k=4, refresh_interval=8):
        for seed in (1, 2):
            ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(seed))
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls == [6] * 8


def test_decode_search_lists_the_blocks_that_leave_the_window_before_the_next_search():
    config = HipConfig(**SMALL, k=4, refresh_interval=4)
    hip, state = Hip(config), {}
    q, k = _qk(q_len=1, k_len=41)
    first = hip.select(q, k, AttentionCall(0, 0.25, None, None, state))
    searched = hip_mask_reference(q, k, k=4, **SMALL, slices=config.decode_slices, oversample=config.decode_oversample)
    # The search's candidates end at block ceil((41 - 4) / 2) = 19 (window 4, block_size_k 2). The next 3 steps grow
    # the keys to 44, whose last query's window starts at key 40: block 19 (keys 38, 39) leaves the window meanwhile.
    for h in range(2):
        n = int(searched.block_counts[0, h, 0])
        assert first.block_indices[0, h, 0, : n + 1].tolist() == searched.block_indices[0, h, 0, :n].tolist() + [19]
        assert int(first.block_counts[0, h, 0]) == n + 1
    for k_len in (42, 43, 44):
        q, k = _qk(q_len=1, k_len=k_len)
        assert hip.select(q, k, AttentionCall(0, 0.25, None, None, state)) is first
    q, k = _qk(q_len=1, k_len=45)
    assert hip.select(q, k, AttentionCall(0, 0.25, None, None, state)) is not first


def test_decode_searches_again_when_a_call_adds_more_keys_than_the_pattern_covers():
    hip, state = Hip(HipConfig(**SMALL, k=4, refresh_interval=8)), {}
    q, k = _qk(q_len=1, k_len=41)
    first = hip.select(q, k, AttentionCall(0, 0.25, None, None, state))
    q, k = _qk(q_len=8, k_len=49)  # 8 new keys at once: beyond the 7 steps of one key the search prepared for
    assert hip.select(q, k, AttentionCall(0, 0.25, None, None, state)) is not first


def test_default_decode_searches_every_step_and_keeps_no_state(monkeypatch):
    calls = _count_searches(monkeypatch)
    model = make_model("llama")
    ids = random_batch(batch=1, length=40)[0]
    with torch.no_grad(), patched(model, "hip", **SMALL, k=4):
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        runners = [m.hf_longattn_runner for m in model.modules() if hasattr(m, "hf_longattn_runner")]
        assert runners and all(r.state == {} for r in runners)
    assert calls == [40] * 4 + [1] * 16  # the prefill, then every one of the 4 decode steps in each of 4 layers


# --- static cache: queries placed by q_offset ---------------------------------------------------------------------

@pytest.mark.parametrize("search,q_len", [(hip_mask_reference, 1), (hip_mask_reference, 20), (hip_mask_triton, 1)])
def test_search_with_q_offset_equals_the_search_on_the_real_keys(search, q_len):
    # A static cache: each row's keys past its real length are garbage, and its queries start at q_offset.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    real, options = [50, 61], dict(SMALL, k=8, slices=2 if q_len == 1 else 1)
    q, k = (t.to(device) for t in _qk(batch=2, q_len=q_len, k_len=80, seed=4))
    got = search(q, k, q_offset=torch.tensor([n - q_len for n in real], device=device), **options)
    for b, n in enumerate(real):
        expected = search(q[b:b + 1], k[b:b + 1, :, :n], **options)
        assert torch.equal(got.block_counts[b], expected.block_counts[0])
        assert torch.equal(got.block_indices[b], expected.block_indices[0])


@pytest.mark.parametrize("q_len", [1, 20])
def test_hip_attends_through_a_static_cache_as_through_the_real_keys(q_len):
    assert Hip.supports_query_offset
    hip, real = Hip(HipConfig(**SMALL, k=8, decode_slices=2)), [50, 61]
    q, k = _qk(batch=2, q_len=q_len, k_len=80, seed=5)
    v = torch.randn_like(k)
    call = AttentionCall(0, 0.25, None, None, q_offset=torch.tensor([n - q_len for n in real]))
    out = hip.attend(q, k, v, call)
    for b, n in enumerate(real):
        expected = hip.attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], AttentionCall(0, 0.25, None, None))
        torch.testing.assert_close(out[b:b + 1], expected, **TOL)


def test_decode_step_under_torch_compile_is_the_eager_step():
    # The search and the attention are each one opaque custom op: nothing breaks the graph, no Python state changes.
    hip = Hip(HipConfig(**SMALL, k=8, decode_slices=2))
    q, k = _qk(batch=2, q_len=1, k_len=80, seed=6)
    v = torch.randn_like(k)

    def step(q, k, v, q_offset):
        return hip.attend(q, k, v, AttentionCall(0, 0.25, None, None, q_offset=q_offset))

    q_offset = torch.tensor([49, 60])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, q_offset), step(q, k, v, q_offset), **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_replays_in_a_cuda_graph():
    # What torch.compile's reduce-overhead mode does with a static cache: the search, the merge of its slices and the
    # attention's split merge must all replay from a graph (kept buffers, counters back at zero after every launch).
    hip = Hip(HipConfig())
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, 16384, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    call = AttentionCall(0, 128**-0.5, None, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hip.attend(q, k, v, call)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hip.attend(q, k, v, call)
    for seed in (8, 9):
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen.manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(out, hip.attend(q, k, v, call), atol=0, rtol=0)


# --- blocktopk -------------------------------------------------------------------------------------------------------

def test_blocktopk_picks_the_block_with_the_best_mean_key():
    dim = 8
    key = torch.zeros(1, 1, 64, dim)
    key[0, 0, 20:24] = 1.0  # block 5 (block_size_k=4): mean key all ones
    key[0, 0, 40] = 3.0  # one strong token in block 10: mean 0.75, below block 5's 1.0
    query = torch.ones(1, 1, 8, dim)
    method = BlockTopK(BlockTopKConfig(k=4, block_size_q=8, block_size_k=4, window=8, sink=0))
    pattern = method.select(query, key, AttentionCall(0, 1.0, None, None))
    assert pattern.block_indices[0, 0, 0, :1].tolist() == [5] and int(pattern.block_counts[0, 0, 0]) == 1
