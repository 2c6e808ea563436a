"""LongBench through lm-eval: local data files for lm-eval's own `longbench_*` tasks, and an offline proxy.

Local data: `write_local_tasks(DATA_DIR, OUT)` (CLI: `hf-longattn longbench-local DATA_DIR --out OUT`) writes one task
YAML per LongBench JSONL file it finds (hotpotqa.jsonl, qasper.jsonl, ...). Each includes lm-eval's own task of that
name (prompt, generation settings, LongBench's metric) and only points `dataset_path` at the local file. Files in the
original THUDM release name the question `input`; lm-eval's tasks read `question`, so `input` is copied over.

Proxy: no LongBench data can be installed here, so `hotpotqa_distractor_proxy_longbench_format` builds multi-document
QA in LongBench's hotpotqa format (its prompt, read from lm-eval's installed task file; its qa_f1_score metric, from
lm-eval's copy of LongBench's metric code) out of HotpotQA dev questions with distractor passages up to a chosen token
length. It is a proxy for relative dense-vs-method comparisons, NOT LongBench: never report it under that name.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import cache
from pathlib import Path

PROXY_TASK = "hotpotqa_distractor_proxy_longbench_format"


def lm_eval_longbench_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise FileNotFoundError("lm-eval is not installed: pip install 'lm-eval>=0.4.8,<0.5'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks" / "longbench"


@cache
def longbench_metrics():
    """lm-eval's LongBench metric module. Its Chinese and code metrics need jieba / fuzzywuzzy / rouge at import time;
    where those are missing, stand-ins that raise on use let the English QA metrics load (they need none of them)."""
    missing = [m for m in ("jieba", "fuzzywuzzy", "rouge") if importlib.util.find_spec(m) is None]
    saved = {m: sys.modules.get(m) for m in missing + ["fuzzywuzzy.fuzz"]}
    for name in missing:
        sys.modules[name] = _unavailable(name)
    if "fuzzywuzzy" in missing:
        sys.modules["fuzzywuzzy"].fuzz = sys.modules["fuzzywuzzy.fuzz"] = _unavailable("fuzzywuzzy")
    if "rouge" in missing:
        sys.modules["rouge"].Rouge = _unavailable("rouge")
    try:
        spec = importlib.util.spec_from_file_location("hf_longattn_longbench_metrics", lm_eval_longbench_dir() / "metrics.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


class _unavailable(types.ModuleType):
    def __getattr__(self, attribute):
        if attribute.startswith("__"):  # the import system probes __path__ etc.: answer as a plain module would
            raise AttributeError(attribute)
        raise ImportError(f"this LongBench metric needs the package '{self.__name__}': pip install 'lm-eval[longbench]'")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"this LongBench metric needs the package '{self.__name__}': pip install 'lm-eval[longbench]'")


@cache
def longbench_prompt(task: str = "hotpotqa") -> str:
    """The doc_to_text prompt of lm-eval's `longbench_<task>` (read from its YAML, `!function` tags left unresolved)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    return yaml.load((lm_eval_longbench_dir() / f"{task}.yaml").read_text(), Loader=Loader)["doc_to_text"]


# --- the proxy -----------------------------------------------------------------------------------------------------

def proxy_dataset(**kwargs):
    """lm-eval custom_dataset: HotpotQA dev questions with distractor passages up to each of `max_seq_lengths`."""
    from .ruler import _dataset, _qa_rows, _settings, hotpotqa

    tokenizer, lengths, num_samples, seed = _settings(kwargs)
    template = longbench_prompt("hotpotqa").replace("{{context}}", "{context}").replace("{{question}}", "{question}")
    rows = []
    for length in lengths:
        rows += _qa_rows(tokenizer, hotpotqa(), length, num_samples, seed, template, "Passage {i}:\n", gen_prefix="")
    return _dataset(rows)


def proxy_score(doc: dict, results: list[str]) -> dict:
    """LongBench's qa_f1_score (best over the reference answers), overall and per reported length."""
    from .ruler import per_length

    metrics = longbench_metrics()
    prediction = results[0].strip()
    f1 = max(metrics.qa_f1_score(prediction, answer) for answer in doc["answers"])
    return per_length(doc, f1, overall="qa_f1_score")


# --- local LongBench files -----------------------------------------------------------------------------------------

def input_as_question(dataset):
    """lm-eval process_docs: the THUDM release calls the question `input`; lm-eval's task prompts read `question`."""
    if "question" in dataset.column_names or "input" not in dataset.column_names:
        return dataset
    return dataset.map(lambda doc: {"question": doc["input"]})


_LOCAL_TEMPLATE = """\
# Written by `hf-longattn longbench-local`: lm-eval's own longbench_{name} task on a local file.
include: {include}
task: longbench_local_{name}
tag:
  - longbench_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
process_docs: !function {helper}.input_as_question
"""


def write_local_tasks(data_dir, out_dir) -> list[str]:
    """Task YAMLs for every LongBench JSONL file in `data_dir` that lm-eval has a longbench task for."""
    data_dir, out_dir = Path(data_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a folder of LongBench .jsonl files")
    known = lm_eval_longbench_dir()
    files = sorted(p for p in list(data_dir.glob("*.jsonl")) + list(data_dir.glob("*.json")) if (known / f"{p.stem}.yaml").exists())
    if not files:
        names = ", ".join(sorted(p.stem for p in known.glob("*.yaml") if not p.stem.startswith("_")))
        raise FileNotFoundError(f"no LongBench files in {data_dir}: expected files named like lm-eval's longbench "
                                f"tasks ({names}), e.g. hotpotqa.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "longbench_local_docs.py").write_text(
        "# Written by `hf-longattn longbench-local`.\nfrom hf_longattn.eval.longbench import input_as_question  # noqa: F401\n")
    written = []
    for path in files:
        (out_dir / f"longbench_local_{path.stem}.yaml").write_text(_LOCAL_TEMPLATE.format(
            name=path.stem, include=known / f"{path.stem}.yaml", data=path, helper="longbench_local_docs"))
        written.append(f"longbench_local_{path.stem}")
    return written
