"""The Triton kernels against the PyTorch reference (and against exact dense attention where the pattern covers all).

Without a GPU the kernels run under Triton's interpreter on tiny shapes; with one, the same tests run compiled on the
device, and the `gpu` tests add realistic shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton modules are first imported (lazily)

pytest.importorskip("triton")

from hf_longattn.kernels import SparsePattern, dense_attention, sparse_attention, sparse_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=2e-5, rtol=1e-4)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_pattern(batch, heads, q_len, k_len, bq, bk, max_blocks, sink=0, window=0, seed=0, device=DEVICE):
    """Distinct random key blocks per row, anywhere in the cache (future ones too: the kernel must mask them)."""
    gen = torch.Generator().manual_seed(seed)
    n_qb, n_kb = -(-q_len // bq), -(-k_len // bk)
    rows = [torch.randperm(n_kb, generator=gen)[:max_blocks] for _ in range(batch * heads * n_qb)]
    indices = torch.stack(rows).view(batch, heads, n_qb, -1).int()
    counts = torch.randint(0, indices.shape[-1] + 1, (batch, heads, n_qb), generator=gen).int()
    return SparsePattern(indices.to(device), counts.to(device), bq, bk, sink, window)


def qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def assert_matches_reference(q, k, v, pattern, tol=FP32_TOL, **kwargs):
    out, lse = sparse_attention(q, k, v, pattern, return_lse=True, backend="triton", **kwargs)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, pattern, return_lse=True, **kwargs)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    torch.testing.assert_close(lse.nan_to_num(0.0, 0.0, 0.0), ref_lse.nan_to_num(0.0, 0.0, 0.0), **tol)
    return out, lse


KV_START = torch.tensor([0, 7])


@pytest.mark.parametrize("sink,window", [(0, 0), (4, 0), (0, 40), (5, 24)])
@pytest.mark.parametrize("block_size_k", [2, 16, 64])
@pytest.mark.parametrize("pattern_heads", ["kv", "q"])
def test_prefill_matches_reference(pattern_heads, block_size_k, sink, window):
    q, k, v = qkv(2, 4, 2, 96, 96, 16)
    heads = 2 if pattern_heads == "kv" else 4
    pattern = random_pattern(2, heads, 96, 96, 16, block_size_k, max_blocks=48 // block_size_k + 1, sink=sink,
                             window=window)
    assert_matches_reference(q, k, v, pattern, kv_start=KV_START.to(DEVICE))


@pytest.mark.parametrize("case", [
    dict(name="softcap", softcap=3.0, scale=0.4),
    dict(name="queries at the end", q_len=37),
    dict(name="group of 3 heads", q_heads=6, kv_heads=2),
    dict(name="one kv head, pattern per query head", q_heads=3, kv_heads=1, pattern_heads=3),
    dict(name="no GQA", q_heads=2, kv_heads=2),
    dict(name="head_dim 24", head_dim=24),
    dict(name="query block of 24", block_size_q=24),
    dict(name="key block of 24", block_size_k=24),
])
def test_prefill_variants(case):
    c = dict(q_heads=4, kv_heads=2, q_len=80, k_len=80, head_dim=16, block_size_q=16, block_size_k=16, softcap=None,
             scale=None)
    c.update(case)
    heads = c.get("pattern_heads", c["kv_heads"])
    q, k, v = qkv(2, c["q_heads"], c["kv_heads"], c["q_len"], c["k_len"], c["head_dim"])
    pattern = random_pattern(2, heads, c["q_len"], c["k_len"], c["block_size_q"], c["block_size_k"], 3, sink=3,
                             window=20)
    assert_matches_reference(q, k, v, pattern, kv_start=KV_START.to(DEVICE), softcap=c["softcap"], scale=c["scale"])


def test_prefill_several_tiles_per_key_block():
    """Key blocks of 64 walked in tiles of 16, and query blocks of 64 in tiles of 16 rows."""
    from hf_longattn.kernels.triton_prefill import sparse_prefill

    q, k, v = qkv(1, 4, 2, 128, 160, 16)
    pattern = random_pattern(1, 2, 128, 160, 64, 64, 2, sink=16, window=40)
    out, lse = sparse_prefill(q, k, v, pattern, 0.25, None, None, config=dict(BLOCK_M=32, BLOCK_N=16))
    ref_out, ref_lse = sparse_attention_reference(q, k, v, pattern, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)


# Triton 3.9's interpreter computes bfloat16 dots wrongly (float16 ones are right), so bfloat16 runs on the GPU only.
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=gpu)])
def test_prefill_half_precision(dtype):
    q, k, v = qkv(2, 4, 2, 64, 64, 32, dtype=dtype)
    pattern = random_pattern(2, 2, 64, 64, 16, 16, 3, sink=4, window=16)
    assert_matches_reference(q, k, v, pattern, tol=dict(atol=2e-2, rtol=2e-2), kv_start=KV_START.to(DEVICE))


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("block_size_k,sink,window,pattern_heads", [
    (2, 0, 0, "kv"), (16, 4, 24, "kv"), (64, 5, 10, "q"), (16, 0, 33, "q"),
])
def test_decode_matches_reference(q_len, block_size_k, sink, window, pattern_heads):
    q, k, v = qkv(2, 4, 2, q_len, 150, 16)
    heads = 2 if pattern_heads == "kv" else 4
    pattern = random_pattern(2, heads, q_len, 150, 16, block_size_k, 64 // block_size_k + 1, sink=sink, window=window)
    assert_matches_reference(q, k, v, pattern, kv_start=KV_START.to(DEVICE), softcap=4.0 if q_len == 5 else None)


@pytest.mark.parametrize("q_len", [1, 20], ids=["decode", "prefill"])
def test_row_starts_given_as_strided_views_are_read_per_row(q_len):
    """kv_start and q_offset as columns of one [B, 2] tensor (how a static cache's mask layout holds them): the
    kernels read row b's value at pointer + b, so a view with stride 2 once gave row 1 row 0's query offset."""
    q, k, v = qkv(2, 4, 2, q_len, 64, 16)
    starts = torch.tensor([[0, 40], [9, 44 - q_len]], device=DEVICE)  # (kv_start, q_offset) per row
    pattern = random_pattern(2, 2, q_len, 64, 16, 8, 3, sink=2, window=8)
    assert_matches_reference(q, k, v, pattern, kv_start=starts[:, 0], q_offset=starts[:, 1])


@pytest.mark.parametrize("splits", [1, 3, 40])
@pytest.mark.parametrize("merge", [1, 4])
def test_decode_any_number_of_splits(splits, merge):
    """Empty splits (more splits than tiles) must merge away without a trace, however many partials the last split
    merges at a time (a count of splits that is not a multiple of it leaves masked ones)."""
    from hf_longattn.kernels.triton_decode import sparse_decode

    q, k, v = qkv(1, 4, 2, 2, 100, 16)
    pattern = random_pattern(1, 2, 2, 100, 16, 16, 4, sink=4, window=20)
    out, lse = sparse_decode(q, k, v, pattern, 0.25, None, None, config=dict(BLOCK_N=16, splits=splits, MERGE=merge))
    ref_out, ref_lse = sparse_attention_reference(q, k, v, pattern, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)


def test_decode_leaves_its_arrival_counters_at_zero():
    """The split programs of a head count their arrivals in counters kept between calls, and the last one merges:
    every call must reset them, or the next call's merge would never run."""
    from hf_longattn.kernels.triton_decode import sparse_decode
    from hf_longattn.kernels.workspace import arrival_counters

    q, k, v = qkv(1, 4, 2, 1, 100, 16)
    pattern = random_pattern(1, 2, 1, 100, 16, 16, 4, sink=4, window=20)
    first, _ = sparse_decode(q, k, v, pattern, 0.25, None, None, config=dict(BLOCK_N=16, splits=3))
    again, _ = sparse_decode(q, k, v, pattern, 0.25, None, None, config=dict(BLOCK_N=16, splits=3))
    assert torch.equal(first, again)
    assert not arrival_counters(q.device, 1).any()


@pytest.mark.parametrize("q_len", [70, 3])  # prefill kernel, decode kernel
@pytest.mark.parametrize("coverage", ["window", "blocks"])
def test_full_coverage_is_dense_attention(coverage, q_len):
    q, k, v = qkv(2, 4, 2, q_len, 70, 16)
    kv_start = KV_START.to(DEVICE)
    if coverage == "window":
        pattern = random_pattern(2, 2, q_len, 70, 16, 16, 2, sink=3, window=70)
    else:  # every key block listed, no sink, no window
        n_qb, n_kb = -(-q_len // 16), -(-70 // 8)
        indices = torch.arange(n_kb, dtype=torch.int32).expand(2, 2, n_qb, n_kb).contiguous()
        counts = torch.full((2, 2, n_qb), n_kb, dtype=torch.int32)
        pattern = SparsePattern(indices.to(DEVICE), counts.to(DEVICE), 16, 8)
    out = sparse_attention(q, k, v, pattern, kv_start=kv_start, backend="triton")
    torch.testing.assert_close(out, dense_attention(q, k, v, kv_start=kv_start), **FP32_TOL)


def _placed_queries_mask(q_len, k_len, q_offset, kv_start):
    """Boolean [B, 1, Lq, Lk]: query i of row b sits at q_offset[b] + i and sees the existing keys up to it."""
    q_pos = q_offset.view(-1, 1, 1, 1) + torch.arange(q_len, device=DEVICE).view(1, 1, -1, 1)
    k_pos = torch.arange(k_len, device=DEVICE).view(1, 1, 1, -1)
    return (k_pos <= q_pos) & (k_pos >= kv_start.view(-1, 1, 1, 1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("q_len", [40, 3])  # prefill kernel, decode kernel
@pytest.mark.parametrize("offsets", [(20, 27), (70, 70), (0, 95)], ids=["static-cache", "past-the-keys", "mixed"])
def test_q_offset_places_the_queries(offsets, q_len, backend):
    """Queries at given positions (a static cache's empty tail; keys all in the past): a covering pattern is dense
    attention under the mask those positions imply."""
    q, k, v = qkv(2, 4, 2, q_len, 70, 16)
    q_offset, kv_start = torch.tensor(offsets, device=DEVICE), KV_START.to(DEVICE)
    pattern = random_pattern(2, 2, q_len, 70, 16, 16, 2, sink=3, window=1 << 20)
    out = sparse_attention(q, k, v, pattern, kv_start=kv_start, q_offset=q_offset, backend=backend)
    expected = dense_attention(q, k, v, mask=_placed_queries_mask(q_len, 70, q_offset, kv_start))
    torch.testing.assert_close(out, expected, **FP32_TOL)


@pytest.mark.parametrize("q_len", [48, 5])
@pytest.mark.parametrize("offsets", [(10, 33), (96, 120)], ids=["inside", "past-the-keys"])
def test_q_offset_kernels_match_reference(offsets, q_len):
    q, k, v = qkv(2, 4, 2, q_len, 96, 16)
    pattern = random_pattern(2, 2, q_len, 96, 16, 16, 4, sink=4, window=24)
    assert_matches_reference(q, k, v, pattern, kv_start=KV_START.to(DEVICE), q_offset=torch.tensor(offsets, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("q_len", [1, 20], ids=["decode", "prefill"])
def test_out_receives_the_output_in_place(q_len, backend):
    """`out=`: a strided view (here every other row of a larger buffer) is written and returned, nothing else."""
    q, k, v = qkv(2, 4, 2, q_len, 64, 16)
    pattern = random_pattern(2, 2, q_len, 64, 16, 8, 3, sink=2, window=8)
    expected = sparse_attention_reference(q, k, v, pattern, kv_start=KV_START.to(DEVICE))
    buffer = torch.full((2, 2 * q_len, 4, 16), 7.0, device=DEVICE)
    out = buffer[:, ::2]
    got = sparse_attention(q, k, v, pattern, kv_start=KV_START.to(DEVICE), backend=backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(buffer[:, ::2], expected, **FP32_TOL)
    assert torch.all(buffer[:, 1::2] == 7.0)
    with pytest.raises(ValueError, match="out must be"):
        sparse_attention(q, k, v, pattern, out=buffer[:, :q_len, :2])


def test_query_that_sees_no_key_gets_zero_and_minus_inf():
    q, k, v = qkv(1, 4, 2, 40, 40, 16)
    pattern = random_pattern(1, 2, 40, 40, 16, 16, 2, sink=2, window=8)
    out, lse = sparse_attention(q, k, v, pattern, kv_start=torch.tensor([10], device=DEVICE), return_lse=True,
                                backend="triton")
    assert torch.all(out[:, :10] == 0) and torch.all(lse[:, :, :10] == -torch.inf)
    assert torch.all(torch.isfinite(lse[:, :, 10:])) and torch.all(out[:, 10:].abs().sum(-1) > 0)


def test_custom_op_under_torch_compile():
    q, k, v = qkv(1, 4, 2, 24, 24, 16)
    pattern = random_pattern(1, 2, 24, 24, 8, 8, 2, sink=2, window=8)
    backend = "triton" if DEVICE == "cuda" else "reference"

    def attend(q, k, v, indices, counts):
        p = SparsePattern(indices, counts, 8, 8, 2, 8)
        out, lse = sparse_attention(q, k, v, p, softcap=5.0, return_lse=True, backend=backend)
        return out * 2, lse

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, pattern.block_indices, pattern.block_counts)
    expected, expected_lse = attend(q, k, v, pattern.block_indices, pattern.block_counts)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    torch.testing.assert_close(lse, expected_lse, **FP32_TOL)


def test_bad_inputs_name_the_problem():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    pattern = random_pattern(1, 2, 8, 8, 8, 8, 1)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, v, pattern, backend="cuda")
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        sparse_attention(q[:, :3], k, v, random_pattern(1, 3, 8, 8, 8, 8, 1))
    with pytest.raises(ValueError, match="last Lq"):
        sparse_attention(torch.cat([q, q], 2), k, v, random_pattern(1, 2, 16, 8, 8, 8, 1))
    with pytest.raises(ValueError, match="kv_start"):
        sparse_attention(q, k, v, pattern, kv_start=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="q_offset must be a \\[B\\]"):
        sparse_attention(q, k, v, pattern, q_offset=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        sparse_attention(q.double(), k.double(), v.double(), pattern, backend="triton")


# Realistic shapes on the device.

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype,block_size_k,softcap", [
    (128, torch.bfloat16, 128, None), (128, torch.bfloat16, 16, None), (64, torch.float16, 64, None),
    (256, torch.bfloat16, 64, 50.0), (128, torch.float32, 128, None),
])
def test_gpu_prefill_realistic(head_dim, dtype, block_size_k, softcap):
    q, k, v = qkv(2, 32, 8, 4096, 4096, head_dim, dtype=dtype)
    pattern = random_pattern(2, 8, 4096, 4096, 128, block_size_k, 2048 // block_size_k, sink=128, window=1024)
    tol = FP32_TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_matches_reference(q, k, v, pattern, tol=tol, softcap=softcap, kv_start=torch.tensor([0, 333], device=DEVICE))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("q_len,head_dim,dtype,block_size_k", [
    (1, 128, torch.bfloat16, 128), (4, 128, torch.bfloat16, 128), (16, 128, torch.bfloat16, 128),
    (1, 128, torch.bfloat16, 2), (1, 128, torch.float32, 128), (1, 256, torch.bfloat16, 64),
])
def test_gpu_decode_realistic(q_len, head_dim, dtype, block_size_k):
    # The key tile follows the row size (128 keys of 16-bit head_dim 128, 64 of float32 or head_dim 256): each must
    # fit shared memory and compute the same.
    q, k, v = qkv(2, 32, 8, q_len, 32768, head_dim, dtype=dtype)
    pattern = random_pattern(2, 8, q_len, 32768, 128, block_size_k, 2048 // block_size_k, sink=128, window=1920)
    tol = FP32_TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_matches_reference(q, k, v, pattern, tol=tol, kv_start=torch.tensor([0, 5000], device=DEVICE))


def test_masked_dense_attention_in_query_chunks_is_the_same(monkeypatch):
    """A masked dense call whose scores would be large runs its query rows in chunks: the same output."""
    from hf_longattn.kernels import dense as dense_module

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    kv_start = torch.tensor([0, 37])
    whole = dense_attention(q, k, v, kv_start=kv_start)
    monkeypatch.setattr(dense_module, "_MAX_MASKED_SCORES", 2 * 4 * 300 * 7)  # chunks of 7 query rows
    torch.testing.assert_close(dense_attention(q, k, v, kv_start=kv_start), whole, **FP32_TOL)
    padded_row = whole[1, :37]
    assert torch.count_nonzero(padded_row) == 0  # padding queries see no key: zeros, as the sparse kernels give


def test_custom_op_keeps_no_scratch_between_calls():
    """Under torch.compile the kernels run inside the custom op, whose scratch must be its own call's: torch.compile's
    CUDA graphs own what their calls allocate and refuse to run when such a tensor outlives the call (a static cache
    under compile failed that way on an H200). An eager call keeps its scratch for the next one."""
    from hf_longattn.kernels import workspace
    from hf_longattn.kernels.ops import sparse_attention_op
    from hf_longattn.kernels.triton_decode import sparse_decode

    q, k, v = qkv(1, 4, 2, 1, 100, 16)
    pattern = random_pattern(1, 2, 1, 100, 16, 16, 4, sink=4, window=20)
    workspace._KEPT.clear()
    out, _ = sparse_attention_op(q, k, v, pattern.block_indices, pattern.block_counts, None, None, 16, 16, 4, 20,
                                 0.25, None, "triton")
    assert not workspace._KEPT
    expected, _ = sparse_attention_reference(q, k, v, pattern, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    sparse_decode(q, k, v, pattern, 0.25, None, None, config=dict(BLOCK_N=16, splits=3))
    assert any(name == "decode partials" for _, name in workspace._KEPT)
