"""Options shared by every method: which layers a method touches (layer policy as data, not code).

Each method subclasses `MethodConfig` with its own fields, defaults (from its paper) and `validate()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An option that a method does not have, or a value it cannot take."""


@dataclass
class MethodConfig:
    # Layers that stay exact dense: an int n means the first n layers, a list names layer indices.
    dense_layers: int | list[int] | tuple[int, ...] = ()
    # Inputs whose key length is below this run dense (a sparse pattern buys nothing on short inputs). A compiled
    # static-cache decode step cannot read the real length on the host: it compares the cache's size.
    min_seq_len: int = 0
    # Local sliding-window layers (Gemma 2/3 local layers, Mistral with a window) keep their exact window.
    keep_sliding_window: bool = True
    _dense_layer_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, (int, list, tuple, set, frozenset)):
            raise ConfigError(f"dense_layers must be an int (the first n layers) or a list of layer indices, got {self.dense_layers!r}")
        if isinstance(self.dense_layers, int):
            if self.dense_layers < 0:
                raise ConfigError(f"dense_layers={self.dense_layers}: a number of leading layers must be >= 0")
            self._dense_layer_set = frozenset(range(self.dense_layers))
        else:
            self._dense_layer_set = frozenset(int(i) for i in self.dense_layers)
        if self.min_seq_len < 0:
            raise ConfigError(f"min_seq_len={self.min_seq_len} must be >= 0")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError naming the option and the fix."""

    def is_dense_layer(self, layer_idx: int) -> bool:
        return layer_idx in self._dense_layer_set

    def options(self) -> dict:
        """The options this config was made from, as `patch_model` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"method '{method}' has no option {', '.join(unknown)}; its options are: {', '.join(names)}")
        return cls(**options)


def positive(config: MethodConfig, *names: str) -> None:
    """Raise ConfigError unless every named option is a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


def non_negative(config: MethodConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r} must be an integer >= 0")
