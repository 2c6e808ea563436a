"""The method registry: one name -> one SparseMethod class (with its Config dataclass)."""

from __future__ import annotations

from .base import AttentionCall, SparseMethod
from .blocktopk import BlockTopK
from .dense import Dense
from .dhsa import Dhsa
from .hip import Hip
from .hyper import Hyper
from .longheads import LongHeads
from .streaming import Streaming

METHODS: dict[str, type[SparseMethod]] = {}


def register_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[SparseMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; available methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _cls in (Dense, Streaming, Hip, BlockTopK, Dhsa, LongHeads, Hyper):
    register_method(_cls)

__all__ = ["AttentionCall", "SparseMethod", "METHODS", "register_method", "get_method"]
