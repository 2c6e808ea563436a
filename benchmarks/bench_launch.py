"""Eager decode steps with fast_launch against Triton's own launch, interleaved in one process.

One query over a 131072-key cache, Llama-3-8B shape, bf16: dense SDPA, the shared sparse attention on a 2K sink+window
pattern, and a whole HiP step (search + attention) at both presets, each timed back to back (host included, what plain
generate() gets). The decode kernels launch alternately through fast_launch and through Triton's JITFunction.run,
`--rounds` times each, and the medians are reported: the H200 host's speed drifts by up to 2x between and within
calls, so only an interleaved comparison separates the two.

With --e2e-context N, generate() instead (benchmarks/run.py's random-weight Llama-3.1-8B config, a dynamic cache,
16 tokens after the first), one process, rounds interleaved: dense SDPA with and without cuDNN, and HiP at its
defaults with fast_launch on and off, and with SDPA's cuDNN off.

    PYTHONPATH=$PWD python benchmarks/bench_launch.py --out benchmarks/results/fast_launch_h200
    PYTHONPATH=$PWD python benchmarks/bench_launch.py --e2e-context 32768 --rounds 4 --out ...
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_hip import loop_us


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--e2e-context", type=int, help="time generate() at this prompt length instead")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fast_launch_h200"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_launch.py needs a CUDA GPU")
    if args.e2e_context:
        return end_to_end(args)
    import triton

    from hf_longattn.kernels import sparse_attention
    from hf_longattn.kernels.launch import FastLaunch
    from hf_longattn.kernels.pattern import window_pattern
    from hf_longattn.methods.base import AttentionCall
    from hf_longattn.methods.hip import Hip, HipConfig

    k = torch.randn(1, 8, args.context, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    pattern = window_pattern(1, 8, 1, 128, 128, 128, 1920, device="cuda")
    cases = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
             "sparse attention, sink+window 2K": lambda: sparse_attention(q, k, v, pattern)}
    for preset in ("retrieval", "paper"):  # refresh_interval=1: every step searches
        method, call = Hip(HipConfig(preset=preset, refresh_interval=1)), AttentionCall(0, 128**-0.5, None, None)
        cases[f"hip {preset}: step (search + attend)"] = lambda m=method, c=call: m.attend(q, k, v, c)
    times = {(name, fast): [] for name in cases for fast in (True, False)}
    for fn in cases.values():
        fn()  # compile
    for _ in range(args.rounds):
        for fast in (True, False):
            FastLaunch.enabled = fast  # False: every launch through Triton's JITFunction.run
            for name, fn in cases.items():
                times[(name, fast)].append(loop_us(fn, args.calls))
    rows = []
    for name in cases:
        fast, plain = times[(name, True)], times[(name, False)]
        rows.append({"case": name, "fast_launch_us": statistics.median(fast),
                     "triton_launch_us": statistics.median(plain), "fast_launch_range": [min(fast), max(fast)],
                     "triton_launch_range": [min(plain), max(plain)]})
    dense = rows[0]
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(), "context": args.context,
              "rounds": args.rounds, "calls": args.calls, "rows": rows}
    lines = [f"# Eager decode steps: fast_launch against Triton's launch ({result['device']})", "",
             f"Command: `{result['command']}`", "",
             f"{result['date']}; torch {result['torch']}, triton {result['triton']}. One query over {args.context} "
             f"keys, Llama-3-8B shape, bf16. Medians of {args.rounds} interleaved rounds of {args.calls} back-to-back "
             "calls (host included); speedup = dense SDPA's median / this.", "",
             "| case | fast_launch us | Triton launch us | speedup, fast_launch | speedup, Triton launch | ranges |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fast_launch_us']:.1f} | {r['triton_launch_us']:.1f} | "
                     f"{dense['fast_launch_us'] / r['fast_launch_us']:.2f}x | "
                     f"{dense['triton_launch_us'] / r['triton_launch_us']:.2f}x | "
                     f"{r['fast_launch_range'][0]:.0f}-{r['fast_launch_range'][1]:.0f} / "
                     f"{r['triton_launch_range'][0]:.0f}-{r['triton_launch_range'][1]:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "launch.json").write_text(json.dumps(result, indent=1))
    (args.out / "launch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def end_to_end(args):
    """Decode ms a token of generate() (the median interval), arms interleaved round by round."""
    import contextlib

    from benchmarks.run import build_model, sdpa_without_cudnn, warm_up
    from benchmarks.timing import environment, time_generate
    from hf_longattn import patch_model, unpatch_model
    from hf_longattn.kernels.launch import FastLaunch

    model = build_model("llama-3.1-8b")
    ids = torch.randint(100, model.config.vocab_size, (1, args.e2e_context),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    arms = {"dense SDPA": ("dense", None, False), "dense SDPA, cuDNN off": ("dense", None, True),
            "hip, fast_launch": ("hip", True, False), "hip, Triton launch": ("hip", False, False),
            "hip, fast_launch, cuDNN off": ("hip", True, True)}
    times = {arm: [] for arm in arms}
    for round_ in range(args.rounds + 1):  # round 0 compiles
        for arm, (method, fast, no_cudnn) in arms.items():
            if method == "hip":
                patch_model(model, "hip")
                FastLaunch.enabled = fast
            with sdpa_without_cudnn() if no_cudnn else contextlib.nullcontext():
                if round_ == 0:
                    warm_up(model, ids[:, :4096])
                else:
                    times[arm].append(time_generate(model, ids, 16)["decode_ms_per_token"])
            unpatch_model(model)
    result = {"environment": environment(), "context": args.e2e_context, "rounds": args.rounds,
              "decode_ms_per_token": times}
    lines = [f"# generate() decode at {args.e2e_context} tokens: fast_launch against Triton's launch", "",
             f"Command: `{result['environment']['command']}`", "",
             "{date}, {device}, torch {torch}, triton {triton}, transformers {transformers}. ".format(
                 **result["environment"]) +
             "Random-weight Llama-3.1-8B config, bf16, dynamic cache, batch 1, 16 tokens after the first; per round "
             f"the median interval between tokens; {args.rounds} rounds, the arms interleaved in each.", "",
             "| arm | median of rounds, ms a token | rounds |", "|---|---|---|"]
    for arm, values in times.items():
        lines.append(f"| {arm} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(result, indent=1))
    (args.out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
