"""Accuracy of the attention methods: needle in a haystack, and RULER / LongBench through lm-eval.

    hf-longattn niah --model smollm2 --methods dense,streaming --lengths 1k,2k,4k --out runs/niah
    hf-longattn lm-eval --model hf-longattn --model_args pretrained=smollm2,method=streaming --tasks ...

Importing this package loads nothing heavy: the NIAH path never imports lm_eval or datasets (the GPU machine has
neither); `lm_eval_model` does, and only when lm-eval is used. The package is `hf_longattn.eval`, never a top-level
`eval` (that would shadow a builtin).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"

__all__ = ["TASKS_DIR"]
