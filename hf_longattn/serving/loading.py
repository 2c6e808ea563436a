"""Load a model for serving with accelerate's device_map, then patch it.

`device_map="auto"` fills the GPUs in order, then CPU memory, then disk, within `max_memory` (e.g. `{0: "70GiB",
1: "70GiB", "cpu": "100GiB"}`). The patch is applied after dispatch: it only attaches a small runner to each attention
module and switches the attention implementation, so it does not care where a layer's weights live, and every tensor a
method creates follows the query it is given, which accelerate's hooks have already moved to the layer's device.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import torch

from ..bundled import load_model
from ..models import decoder_attention_modules
from ..patch import is_patched, patch_model


def parse_max_memory(text: str | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=100GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '100GiB'} (accelerate's max_memory)."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int

    memory = {}
    for item in text.split(","):
        device, _, size = item.partition("=")
        device, size = device.strip(), size.strip()
        if not device or not size:
            raise ValueError(f"--max-memory item {item!r} is not DEVICE=SIZE; write e.g. 0=70GiB,cpu=100GiB")
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ValueError(f"--max-memory {item!r}: {size!r} is not a size such as 70GiB or 500MB") from None
        if not (device.isdigit() or device in ("cpu", "mps")):
            raise ValueError(f"--max-memory {item!r}: the device must be a GPU index (0, 1, ...), cpu or mps")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def load_for_serving(path: str, gguf_file: str | None = None, method: str | None = "hip", options: dict | None = None,
                     dtype: str = "auto", device_map: str | dict = "auto", max_memory: dict | None = None,
                     offload_folder: str | None = None):
    """(model, tokenizer): loaded with `device_map` (and `max_memory`; what does not fit goes to `offload_folder`,
    a temporary folder by default), then patched with `method` unless it is None or 'none'."""
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    extra = {}
    if max_memory:
        if offload_folder is None:
            offload_folder = tempfile.mkdtemp(prefix="hf-longattn-offload-")
            atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
        extra = {"max_memory": max_memory, "offload_folder": offload_folder}
    model, tokenizer = load_model(path, gguf_file=gguf_file, dtype=getattr(torch, dtype), device_map=device_map,
                                  **extra)
    if method not in (None, "none"):
        patch_model(model, method, **(options or {}))
    return model, tokenizer


def describe(model) -> dict:
    """What /v1/models and /health show: the method with all its options, and where the layers are."""
    if is_patched(model):
        runner = decoder_attention_modules(model)[0].hf_longattn_runner
        method = {"method": runner.method.name, "method_options": runner.config.options()}
    else:
        method = {"method": "none", "method_options": {}}
    placement = getattr(model, "hf_device_map", None)
    devices = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placement.values()}) if placement \
        else [str(model.device)]
    names = {d: torch.cuda.get_device_name(torch.device(d)) for d in devices if d.startswith("cuda")}
    dtype = str(model.dtype).removeprefix("torch.")
    return {**method, "dtype": dtype, "devices": devices, **({"gpus": names} if names else {})}
