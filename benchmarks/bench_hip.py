"""HiP speed on one attention layer of Llama-3-8B's shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1,
with dense attention measured in the same run.

Decode, one query over a cache of each --decode-contexts length: dense SDPA decode; HiP's search alone; a whole HiP
step (search + sparse attention: the default, a search at every step); the paper preset amortised over its refresh
(one search and 7 reuses, per step). Each is timed three ways:
  * gpu: triton.testing.do_bench, GPU time between events after an L2 flush (the flush lets the host run ahead, so a
    call whose host work is shorter than the flush shows its GPU time only);
  * loop: back-to-back calls timed on the host, max(host, GPU) per call - what plain generate() gets;
  * graph: the call captured once as a CUDA graph and replayed (no host work at all).
Prefill at each --prefill-contexts: SDPA's cuDNN backend (dense, causal) against HiP = mask search + the shared sparse
kernel, per preset, with the search's share. --sweep first times launch settings of both search kernels and the
decode search's oversampling, and the fastest settings that keep the selection time the rest.

    python benchmarks/bench_hip.py --sweep --out benchmarks/results

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
    "prefill": [{"tile_keys": t, "num_warps": w, "stages": 2, "transposed": tr}
                for t in (64, 128) for w in (4, 8) for tr in (False, True)],
    "decode": [{"tile_keys": t, "num_warps": w, "merge_bits": b} for t in (128, 256) for w in (4, 8) for b in (1, 2)],
}
OVERSAMPLE_SWEEP = (1, 2, 4)  # decode search: groups per kept block, each in its default slices (hip_mask.SLICE_GROUPS)


def gpu_us(fn) -> float:
    import triton

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=100)


def loop_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def graph_us(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return gpu_us(graph.replay)


def timings(fn, per_call: int = 1) -> dict:
    return {name: clock(fn) / per_call for name, clock in (("gpu_us", gpu_us), ("loop_us", loop_us),
                                                           ("graph_us", graph_us))}


def mask_options(config: HipConfig, decode: bool) -> dict:
    return dict(config.search_options(decode), scale=DIM**-0.5)


def qkv(q_len: int, context: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, q_len, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, torch.randn_like(k)


def decode(context: int, presets: list[str]) -> dict:
    q, k, v = qkv(1, context, seed=1)
    scale = DIM**-0.5
    rows = {"dense SDPA": timings(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))}
    for preset in presets:
        config = HipConfig(preset=preset, refresh_interval=1)
        method, call = Hip(config), AttentionCall(0, scale, None, None)
        options = mask_options(config, decode=True)
        rows[f"hip {preset}: search"] = timings(lambda: hip_mask_triton(q, k, **options))
        rows[f"hip {preset}: step (search + attend)"] = timings(lambda: method.attend(q, k, v, call))
    # The paper's search as one beam (one program per kv head), what a decode step searched with before slicing.
    beam = dict(mask_options(HipConfig(preset="paper"), decode=True), slices=1, oversample=1)
    rows["hip paper: search as one beam (before)"] = timings(lambda: hip_mask_triton(q, k, **beam))
    paper = HipConfig(preset="paper")
    method, call = Hip(paper), AttentionCall(0, scale, None, None)

    def refresh_cycle():  # one search, then reuses until the next search is due
        call.state.clear()
        for _ in range(paper.refresh_interval):
            method.attend(q, k, v, call)

    rows[f"hip paper: amortised over refresh {paper.refresh_interval}"] = timings(refresh_cycle, paper.refresh_interval)
    dense = rows["dense SDPA"]
    for r in rows.values():
        r.update({f"speedup_{key}": dense[key] / r[key] for key in ("gpu_us", "loop_us", "graph_us")})
    return {"context": context, "rows": rows}


def prefill(context: int, presets: list[str]) -> dict:
    q, k, v = qkv(context, context, seed=0)
    scale = DIM**-0.5
    # cuDNN's SDPA takes equal head counts: the GQA expansion is done once, outside the timing.
    k_full, v_full = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = gpu_us(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=scale)) / 1e3
    del k_full, v_full
    row = {"context": context, "dense_cudnn_ms": dense, "hip": {}}
    for preset in presets:
        options = mask_options(HipConfig(preset=preset), decode=False)
        pattern = hip_mask_triton(q, k, **options)
        mask = gpu_us(lambda: hip_mask_triton(q, k, **options)) / 1e3
        attend = gpu_us(lambda: sparse_attention(q, k, v, pattern, scale=scale)) / 1e3
        total = gpu_us(lambda: sparse_attention(q, k, v, hip_mask_triton(q, k, **options), scale=scale)) / 1e3
        row["hip"][preset] = {"options": options, "mask_ms": mask, "attention_ms": attend, "total_ms": total,
                              "speedup_vs_cudnn": dense / total, "mask_share": mask / total}
    return row


def sweep_launch(phase: str, context: int, preset: str) -> list[dict]:
    """Launch settings of the search kernel of `phase` (prefill: the beam kernel over every query block; decode: the
    sliced kernel), each checked to give the default settings' selection."""
    q, k, _ = qkv(context if phase == "prefill" else 1, context, seed=2)
    options = mask_options(HipConfig(preset=preset), decode=phase == "decode")
    reference = hip_mask_triton(q, k, **options)
    results = []
    for launch in SWEEP[phase]:
        try:
            same = bool(torch.equal(hip_mask_triton(q, k, **options, launch=launch).block_indices,
                                    reference.block_indices))
            results.append({**launch, "us": gpu_us(lambda: hip_mask_triton(q, k, **options, launch=launch)),
                            "same_selection": same})
        except Exception as error:  # noqa: BLE001 - a setting that needs more shared memory or registers than exist
            results.append({**launch, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
        print(phase, results[-1], flush=True)
    return results


def sweep_slices(context: int, presets: list[str]) -> list[dict]:
    """The decode search's time by oversampling, each in its default slices, and the default in twice as many slices
    (the selections differ by design; benchmarks/hip_decode_recall.py measures what they keep)."""
    q, k, _ = qkv(1, context, seed=3)
    results = []
    for preset in presets:
        default = HipConfig(preset=preset)
        settings = [{"decode_oversample": o} for o in OVERSAMPLE_SWEEP]
        settings.append({"decode_slices": 2 * default.decode_slices})  # narrower slices (fewer registers each)
        for setting in settings:
            config = HipConfig(preset=preset, **setting)
            entry = {"preset": preset, "oversample": config.decode_oversample, "slices": config.decode_slices}
            try:
                entry["us"] = gpu_us(lambda: hip_mask_triton(q, k, **mask_options(config, decode=True)))
            except Exception as error:  # noqa: BLE001
                entry["error"] = str(error).splitlines()[0][:200]
            results.append(entry)
            print("slices", results[-1], flush=True)
    return results


def markdown(result: dict) -> str:
    lines = [f"# HiP single-layer speed ({result['device']})", "", f"Command: `{result['command']}`", "",
             f"{result['date']}; torch {result['torch']}, triton {result['triton']}; Llama-3-8B shape (32 q heads, "
             "8 kv heads, head_dim 128), bf16, batch 1. Search kernel launch settings: "
             f"{result['launch_settings']}.", ""]
    for d in result["decode"]:
        lines += [f"## Decode, one query over {d['context']} keys (us; speedup = dense / this)", "",
                  "gpu: do_bench after an L2 flush; loop: back-to-back eager calls, host included (what generate() "
                  "gets); graph: replayed CUDA graph.", "",
                  "| | gpu | loop | graph | speedup gpu | speedup loop | speedup graph |", "|---|---|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            lines.append(f"| {name} | {r['gpu_us']:.0f} | {r['loop_us']:.0f} | {r['graph_us']:.1f} | "
                         f"{r['speedup_gpu_us']:.1f}x | {r['speedup_loop_us']:.1f}x | {r['speedup_graph_us']:.1f}x |")
        lines.append("")
    lines += ["## Prefill (mask search included; ms)", "",
              "| context | preset | dense cuDNN | HiP search | HiP attention | HiP total | speedup | search share |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["prefill"]:
        for preset, h in row["hip"].items():
            lines.append(f"| {row['context']} | {preset} | {row['dense_cudnn_ms']:.2f} | {h['mask_ms']:.2f} | "
                         f"{h['attention_ms']:.2f} | {h['total_ms']:.2f} | {h['speedup_vs_cudnn']:.1f}x | "
                         f"{100 * h['mask_share']:.0f}% |")
    for phase in ("prefill", "decode"):
        if result.get(f"{phase}_sweep"):
            lines += ["", f"## Search kernel launch sweep, {phase} (preset {result['sweep_preset']}, context "
                      f"{result['sweep_context']})", "",
                      "| tile keys | num_warps | stages | transposed | us | same selection |", "|---|---|---|---|---|---|"]
            for s in sorted(result[f"{phase}_sweep"], key=lambda s: s.get("us", float("inf"))):
                setting = f"| {s['tile_keys']} | {s['num_warps']} | {s['stages']} | {s.get('transposed', '-')} | "
                lines.append(setting + (f"{s['us']:.1f} | {s['same_selection']} |" if "us" in s else f"{s['error']} | |"))
    if result.get("slices_sweep"):
        lines += ["", f"## Decode search by oversampling (context {result['sweep_context']})", "",
                  "| preset | oversample | slices | us |", "|---|---|---|---|"]
        lines += [f"| {s['preset']} | {s['oversample']} | {s['slices']} | " + (f"{s['us']:.1f} |" if "us" in s else
                  f"{s['error']} |") for s in result["slices_sweep"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[131072, 32768])
    parser.add_argument("--prefill-contexts", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--presets", nargs="+", default=list(HIP_PRESETS), choices=list(HIP_PRESETS))
    parser.add_argument("--sweep", action="store_true", help="first time launch settings and decode slices")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_hip.py needs a CUDA GPU")
    import triton

    result = {
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "decode": [], "prefill": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        result["launch_settings"] = json.loads(json.dumps(LAUNCH_SETTINGS))
        (args.out / "hip_bench.json").write_text(json.dumps(result, indent=1))
        (args.out / "hip_bench.md").write_text(markdown(result))

    if args.sweep:
        context = result["sweep_context"] = max(args.decode_contexts + args.prefill_contexts)
        result["sweep_preset"] = "paper"
        for phase in ("prefill", "decode"):
            result[f"{phase}_sweep"] = sweep_launch(phase, context, "paper")
            valid = [s for s in result[f"{phase}_sweep"] if s.get("same_selection")]
            if valid:
                best = min(valid, key=lambda s: s["us"])
                LAUNCH_SETTINGS[phase] = {key: best[key] for key in LAUNCH_SETTINGS[phase]}
            save()
        result["slices_sweep"] = sweep_slices(context, args.presets)
        save()
    for context in args.decode_contexts:
        result["decode"].append(decode(context, args.presets))
        print(json.dumps(result["decode"][-1], indent=1), flush=True)
        save()
    for context in args.prefill_contexts:
        result["prefill"].append(prefill(context, args.presets))
        print(json.dumps(result["prefill"][-1], indent=1), flush=True)
        torch.cuda.empty_cache()
        save()
    print(markdown(result))


if __name__ == "__main__":
    main()
