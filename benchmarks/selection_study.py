"""Which score should a top-k block selector maximise? Exhaustive (oracle) selections against dense, on passkey prompts.

Each selector below keeps, for every query block and kv head, the k / block_size_k key blocks (of 2 tokens) with the
highest score over ALL candidates - no hierarchy, no approximation in the search - plus the same sink and window as
HiP. Only the score differs:

* logit:      max over the block's queries and the group's heads of the raw logit (HiP paper's criterion);
* prob-exact: max of the softmax probability, with each query's exact log-sum-exp;
* prob-local: max of logit minus the log-sum-exp over sink and window only;
* prob-sampled: max of logit minus (sink + window mass + a stratified sample of the candidates, as HiP's first round
  draws it: one block in every ~2 * (candidates / 640) blocks, weighted by that stride).

Passkey prompts from the eval package (`hf_longattn.eval.niah`, the synthetic "grass is green" filler, depths evenly
spread over 0..100%), every selector at a 512-token budget: 16 sink + 176 window + 320 selected tokens (the selection
takes about 3/4 of what the sink leaves, in whole 64-token blocks, close to HiP's own 2:1 ratio of k to window).
Runs on CPU in minutes:

    python -m benchmarks.selection_study --length 2048 --samples 20 --out benchmarks/results/hip_selection_study.md

(The committed hip_selection_study.md was measured on the prompts of the retired benchmarks/hip_accuracy.py, the same
filler and needle sentence in a different frame.)
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_longattn.eval.niah import depth_grid, make_samples, run_method
from hf_longattn.kernels import SparsePattern
from hf_longattn.kernels.hip_mask import candidate_block_range
from hf_longattn.methods import register_method
from hf_longattn.methods.base import SparseMethod
from hf_longattn.methods.blocktopk import BlockTopKConfig

SCORES = ("logit", "prob-exact", "prob-local", "prob-sampled")


def budget_options(budget: int) -> dict:
    """HiP's options at `budget` attended tokens per query: a 16-token sink, ~3/4 of the rest selected (whole
    64-token blocks), the remainder as the window."""
    sink = 16
    selected = (budget - sink) * 3 // 4 // 64 * 64
    return {"sink": sink, "window": budget - sink - selected, "k": selected}


@dataclass
class OracleConfig(BlockTopKConfig):
    block_size_k: int = 2
    score: str = "logit"


@register_method
class Oracle(SparseMethod):
    """Exhaustive top-k key blocks by `score` (builds the Lq x Lk table: a study tool for short prompts only)."""

    name = "oracle"
    Config = OracleConfig

    def select(self, query, key, call):
        c = self.config
        batch, num_q_heads, q_len, _ = query.shape
        num_kv_heads, k_len = key.shape[1], key.shape[2]
        group = num_q_heads // num_kv_heads
        n_qb, n_kb = -(-q_len // c.block_size_q), -(-k_len // c.block_size_k)
        logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float().repeat_interleave(group, 1)) * call.scale
        k_pos = torch.arange(k_len).view(1, -1)
        q_pos = (torch.arange(q_len) + k_len - q_len).view(-1, 1)
        causal = k_pos <= q_pos
        logits = logits.masked_fill(~causal, -math.inf)
        local = causal & ((k_pos < c.sink) | (k_pos > q_pos - c.window))
        if c.score == "prob-exact":
            logits = logits - logits.logsumexp(-1, keepdim=True)
        elif c.score == "prob-local":
            logits = logits - logits.masked_fill(~local, -math.inf).logsumexp(-1, keepdim=True)
        elif c.score == "prob-sampled":
            stride = max(1, (k_len - c.sink - c.window) // 640)
            sampled = causal & ~local & (k_pos % (2 * stride) < 2)
            estimate = torch.logaddexp(logits.masked_fill(~local, -math.inf).logsumexp(-1, keepdim=True),
                                       logits.masked_fill(~sampled, -math.inf).logsumexp(-1, keepdim=True)
                                       + math.log(stride))
            logits = logits - estimate
        pad = (0, n_kb * c.block_size_k - k_len, 0, n_qb * c.block_size_q - q_len)
        logits = torch.nn.functional.pad(logits, pad, value=-math.inf)
        scores = logits.view(batch, num_kv_heads, group, n_qb, c.block_size_q, n_kb, c.block_size_k).amax((2, 4, 6))
        lo, hi = candidate_block_range(batch, q_len, k_len, c.block_size_q, c.block_size_k, c.sink, c.window,
                                       call.kv_start, query.device)
        block = torch.arange(n_kb)
        candidate = ((block >= lo.unsqueeze(-1)) & (block < hi.unsqueeze(-1))).unsqueeze(1)
        scores = scores.masked_fill(~candidate, -math.inf)
        ids = scores.topk(min(c.k // c.block_size_k, n_kb), -1).indices
        live = torch.gather(candidate.expand(-1, num_kv_heads, -1, -1), -1, ids)
        counts = live.sum(-1)
        ids = torch.sort(torch.where(live, ids, n_kb), -1).values
        ids = torch.where(torch.arange(ids.shape[-1]) < counts.unsqueeze(-1), ids, 0)
        return SparsePattern(ids.int(), counts.int(), c.block_size_q, c.block_size_k, c.sink, c.window)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="markdown file for the results")
    args = parser.parse_args(argv)
    from hf_longattn.bundled import load_model

    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    samples = make_samples(tokenizer, [args.length], depth_grid(args.samples), 1, needle="passkey",
                           haystack="synthetic")
    budget = budget_options(args.budget)
    runs = {"dense": ("dense", {})} | {f"oracle {s}": ("oracle", {**budget, "score": s}) for s in SCORES}
    runs["hip (hierarchical, prob-sampled)"] = ("hip", budget)
    rows = []
    for label, (method, options) in runs.items():
        start = time.time()
        records = run_method(model, tokenizer, samples, method, options)["samples"]
        found = [r["score"] == 1.0 for r in sorted(records, key=lambda r: r["depth"])]
        rows.append(f"| {label} | {sum(found)}/{len(found)} | {''.join('x' if f else '.' for f in found)} |")
        print(rows[-1], f"({time.time() - start:.0f} s)", flush=True)
    report = [f"# Selection score study: passkey at {args.length} tokens, {args.budget}-token budget", "",
              f"Command: `python -m benchmarks.selection_study {' '.join(sys.argv[1:])}`", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or 'cpu'}; SmolLM2-135M-"
              f"Instruct float32, greedy; depths 0..100% left to right (x = passkey found). Budget: {budget}.", "",
              "| selector | found | per prompt |", "|---|---|---|", *rows]
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
