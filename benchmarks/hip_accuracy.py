"""Passkey retrieval at a fixed attention budget: dense vs streaming vs blocktopk vs hip, plus per-layer recall.

Every method answers the very same prompts: a 5-digit passkey hidden at a depth spread evenly over 0..100% of a
repetitive filler text of exactly L tokens (the classic synthetic passkey test), asked for at the end in the model's
chat format. A sample counts as found when the greedy answer contains the passkey. Beside accuracy, the share of the
exact attention mass that each method's selection keeps (hf_longattn.recall) is averaged per layer over the first
few prompts of each length.

Budget (default 512 tokens per query): streaming = 16 sink + 496 window; blocktopk and hip = 16 sink + 176 window +
320 selected tokens (5 blocks of 64 for blocktopk, 160 blocks of 2 for hip): the selection takes about 3/4 of what
the sink leaves, in whole 64-token blocks, close to HiP's own 2:1 ratio of k to window.

    python benchmarks/hip_accuracy.py --lengths 2048 4096 8192 --samples 50 --out benchmarks/results/hip_accuracy
    python benchmarks/hip_accuracy.py --lengths 1024 --samples 2 --out /tmp/acc     # CPU smoke run

Writes hip_accuracy.json and hip_accuracy.md under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from hf_longattn import patched
from hf_longattn.recall import model_recall

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def method_options(budget: int, dense_layers: int) -> dict[str, tuple[str, dict]]:
    """label -> (method, options): each method at `budget` attended tokens per query (sink + window + selection).
    "hip-logit" is HiP ranking by the paper's raw q.k instead of the default estimated probability."""
    sink, selected = 16, (budget - 16) * 3 // 4 // 64 * 64
    window = budget - sink - selected
    shared = {"dense_layers": dense_layers}
    return {
        "dense": ("dense", {}),
        "streaming": ("streaming", {"sink": sink, "window": budget - sink, **shared}),
        "blocktopk": ("blocktopk", {"sink": sink, "window": window, "k": selected, "block_size_k": 64, **shared}),
        "hip": ("hip", {"sink": sink, "window": window, "k": selected, **shared}),
        "hip-logit": ("hip", {"sink": sink, "window": window, "k": selected, "score": "logit", **shared}),
    }


class PasskeyPrompts:
    """Prompts of an exact token length, built from token pieces so that no re-tokenisation changes the length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else "\x00"
        head, tail = chat.split("\x00")
        encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.head = encode(head + INTRO)
        self.tail = encode(QUESTION) + encode(tail + ANSWER_PREFIX)
        self.filler = encode(FILLER)
        self.encode = encode

    def make(self, length: int, depth: float, key: str) -> list[int]:
        needle = self.encode(NEEDLE.format(key=key))
        room = length - len(self.head) - len(self.tail) - len(needle)
        if room < len(self.filler):
            raise ValueError(f"length {length} is too short for a passkey prompt ({length - room} fixed tokens)")
        haystack = (self.filler * (room // len(self.filler) + 1))[:room]
        # Insert at the sentence boundary (a filler repeat) nearest the depth, then trim the tail to the exact room.
        cut = round(depth * (room // len(self.filler))) * len(self.filler)
        ids = self.head + haystack[:cut] + needle + haystack[cut:] + self.tail
        assert len(ids) == length
        return ids


def make_samples(tokenizer, length: int, count: int, seed: int) -> list[dict]:
    prompts, rng = PasskeyPrompts(tokenizer), random.Random(seed * 1_000_003 + length)
    samples = []
    for i in range(count):
        depth = i / (count - 1) if count > 1 else 0.5
        key = str(rng.randint(10000, 99999))
        samples.append({"length": length, "depth": depth, "key": key, "ids": prompts.make(length, depth, key)})
    return samples


@torch.no_grad()
def answers(model, tokenizer, samples: list[dict], batch_size: int, max_new_tokens: int = 10) -> list[str]:
    out = []
    for i in range(0, len(samples), batch_size):
        ids = torch.tensor([s["ids"] for s in samples[i:i + batch_size]], device=model.device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out += tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
    return out


def run(model, tokenizer, lengths: list[int], samples: int, methods: dict[str, tuple[str, dict]], batch_size: int,
        recall_samples: int, seed: int = 0) -> dict:
    results = {label: {"method": name, "options": options, "lengths": {}}
               for label, (name, options) in methods.items()}
    for length in lengths:
        cell = make_samples(tokenizer, length, samples, seed)
        for label, (name, options) in methods.items():
            start = time.time()
            with patched(model, name, **options):
                texts = answers(model, tokenizer, cell, batch_size)
            found = [s["key"] in text for s, text in zip(cell, texts)]
            entry = {"accuracy": sum(found) / len(found), "found": found, "depths": [s["depth"] for s in cell],
                     "answers": texts, "seconds": time.time() - start}
            if name != "dense" and recall_samples:
                per_layer = [model_recall(model, torch.tensor([s["ids"]], device=model.device), name, **options)
                             for s in cell[:recall_samples]]
                entry["recall_per_layer_head"] = {
                    layer: torch.stack([r[layer] for r in per_layer]).mean(0).tolist() for layer in per_layer[0]
                }
            results[label]["lengths"][length] = entry
            print(f"{label:10s} L={length:6d} accuracy {entry['accuracy']:.2f} ({entry['seconds']:.0f} s)", flush=True)
    return results


def markdown(report: dict) -> str:
    results, lengths = report["results"], report["lengths"]
    lines = [f"# Passkey retrieval at a {report['budget']}-token budget ({report['model']}, {report['dtype']})", "",
             f"Command: `{report['command']}`", "", f"{report['date']}, {report['device']}; {report['samples']} "
             "samples per length, depths evenly spread over 0..100%, greedy decoding; same prompts for every method.",
             "", "| method | options | " + " | ".join(f"{n}" for n in lengths) + " | mean recall |",
             "|---|---|" + "---|" * (len(lengths) + 1)]
    for name, r in results.items():
        cells = [f"{100 * r['lengths'][n]['accuracy']:.0f}%" for n in lengths]
        per_layer = [r["lengths"][n].get("recall_per_layer_head", {}) for n in lengths]
        recalls = [v for table in per_layer for layer in table.values() for v in layer]
        mean_recall = f"{sum(recalls) / len(recalls):.3f}" if recalls else "1 (exact)"
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "exact"
        lines.append(f"| {name} | {options} | " + " | ".join(cells) + f" | {mean_recall} |")
    lines += ["", "## Recall of the exact attention mass per layer (mean over heads and the recall samples)", "",
              "| method | length | " + " | ".join(f"L{i}" for i in range(report["num_layers"])) + " |",
              "|---|---|" + "---|" * report["num_layers"]]
    for name, r in results.items():
        for n in lengths:
            per = r["lengths"][n].get("recall_per_layer_head")
            if per is None:
                continue
            row = [f"{sum(per[i]) / len(per[i]):.2f}" if i in per else "dense" for i in range(report["num_layers"])]
            lines.append(f"| {name} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a hub name / local path")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--samples", type=int, default=50, help="prompts per length (depths spread over 0..100%%)")
    parser.add_argument("--budget", type=int, default=512, help="attended tokens per query for the sparse methods")
    parser.add_argument("--methods", nargs="+", default=["dense", "streaming", "blocktopk", "hip", "hip-logit"])
    parser.add_argument("--dense-layers", type=int, default=0, help="leading layers kept dense by the sparse methods")
    parser.add_argument("--recall-samples", type=int, default=4, help="prompts per length for the recall table")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.budget < 16 + 64 + 16:
        parser.error(f"--budget {args.budget} is too small: it must hold a 16-token sink, a 64-token block, a window")
    all_methods = method_options(args.budget, args.dense_layers)
    unknown = sorted(set(args.methods) - set(all_methods))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(all_methods)}")

    from hf_longattn.bundled import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    results = run(model, tokenizer, args.lengths, args.samples, {m: all_methods[m] for m in args.methods},
                  args.batch_size, args.recall_samples, args.seed)
    report = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "dtype": args.dtype, "budget": args.budget,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "samples": args.samples, "lengths": args.lengths,
        "num_layers": model.config.num_hidden_layers, "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hip_accuracy.json").write_text(json.dumps(report, indent=1))
    (args.out / "hip_accuracy.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
