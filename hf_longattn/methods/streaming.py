"""`streaming`: attention sinks + a sliding window (StreamingLLM, Xiao et al. 2023).

The simplest static pattern and the baseline every selector must beat at the same budget. With a window that covers
the whole context it is exact dense attention.
"""

from dataclasses import dataclass

from ..config import MethodConfig, non_negative, positive
from ..kernels import window_pattern
from .base import SparseMethod


@dataclass
class StreamingConfig(MethodConfig):
    sink: int = 16
    window: int = 496
    block_size_q: int = 64

    def validate(self):
        non_negative(self, "sink")
        positive(self, "window", "block_size_q")


class Streaming(SparseMethod):
    name = "streaming"
    Config = StreamingConfig
    supports_query_offset = True  # the pattern does not depend on where the queries sit

    def select(self, query, key, call):
        c = self.config
        batch, heads, q_len = query.shape[0], key.shape[1], query.shape[2]
        return window_pattern(batch, heads, q_len, c.block_size_q, 64, c.sink, c.window, device=query.device)
