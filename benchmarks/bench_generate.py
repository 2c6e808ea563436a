"""End-to-end generate() speed of a patched model: prefill and per-token decode, dense against the sparse methods.

Each method runs the same random-token prompt of each length, batch 1, greedy. Reported per method and length: the
first call (it includes Triton's compilation), the prefill (generate with one new token, median of 3) and the decode
time per token (a longer generate minus the prefill, over the extra tokens). With --profile, the CUDA kernels that
take the most time during one generate() of each sparse method at the longest length are listed.

    python benchmarks/bench_generate.py --lengths 2048 8192 32768 --methods dense hip --out benchmarks/results

Writes generate_bench.json and generate_bench.md under --out. Needs a CUDA GPU for meaningful numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_longattn import patched


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, ids: torch.Tensor, new_tokens: int) -> dict:
    first = timed_generate(model, ids, 1)
    prefill = statistics.median(timed_generate(model, ids, 1) for _ in range(3))
    longer = statistics.median(timed_generate(model, ids, new_tokens + 1) for _ in range(2))
    return {"first_call_s": first, "prefill_ms": 1e3 * prefill, "decode_ms_per_token": 1e3 * (longer - prefill) / new_tokens}


def profile(model, ids: torch.Tensor, new_tokens: int, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_generate(model, ids, new_tokens + 1)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)


def markdown(report: dict) -> str:
    lines = [f"# generate() speed, {report['model']} ({report['dtype']}), {report['device']}", "",
             f"Command: `{report['command']}`", "", f"{report['date']}; torch {report['torch']}, "
             f"transformers {report['transformers']}, triton {report['triton']}. Batch 1, greedy, "
             f"{report['new_tokens']} decode tokens.", "",
             "| length | method | first call (s) | prefill (ms) | decode (ms/token) | prefill vs dense | decode vs dense |",
             "|---|---|---|---|---|---|---|"]
    for length, by_method in report["results"].items():
        dense = by_method.get("dense")
        for method, r in by_method.items():
            ratio = (lambda key: f"{dense[key] / r[key]:.2f}x" if dense else "-")  # noqa: E731
            lines.append(f"| {length} | {method} | {r['first_call_s']:.1f} | {r['prefill_ms']:.1f} | "
                         f"{r['decode_ms_per_token']:.2f} | {ratio('prefill_ms')} | {ratio('decode_ms_per_token')} |")
    for method, table in report.get("profiles", {}).items():
        lines += ["", f"## Top CUDA kernels, one generate() with {method} at {max(map(int, report['results']))}", "",
                  "```", table, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a hub name / local path")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--methods", nargs="+", default=["dense", "hip"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", action="store_true", help="list the top CUDA kernels of each sparse method")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU")
    import transformers
    import triton

    from hf_longattn.bundled import load_model

    model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
    model.to("cuda")
    vocab = model.config.vocab_size
    results, profiles = {}, {}
    for length in args.lengths:
        ids = torch.randint(100, vocab, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
        results[length] = {}
        for method in args.methods:
            with torch.no_grad(), patched(model, method):
                results[length][method] = measure(model, ids, args.new_tokens)
                if args.profile and method != "dense" and length == max(args.lengths):
                    profiles[method] = profile(model, ids, args.new_tokens)
            print(length, method, results[length][method], flush=True)
    report = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
        "new_tokens": args.new_tokens, "results": results, "profiles": profiles,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generate_bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "generate_bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
