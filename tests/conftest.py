import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter. The switch is read when triton.language is first
# imported, and other tests (torch.compile, lm-eval) import it early, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32), loaded once per test session: (model, tokenizer)."""
    from hf_longattn.bundled import load_model

    return load_model("smollm2", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2, tmp_path_factory):
    """The same SmolLM2 saved as a plain safetensors checkpoint, for tests that load it again (subprocesses,
    device_map): it loads in under a second, where the GGUF file takes some 15 s of CPU to dequantize."""
    import copy

    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2")
    plain = copy.deepcopy(model)
    plain.hf_quantizer = None  # GGUF weights are dequantized at load time: nothing quantized is left to save
    del plain.config.quantization_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
