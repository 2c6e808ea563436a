"""Device buffers that kernels keep between launches, so that a decode step allocates and clears nothing.

`kept(device, name, numel, dtype)`: scratch space, grown as needed. `arrival_counters(device, count)`: int32 counters
that start at zero and that every kernel using them leaves at zero (the last program to arrive resets its counter),
so a launch needs no memset. A kernel uses them from its start to its end on the current stream; kernels on one
stream run one after another, so they can share them.

Inside a compiled graph (`per_call()`, entered by the custom ops that torch.compile runs) every call gets fresh
buffers instead: torch.compile's CUDA graphs own the memory allocated while they warm up and are captured, and refuse
to run when a tensor of theirs outlives the call unseen.
"""

from __future__ import annotations

import contextlib

import torch

_KEPT: dict[tuple[torch.device, str], torch.Tensor] = {}
_per_call = False


@contextlib.contextmanager
def per_call():
    """Fresh scratch buffers for the calls inside, none kept (a custom op's body under torch.compile)."""
    global _per_call
    previous, _per_call = _per_call, True
    try:
        yield
    finally:
        _per_call = previous


def kept(device: torch.device, name: str, numel: int, dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
    if _per_call:
        return (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype, device=device)
    buffer = _KEPT.get((device, name))
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        grown = max(numel, 2 * buffer.numel()) if buffer is not None else numel
        buffer = (torch.zeros if zeroed else torch.empty)(grown, dtype=dtype, device=device)
        # Memory allocated while a CUDA graph is captured belongs to that graph: use it, do not keep it.
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _KEPT[(device, name)] = buffer
    return buffer


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    return kept(device, "arrival counters", count, torch.int32, zeroed=True)
