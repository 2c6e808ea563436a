"""Device buffers that kernels keep between launches, so that a decode step allocates and clears nothing.

`kept(device, name, numel, dtype)`: scratch space, grown as needed. `arrival_counters(device, count)`: int32 counters
that start at zero and that every kernel using them leaves at zero (the last program to arrive resets its counter),
so a launch needs no memset. A kernel uses them from its start to its end on the current stream; kernels on one
stream run one after another, so they can share them.
"""

from __future__ import annotations

import torch

_KEPT: dict[tuple[torch.device, str], torch.Tensor] = {}


def kept(device: torch.device, name: str, numel: int, dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
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
