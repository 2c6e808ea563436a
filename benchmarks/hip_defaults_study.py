"""HiP's defaults against dense and against other settings: passkey accuracy on the very same NIAH prompts.

Each variant is a (method, options) pair; all of them answer the prompts that `hf_longattn.eval.niah.make_samples`
draws (Paul Graham essays haystack, a 5-digit passkey, `--depths` depths x `--samples` prompts per length), with the
eval package's scoring. The table reports found / prompts per length and the per-prompt pattern (x = found, in depth
order), so that two variants can be compared prompt by prompt.

    python benchmarks/hip_defaults_study.py --lengths 2048 4096 8192 --depths 10 --samples 5 --batch-size 10 \\
        --variants dense hip hip-before --out benchmarks/results/hip_defaults     # the H200 study
    python benchmarks/hip_defaults_study.py --lengths 2048 --depths 4 --samples 2 --device cpu --out /tmp/s

Writes hip_defaults.json and hip_defaults.md under --out (after every variant, so a cut run keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hf_longattn.eval.niah import make_samples, run_method

VARIANTS = {
    "dense": ("dense", {}),
    "hip": ("hip", {}),  # the defaults
    "hip-paper": ("hip", {"preset": "paper"}),  # the paper's budget and refresh
    # The defaults before this study: the paper's budget and refresh, the decode search as one beam.
    "hip-before": ("hip", {"preset": "paper", "decode_slices": 1, "decode_oversample": 1}),
    "hip-paper-r1": ("hip", {"preset": "paper", "refresh_interval": 1}),
    "hip-paper-r1-beam": ("hip", {"preset": "paper", "refresh_interval": 1, "decode_slices": 1,
                                  "decode_oversample": 1}),  # the paper's decode search, at every step
    "hip-beam": ("hip", {"decode_slices": 1, "decode_oversample": 1}),
    "hip-slices": ("hip", {"decode_oversample": 1}),  # slices that do not compete
    "hip-logit": ("hip", {"score": "logit"}),
    # The decode budget of the defaults, a smaller one for the prompt: the paper's, or half the default's.
    "hip-prefill-paper": ("hip", {"prefill_k": 512, "prefill_window": 256}),
    "hip-prefill-half": ("hip", {"prefill_k": 1024, "prefill_window": 512}),
    # The search in query blocks of 128 scored by every 4th query: as many scored queries a block, half the blocks.
    "hip-q128": ("hip", {"block_size_q": 128, "query_stride": 4}),
    "hip-paper-q128": ("hip", {"preset": "paper", "block_size_q": 128, "query_stride": 4}),
    "hip-q64": ("hip", {"block_size_q": 64, "query_stride": 2}),  # the layout before 128
    "hip-q256": ("hip", {"block_size_q": 256, "query_stride": 8}),  # half the searches again
    "hip-paper-q256": ("hip", {"preset": "paper", "block_size_q": 256, "query_stride": 8}),
}


def markdown(report: dict) -> str:
    lengths = report["lengths"]
    lines = [f"# HiP defaults study ({report['model']}, {report['dtype']}, {report['device']})", "",
             f"Command: `{report['command']}`", "",
             f"{report['date']}; {report['prompts_per_length']} prompts per length (NIAH passkey, essays haystack, "
             f"{report['depths']} depths x {report['samples']} samples), greedy. x = passkey found, in depth order.", "",
             "| variant | options | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for label, r in report["results"].items():
        cells = []
        for n in lengths:
            found = [s["score"] == 1.0 for s in r["samples"] if s["length"] == n]
            cells.append(f"{sum(found)}/{len(found)} `{''.join('x' if f else '.' for f in found)}`")
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"| {label} | {options} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--depths", type=int, default=10, help="evenly spaced depths 0..100%%")
    parser.add_argument("--samples", type=int, default=5, help="prompts per (length, depth)")
    parser.add_argument("--variants", nargs="+", default=["dense", "hip", "hip-before"], choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from hf_longattn.bundled import load_model
    from hf_longattn.eval.niah import depth_grid

    model, tokenizer = load_model("smollm2", dtype=getattr(torch, args.dtype))
    model.to(args.device)
    samples = make_samples(tokenizer, args.lengths, depth_grid(args.depths), args.samples, haystack="essays")
    report = {
        "command": "python " + " ".join(sys.argv), "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "lengths": args.lengths, "depths": args.depths,
        "samples": args.samples, "prompts_per_length": args.depths * args.samples, "results": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for label in args.variants:
        method, options = VARIANTS[label]
        report["results"][label] = run_method(model, tokenizer, samples, method, options, args.batch_size)
        found = sum(s["score"] == 1.0 for s in report["results"][label]["samples"])
        print(f"{label:18s} {found}/{len(samples)} ({report['results'][label]['seconds']:.0f} s)", flush=True)
        (args.out / "hip_defaults.json").write_text(json.dumps(report, indent=1))
        (args.out / "hip_defaults.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
