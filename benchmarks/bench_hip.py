"""HiP speed on one attention layer of Llama-3-8B's shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1.

Prefill at each context: SDPA's cuDNN backend (dense, causal) against HiP = mask estimation + the shared sparse kernel,
both in the same run; the mask estimation's share of HiP's time. Decode at the longest context: dense SDPA decode
against HiP decode, with the search amortised over its refresh interval (the timed unit is one refresh followed by
refresh_interval - 1 reuse steps, divided by refresh_interval). Also a small sweep of the mask kernel's launch settings.

    python benchmarks/bench_hip.py --contexts 32768 131072 --out benchmarks/results

Writes hip_bench.json and hip_bench.md under --out. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_longattn.kernels import sparse_attention
from hf_longattn.kernels.hip_mask import LAUNCH_SETTINGS, hip_mask_triton
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.hip import HIP_PRESETS, Hip, HipConfig

HEADS, KV_HEADS, DIM = 32, 8, 128
SWEEP = {
    "prefill": [{"tile_keys": t, "num_warps": w, "stages": s} for t in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)],
    "decode": [{"tile_keys": t, "num_warps": w, "stages": s} for t in (64, 256, 512) for w in (4, 8, 16) for s in (1, 2)],
}


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=200)


def graphed_ms(fn) -> float:
    """GPU time of fn captured once as a CUDA graph and replayed: no host overhead, as in a server that runs its
    decode steps as CUDA graphs (vLLM, SGLang, torch.compile's reduce-overhead mode)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def mask_options(config: HipConfig) -> dict:
    return dict(k=config.k, block_size_q=config.block_size_q, block_size_k=config.block_size_k,
                query_stride=config.query_stride, sink=config.sink, window=config.window,
                shared_kv_heads=config.shared_kv_heads)


def prefill(context: int, presets: list[str]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    scale = DIM**-0.5
    # cuDNN's SDPA takes equal head counts: the GQA expansion is done once, outside the timing.
    k_full, v_full = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = bench_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=scale))
    del k_full, v_full
    row = {"context": context, "dense_cudnn_ms": dense, "hip": {}}
    for preset in presets:
        options = mask_options(HipConfig(preset=preset))
        pattern = hip_mask_triton(q, k, **options)
        mask = bench_ms(lambda: hip_mask_triton(q, k, **options))
        attend = bench_ms(lambda: sparse_attention(q, k, v, pattern, scale=scale))
        total = bench_ms(
            lambda: sparse_attention(q, k, v, hip_mask_triton(q, k, **options), scale=scale))
        row["hip"][preset] = {
            "options": options, "mask_ms": mask, "attention_ms": attend, "total_ms": total,
            "speedup_vs_cudnn": dense / total, "mask_share": mask / total,
        }
    return row


def decode(context: int, presets: list[str], interval: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    scale = DIM**-0.5
    dense_gqa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
    k_full, v_full = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        dense_flash = bench_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, scale=scale))
    del k_full, v_full
    dense = min(dense_gqa, dense_flash)
    dense_graphed = graphed_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
    row = {"context": context, "dense_sdpa_gqa_ms": dense_gqa, "dense_flash_expanded_ms": dense_flash,
           "dense_ms": dense, "dense_graphed_ms": dense_graphed, "refresh_interval": interval, "hip": {}}
    for preset in presets:
        config = HipConfig(preset=preset, refresh_interval=interval)
        method = Hip(config)
        call = AttentionCall(0, scale, None, None, {})

        def steps():
            call.state.clear()  # the first of the `interval` calls searches, the others reuse
            for _ in range(interval):
                method.attend(q, k, v, call)

        def refresh_only():
            call.state.clear()
            method.attend(q, k, v, call)

        method.attend(q, k, v, call)

        def reuse_only():
            call.state["hip"]["age"] = 0
            method.attend(q, k, v, call)

        amortised = bench_ms(steps) / interval
        amortised_graphed = graphed_ms(steps) / interval
        row["hip"][preset] = {
            "refresh_step_ms": bench_ms(refresh_only), "reuse_step_ms": bench_ms(reuse_only),
            "mask_ms": bench_ms(lambda: hip_mask_triton(q, k, **mask_options(config))),
            "amortised_step_ms": amortised, "speedup_vs_dense": dense / amortised,
            "amortised_graphed_ms": amortised_graphed, "speedup_graphed": dense_graphed / amortised_graphed,
        }
    return row


def sweep_launch(context: int, q_len: int, sweep: list[dict]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, HEADS, q_len, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    options = mask_options(HipConfig())
    reference = hip_mask_triton(q, k, **options)
    results = []
    for launch in sweep:
        try:
            got = hip_mask_triton(q, k, **options, launch=launch)
        except Exception as error:  # noqa: BLE001 - a setting that needs more shared memory or registers than exist
            print(launch, error, flush=True)
            continue
        same = bool(torch.equal(got.block_indices, reference.block_indices))
        results.append({**launch, "mask_ms": bench_ms(lambda: hip_mask_triton(q, k, **options, launch=launch)),
                        "same_selection": same})
        print(results[-1], flush=True)
    return results


def markdown(result: dict) -> str:
    lines = [f"# HiP single-layer speed ({result['device']})", "", f"Command: `{result['command']}`", "",
             f"{result['date']}; torch {result['torch']}, triton {result['triton']}; Llama-3-8B shape (32 q heads, "
             "8 kv heads, head_dim 128), bf16, batch 1. Times in ms (triton.testing.do_bench). Mask kernel launch "
             f"settings: {result['launch_settings']}.", "",
             "## Prefill (mask estimation included)", "",
             "| context | preset | dense cuDNN | HiP mask | HiP attention | HiP total | speedup | mask share |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["prefill"]:
        for preset, h in row["hip"].items():
            lines.append(f"| {row['context']} | {preset} | {row['dense_cudnn_ms']:.2f} | {h['mask_ms']:.2f} | "
                         f"{h['attention_ms']:.2f} | {h['total_ms']:.2f} | {h['speedup_vs_cudnn']:.1f}x | "
                         f"{100 * h['mask_share']:.0f}% |")
    d = result["decode"]
    lines += ["", f"## Decode at {d['context']} (search every {d['refresh_interval']} steps, amortised)", "",
              f"Dense: SDPA enable_gqa {d['dense_sdpa_gqa_ms'] * 1e3:.0f} us, flash on expanded K/V "
              f"{d['dense_flash_expanded_ms'] * 1e3:.0f} us; the faster is the baseline.", "",
              "| preset | refresh step | reuse step | mask search | amortised step | dense | speedup |",
              "|---|---|---|---|---|---|---|"]
    for preset, h in d["hip"].items():
        lines.append(f"| {preset} | {h['refresh_step_ms'] * 1e3:.0f} us | {h['reuse_step_ms'] * 1e3:.0f} us | "
                     f"{h['mask_ms'] * 1e3:.0f} us | {h['amortised_step_ms'] * 1e3:.0f} us | "
                     f"{d['dense_ms'] * 1e3:.0f} us | {h['speedup_vs_dense']:.1f}x |")
    lines += ["", "Under CUDA graphs (GPU time only, each timed sequence replayed as one graph): dense "
              f"{d['dense_graphed_ms'] * 1e3:.0f} us.", "", "| preset | amortised step | speedup |", "|---|---|---|"]
    for preset, h in d["hip"].items():
        lines.append(f"| {preset} | {h['amortised_graphed_ms'] * 1e3:.1f} us | {h['speedup_graphed']:.1f}x |")
    for phase in ("prefill", "decode"):
        if result.get(f"{phase}_sweep"):
            lines += ["", f"## Mask kernel launch sweep, {phase} (paper preset, context {result['sweep_context']})",
                      "", "The fastest setting with the same selection as the defaults timed the rows above.", "",
                      "| tile keys | num_warps | stages | mask ms | same selection |", "|---|---|---|---|---|"]
            for s in sorted(result[f"{phase}_sweep"], key=lambda s: s["mask_ms"]):
                lines.append(f"| {s['tile_keys']} | {s['num_warps']} | {s['stages']} | {s['mask_ms']:.3f} | "
                             f"{s['same_selection']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--presets", nargs="+", default=list(HIP_PRESETS), choices=list(HIP_PRESETS))
    parser.add_argument("--refresh-interval", type=int, default=8)
    parser.add_argument("--sweep", action="store_true", help="also time the mask kernel's launch settings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_hip.py needs a CUDA GPU")
    import triton

    result = {
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
    }
    if args.sweep:
        context = result["sweep_context"] = max(args.contexts)
        for phase, q_len in (("prefill", context), ("decode", 1)):
            result[f"{phase}_sweep"] = sweep_launch(context, q_len, SWEEP[phase])
            valid = [s for s in result[f"{phase}_sweep"] if s["same_selection"]]
            if valid:
                best = min(valid, key=lambda s: s["mask_ms"])
                LAUNCH_SETTINGS[phase] = {key: best[key] for key in LAUNCH_SETTINGS[phase]}
    result["launch_settings"] = json.loads(json.dumps(LAUNCH_SETTINGS))
    result["prefill"] = []
    for context in args.contexts:
        result["prefill"].append(prefill(context, args.presets))
        print(json.dumps(result["prefill"][-1], indent=1), flush=True)
        torch.cuda.empty_cache()
    result["decode"] = decode(max(args.contexts), args.presets, args.refresh_interval)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hip_bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "hip_bench.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
