"""Where an eagerly launched decode step spends its host time: cProfile of one attention layer's decode calls.

A decode step launched eagerly (plain generate()) is bound by its host work whenever that outlasts its GPU work, so
the host time per call is what decides whether a method beats dense there. For each method this prints the host
time per call (back-to-back calls, no synchronisation inside) and the functions that take it.

    PYTHONPATH=$PWD python benchmarks/profile_decode.py --context 32768 --methods streaming hip
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time

import torch

from benchmarks.run import LAYER_SHAPES, LayerInputs, build_model, new_method, sdpa_without_cudnn, warm_up
from benchmarks.timing import cuda_time_by_kernel, time_generate
from hf_longattn import patch_model, unpatch_model


def host_us(fn, calls: int) -> float:
    """Host microseconds per call, the GPU left to run behind (synchronised only at the ends)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def sdpa_with_fresh_lengths(x: LayerInputs, calls: int) -> None:
    """Dense SDPA decode as generate() calls it, one key more at every call, per backend: a backend that plans per
    shape (cuDNN) pays its planning at every step there, which a benchmark repeating one shape never sees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = x.step_queries[0]
    k, v = (torch.cat([t, t[:, :, :calls + 8]], 2) for t in (x.k, x.v))
    for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        lengths = iter(range(x.context, x.context + calls + 8))

        def step(lengths=lengths):
            n = next(lengths)
            return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=x.scale,
                                                                    enable_gqa=True)
        label = "default" if backend is None else backend.name
        try:
            with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
                step()
                fresh = host_us(step, calls)
                start = time.perf_counter()
                for _ in range(4):
                    step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                synced = 1e6 * (time.perf_counter() - start) / 4
            print(f"  dense SDPA {label}, a new key length each call: {fresh:.1f} us/call (GPU left behind), "
                  f"{synced:.1f} us/call with the GPU waited for")
        except RuntimeError as error:
            print(f"  dense SDPA {label}: {str(error).splitlines()[0][:120]}")


def print_profile(profiler: cProfile.Profile, top: int) -> None:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


def per_decode_token(model, ids, tokens: int, measure) -> dict:
    """measure(run) -> {name: (value, calls)} of one generate(); the same for a 1-token generate() subtracted (its
    prefill) and divided by `tokens`: what one decode step costs."""
    def run(n):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    prefill, whole = measure(lambda: run(1)), measure(lambda: run(1 + tokens))
    return {name: tuple((v - prefill.get(name, (0, 0))[i]) / tokens for i, v in enumerate(values))
            for name, values in whole.items()}


def host_functions(run) -> dict:
    """{function: (own host s, calls)} of run() under cProfile."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    return {f"{path.split('/')[-1]}:{line} {name}": (v[2], v[0]) for (path, line, name), v in stats.items()}


def e2e(args) -> None:
    """Per decode token of generate() (Llama-3.1-8B's config, random bf16 weights; a tiny one on a CPU): the GPU time
    by kernel and the host time by function, dense (SDPA without cuDNN) and each method."""
    model = build_model("llama-3.1-8b" if torch.cuda.is_available() else "tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=model.device)
    for name in ["dense", *args.methods]:
        if name != "dense":
            patch_model(model, name)
        with sdpa_without_cudnn() if name == "dense" else contextlib.nullcontext():
            warm_up(model, ids[:, :4096])
            intervals = time_generate(model, ids, 16)["decode_intervals_ms"]
            label = "dense (SDPA without cuDNN)" if name == "dense" else name
            print(f"\n=== e2e {label} at {args.context}: median {statistics.median(intervals):.1f} ms a token; "
                  "intervals " + " ".join(f"{g:.1f}" for g in intervals))
            if torch.cuda.is_available():
                kernels = per_decode_token(model, ids, 16, cuda_time_by_kernel)
                print(f"GPU time a token: {sum(us for us, _ in kernels.values()) / 1e3:.2f} ms; by kernel (ms, "
                      "launches):")
                for kernel, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top // 2]:
                    print(f"  {us / 1e3:8.3f} {calls:6.1f}  {kernel[:80]}")
            functions = per_decode_token(model, ids, 16, host_functions)
            print("host time a token under cProfile, by function's own time (ms, calls):")
            for function, (seconds, calls) in sorted(functions.items(), key=lambda kv: -kv[1][0])[:args.top]:
                print(f"  {1e3 * seconds:7.3f} {calls:7.1f}  {function}")
        if name != "dense":
            unpatch_model(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--methods", nargs="+", default=["streaming", "hip", "dhsa", "blocktopk", "hyper"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--e2e", action="store_true",
                        help="generate()'s decode steps (GPU time by kernel, host time by function), not one layer")
    args = parser.parse_args()
    if args.e2e:
        return e2e(args)

    x = LayerInputs(args.context, *LAYER_SHAPES["llama-3-8b" if torch.cuda.is_available() else "tiny"], steps=1)
    q, (k, v) = x.step_queries[0], x.caches[0]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=x.scale, enable_gqa=True)
    for _ in range(3):
        sdpa()
    print(f"context {args.context}: dense SDPA host {host_us(sdpa, args.calls):.1f} us/call")
    sdpa_with_fresh_lengths(x, args.calls)
    for name in args.methods:
        method = new_method(name)
        state: dict = {}
        method.attend(x.q, x.k, x.v, x.call(state))  # its prefill, then steps that continue it
        def step(method=method, state=state):
            return method.attend(q, k, v, x.call(state))
        for _ in range(5):
            step()
        print(f"\n=== {name}: host {host_us(step, args.calls):.1f} us/call")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            step()
        profiler.disable()
        print_profile(profiler, args.top)


if __name__ == "__main__":
    main()
