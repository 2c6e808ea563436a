"""Needle in a haystack: hide a needle at a depth of a context of exactly N tokens, ask for it, score the answer.

Prompts are assembled in the model's own tokens (frame + haystack slice + needle tokens), so a cell's length is exact
and every prompt of one length batches without padding. The needle goes in at the sentence boundary just before its
depth. Every method sees the very same prompts (the samples are drawn once, seeded per cell), so a method's score
differs from dense only through its attention.

    from hf_longattn.eval.niah import run_niah, save_report
    results = run_niah(model, tokenizer, {"dense": {}, "streaming": {"window": 1024}}, lengths=[2048, 4096])
    save_report(results, "out/")
"""

from __future__ import annotations

import bisect
import random
import time
from dataclasses import dataclass

import torch

from .haystack import Needle, load_haystack, make_needle

INTRO = ("There is a piece of important information hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about it.")
_HOLE = "\x00HAYSTACK\x00"


def depth_grid(depths: int | list[float]) -> list[float]:
    """11 -> [0, 10, ..., 100] (percent of the haystack before the needle); a list is taken as given."""
    if isinstance(depths, int):
        if depths < 1:
            raise ValueError("--depths must be at least 1")
        return [0.0] if depths == 1 else [round(100 * i / (depths - 1), 2) for i in range(depths)]
    values = [float(d) for d in depths]
    if not values or any(not 0 <= d <= 100 for d in values):
        raise ValueError(f"depths {depths} must be percentages between 0 and 100")
    return values


@dataclass
class Sample:
    length: int
    depth: float
    index: int
    input_ids: list[int]
    needle: Needle
    needle_depths: list[float]  # where each needle sentence actually landed, percent of the haystack


class TokenHaystack:
    """A haystack as the model's tokens, with the places where a sentence ends (where needles may go)."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(self.ids) < 64:
            raise ValueError("the haystack is shorter than 64 tokens; give a longer text")
        ends_sentence = {t: tokenizer.decode([t]).rstrip().endswith((".", "!", "?")) for t in set(self.ids)}
        self.sentence_ends = [i for i, t in enumerate(self.ids) if ends_sentence[t]] or [0]
        self._end_set = set(self.sentence_ends)

    def hide(self, pieces: list[list[int]], budget: int, depths: list[float], rng: random.Random):
        """`budget` haystack tokens from a random sentence start with the needle `pieces` inserted at `depths` (%).

        Returns (ids, depths where the pieces landed). Each piece goes at the sentence end just before its depth.
        """
        start = rng.choice(self.sentence_ends) + 1
        hay = self._slice(start, budget)
        boundaries = [0] + [i + 1 for i in range(budget) if (start + i) % len(self.ids) in self._end_set]
        order = sorted(range(len(pieces)), key=lambda i: depths[i])
        cuts = {i: boundaries[max(0, bisect.bisect_right(boundaries, round(budget * depths[i] / 100)) - 1)] for i in order}
        ids, previous = [], 0
        for i in order:
            ids += hay[previous:cuts[i]] + pieces[i]
            previous = cuts[i]
        ids += hay[previous:]
        return ids, [round(100 * cuts[i] / budget, 2) for i in range(len(pieces))]

    def _slice(self, start: int, count: int) -> list[int]:
        """`count` haystack tokens from `start`, wrapping around to the beginning when the haystack runs out."""
        out, position = [], start % len(self.ids)
        while len(out) < count:
            out += self.ids[position: position + count - len(out)]
            position = 0
        return out


class PromptBuilder:
    """Builds needle prompts of an exact token length for one tokenizer and haystack."""

    def __init__(self, tokenizer, haystack_text: str, chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.chat_template = _uses_chat_template(tokenizer, chat_template)
        if self.chat_template and not tokenizer.chat_template:
            raise ValueError("a chat template was requested but this tokenizer has none")
        self.haystack = TokenHaystack(tokenizer, haystack_text)

    def frame(self, needle: Needle) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack: instructions, then the question and the start of the answer."""
        user = f"{INTRO}\n\n{_HOLE}\n\n{needle.question}"
        tok = self.tokenizer
        if self.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
            before, after = (text + needle.answer_prefix).split(_HOLE)
            return tok(before, add_special_tokens=False).input_ids, tok(after, add_special_tokens=False).input_ids
        before, after = (user + "\nAnswer: " + needle.answer_prefix).split(_HOLE)
        return tok(before).input_ids, tok(after, add_special_tokens=False).input_ids

    def build(self, needle: Needle, length: int, depth: float, index: int, rng: random.Random) -> Sample:
        prefix, suffix = self.frame(needle)
        pieces = [self.tokenizer(" " + s, add_special_tokens=False).input_ids for s in needle.sentences]
        budget = length - len(prefix) - len(suffix) - sum(map(len, pieces))
        if budget < 16:
            raise ValueError(f"length {length} leaves no room for a haystack: the question, instructions and needle "
                             f"take {length - budget} tokens; use a longer length")
        # The first sentence goes at the cell's depth, the others spread evenly over the rest of the haystack.
        depths = [depth + (100 - depth) * i / len(pieces) for i in range(len(pieces))]
        context, landed = self.haystack.hide(pieces, budget, depths, rng)
        ids = prefix + context + suffix
        assert len(ids) == length, (len(ids), length)
        return Sample(length, depth, index, ids, needle, landed)


def make_samples(tokenizer, lengths: list[int], depths: list[float], samples_per_cell: int, needle: str = "passkey",
                 haystack: str = "essays", seed: int = 0, chat_template: bool | None = None) -> list[Sample]:
    """Every prompt of the grid, drawn once: cell (length, depth, index) always gets the same needle and slice."""
    builder = PromptBuilder(tokenizer, load_haystack(haystack), chat_template)
    samples = []
    for length in lengths:
        for depth in depths:
            for index in range(samples_per_cell):
                rng = random.Random(f"{seed}/{length}/{depth}/{index}")
                samples.append(builder.build(make_needle(needle, rng), length, depth, index, rng))
    return samples


@torch.no_grad()
def generate(model, tokenizer, input_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers for prompts of one length (no padding needed)."""
    device = next(model.parameters()).device
    batch = torch.tensor(input_ids, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=pad,
    )
    return tokenizer.batch_decode(out[:, batch.shape[1]:], skip_special_tokens=True)


def run_method(model, tokenizer, samples: list[Sample], method: str, options: dict, batch_size: int = 1,
               progress=None) -> dict:
    """Score every sample with `model` patched to `method`; the model is left unpatched afterwards."""
    from .. import patch_model, unpatch_model

    patch_model(model, method, **options)
    records = []
    started = time.perf_counter()
    try:
        groups: dict[int, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(sample.length, []).append(sample)
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i: i + batch_size]
                max_new = max(s.needle.max_new_tokens for s in chunk)
                outputs = generate(model, tokenizer, [s.input_ids for s in chunk], max_new)
                for sample, output in zip(chunk, outputs):
                    records.append({
                        "length": sample.length, "depth": sample.depth, "index": sample.index,
                        "needle_depths": sample.needle_depths, "answers": sample.needle.answers,
                        "output": output.strip(), "score": sample.needle.score(output),
                    })
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        unpatch_model(model)
    return {"method": method, "options": _jsonable(options), "seconds": round(time.perf_counter() - started, 2),
            "samples": records}


def run_niah(model, tokenizer, methods: dict[str, dict], lengths: list[int], depths: int | list[float] = 11,
             samples_per_cell: int = 1, needle: str = "passkey", haystack: str = "essays", seed: int = 0,
             batch_size: int = 1, chat_template: bool | None = None, model_name: str = "", progress: bool = True,
             max_position_embeddings: int | None = None, on_result=None) -> list[dict]:
    """Run the grid for every method (name -> options) on the same samples; one result dict per method.

    `on_result(results_so_far)` is called after each method, e.g. to write files before a later method runs.
    """
    from tqdm.auto import tqdm

    depths = depth_grid(depths)
    samples = make_samples(tokenizer, lengths, depths, samples_per_cell, needle, haystack, seed, chat_template)
    settings = {
        "model": model_name, "lengths": lengths, "depths": depths, "samples_per_cell": samples_per_cell,
        "needle": needle, "haystack": haystack, "seed": seed, "chat_template": _uses_chat_template(tokenizer, chat_template),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "machine": _machine(next(model.parameters()).device),
        "max_position_embeddings": max_position_embeddings,
        "extrapolated_lengths": [n for n in lengths if max_position_embeddings and n > max_position_embeddings],
    }
    results = []
    with tqdm(total=len(samples) * len(methods), desc="NIAH", unit="prompt", disable=not progress) as bar:
        for method, options in methods.items():
            bar.set_postfix_str(method)
            result = run_method(model, tokenizer, samples, method, options, batch_size, bar)
            results.append({**settings, **result, **summarize(result["samples"], lengths, depths)})
            if on_result is not None:
                on_result(results)
    return results


def _machine(device: torch.device) -> dict:
    import platform

    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "name": name, "torch": torch.__version__, "transformers": transformers.__version__}


def _uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    return bool(tokenizer.chat_template) if chat_template is None else chat_template


def summarize(records: list[dict], lengths: list[int], depths: list[float]) -> dict:
    """Mean score per cell (matrix rows = depths, columns = lengths), per length, and overall."""
    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    cell = {(r["length"], r["depth"]): [] for r in records}
    for r in records:
        cell[(r["length"], r["depth"])].append(r["score"])
    return {
        "scores": [[mean(cell.get((length, depth), [])) for length in lengths] for depth in depths],
        "per_length": {str(length): mean([r["score"] for r in records if r["length"] == length]) for length in lengths},
        "overall": mean([r["score"] for r in records]),
    }


# What runs must share to be merged into one grid.
_SAME_GRID = ("model", "needle", "haystack", "depths", "chat_template", "max_position_embeddings")


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """One result per method from runs of one grid at different lengths (one process a length, as a GPU that cannot
    hold every length's batch at once needs): the samples pooled and summarised again. A method that a run lacks has
    no cells at that run's lengths (blank in the heatmap, "-" in the table)."""
    first = runs[0][0]
    for result in (r for run in runs for r in run):
        for key in _SAME_GRID:
            if result.get(key) != first.get(key):
                raise ValueError(f"runs of different grids cannot be merged: {key} is {first.get(key)!r} in one and "
                                 f"{result.get(key)!r} in another")
    lengths = sorted({n for run in runs for n in run[0]["lengths"]})
    by_method: dict[str, list[dict]] = {}
    for result in (r for run in runs for r in run):
        by_method.setdefault(result["method"], []).append(result)
    merged = []
    for method, parts in by_method.items():
        seen = [n for part in parts for n in part["lengths"]]
        if len(seen) != len(set(seen)):
            raise ValueError(f"'{method}' ran at the same length in two runs ({sorted(seen)}): merge runs of "
                             "different lengths")
        if any(part["options"] != parts[0]["options"] for part in parts):
            raise ValueError(f"'{method}' ran with different options in the runs: {[p['options'] for p in parts]}")
        samples = [s for part in parts for s in part["samples"]]
        merged.append({
            **{k: v for k, v in parts[0].items() if k != "command"}, "lengths": lengths,
            "samples_per_cell": max(part["samples_per_cell"] for part in parts),
            "extrapolated_lengths": [n for n in lengths if first.get("max_position_embeddings")
                                     and n > first["max_position_embeddings"]],
            "seconds": round(sum(part["seconds"] for part in parts), 2), "samples": samples,
            "commands": [part.get("command") for part in parts], **summarize(samples, lengths, first["depths"]),
        })
    return merged


def load_run(folder) -> list[dict]:
    """The results a NIAH run wrote to `folder` (its niah_<method>.json files), dense first."""
    import json
    from pathlib import Path

    files = sorted(Path(folder).glob("niah_*.json"))
    if not files:
        raise FileNotFoundError(f"no niah_<method>.json in {folder}: not the --out folder of an `hf-longattn niah` run")
    results = [json.loads(f.read_text()) for f in files]
    return sorted(results, key=lambda r: r["method"] != "dense")


def save_report(results: list[dict], out_dir, command: str | None = None) -> dict:
    """Write niah_<method>.json + .png per method, niah_side_by_side.png and niah_summary.md; return the paths."""
    import json
    from pathlib import Path

    from .plots import heatmap, markdown_table, side_by_side

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for result in results:
        name = result["method"]
        record = {**result, "command": command} if command else result
        (out / f"niah_{name}.json").write_text(json.dumps(record, indent=1))
        heatmap(result, out / f"niah_{name}.png")
        paths[name] = out / f"niah_{name}.json"
    side_by_side(results, out / "niah_side_by_side.png")
    table = markdown_table(results)
    header = f"# NIAH: {results[0]['model']}, needle {results[0]['needle']}, haystack {results[0]['haystack']}\n\n"
    if command:
        header += f"Command: `{command}`\n\n"
    (out / "niah_summary.md").write_text(header + table + "\n")
    paths["summary"] = out / "niah_summary.md"
    return paths


def _jsonable(options: dict) -> dict:
    return {k: list(v) if isinstance(v, (tuple, set, frozenset)) else v for k, v in options.items()}
