"""How much of the exact attention a HiP decode step keeps, on real passkey prompts, teacher-forced (cheap on a CPU).

The model runs once, dense, on each NIAH passkey prompt followed by its correct answer (" 24718."). At each answer
position - the decode steps that must copy the digits - every layer's query and keys are captured, and each HiP
variant's decode search (one query, all keys so far) is scored by its recall: the share of the query's exact softmax
mass that sink + window + selected blocks hold (hf_longattn.recall). One dense forward per prompt serves every
variant, so variants that differ only in their decode search (slices, budget, score) are compared on the very same
queries.

    python benchmarks/hip_decode_recall.py --lengths 2048 8192 --prompts 4 --out benchmarks/results/hip_decode_recall.md

Reports per variant and length: the mean recall over layers, heads and answer positions, the mean of each position's
worst layer, and the share of (layer, position) pairs below 0.5.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_longattn.eval.niah import depth_grid, make_samples
from hf_longattn.kernels.hip_mask import hip_mask_reference
from hf_longattn.methods.hip import HipConfig
from hf_longattn.recall import attention_recall

VARIANTS = {
    "paper budget (its default: 64 slices, 4x groups)": {"preset": "paper"},
    "paper budget, 16 slices, 4x groups (the default before)": {"preset": "paper", "decode_slices": 16},
    "paper budget, 16 slices, no oversampling": {"preset": "paper", "decode_oversample": 1, "decode_slices": 16},
    "paper budget, one beam (the paper)": {"preset": "paper", "decode_slices": 1, "decode_oversample": 1},
    "retrieval budget (the default: 128 slices, 2x groups)": {},
    "retrieval budget, 32 slices, 2x groups (the default before)": {"decode_slices": 32},
    "retrieval budget, 64 slices, no oversampling": {"decode_oversample": 1, "decode_slices": 64},
    "retrieval budget, one beam": {"decode_slices": 1, "decode_oversample": 1},
}
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
_tail = 0


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Dense attention that keeps the last `_tail` queries and all keys of every layer."""
    _captured[module.layer_idx] = (query[:, :, -_tail:].clone(), key.clone(), kwargs.get("scaling") or module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def decode_recalls(captured, options: dict) -> torch.Tensor:
    """[layers, positions]: recall (mean over query heads) of the decode search at each captured position."""
    c = HipConfig(**options)
    search = dict(k=c.k, block_size_q=c.block_size_q, block_size_k=c.block_size_k, query_stride=c.query_stride,
                  sink=c.sink, window=c.window, score=c.score, slices=c.decode_slices, oversample=c.decode_oversample)
    rows = []
    for layer in sorted(captured):
        query, key, scale = captured[layer]
        tail, length = query.shape[2], key.shape[2]
        per_position = []
        for t in range(tail):
            q, k = query[:, :, t:t + 1], key[:, :, : length - tail + t + 1]
            pattern = hip_mask_reference(q, k, scale=scale, **search)
            per_position.append(attention_recall(q, k, pattern, scale=scale).mean())
        rows.append(torch.stack(per_position))
    return torch.stack(rows)


def main(argv=None):
    global _tail
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per length, depths spread over 0..100%%")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True, help="markdown file for the results")
    args = parser.parse_args(argv)
    from hf_longattn.bundled import load_model

    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    AttentionInterface.register("capture_tail", _capture)
    model.set_attn_implementation("capture_tail")
    results = {label: {} for label in args.variants}
    for length in args.lengths:
        samples = make_samples(tokenizer, [length], depth_grid(args.prompts), 1, haystack="essays")
        per_variant = {label: [] for label in args.variants}
        for sample in samples:
            answer = tokenizer(" " + sample.needle.answers[0] + ".", add_special_tokens=False).input_ids
            _tail = len(answer)  # the prompt's last position predicts the first answer token
            ids = torch.tensor([sample.input_ids + answer[:-1]])
            start = time.time()
            with torch.no_grad():
                model(ids)
            for label in args.variants:
                per_variant[label].append(decode_recalls(_captured, VARIANTS[label]))
            print(f"{length} depth {sample.depth:.0f}: " + ", ".join(
                f"{label} {per_variant[label][-1].mean():.3f}" for label in args.variants)
                + f" ({time.time() - start:.0f} s)", flush=True)
        for label in args.variants:
            r = torch.stack(per_variant[label])  # [prompts, layers, positions]
            results[label][length] = (r.mean().item(), r.amin(1).mean().item(), (r < 0.5).float().mean().item())
    lines = ["# HiP decode recall at the answer positions (teacher-forced)", "", f"Command: `python {' '.join(sys.argv)}`",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or 'cpu'}; "
             f"SmolLM2-135M-Instruct float32, NIAH passkey (essays), {args.prompts} prompts a length, every layer, "
             "each answer token's decode step. Cells: mean recall / mean of the worst layer per step / share of "
             "(layer, step) pairs below 0.5.", "",
             "| variant | " + " | ".join(str(n) for n in args.lengths) + " |", "|---|" + "---|" * len(args.lengths)]
    for label, by_length in results.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{m:.3f} / {w:.3f} / {100 * low:.1f}%" for m, w, low in (by_length[n] for n in args.lengths)) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
