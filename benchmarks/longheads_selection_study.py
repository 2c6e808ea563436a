"""Does LongHeads' chunk selection reach the needle? Passkey prompts on SmolLM2-135M-Instruct (float32, on the CPU:
the decode step's selection is recorded from its PyTorch reference, which the GPU's one-launch kernel replaces).

For each prompt, at the first answer token (the first decode step), every layer's chunk selection is recorded per
key/value head, beside dense attention's mass per chunk for the same query (the exact softmax over all keys, the
group's best query head). Reported per prompt: the needle's chunk, how many (layer, kv head) pairs select it, how
often dense attention ranks it first among the chunks that compete for selection, and whether the answer is right.
A selection that reaches the needle while the answer is wrong points at the model (what it does with a cap-long
span), one that misses it at the selection.

    PYTHONPATH=$PWD python benchmarks/longheads_selection_study.py --lengths 8192 --depths 10 50 90 \\
        --out benchmarks/results/longheads_selection_study.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import hf_longattn.kernels.longheads_decode as decode_module
import hf_longattn.methods.longheads as longheads_module
from hf_longattn import patched
from hf_longattn.bundled import load_model
from hf_longattn.eval.niah import make_samples


def needle_position(sample, tokenizer) -> int:
    answer = tokenizer(sample.needle.answers[0], add_special_tokens=False).input_ids
    ids = sample.input_ids
    return next(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer)


def first_step_record(model, ids: torch.Tensor, chunk_size: int, max_new_tokens: int) -> tuple[dict, torch.Tensor]:
    """({layer: (selected chunk ids per kv head, dense mass per chunk [Hq, C])} at the first decode step, output)."""
    record: dict[int, dict] = {}
    select, attend = decode_module.select_layout_reference, longheads_module.LongHeads.attend
    current = {}

    def recording_select(query, reps, row_start, inv_freq, **options):
        layout = select(query, reps, row_start, inv_freq, **options)
        entry = record.get(current["layer"])
        if query.shape[2] == 1 and entry is not None and "selected" not in entry:
            entry["selected"] = (layout["src_start"][0, :, 0] // chunk_size).tolist()
        return layout

    def recording_attend(self, query, key, value, call):
        current["layer"] = call.layer_idx
        if query.shape[2] == 1 and call.layer_idx not in record:
            q, k = query[0, :, 0].float(), key[0].float()
            group = q.shape[0] // k.shape[0]
            p = (torch.einsum("hd,hld->hl", q, k.repeat_interleave(group, 0)) * call.scale).softmax(-1)
            chunks = -(-p.shape[-1] // chunk_size)
            mass = torch.nn.functional.pad(p, (0, chunks * chunk_size - p.shape[-1])).view(p.shape[0], chunks, -1)
            record[call.layer_idx] = {"mass": mass.sum(-1)}
        return attend(self, query, key, value, call)

    decode_module.select_layout_reference, longheads_module.LongHeads.attend = recording_select, recording_attend
    try:
        with torch.no_grad(), patched(model, "longheads", chunk_size=chunk_size):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)
    finally:
        decode_module.select_layout_reference, longheads_module.LongHeads.attend = select, attend
    return record, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[10, 50, 90])
    parser.add_argument("--haystack", default="synthetic")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2", dtype="float32")
    rows = []
    for sample in make_samples(tokenizer, args.lengths, args.depths, 1, haystack=args.haystack):
        started = time.perf_counter()
        needle = needle_position(sample, tokenizer) // args.chunk_size
        ids = torch.tensor([sample.input_ids])
        record, out = first_step_record(model, ids, args.chunk_size, sample.needle.max_new_tokens)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        selected = first = pairs = 0
        for entry in record.values():
            group = entry["mass"].shape[0] // len(entry["selected"])
            for head, chunks in enumerate(entry["selected"]):
                pairs += 1
                selected += needle in chunks
                mass = entry["mass"][head * group:(head + 1) * group].max(0).values
                # Chunks that compete for selection: not the first, not the last three (local at the first step).
                first += int(mass[1:-3].argmax()) + 1 == needle
        rows.append(f"| {sample.length} | {sample.depth:g}% | {needle} of {-(-sample.length // args.chunk_size)} | "
                    f"{selected}/{pairs} | {first}/{pairs} | {'yes' if sample.needle.score(answer) else 'no'} "
                    f"(`{answer[:40]}`) | {time.perf_counter() - started:.0f} |")
        print(rows[-1], flush=True)
    text = [
        "# LongHeads: does the chunk selection reach the needle?", "",
        f"Command: `python benchmarks/longheads_selection_study.py {' '.join(sys.argv[1:])}`", "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; SmolLM2-135M-Instruct float32 (trained 8K), "
        f"LongHeads defaults (cap 4096, chunks of {args.chunk_size}), haystack {args.haystack}, one prompt per cell. "
        "At the first answer token, per layer and key/value head: does the selection hold the needle's chunk, and "
        "does dense attention (the group's best head) put more mass on it than on any other chunk that competes? "
        "(Past the trained 8K, dense attention's positions are extrapolated: its mass there is no oracle.)", "",
        "| length | depth | needle chunk | pairs selecting it | dense ranks it first | answer right | seconds |",
        "|---|---|---|---|---|---|---|", *rows,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
