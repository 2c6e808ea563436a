"""Why `hyper` keeps an attention sink, and what sortLSH finds, on SmolLM2-135M's real queries and keys (CPU is enough).

One essay window of --length tokens goes through the bundled SmolLM2 (float32, dense); every studied layer's q, k, v
are kept and, per layer, for the queries of the recursion's first off-diagonal pair (the right half):
  * sink mass: the share of their exact attention on the first key;
  * error: mean relative L2 error of the attention output, HyperAttention (each --configs entry) vs exact;
  * block mass: the share of the pair's exact attention (past the sink) that falls in each query's sorted block,
    beside the share a random block of that size would hold.

    python benchmarks/hyper_study.py --length 8192 --layers 2 10 15 20 25 29 --out benchmarks/results/hyper_study
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hf_longattn import patched
from hf_longattn.bundled import load_model
from hf_longattn.eval.haystack import load_haystack
from hf_longattn.kernels import dense_attention
from hf_longattn.kernels.hyper_layout import causal_tree, level_geometry, level_layout
from hf_longattn.methods import AttentionCall
from hf_longattn.methods.hyper import Hyper, HyperConfig
from hf_longattn.models import decoder_attention_modules

CONFIGS = {"default (sink 16)": {}, "paper (sink 0)": {"sink": 0}, "sink 16, no sample": {"sample_size": 0}}


def capture(length: int, layers: list[int], offset: int = 5000) -> dict:
    """{layer: (q, k, v, scale)} of one essay window, from a dense forward pass."""
    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    ids = tokenizer(load_haystack("essays"), add_special_tokens=False).input_ids[offset:offset + length]
    store = {}

    class Recorder:
        def __init__(self, method):
            self.method, self.name, self.config = method, method.name, method.config

        def attend(self, q, k, v, call):
            if call.layer_idx in layers:
                store[call.layer_idx] = (q, k, v, call.scale)
            return self.method.attend(q, k, v, call)

    with torch.no_grad(), patched(model, "dense"):
        for module in decoder_attention_modules(model):
            module.hf_longattn_runner.method = Recorder(module.hf_longattn_runner.method)
        model(torch.tensor([ids]), use_cache=False)
    return store


def study_layer(q, k, v, scale, layer: int, configs: dict) -> dict:
    base = HyperConfig(last_layers="all")
    (start, mid, end), = causal_tree(q.shape[2], base.min_seq_len, base.block_size).levels[0][:1]
    group = q.shape[1] // k.shape[1]
    exact = dense_attention(q, k, v, scale)
    row = {"layer": layer, "pair": [start, mid, end], "error": {}}
    for name, options in configs.items():
        out = Hyper(HyperConfig(last_layers="all", **options)).attend(q, k, v, AttentionCall(layer, scale, None, None, {}))
        row["error"][name] = float(((out - exact).norm(dim=-1) / exact.norm(dim=-1))[:, mid:end].mean())

    # Exact attention of the right half's queries over the left half (and the first key's share of all they see).
    probs = torch.einsum("bhqd,bhkd->bhqk", q[:, :, mid:end], k.repeat_interleave(group, 1)[:, :, :end]) * scale
    causal = torch.arange(end).view(1, -1) > torch.arange(mid, end).view(-1, 1)
    probs = probs.masked_fill(causal, -torch.inf).softmax(-1)
    row["sink_mass"] = float(probs[..., 0].mean())
    method = Hyper(base)
    q_buckets, k_buckets = method.buckets(q, k, layer)
    layout = level_layout(q_buckets, k_buckets, level_geometry(((start, mid, end),), 0, q.device), None,
                          base.hash_bits, base.sink)
    own, held = base.block_size, []
    for h in range(q.shape[1]):
        keys = layout.key_index[0, h // group, base.sink:]  # the sorted keys past the sink
        rows = layout.query_source[0, h] - mid  # query of each slot
        pair = probs[0, h, rows][:, keys]
        pair = pair / pair.sum(-1, keepdim=True)
        slot_block = torch.arange(len(rows)) // own
        in_block = (torch.arange(base.sink, mid - start) // own).view(1, -1) == slot_block.view(-1, 1)
        held.append((pair * in_block).sum(-1).mean())
    row["block_mass"] = float(torch.stack(held).mean())
    row["random_block_mass"] = own / (mid - start - base.sink)
    return row


def markdown(record: dict) -> str:
    names = list(record["configs"])
    header = ["layer", "first-key mass", *[f"error: {n}" for n in names], "sorted-block mass", "random block"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in record["rows"]:
        lines.append(f"| {r['layer']} | {r['sink_mass']:.3f} | " + " | ".join(f"{r['error'][n]:.3f}" for n in names)
                     + f" | {r['block_mass']:.3f} | {r['random_block_mass']:.3f} |")
    return (f"SmolLM2-135M-Instruct (float32), one essay window of {record['length']} tokens, queries of the first "
            f"off-diagonal pair; `{record['command']}`\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 15, 20, 25, 29])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    store = capture(args.length, args.layers)
    record = {"length": args.length, "configs": CONFIGS, "rows": [],
              "command": "python benchmarks/hyper_study.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with torch.no_grad():
        for layer in args.layers:
            record["rows"].append(study_layer(*store[layer], layer, CONFIGS))
            print(json.dumps(record["rows"][-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hyper_study.json").write_text(json.dumps(record, indent=1))
    (out / "hyper_study.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
