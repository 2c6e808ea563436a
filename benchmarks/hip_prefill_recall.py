"""How much of the exact attention HiP's prompt (prefill) selection keeps, on real passkey prompts (cheap on a CPU).

Each prompt runs once per variant with HiP patched in; every layer's prefill pattern is scored by its recall - the
share of each query's exact softmax mass that sink + window + selected blocks hold (`hf_longattn.recall`) - averaged
over the prompt's queries and heads. The variants differ in how the search is laid out (query block size, scored
queries) at the same budget, so their recalls compare the searches on the very same queries.

    python benchmarks/hip_prefill_recall.py --out benchmarks/results/hip_prefill_recall.md

Reports per variant and length: the mean recall over layers, heads and queries, and the mean of each prompt's worst
layer.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from hf_longattn.eval.niah import depth_grid, make_samples
from hf_longattn.recall import model_recall

VARIANTS = {
    "retrieval budget, query blocks of 64, every 2nd query scored": {"block_size_q": 64, "query_stride": 2},
    "retrieval budget, query blocks of 128, every 4th query scored": {"block_size_q": 128, "query_stride": 4},
    "paper budget, query blocks of 64, every 2nd query scored": {"preset": "paper", "block_size_q": 64,
                                                                  "query_stride": 2},
    "paper budget, query blocks of 128, every 4th query scored": {"preset": "paper", "block_size_q": 128,
                                                                   "query_stride": 4},
    "retrieval budget, query blocks of 256, every 8th query scored": {"block_size_q": 256, "query_stride": 8},
    "paper budget, query blocks of 256, every 8th query scored": {"preset": "paper", "block_size_q": 256,
                                                                   "query_stride": 8},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])  # at 2K the default selects all
    parser.add_argument("--prompts", type=int, default=2, help="prompts per length, depths spread over 0..100%%")
    # By default the layouts of 64 and 128 (hip_prefill_recall.md); blocks of 256 when named (_256.md).
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4], choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True, help="markdown file for the results")
    args = parser.parse_args(argv)
    from hf_longattn.bundled import load_model

    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    results = {label: {} for label in args.variants}
    for length in args.lengths:
        samples = make_samples(tokenizer, [length], depth_grid(args.prompts), 1, haystack="essays")
        for label in args.variants:
            per_prompt = []
            for sample in samples:
                start = time.time()
                layers = model_recall(model, torch.tensor([sample.input_ids]), "hip", **VARIANTS[label])
                per_prompt.append(torch.stack([v.mean() for v in layers.values()]))  # [layers]
                print(f"{length} depth {sample.depth:.0f} {label}: {per_prompt[-1].mean():.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
            r = torch.stack(per_prompt)  # [prompts, layers]
            results[label][length] = (r.mean().item(), r.amin(1).mean().item())
    lines = ["# HiP prefill recall on passkey prompts", "", f"Command: `python {' '.join(sys.argv)}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or 'cpu'}; "
             f"SmolLM2-135M-Instruct float32, NIAH passkey (essays), {args.prompts} prompts a length, every layer, "
             "every prompt query. Cells: mean recall / mean of each prompt's worst layer.", "",
             "| variant | " + " | ".join(str(n) for n in args.lengths) + " |", "|---|" + "---|" * len(args.lengths)]
    for label, by_length in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{m:.4f} / {w:.4f}" for m, w in (by_length[n] for n in args.lengths))
                     + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
