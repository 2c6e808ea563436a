"""End-to-end generate() speed of a patched model: time to first token and decode time per token, dense against the
sparse methods, with the dynamic cache (eager, what plain generate() does) and with a static cache, which
transformers compiles (torch.compile, CUDA graphs) on the GPU.

One generate() per (method, cache, length) gives both numbers: a logits processor stamps every step (after a device
sync), so the prefill is the time to the first stamp and the decode time per token the median gap between the later
ones. Before the timed runs each (method, cache) generates once at --warmup-length: Triton's and torch.compile's
first-call compilation, reported as "first call". The static cache is sized once for the longest length, so the
compiled decode step serves every length.

    python benchmarks/bench_generate.py --model llama-3.1-8b --lengths 32768 131072 --caches dynamic static \\
        --methods dense hip --out benchmarks/results            # random weights, Llama-3.1-8B's config, bf16
    python benchmarks/bench_generate.py --model smollm2 --lengths 2048 8192 --caches dynamic --out /tmp/g

Writes generate_bench.json and generate_bench.md under --out (after every run). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_longattn import patched

# Llama-3.1-8B's architecture (random weights: speed does not depend on them).
LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
)


class StepClock(LogitsProcessor):
    """Stamps the wall time of every generation step, after the device has finished it."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def load(name: str, dtype: torch.dtype, layers: int | None):
    if name == "llama-3.1-8b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**dict(LLAMA_31_8B, **({"num_hidden_layers": layers} if layers else {})))
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        return model.eval()
    from hf_longattn.bundled import load_model

    model, _ = load_model(name, dtype=dtype)
    return model.to("cuda").eval()


def timed_generate(model, ids: torch.Tensor, new_tokens: int, cache) -> dict:
    """(seconds of the whole call, prefill ms, decode ms per token) of one greedy generate()."""
    clock = StepClock()
    if cache is not None:
        cache.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=model.config.pad_token_id or 0,
                   logits_processor=LogitsProcessorList([clock]), **({} if cache is None else {"past_key_values": cache}))
    torch.cuda.synchronize()
    stamps = clock.stamps
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"call_s": time.perf_counter() - start, "prefill_ms": 1e3 * (stamps[0] - start),
            "decode_ms_per_token": 1e3 * statistics.median(gaps) if gaps else float("nan"),
            "decode_max_ms": 1e3 * max(gaps) if gaps else float("nan")}


def markdown(report: dict) -> str:
    lines = [f"# generate() speed, {report['model']} ({report['dtype']}), {report['device']}", "",
             f"Command: `{report['command']}`", "", f"{report['date']}; torch {report['torch']}, "
             f"transformers {report['transformers']}, triton {report['triton']}. Batch 1, greedy, "
             f"{report['new_tokens']} new tokens. First call: one generate() at {report['warmup_length']} tokens "
             "(Triton and torch.compile compile there).", "",
             "| cache | method | first call (s) | length | prefill (ms) | decode (ms/token) | prefill vs dense | "
             "decode vs dense |", "|---|---|---|---|---|---|---|---|"]
    for cache, by_method in report["results"].items():
        dense = by_method.get("dense", {})
        for method, r in by_method.items():
            for length, t in r.get("lengths", {}).items():
                d = dense.get("lengths", {}).get(length)
                ratio = (lambda key: f"{d[key] / t[key]:.2f}x" if d else "-")  # noqa: E731
                lines.append(f"| {cache} | {method} | {r['first_call_s']:.1f} | {length} | {t['prefill_ms']:.0f} | "
                             f"{t['decode_ms_per_token']:.2f} | {ratio('prefill_ms')} | {ratio('decode_ms_per_token')} |")
            if "error" in r:
                lines.append(f"| {cache} | {method} | - | - | - | - | {r['error']} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="'llama-3.1-8b' (random weights), 'smollm2', a path")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (llama-3.1-8b only)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--methods", nargs="+", default=["dense", "hip"])
    parser.add_argument("--caches", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warmup-length", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_generate.py needs a CUDA GPU")
    import transformers
    import triton
    from transformers import StaticCache

    model = load(args.model, getattr(torch, args.dtype), args.layers)
    vocab = model.config.vocab_size
    report = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
        "new_tokens": args.new_tokens, "warmup_length": args.warmup_length, "results": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "generate_bench.json").write_text(json.dumps(report, indent=1))
        (args.out / "generate_bench.md").write_text(markdown(report))

    prompt = lambda n: torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(n)).cuda()  # noqa: E731
    for cache_kind in args.caches:
        report["results"][cache_kind] = {}
        cache = None
        if cache_kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=max(args.lengths) + args.new_tokens)
        for method in args.methods:
            entry = report["results"][cache_kind][method] = {"lengths": {}}
            try:
                with torch.no_grad(), patched(model, method):
                    entry["first_call_s"] = timed_generate(model, prompt(args.warmup_length), args.new_tokens,
                                                           cache)["call_s"]
                    for length in args.lengths:
                        entry["lengths"][length] = timed_generate(model, prompt(length), args.new_tokens, cache)
                        print(cache_kind, method, length, entry["lengths"][length], flush=True)
            except Exception as error:  # noqa: BLE001 - one failing configuration must not lose the others
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                print(cache_kind, method, entry["error"], flush=True)
            entry.setdefault("first_call_s", float("nan"))
            torch._dynamo.reset()  # the next method compiles its own decode step
            save()
        del cache
        torch.cuda.empty_cache()
    print(markdown(report))


if __name__ == "__main__":
    main()
