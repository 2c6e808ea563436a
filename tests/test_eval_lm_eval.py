"""lm-eval through our model, offline: the registered `hf-longattn` CLI path and HFLM on a patched model object."""

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

SMALL = {"tokenizer": "smollm2", "max_seq_lengths": [1024], "num_samples": 1}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_ruler_task_data_is_offline_and_sized_in_model_tokens(smollm2):
    from hf_longattn.eval import ruler

    _, tokenizer = smollm2
    for make in (ruler.niah_single_essay, ruler.niah_multikey_essay, ruler.qa_squad):
        rows = make(pretrained="smollm2", max_seq_lengths=[1024, 2048], num_samples=1)["test"]
        assert len(rows) == 2
        for row in rows:
            tokens = len(tokenizer(row["input"]).input_ids)
            assert tokens == row["length"] and tokens + 32 <= row["max_length"] and tokens > row["max_length"] // 2
            if "niah" in make.__name__:
                assert row["outputs"][0] in row["input"]
    assert ruler.score_all({"outputs": ["123", "456"], "max_length": 2048}, [" 123 and 999"])["2048"] == 0.5


def test_cli_runs_ruler_niah_with_the_registered_model(tmp_path):
    """`hf-longattn lm-eval run --model hf-longattn --model_args pretrained=smollm2,method=...` end to end."""
    import json

    from hf_longattn.eval.lm_eval_model import lm_eval_main

    lm_eval_main([
        "run", "--model", "hf-longattn", "--model_args", "pretrained=smollm2,method=streaming,window=512,sink=4,dtype=float32",
        "--tasks", "longattn_ruler_niah_single_repeat", "--metadata", json.dumps(SMALL), "--limit", "1",
        "--gen_kwargs", "max_gen_toks=10", "--device", "cpu", "--batch_size", "1", "--apply_chat_template",
        "--output_path", str(tmp_path),
    ])
    [result_file] = list(tmp_path.rglob("results_*.json"))
    results = json.loads(result_file.read_text())
    metrics = results["results"]["longattn_ruler_niah_single_repeat"]
    assert "score,none" in metrics and 0 <= metrics["score,none"] <= 1
    assert metrics["1024,none"] == metrics["score,none"] and metrics["4096,none"] == -1
    assert results["config"]["model_args"]["method"] == "streaming"


def test_hflm_on_a_patched_model_object_runs_the_longbench_format_proxy(smollm2):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hf_longattn import is_patched, patch_model, unpatch_model
    from hf_longattn.eval import TASKS_DIR
    from hf_longattn.eval.lm_eval_model import LongAttnLM

    model, tokenizer = smollm2
    try:
        lm = LongAttnLM(pretrained=patch_model(model, "dense"), tokenizer=tokenizer, method="streaming", window=512)
        assert is_patched(model) and lm.method == "streaming"
        assert isinstance(lm, HFLM)
        manager = TaskManager(include_path=str(TASKS_DIR), metadata=SMALL)
        out = simple_evaluate(model=lm, tasks=["hotpotqa_distractor_proxy_longbench_format"], limit=1,
                              task_manager=manager, apply_chat_template=True)
    finally:
        unpatch_model(model)
    metrics = out["results"]["hotpotqa_distractor_proxy_longbench_format"]
    assert 0 <= metrics["qa_f1_score,none"] <= 1
    sample = out["samples"]["hotpotqa_distractor_proxy_longbench_format"][0]
    assert "Passage 1:" in sample["arguments"][0][0] and "Answer:" in sample["arguments"][0][0]


def test_plain_hflm_accepts_a_patched_model(smollm2):
    """HFLM(pretrained=<patched model>) scores through the patch: a window covering the text gives dense's numbers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from hf_longattn import is_patched, patched

    model, tokenizer = smollm2
    request = Instance(request_type="loglikelihood", doc={}, arguments=("The grass is green. The sky is", " blue"), idx=0)
    [(unpatched, _)] = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood([request])
    with patched(model, "streaming", window=256):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        assert lm.model is model and is_patched(lm.model)
        [(logprob, _)] = lm.loglikelihood([request])
    assert logprob == pytest.approx(unpatched, abs=1e-4)
