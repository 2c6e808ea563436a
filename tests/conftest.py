import os

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32), loaded once per test session: (model, tokenizer)."""
    from hf_longattn.bundled import load_model

    return load_model("smollm2", dtype=torch.float32)
