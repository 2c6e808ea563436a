"""HyperAttention's single-layer causal prefill, whole and stage by stage, beside dense SDPA (cuDNN) in the same run.

Llama-3-8B shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1, the method at its defaults (min_seq_len
4096, block 256, sample 256, 7 hash bits). Stages, each timed alone over every level of the recursion on inputs
prepared beforehand: hash (LSH buckets of q and k), sort (each level's layout: segment sorts, ranks, slots), gather
(q, k, v into sorted order), leaves (exact causal attention inside the recursion's leaves), block diagonals, sampled
residuals, merges. Their sum is printed beside the whole call.

    python benchmarks/bench_hyper.py --out benchmarks/results          # H200: about a minute
    python benchmarks/bench_hyper.py --contexts 1024 --min-seq-len 128 --block-size 32 --out /tmp/bench   # CPU smoke

On a CPU every figure is one call's wall clock: a check that the script runs, not a performance figure.
Writes hyper_bench.json and hyper_bench.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import environment, markdown_table, time_ms, write_result
from hf_longattn.kernels.hyper_layout import causal_tree, level_geometry, level_layout
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.hyper import Hyper, HyperConfig

HEADS, KV_HEADS, DIM = 32, 8, 128
STAGES = ("hash", "sort", "gather", "leaves", "block_diagonal", "residual", "merge")


def dense_ms(q, k, v) -> float:
    k_full, v_full = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    if not q.is_cuda:
        return time_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return time_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))


def bench_context(context: int, options: dict, device: str, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, context, DIM, device=device, dtype=dtype, generator=gen)
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    method = Hyper(HyperConfig(last_layers="all", **options))
    c = method.config
    call = AttentionCall(0, DIM**-0.5, None, None, {})
    tree = causal_tree(context, c.min_seq_len, c.block_size)
    q_buckets, k_buckets = method.buckets(q, k, 0)
    geometries = [level_geometry(pairs, 0, q.device) for pairs in tree.levels]
    layouts = [level_layout(q_buckets, k_buckets, g, None, c.hash_bits) for g in geometries]
    inputs = [method.sorted_inputs(q, k, v, layout) for layout in layouts]
    out, lse = method.leaves(q, k, v, tree, call)
    blocks = [method.block_diagonal(*x, layout, call) for x, layout in zip(inputs, layouts)]
    samples = [method.residual(*x, layout, call) for x, layout in zip(inputs, layouts)] if c.sample_size else []
    parts = [[b, *s] for b, s in zip(blocks, [[s] for s in samples] or [[] for _ in blocks])]

    stages = {
        "hash": lambda: method.buckets(q, k, 0),
        "sort": lambda: [level_layout(q_buckets, k_buckets, g, None, c.hash_bits) for g in geometries],
        "gather": lambda: [method.sorted_inputs(q, k, v, layout) for layout in layouts],
        "leaves": lambda: method.leaves(q, k, v, tree, call),
        "block_diagonal": lambda: [method.block_diagonal(*x, layout, call) for x, layout in zip(inputs, layouts)],
        "residual": lambda: [method.residual(*x, layout, call) for x, layout in zip(inputs, layouts)],
        "merge": lambda: [method.merge_level(out, lse, p, layout) for p, layout in zip(parts, layouts)],
    }
    if not c.sample_size:
        del stages["residual"]
    row = {"context": context, "levels": len(tree.levels), "leaves": len(tree.leaves)}
    row["stages_ms"] = {name: time_ms(fn) for name, fn in stages.items()}
    row["hyper_ms"] = time_ms(lambda: method.attend(q, k, v, call))
    row["dense_ms"] = dense_ms(q, k, v)
    row["speedup_vs_dense"] = row["dense_ms"] / row["hyper_ms"]
    row["stages_sum_ms"] = sum(row["stages_ms"].values())
    row["hash_and_sort_share"] = sum(row["stages_ms"][s] for s in ("hash", "sort", "gather")) / row["stages_sum_ms"]
    return row


def markdown(record: dict) -> str:
    header = ["context", "dense (cuDNN) ms", "hyper ms", "speedup", *[f"{s} ms" for s in STAGES], "stages sum ms",
              "hash+sort+gather share"]
    rows = [[row["context"], f"{row['dense_ms']:.2f}", f"{row['hyper_ms']:.2f}", f"{row['speedup_vs_dense']:.2f}x",
             *[f"{row['stages_ms'][s]:.2f}" if s in row["stages_ms"] else "-" for s in STAGES],
             f"{row['stages_sum_ms']:.2f}", f"{row['hash_and_sort_share']:.0%}"] for row in record["rows"]]
    env = record["environment"]
    return (f"{env['device']}, {record['dtype']}, batch 1, {HEADS} query / {KV_HEADS} kv heads, head_dim {DIM}, "
            f"options {json.dumps(record['options'])}; {env['date']}, `{env['command']}`\n\n"
            + markdown_table(header, rows) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--min-seq-len", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--sample-size", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in ("min_seq_len", "block_size", "sample_size")
               if getattr(args, name) is not None}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    record = {"environment": environment(None if argv is None else [__file__, *argv]), "dtype": str(dtype),
              "options": options, "rows": []}
    for context in args.contexts:
        record["rows"].append(bench_context(context, options, device, dtype))
        print(json.dumps(record["rows"][-1]), flush=True)
    write_result(Path(args.out), "hyper_bench", record, markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
