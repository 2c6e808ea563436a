"""Patch a model in one line and generate: a passkey hidden in a long haystack, found with sparse attention.

    python examples/quickstart.py                       # the bundled SmolLM2-135M-Instruct, method hip
    python examples/quickstart.py --method dense        # the exact reference
    python examples/quickstart.py --model meta-llama/Llama-3.1-8B-Instruct --length 32000 --dtype bfloat16
"""

import argparse
import random
import time

import torch

from hf_longattn import available_methods, patch_model
from hf_longattn.bundled import load_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), a hub name or a local path")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--method", default="hip", choices=available_methods())
    parser.add_argument("--length", type=int, default=4000, help="haystack length in tokens")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, args.gguf_file, dtype=args.dtype)
    model.to(args.device)
    patch_model(model, method=args.method)  # the one line

    key = random.Random(0).randint(10000, 99999)
    repeats = args.length // len(tokenizer(FILLER).input_ids)
    parts = [FILLER] * repeats
    parts.insert(repeats // 2, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    message = "Find the pass key hidden in this text.\n" + "".join(parts) + "\nWhat is the pass key?"
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt").to(args.device)

    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"{args.method} on {inputs.input_ids.shape[1]} tokens, {time.perf_counter() - start:.1f} s: {answer!r}")
    print("found the pass key" if str(key) in answer else f"missed the pass key {key}")


if __name__ == "__main__":
    main()
