"""Serving speed through the HTTP server: time to first token and decode tokens/s per request, each method vs dense.

`none` is the unpatched model (its own dense attention), `dense` our exact path; every other method is sparse.

For each method one `hf-longattn serve` process is started (all at once, so that their start-up overlaps; then they
are measured one after another). Each server is warmed up at every length (the first request compiles the Triton
kernels), then at each prompt length it gets rounds of 1 and of N simultaneous streamed requests: random token ids of
exactly that length, exactly --max-tokens new tokens each (`ignore_eos`). Per request the client records the time to
the first streamed text (queue wait included: the server runs one generate() at a time), the decode rate after it,
and the server's own timing. The client is the standard library only (http.client), so the machine that runs this
needs nothing beyond what the server needs.

    python benchmarks/bench_serve.py --model smollm2 --methods none hip --lengths 8192 32768 --concurrency 1 4 \\
        --out benchmarks/results/serve

Writes serve_bench.json and serve_bench.md under --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request(method, path, json.dumps(body) if body is not None else None,
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    return connection, response


def get_json(port: int, path: str) -> dict:
    connection, response = request(port, "GET", path)
    try:
        return json.loads(response.read())
    finally:
        connection.close()


def streamed_completion(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request, timed as the client sees it."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    connection, response = request(port, "POST", "/v1/completions", body, timeout=900)
    first = server_timing = usage = None
    try:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                server_timing = chunk["timing"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    finally:
        connection.close()
    end = time.perf_counter()
    tokens = usage["completion_tokens"]
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": tokens,
            "ttft_s": first - start, "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else None,
            "total_s": end - start, "server": server_timing}


def concurrent_round(port: int, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
    """All prompts sent at the same moment; (per-request results, wall time of the round)."""
    results: list[dict | BaseException] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        try:
            results[i] = streamed_completion(port, prompts[i], max_tokens)
        except BaseException as error:  # reported below, after every client is done
            results[i] = error

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results, wall


def start_server(args, method: str, options: dict, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "hf_longattn.eval", "serve", "--model", args.model, "--method", method,
               "--port", str(port), "--dtype", args.dtype, "--max-context", str(max(args.lengths) + args.max_tokens),
               "--log-level", "warning"]
    if args.gguf_file:
        command += ["--gguf-file", args.gguf_file]
    if options:
        command += ["--method-args", json.dumps(options)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)


def wait_healthy(port: int, process: subprocess.Popen, log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited:\n{log.read_text()[-3000:]}")
        try:
            return get_json(port, "/v1/models")["data"][0]
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the server on port {port} did not answer within {timeout:.0f} s; see {log}")


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab_size) for _ in range(length)]


def benchmark(port: int, card: dict, args) -> list[dict]:
    rows = []
    for length in args.lengths:
        warm_up = random_prompt(card["vocab_size"], length, seed=-1)
        streamed_completion(port, warm_up, min(4, args.max_tokens))  # the first call at a length compiles kernels
        for clients in args.concurrency:
            prompts = [random_prompt(card["vocab_size"], length, seed=1000 * length + i) for i in range(clients)]
            results, wall = concurrent_round(port, prompts, args.max_tokens)
            for i, r in enumerate(results):
                rows.append({"length": length, "clients": clients, "client": i, "round_wall_s": wall, **r})
            print(f"{card['method']:>10} {length:>7} x{clients}: ttft "
                  + ", ".join(f"{r['ttft_s']:.3f}" for r in results) + " s; decode "
                  + ", ".join(f"{r['decode_tokens_per_s']:.0f}" for r in results) + " tok/s", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["length"], r["clients"]), []).append(r)
    out = []
    for (method, length, clients), group in groups.items():
        tokens = sum(r["completion_tokens"] for r in group)
        out.append({
            "method": method, "length": length, "clients": clients,
            "ttft_median_s": statistics.median(r["ttft_s"] for r in group),
            "ttft_max_s": max(r["ttft_s"] for r in group),
            "server_prefill_median_s": statistics.median(
                r["server"]["time_to_first_token_s"] - r["server"]["queue_s"] for r in group),
            "decode_tokens_per_s_median": statistics.median(r["decode_tokens_per_s"] for r in group),
            "round_tokens_per_s": tokens / group[0]["round_wall_s"],
        })
    return out


def markdown(report: dict) -> str:
    methods = {s["method"] for s in report["summary"]}
    baseline = next((m for m in ("none", "dense") if m in methods), None)  # the model's own attention, or ours dense
    label = {"none": "unpatched"}.get(baseline, baseline)
    lines = [f"# Serving speed, {report['model']} ({report['dtype']}), {report['device']}", "",
             f"Command: `{report['command']}`", "",
             f"{report['date']}; {report['versions']}. Streamed /v1/completions, random-token prompts, "
             f"{report['max_tokens']} new tokens each (ignore_eos), greedy; one generate() at a time on the server, "
             "so with N clients all but one wait in its queue. TTFT as the client sees it (queue included); prefill "
             "is the server's time from start to first token; decode is tokens/s after the first token.", "",
             "| method | prompt | clients | TTFT median (s) | TTFT max (s) | prefill median (s) | decode tok/s median "
             f"| round tok/s | TTFT vs {label} | decode vs {label} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(s["length"], s["clients"]): s for s in report["summary"] if s["method"] == baseline}
    for s in sorted(report["summary"], key=lambda s: (s["length"], s["clients"], s["method"])):
        d = dense.get((s["length"], s["clients"]))
        ttft_ratio = f"{d['ttft_median_s'] / s['ttft_median_s']:.2f}x" if d else "-"
        decode_ratio = f"{s['decode_tokens_per_s_median'] / d['decode_tokens_per_s_median']:.2f}x" if d else "-"
        lines.append(f"| {s['method']} | {s['length']} | {s['clients']} | {s['ttft_median_s']:.3f} | "
                     f"{s['ttft_max_s']:.3f} | {s['server_prefill_median_s']:.3f} | "
                     f"{s['decode_tokens_per_s_median']:.1f} | {s['round_tokens_per_s']:.1f} | {ttft_ratio} | "
                     f"{decode_ratio} |")
    lines += ["", "Methods and options as served:", ""]
    lines += [f"- {m}: `{json.dumps(card['method_options'])}`" for m, card in report["servers"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), a local folder or .gguf, a hub id")
    parser.add_argument("--gguf-file")
    parser.add_argument("--methods", nargs="+", default=["none", "hip"],
                        help="'none' serves the unpatched model (its own dense attention)")
    parser.add_argument("--method-args", help='per method, JSON: \'{"hip": {"k": 1024}}\'')
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="prompt lengths in tokens")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="simultaneous clients per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--port", type=int, default=8400, help="first port; one server per method on consecutive ports")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    method_args = json.loads(args.method_args) if args.method_args else {}
    unknown = set(method_args) - set(args.methods)
    if unknown:
        parser.error(f"--method-args names {', '.join(sorted(unknown))}, which --methods does not")
    args.out.mkdir(parents=True, exist_ok=True)

    ports = {m: args.port + i for i, m in enumerate(args.methods)}
    logs = {m: args.out / f"serve_{m}.log" for m in args.methods}
    servers = {m: start_server(args, m, method_args.get(m, {}), ports[m], logs[m]) for m in args.methods}
    rows, cards = [], {}
    try:
        for method in args.methods:
            cards[method] = wait_healthy(ports[method], servers[method], logs[method], args.startup_timeout)
        for method in args.methods:  # one at a time: the others sit idle
            rows += [{"method": method, **r} for r in benchmark(ports[method], cards[method], args)]
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            process.wait(timeout=60)

    first = next(iter(cards.values()))
    gpus = sorted(set((first.get("gpus") or {}).values()))
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "dtype": first.get("dtype", args.dtype),
        "device": ", ".join(gpus) or f"CPU ({platform.processor() or platform.machine()})",
        "versions": ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "triton", "fastapi", "uvicorn")),
        "max_tokens": args.max_tokens, "servers": cards, "summary": summary(rows), "requests": rows,
    }
    (args.out / "serve_bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "serve_bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


if __name__ == "__main__":
    sys.exit(main())
