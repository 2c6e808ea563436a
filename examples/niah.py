"""Needle in a haystack from Python: dense vs a sparse method on the bundled SmolLM2-135M-Instruct, same prompts.

    python examples/niah.py                      # 1K and 2K, 5 depths, a few minutes on a laptop CPU
    python examples/niah.py --lengths 2k,4k,8k   # longer: better on a GPU

The command-line equivalent is `hf-longattn niah --model smollm2 --methods dense,streaming ...`.
"""

import argparse

import torch

from hf_longattn.bundled import load_model
from hf_longattn.eval.niah import run_niah, save_report
from hf_longattn.eval.options import parse_lengths

parser = argparse.ArgumentParser()
parser.add_argument("--lengths", default="1k,2k")
parser.add_argument("--out", default="runs/niah_example")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load_model("smollm2", dtype=torch.float32)  # float32: this tiny model does better than in bf16
model.to(device)

methods = {
    "dense": {},                                # exact attention through the same patched path
    "streaming": {"sink": 16, "window": 496},   # attention sinks + a local window: misses needles far back
}
results = run_niah(model, tokenizer, methods, lengths=parse_lengths(args.lengths), depths=5, samples_per_cell=2,
                   needle="passkey", haystack="essays", seed=0, model_name="SmolLM2-135M-Instruct",
                   max_position_embeddings=model.config.max_position_embeddings)
paths = save_report(results, args.out)
print(open(paths["summary"]).read())
print(f"heatmaps and JSON in {args.out}/")
