"""Patch a model in one line and generate: a passkey hidden in a long haystack, answered with sparse attention,
beside the exact dense answer on the same prompt.

    python examples/quickstart.py                       # the bundled SmolLM2-135M-Instruct, method hip
    python examples/quickstart.py --method dense        # the exact reference
    python examples/quickstart.py --model meta-llama/Llama-3.1-8B-Instruct --length 32000 --dtype bfloat16
"""

import argparse
import time

import torch

from hf_longattn import available_methods, patch_model, unpatch_model
from hf_longattn.bundled import load_model
from hf_longattn.eval.niah import make_samples


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), a hub name or a local path")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--method", default="hip", choices=available_methods())
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=50.0, help="where the passkey sits, percent of the haystack")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, args.gguf_file, dtype=args.dtype)
    model.to(args.device)
    (sample,) = make_samples(tokenizer, [args.length], [args.depth], samples_per_cell=1, haystack="essays")
    inputs = torch.tensor([sample.input_ids], device=args.device)

    for method in dict.fromkeys(["dense", args.method]):
        patch_model(model, method=method)  # the one line
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                    max_new_tokens=sample.needle.max_new_tokens)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(output[0, inputs.shape[1]:], skip_special_tokens=True)
        verdict = "found" if sample.needle.score(answer) == 1.0 else "missed"
        print(f"{method:>10} on {inputs.shape[1]} tokens, {seconds:.1f} s: {answer!r} ({verdict} the pass key "
              f"{sample.needle.answers[0]})")
    unpatch_model(model)


if __name__ == "__main__":
    main()
