"""Single-layer attention speed: the Triton sparse kernels against dense SDPA (cuDNN, flash) and FlexAttention.

Llama-3-8B shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1, causal prefill at 8K/32K/128K with a
token budget per query block of 128 queries (sink 128 + window, or random causal 128-blocks that always include the
diagonal block), FlexAttention given the same mask; decode (1 and 4 queries) at 128K against dense SDPA decode.
Every number comes from one run; FLOP counts are over the visible (query, key) pairs ("useful") and over the 128 x 128
blocks that hold at least one visible pair ("computed").

    python benchmarks/bench_kernels.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_longattn.kernels import SparsePattern, sparse_attention, window_pattern
from hf_longattn.kernels.triton_prefill import default_prefill_config

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
SINK = 128
CASES = [(8192, 2048), (32768, 2048), (32768, 8192), (131072, 2048), (131072, 8192)]  # (context, budget)
SWEEP = [  # prefill tile configs tried at 128K (BLOCK_M = stacked rows of the GQA group)
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=2),
]


def bench_ms(fn, cudagraph=False) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if cudagraph:
        return triton.testing.do_bench_cudagraph(fn, rep=50)
    rep = max(20, min(200, int(once * 1e3 * 5)))  # several repeats even of a 400 ms dense call
    return triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep)


def loop_us(fn, calls=200) -> float:
    """Back-to-back eager calls timed on the host: max(host, GPU) per call, what plain generate() gets."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


def window_case(k_len, budget, device):
    return window_pattern(1, KV_HEADS, k_len, BLOCK, BLOCK, SINK, budget - SINK, device=device)


def random_blocks_case(k_len, budget, device, seed=0):
    """budget // 128 distinct causal key blocks per query block and kv head: the diagonal + random earlier ones."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_qb, per_row = k_len // BLOCK, budget // BLOCK
    scores = torch.rand(KV_HEADS, n_qb, n_qb, generator=gen)
    causal = torch.arange(n_qb).view(-1, 1) >= torch.arange(n_qb).view(1, -1)
    scores = scores.masked_fill(~causal, -1.0)
    scores[:, torch.arange(n_qb), torch.arange(n_qb)] = 2.0  # the diagonal block always
    top = scores.topk(per_row, dim=-1)
    indices = top.indices.masked_fill(top.values < 0, n_qb).sort(-1).values  # non-causal picks go to the end
    counts = (top.values >= 0).sum(-1)
    indices = indices.clamp_max(n_qb - 1)
    return SparsePattern(indices.int().unsqueeze(0).to(device), counts.int().unsqueeze(0).to(device), BLOCK, BLOCK)


def flex_block_mask(pattern: SparsePattern, k_len, device):
    from torch.nn.attention.flex_attention import create_block_mask

    if pattern.max_blocks == 0:
        sink, window = pattern.sink_tokens, pattern.window_tokens

        def mask_mod(b, h, q, kv):
            return (kv <= q) & ((kv < sink) | (q - kv < window))
        return create_block_mask(mask_mod, None, None, k_len, k_len, device=device, _compile=True)
    n_qb = k_len // BLOCK
    live = torch.arange(pattern.max_blocks, device=device) < pattern.block_counts[0].unsqueeze(-1)
    column = torch.where(live, pattern.block_indices[0].long(), n_qb)  # dead slots go to a spare column
    listed = torch.zeros(KV_HEADS, n_qb, n_qb + 1, dtype=torch.bool, device=device)
    listed.scatter_(-1, column, True)
    listed = listed[..., :n_qb].contiguous()
    group = Q_HEADS // KV_HEADS

    def mask_mod(b, h, q, kv):
        return (kv <= q) & listed[h // group, q // BLOCK, kv // BLOCK]
    return create_block_mask(mask_mod, 1, Q_HEADS, k_len, k_len, device=device, _compile=True)


def mask_counts(block_mask, k_len, pattern):
    """(visible (q, k) pairs summed over query heads, non-empty 128 x 128 blocks summed over query heads)."""
    heads = Q_HEADS if block_mask.kv_num_blocks.shape[1] == 1 else 1
    blocks = (block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()).item() * heads
    if pattern.max_blocks == 0:
        p = torch.arange(k_len, dtype=torch.float64)
        visible = torch.clamp(p + 1, max=pattern.sink_tokens) + torch.clamp(p + 1 - pattern.sink_tokens, 0, pattern.window_tokens)
        pairs = visible.sum().item() * Q_HEADS
    else:  # every listed block is fully visible except the diagonal one, which is a causal triangle
        counts = pattern.block_counts.double().sum().item()
        n_qb = k_len // BLOCK
        pairs = (counts * BLOCK * BLOCK - KV_HEADS * n_qb * BLOCK * (BLOCK - 1) / 2) * (Q_HEADS // KV_HEADS)
    return pairs, blocks


def tflops(flop, ms):
    return flop / (ms * 1e-3) / 1e12


def sdpa_dense(q, k_rep, v_rep, backend):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
    return run


def prefill_rows(args, device, results, save):
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dense_by_context = {}
    for k_len, budget in CASES:
        if k_len not in args.contexts:
            continue
        gen = torch.Generator(device=device).manual_seed(k_len)
        q = torch.randn(1, Q_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        dense_flop = 4 * HEAD_DIM * Q_HEADS * k_len * (k_len + 1) / 2
        if k_len not in dense_by_context:
            group = Q_HEADS // KV_HEADS
            k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            row = {"context": k_len}
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    row[f"{name}_ms"] = bench_ms(sdpa_dense(q, k_rep, v_rep, backend))
                    row[f"{name}_tflops"] = tflops(dense_flop, row[f"{name}_ms"])
                except RuntimeError as e:
                    row[f"{name}_error"] = str(e).splitlines()[0]
            del k_rep, v_rep
            dense_by_context[k_len] = row
            results["dense"].append(row)
            print("dense", row, flush=True)
        dense = dense_by_context[k_len]
        for kind, make in (("sink+window", window_case), ("random blocks", random_blocks_case)):
            pattern = make(k_len, budget, device)
            block_mask = flex_block_mask(pattern, k_len, device)
            pairs, blocks = mask_counts(block_mask, k_len, pattern)
            computed_flop = blocks * BLOCK * BLOCK * 4 * HEAD_DIM
            useful_flop = pairs * 4 * HEAD_DIM
            ours = lambda: sparse_attention(q, k, v, pattern)  # noqa: E731
            theirs = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)  # noqa: E731
            diff = (ours().transpose(1, 2).float() - theirs().float()).abs().max().item()
            row = {"context": k_len, "budget": budget, "density": budget / k_len, "pattern": kind,
                   "ours_ms": bench_ms(ours), "flex_ms": bench_ms(theirs), "max_abs_diff_vs_flex": diff,
                   "computed_blocks": blocks, "useful_tflop": useful_flop / 1e12, "computed_tflop": computed_flop / 1e12}
            row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
            for name in ("cudnn", "flash"):
                if f"{name}_ms" in dense:
                    row[f"speedup_vs_{name}"] = dense[f"{name}_ms"] / row["ours_ms"]
            row["ours_tflops_computed"] = tflops(computed_flop, row["ours_ms"])
            row["ours_tflops_useful"] = tflops(useful_flop, row["ours_ms"])
            row["flex_tflops_computed"] = tflops(computed_flop, row["flex_ms"])
            if "cudnn_tflops" in dense:
                row["ours_computed_vs_cudnn_tflops"] = row["ours_tflops_computed"] / dense["cudnn_tflops"]
            results["prefill"].append(row)
            print("prefill", {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
            save()
        del q, k, v


def sweep_rows(args, device, results, save):
    """Tile configs at 128K / 2K budget, and the price of not packing GQA groups (one pattern head per query head)."""
    from hf_longattn.kernels.triton_prefill import sparse_prefill

    k_len = max(args.contexts)
    q = torch.randn(1, Q_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for kind, make in (("sink+window", window_case), ("random blocks", random_blocks_case)):
        pattern = make(k_len, 2048, device)
        per_q_head = SparsePattern(pattern.block_indices.repeat_interleave(4, 1), pattern.block_counts.repeat_interleave(4, 1),
                                   BLOCK, BLOCK, pattern.sink_tokens, pattern.window_tokens)
        for cfg in SWEEP:
            row = {"context": k_len, "pattern": kind, **cfg}
            try:
                row["packed_ms"] = bench_ms(lambda: sparse_prefill(q, k, v, pattern, HEAD_DIM**-0.5, None, None, config=cfg))
                row["per_query_head_ms"] = bench_ms(
                    lambda: sparse_prefill(q, k, v, per_q_head, HEAD_DIM**-0.5, None, None, config=cfg))
            except Exception as e:  # a config that does not fit the chip (shared memory) is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            results["sweep"].append(row)
            print("sweep", row, flush=True)
            save()
    del q, k, v


def decode_rows(args, device, results, save):
    k_len = max(args.contexts)
    k = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for q_len in (1, 4):
        q = torch.randn(1, Q_HEADS, q_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
        mask = None
        if q_len > 1:  # the last q_len keys of a causal cache
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)

        def dense():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        for kind in ("sink+window", "random blocks"):
            if kind == "sink+window":
                pattern = window_pattern(1, KV_HEADS, q_len, BLOCK, BLOCK, SINK, 2048 - SINK, device=device)
            else:
                full = random_blocks_case(k_len, 2048, device)
                pattern = SparsePattern(full.block_indices[:, :, -1:].contiguous(), full.block_counts[:, :, -1:].contiguous(),
                                        BLOCK, BLOCK)
            ours = lambda: sparse_attention(q, k, v, pattern)  # noqa: E731
            row = {"context": k_len, "queries": q_len, "budget": 2048, "pattern": kind,
                   "ours_us": 1e3 * bench_ms(ours), "dense_sdpa_us": 1e3 * bench_ms(dense),
                   "ours_loop_us": loop_us(ours), "dense_sdpa_loop_us": loop_us(dense),
                   "ours_graph_us": 1e3 * bench_ms(ours, cudagraph=True),
                   "dense_sdpa_graph_us": 1e3 * bench_ms(dense, cudagraph=True)}
            row["speedup"] = row["dense_sdpa_us"] / row["ours_us"]
            row["speedup_loop"] = row["dense_sdpa_loop_us"] / row["ours_loop_us"]
            row["speedup_graph"] = row["dense_sdpa_graph_us"] / row["ours_graph_us"]
            results["decode"].append(row)
            print("decode", row, flush=True)
            save()


DECODE_SWEEP = [dict(BLOCK_N=n, num_warps=w, splits=sp) for n in (32, 64, 128) for w in (4, 8) for sp in (None, 64)]


def decode_sweep_rows(args, device, results, save):
    """Launch settings of the sparse decode kernel (one query, 2K sink + window at the longest context)."""
    from hf_longattn.kernels.triton_decode import sparse_decode

    k_len = max(args.contexts)
    k = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    pattern = window_pattern(1, KV_HEADS, 1, BLOCK, BLOCK, SINK, 2048 - SINK, device=device)
    for cfg in DECODE_SWEEP:
        row = {"context": k_len, **cfg}
        try:
            row["us"] = 1e3 * bench_ms(lambda: sparse_decode(q, k, v, pattern, HEAD_DIM**-0.5, None, None, config=cfg))
        except Exception as e:  # a config that does not fit the chip is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        results["decode_sweep"].append(row)
        print("decode sweep", row, flush=True)
        save()


def markdown(results) -> str:
    lines = [f"# Sparse attention kernels, {results['machine']['gpu']}", "", f"Command: `{results['command']}`", "",
             f"torch {results['machine']['torch']}, triton {results['machine']['triton']}. Single layer, 32 query heads, "
             "8 kv heads, head_dim 128, bf16, batch 1. Times in ms (decode in us). Prefill tiles: "
             f"{results.get('prefill_config')}.", "",
             "## Prefill", "",
             "| context | budget | density | pattern | ours | FlexAttention | cuDNN dense | flash dense | vs Flex | vs cuDNN "
             "| ours TFLOP/s (computed / useful) | Flex TFLOP/s (computed) | cuDNN TFLOP/s | ours/cuDNN TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["context"]: r for r in results["dense"]}
    for r in results["prefill"]:
        d = dense.get(r["context"], {})
        lines.append(
            f"| {r['context'] // 1024}K | {r['budget']} | 1/{round(1 / r['density'])} | {r['pattern']} | {r['ours_ms']:.2f} "
            f"| {r['flex_ms']:.2f} | {d.get('cudnn_ms', math.nan):.1f} | {d.get('flash_ms', math.nan):.1f} "
            f"| {r['speedup_vs_flex']:.2f}x | {r.get('speedup_vs_cudnn', math.nan):.1f}x "
            f"| {r['ours_tflops_computed']:.0f} / {r['ours_tflops_useful']:.0f} | {r['flex_tflops_computed']:.0f} "
            f"| {d.get('cudnn_tflops', math.nan):.0f} | {r.get('ours_computed_vs_cudnn_tflops', math.nan):.0%} |")
    lines += ["", "## Decode (context 128K, 2K budget)", "",
              "Eager: do_bench (GPU time after an L2 flush); loop: back-to-back eager calls, host included (what "
              "generate() gets); CUDA graph: replayed.", "",
              "| queries | pattern | ours (us) | dense SDPA (us) | speedup | ours, loop | dense, loop | speedup "
              "| ours, CUDA graph | dense, CUDA graph | speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["decode"]:
        lines.append(f"| {r['queries']} | {r['pattern']} | {r['ours_us']:.1f} | {r['dense_sdpa_us']:.1f} | {r['speedup']:.1f}x "
                     f"| {r.get('ours_loop_us', math.nan):.1f} | {r.get('dense_sdpa_loop_us', math.nan):.1f} "
                     f"| {r.get('speedup_loop', math.nan):.1f}x "
                     f"| {r['ours_graph_us']:.1f} | {r['dense_sdpa_graph_us']:.1f} | {r['speedup_graph']:.1f}x |")
    if results.get("decode_sweep"):
        lines += ["", "## Decode launch settings (one query, 2K sink + window; us)", "",
                  "| BLOCK_N | num_warps | splits | us |", "|---|---|---|---|"]
        for r in sorted(results["decode_sweep"], key=lambda r: r.get("us", math.inf)):
            lines.append(f"| {r['BLOCK_N']} | {r['num_warps']} | {r['splits'] or 'auto'} | "
                         + (f"{r['us']:.1f} |" if "us" in r else f"{r['error']} |"))
    if results["sweep"]:
        lines += ["", "## Prefill tile configs at 128K, 2K budget (GQA-packed vs one pattern head per query head)", "",
                  "| pattern | BLOCK_M | BLOCK_N | warps | stages | packed (ms) | per query head (ms) |", "|---|---|---|---|---|---|---|"]
        for r in results["sweep"]:
            lines.append(f"| {r['pattern']} | {r['BLOCK_M']} | {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} "
                         f"| {r.get('packed_ms', math.nan):.2f} | {r.get('per_query_head_ms', math.nan):.2f} |"
                         + (f" {r['error']}" if "error" in r else ""))
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = sorted(results["dense"], key=lambda r: r["context"])
    for name in ("cudnn", "flash"):
        pts = [(r["context"], r[f"{name}_ms"]) for r in dense if f"{name}_ms" in r]
        if pts:
            ax.plot(*zip(*pts), "o--", label=f"dense SDPA {name}")
    for kind, marker in (("sink+window", "s"), ("random blocks", "^")):
        rows = sorted((r for r in results["prefill"] if r["pattern"] == kind and r["budget"] == 2048), key=lambda r: r["context"])
        if rows:
            ax.plot([r["context"] for r in rows], [r["flex_ms"] for r in rows], marker + ":", label=f"FlexAttention, {kind}")
            ax.plot([r["context"] for r in rows], [r["ours_ms"] for r in rows], marker + "-", label=f"ours, {kind}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="one layer prefill (ms)",
           title="Llama-3-8B layer, bf16, 2K-token budget per query block")
    ax.set_xticks([r["context"] for r in dense], [f"{r['context'] // 1024}K" for r in dense])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--parts", default="prefill,decode,sweep", help="any of prefill,decode,decode-sweep,sweep")
    parser.add_argument("--name", default="kernels_h200", help="file stem of the results")
    args = parser.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton

    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python " + " ".join(sys.argv),
               "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version()},
               "prefill_config": default_prefill_config(HEAD_DIM),
               "dense": [], "prefill": [], "decode": [], "sweep": [], "decode_sweep": []}

    def save():
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
        (out / f"{args.name}.md").write_text(markdown(results))

    parts = args.parts.split(",")
    if "prefill" in parts:
        prefill_rows(args, device, results, save)
    if "decode" in parts:
        decode_rows(args, device, results, save)
    if "decode-sweep" in parts:
        decode_sweep_rows(args, device, results, save)
    if "sweep" in parts:
        sweep_rows(args, device, results, save)
    save()
    if results["prefill"]:
        plot(results, out / f"{args.name}.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
