"""lm-eval's `hf` model with a sparse attention method: registered as `hf-longattn`.

    lm-eval ... --model hf-longattn --model_args pretrained=PATH,method=hip,budget=2048
    HFLM(pretrained=patch_model(model, "hip"), tokenizer=tokenizer)   # from Python, a patched model works as is
    accelerate launch --multi_gpu --num_processes 8 -m hf_longattn.eval lm-eval run --model hf-longattn ...  # one copy
                                                              # of the model per process, the requests split by rank

`method=` picks the method (none: leave the model's attention alone); every argument that is neither HFLM's nor a
`from_pretrained` loading option is an option of the method, checked by the method's config before the model loads.
`pretrained=smollm2` is the bundled SmolLM2-135M-Instruct. lm-eval 0.4 has no plugin discovery, so `lm_eval_main`
(`hf-longattn lm-eval ...`) imports this module, adds our task folder and hands over to lm-eval's own CLI.
"""

from __future__ import annotations

import inspect
import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import patch_model
from ..bundled import BUNDLED_NAME, bundled_model_path
from . import TASKS_DIR
from .options import check_method_options, parse_value

# `from_pretrained` options that HFLM forwards through **kwargs; anything else unknown to HFLM is a method option.
LOADING_OPTIONS = frozenset({
    "device_map", "attn_implementation", "low_cpu_mem_usage", "max_memory", "load_in_8bit", "load_in_4bit",
    "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "rope_scaling", "use_safetensors",
})
_HFLM_OPTIONS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def split_model_args(kwargs: dict) -> tuple[dict, dict]:
    """(HFLM and loading arguments, method options) from `--model_args` beyond pretrained/method."""
    hflm = {k: v for k, v in kwargs.items() if k in _HFLM_OPTIONS or k in LOADING_OPTIONS}
    method = {k: parse_value(v) for k, v in kwargs.items() if k not in hflm}
    return hflm, method


@register_model("hf-longattn", "hf_longattn")
class LongAttnLM(HFLM):
    def __init__(self, pretrained=BUNDLED_NAME, method: str | None = None, gguf_file: str | None = None, **kwargs):
        hflm_args, options = split_model_args(kwargs)
        if method in (None, "none"):
            if options:
                raise ValueError(f"--model_args {', '.join(options)}: not lm-eval/HFLM arguments, and no method= was "
                                 "given whose options they could be")
        else:
            check_method_options(method, options)  # unknown method or option: fail before loading anything
        if pretrained == BUNDLED_NAME:
            folder, gguf_file = bundled_model_path()
            pretrained = str(folder)
        super().__init__(pretrained=pretrained, gguf_file=gguf_file, **hflm_args)
        self._split_requests_across_processes()
        self.method = method
        self.method_options = options
        if method not in (None, "none"):
            patch_model(self.model, method, **options)  # in every process: each loaded its own copy

    def _split_requests_across_processes(self) -> None:
        """Under `accelerate launch` HFLM takes its rank from accelerate only when it counts more than one GPU; on CPUs
        (accelerate's MULTI_CPU, gloo) it leaves every process at rank 0 of 1, so each would run every request and
        write the results. Take rank and world size from accelerate whenever it launched several processes."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes


def lm_eval_main(argv: list[str]) -> int:
    """lm-eval's CLI (`lm-eval run ...`, `ls`, `validate`) with `hf-longattn` registered and our tasks included."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself (to insert the default `run`)
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    cli.execute(args)
    return 0
