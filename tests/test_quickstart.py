"""examples/quickstart.py's claims that do not need a model run: at its default prompt length every method is sparse,
and the passkey's distance from the end of the prompt is counted in tokens."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from hf_longattn import available_methods

_spec = importlib.util.spec_from_file_location("quickstart", Path(__file__).parents[1] / "examples" / "quickstart.py")
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)


def test_every_method_is_sparse_at_the_default_length():
    length = quickstart.build_parser().get_default("length")
    config = SimpleNamespace(max_position_embeddings=8192)  # SmolLM2's trained context
    for method in available_methods():
        text = quickstart.keys_read(method, quickstart.OPTIONS.get(method, {}), length, config)
        assert text.startswith("all" if method == "dense" else tuple(f"{n} of {length}:" for n in range(1, length))), \
            (method, text)


def test_passkey_distance():
    tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    assert quickstart.passkey_distance(tokenizer, [1, 2, 3, 12345, 4, 5], "12345") == 2  # two tokens after it
