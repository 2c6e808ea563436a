"""Text -> values for the command lines: token lengths ("2k"), method lists and method options ("budget=2048").

Shared by `hf-longattn niah` and the lm-eval model, so both read `budget=2048,dense_layers=[0,1]` the same way.
Nothing here imports torch, lm_eval or datasets: errors surface before anything heavy is loaded.
"""

from __future__ import annotations

import ast
import json
import re

from ..config import ConfigError

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(text: str | int) -> int:
    """'2k' -> 2048, '1.5K' -> 1536, '4096' -> 4096 (tokens; k = 1024, as in the NIAH and RULER literature)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise ValueError(f"length {text!r} is not a token count; write e.g. 4096, 4k or 1.5k")
        number, unit = match.groups()
        value = float(number) * _UNITS[unit.lower()]
        if value != int(value):
            raise ValueError(f"length {text!r} is not a whole number of tokens")
        value = int(value)
    if value < 1:
        raise ValueError(f"length {text!r} must be at least one token")
    return value


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4k' -> [1024, 2048, 4096], sorted and without duplicates."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one context length, e.g. --lengths 2k,4k,8k")
    return sorted({parse_length(t) for t in items})


def parse_value(text):
    """A command-line option value: 'true' -> True, '2048' -> 2048, '0.5' -> 0.5, '[0,1]' or '0;1' -> [0, 1].

    Anything already typed (lm-eval's CLI parses its --model_args) is returned unchanged; other text stays a string.
    """
    if not isinstance(text, str):
        return text
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    if ";" in stripped:  # a list in a comma-separated argument string: dense_layers=0;1;2
        return [parse_value(part) for part in stripped.split(";") if part.strip()]
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
        return stripped


def parse_options(text: str | dict | None) -> dict:
    """'budget=2048,dense_layers=[0,1]' (or a JSON object, or a dict) -> {'budget': 2048, 'dense_layers': [0, 1]}."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return {k: parse_value(v) for k, v in text.items()}
    stripped = text.strip()
    if stripped.startswith("{"):
        return dict(json.loads(stripped))
    options = {}
    for item in _split_top_level(stripped):
        if "=" not in item:
            raise ValueError(f"option {item!r} is not key=value; write e.g. budget=2048,dense_layers=[0,1]")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_value(value)
    return options


def parse_method_args(text: str | None, methods: list[str]) -> dict[str, dict]:
    """Per-method options for the NIAH CLI.

    Either JSON, '{"hip": {"budget": 2048}, "streaming": {"window": 1024}}', or 'hip.budget=2048,streaming.window=1024'.
    """
    per_method: dict[str, dict] = {m: {} for m in methods}
    if not text:
        return per_method
    stripped = text.strip()
    if stripped.startswith("{"):
        given = json.loads(stripped)
        if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
            raise ValueError('--method-args JSON must map method names to option objects, e.g. {"hip": {"budget": 2048}}')
    else:
        given = {}
        for key, value in parse_options(stripped).items():
            if "." not in key:
                raise ValueError(f"--method-args option {key!r} must name its method: write e.g. hip.{key}=...")
            method, option = key.split(".", 1)
            given.setdefault(method, {})[option] = value
    for method, options in given.items():
        if method not in per_method:
            raise ValueError(f"--method-args names '{method}', which is not in --methods ({', '.join(methods)})")
        per_method[method].update(options)
    return per_method


def check_method_options(method: str, options: dict) -> None:
    """Raise (unknown method: ValueError; bad option: ConfigError) before any model is loaded."""
    from ..methods import get_method

    get_method(method).Config.from_options(method, options)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so 'dense_layers=[0,1],budget=2' keeps the list whole."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


__all__ = [
    "ConfigError", "parse_length", "parse_lengths", "parse_value", "parse_options", "parse_method_args",
    "check_method_options",
]
