"""LongHeads speed on one attention layer of Llama-3-8B's shape (32 query heads, 8 kv heads, head_dim 128, Llama 3.1's
RoPE), bf16, batch 1, cap 4096 in chunks of 256 (the defaults for a model trained on 128K); the queries in the memory
order a model passes them.

Prefill at each context: SDPA's cuDNN backend (dense, causal) against LongHeads from a fresh state (representatives
of every chunk + selection + gather/rotate + the shared sparse kernel), for each --block-sizes; the CUDA time of one
call split by kernel (torch.profiler). Decode at the longest context, launched eagerly: dense SDPA (flash) against
one LongHeads step (no chunk completes), and the extra cost of a step that completes a chunk.

    python benchmarks/bench_longheads.py --contexts 32768 131072 --out benchmarks/results/longheads

Writes longheads_bench.json and longheads_bench.md under --out. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig

from bench_kernels import bench_ms
from timing import cuda_time_by_kernel
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.longheads import LongHeads, LongHeadsConfig

HEADS, KV_HEADS, DIM = 32, 8, 128
CONFIG = LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                     max_position_embeddings=131072, rope_parameters={
                         "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
MODULE = types.SimpleNamespace(config=CONFIG, layer_idx=0)
# Kernel name fragments -> phase, for the per-kernel split of one prefill call.
PHASES = {"select_": "selection", "gather_rotate": "gather + rotate", "sparse": "attention",
          "chunk_representatives": "representatives"}


def inputs(context: int, q_len: int):
    """Queries as a model passes them: [B, H, L, D] over [B, L, H, D] memory (q_proj's output, transposed)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, q_len, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    k = torch.randn(1, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, torch.randn_like(k)


def fresh_call(state=None) -> AttentionCall:
    return AttentionCall(0, DIM**-0.5, None, None, {} if state is None else state, module=MODULE)


def kernel_split(fn, top: int = 12) -> tuple[dict, list]:
    """CUDA milliseconds of one call of fn: summed per phase (by kernel name), and the `top` kernels by time."""
    split: dict[str, float] = {}
    kernels = []
    for name, (time_us, count) in cuda_time_by_kernel(fn).items():
        phase = next((p for key, p in PHASES.items() if key in name.lower()), "other")
        split[phase] = split.get(phase, 0.0) + time_us / 1e3
        kernels.append((round(time_us / 1e3, 3), count, name[:90]))
    return {k: round(v, 3) for k, v in sorted(split.items())}, sorted(kernels, reverse=True)[:top]


def dense_prefill_ms(q, k, v) -> float:
    # cuDNN's SDPA takes equal head counts: the GQA expansion is done once, outside the timing.
    k_full, v_full = (t.repeat_interleave(HEADS // KV_HEADS, 1) for t in (k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=DIM**-0.5))


def prefill(context: int, block_sizes: list[int]) -> dict:
    q, k, v = inputs(context, context)
    row = {"context": context, "dense_cudnn_ms": dense_prefill_ms(q, k, v), "longheads": {}}
    dense = row["dense_cudnn_ms"]
    for block in block_sizes:
        method = LongHeads(LongHeadsConfig(block_size_q=block))
        run = lambda: method.attend(q, k, v, fresh_call())  # noqa: E731
        total = bench_ms(run)
        reps = bench_ms(lambda: method.update_state(q, k, v, fresh_call(), method.layer(fresh_call(), q.device)[0]))
        split, kernels = kernel_split(run)
        row["longheads"][block] = {"ms": total, "speedup": dense / total, "representatives_ms": reps,
                                   "cuda_ms_by_kernel": split, "top_kernels_ms_count_name": kernels}
        torch.cuda.empty_cache()
    return row


def decode(context: int) -> dict:
    q, k, v = inputs(context, context - 1)
    step_q = q[:, :, -1:].clone()
    method = LongHeads(LongHeadsConfig())
    state: dict = {}
    method.attend(q, k[:, :, :-1], v[:, :, :-1], fresh_call(state))  # the prompt: representatives of every chunk
    del q
    torch.cuda.empty_cache()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        dense = bench_ms(lambda: F.scaled_dot_product_attention(step_q, k, v, scale=DIM**-0.5, enable_gqa=True))
    step = bench_ms(lambda: method.attend(step_q, k, v, fresh_call(state)))  # no chunk completes at this length

    chunks = state["longheads"]

    def completing_step():  # the representative of one more chunk, as when a decode step completes it
        chunks.done = [chunks.done[0] - 1]
        method.attend(step_q, k, v, fresh_call(state))

    completing = bench_ms(completing_step)
    return {"context": context, "dense_flash_us": 1e3 * dense, "longheads_us": 1e3 * step,
            "speedup": dense / step, "step_completing_a_chunk_us": 1e3 * completing,
            "amortised_us": 1e3 * (step + (completing - step) / LongHeadsConfig().chunk_size)}


def markdown(result: dict) -> str:
    lines = [f"# LongHeads, one attention layer (Llama-3-8B shape, bf16, cap 4096, chunks of 256), {result['device']}",
             "", f"Command: `{result['command']}`", "", f"{result['date']}; torch {result['torch']}, triton "
             f"{result['triton']}.", "", "## Prefill (fresh state: representatives of every chunk included)", "",
             "| context | dense cuDNN (ms) | block_size_q | longheads (ms) | speedup | representatives (ms) | CUDA ms by kernel |",
             "|---|---|---|---|---|---|---|"]
    for row in result["prefill"]:
        for block, r in row["longheads"].items():
            split = ", ".join(f"{k} {v:.1f}" for k, v in r["cuda_ms_by_kernel"].items())
            lines.append(f"| {row['context']} | {row['dense_cudnn_ms']:.1f} | {block} | {r['ms']:.1f} | "
                         f"{r['speedup']:.1f}x | {r['representatives_ms']:.1f} | {split} |")
    lines += ["", "Kernels by CUDA time (ms, launches), one call at the longest context:", ""]
    for block, r in result["prefill"][-1]["longheads"].items():
        lines += [f"- block_size_q={block}: " + "; ".join(f"{ms} ({n}) {name}" for ms, n, name in
                                                        r["top_kernels_ms_count_name"])]
    d = result["decode"]
    lines += ["", "## Decode, one query, launched eagerly", "",
              "| context | dense flash (us) | longheads step (us) | speedup | step completing a chunk (us) | amortised (us) |",
              "|---|---|---|---|---|---|",
              f"| {d['context']} | {d['dense_flash_us']:.0f} | {d['longheads_us']:.0f} | {d['speedup']:.2f}x | "
              f"{d['step_completing_a_chunk_us']:.0f} | {d['amortised_us']:.0f} |"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/longheads"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_longheads.py needs a CUDA GPU")
    import triton

    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(), "prefill": []}
    for context in args.contexts:
        result["prefill"].append(prefill(context, args.block_sizes))
        print(json.dumps(result["prefill"][-1], indent=1), flush=True)
        torch.cuda.empty_cache()
    result["decode"] = decode(max(args.contexts))
    print(json.dumps(result["decode"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "longheads_bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "longheads_bench.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
