"""One way to time a kernel, a generate() call and a peak, and one way to write a result: every benchmark uses these.

    time_ms(fn)                       median ms of one fn() call: CUDA events on a GPU (launches included), clock on CPU
    time_ms(fn, graph=True)           the same calls captured once as a CUDA graph and replayed (GPU time only)
    time_ms(fn, setup=restore)        setup() runs before every timed call, outside the timing (e.g. decode state)
    peak_bytes(fn)                    (fn(), bytes of GPU memory fn allocated on top of what was there)
    cuda_time_by_kernel(fn)           {kernel: (GPU us, launches)} of one fn() call (torch.profiler)
    time_generate(model, ids, n, ...) time to first token, decode ms per token, peak GPU memory of one generate()
    environment()                     date, machine, versions, the command and the commit, for every result file
    write_result(out, stem, record, markdown)  stem.json + stem.md under out
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Written before each timed GPU call so that no call finds its inputs in the L2 cache left warm by the previous one
# (H200 L2: 60 MB); in a model, the other layers' work evicts it.
_L2_FLUSH_BYTES = 256 << 20
_flush_buffer: torch.Tensor | None = None


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _flush_l2() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    _flush_buffer.zero_()


def capture_graph(fn: Callable[[], object], setup: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph:
    """fn's GPU work as a CUDA graph, captured after setup(). fn must already have run once (Triton compiles)."""
    setup = setup or (lambda: None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        setup()
        fn()  # a last warm-up on the capture's side stream, as torch's docs ask
    torch.cuda.current_stream().wait_stream(stream)
    setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_ms(fn: Callable[[], object], graph: bool = False, setup: Callable[[], None] | None = None,
            target_s: float = 0.2, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of one fn() call.

    On a GPU each call is bracketed by CUDA events on an idle device (synchronised before), so a call that is bound by
    its kernel launches (a decode step) is timed with its launches, as a program sees it; graph=True captures fn once
    and times the replays: GPU time only, as a server that runs its decode steps as CUDA graphs sees it. `setup` (if
    given) runs before the first call, before the capture and before every timed eager call, never inside the
    timing. The number of timed calls fills about `target_s` seconds, within [min_reps, max_reps]. On a CPU it is a
    wall clock (graph=True is refused there).
    """
    setup = setup or (lambda: None)
    if not on_gpu():
        if graph:
            raise RuntimeError("CUDA graphs need a CUDA GPU")
        setup()
        fn()  # warm-up
        times = []
        for _ in range(min_reps):
            setup()
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    setup()
    fn()  # compile, allocate
    if graph:
        replay = capture_graph(fn, setup).replay
        setup = lambda: None  # noqa: E731 - a replay starts from the state captured, not from Python's
    else:
        replay = fn
    estimate = _event_times(replay, setup, 1)[0]
    reps = int(min(max_reps, max(min_reps, target_s * 1e3 / max(estimate, 1e-3))))
    return statistics.median(_event_times(replay, setup, reps))


def _event_times(fn, setup, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        setup()
        _flush_l2()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), the most GPU memory fn held at once beyond what was allocated when it started); 0 on CPU."""
    if not on_gpu():
        return fn(), 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


def cuda_time_by_kernel(fn: Callable[[], object]) -> dict[str, tuple[float, int]]:
    """{kernel name: (GPU microseconds, launches)} of one fn() call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        time_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if time_us:
            times[event.key] = (time_us, event.count)
    return times


def _token_clock():
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """A generate() streamer that notes when each new token reaches the host (generate copies it there, which
        waits for the GPU): the first put() is the prompt, the next ones are the generated tokens."""

        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    return TokenClock()


@torch.no_grad()
def time_generate(model, input_ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> dict:
    """One greedy generate() of exactly `new_tokens` + 1 tokens (batch 1).

    Returns ttft_s (the call until the first new token is on the host: the prefill), decode_ms_per_token (the median
    interval between the following tokens: a one-off cost, such as a kernel compiled for a new specialisation, shows
    in decode_max_ms instead of moving it; all of them in decode_intervals_ms), peak_gib (the most GPU memory
    allocated during the call, weights and KV cache included; 0 on CPU) and tokens (the generated ids, to check that
    two set-ups produce the same ones).
    """
    clock = _token_clock()
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens + 1,
                   min_new_tokens=new_tokens + 1, do_sample=False, pad_token_id=0, streamer=clock, **generate_kwargs)
    gaps = [1e3 * (b - a) for a, b in zip(clock.times, clock.times[1:])]
    return {
        "ttft_s": clock.times[0] - start,
        "decode_ms_per_token": statistics.median(gaps) if gaps else None,
        "decode_max_ms": max(gaps) if gaps else None,
        "decode_intervals_ms": gaps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else 0.0,
        "tokens": clock.tokens,
    }


def environment(argv: list[str] | None = None) -> dict:
    """Where and with what a result was measured, and the command that measured it."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    argv = sys.argv if argv is None else argv
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if on_gpu() else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "commit": commit, "command": "python " + " ".join(argv),
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out: Path, stem: str, record: dict, markdown: str) -> list[Path]:
    """Write out/stem.json (the record) and out/stem.md (the markdown); return both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(record, indent=1, default=str))
    paths[1].write_text(markdown)
    return paths
