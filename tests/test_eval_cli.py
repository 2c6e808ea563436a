"""`hf-longattn` argument errors: clear, and before any model is loaded; the LongBench local-task writer."""

import json

import pytest

from hf_longattn.eval.cli import UsageError, check_lengths, main


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _load_forbidden(*args, **kwargs):
    raise AssertionError("the model must not be loaded when the arguments are wrong")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    monkeypatch.setattr("hf_longattn.bundled.load_model", _load_forbidden)


def test_missing_model(capsys, tmp_path):
    err = _error(capsys, "niah", "--model", str(tmp_path / "nothing-here"), "--out", str(tmp_path))
    assert "not found" in err and "--model smollm2" in err


def test_unknown_method_lists_the_available_ones(capsys, tmp_path):
    err = _error(capsys, "niah", "--model", "smollm2", "--methods", "dense,nosuch", "--out", str(tmp_path))
    assert "unknown method 'nosuch'" in err and "streaming" in err


def test_unknown_method_option(capsys, tmp_path):
    err = _error(capsys, "niah", "--model", "smollm2", "--methods", "streaming", "--method-args",
                 '{"streaming": {"windw": 3}}', "--out", str(tmp_path))
    assert "no option windw" in err


def test_bad_length(capsys, tmp_path):
    assert "4q" in _error(capsys, "niah", "--model", "smollm2", "--lengths", "1k,4q", "--out", str(tmp_path))


def test_length_beyond_the_trained_context_needs_the_flag(capsys, tmp_path):
    pytest.importorskip("gguf")
    err = _error(capsys, "niah", "--model", "smollm2", "--lengths", "4k,16k", "--out", str(tmp_path))
    assert "16384" in err and "8192" in err and "--allow-extrapolation" in err


def test_extrapolation_flag_allows_and_says_so(capsys):
    with pytest.raises(UsageError):
        check_lengths([4096, 16384], 8192, allow_extrapolation=False)
    check_lengths([4096, 16384], 8192, allow_extrapolation=True)
    assert "beyond the model's trained context" in capsys.readouterr().err
    check_lengths([4096], None, allow_extrapolation=False)  # no known limit: nothing to check


def test_longbench_local_writes_tasks_over_local_files(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    data = tmp_path / "data"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_text(json.dumps({"input": "Who?", "context": "Passage 1:\nA.", "answers": ["A"],
                                                     "length": 3}) + "\n")
    (data / "notes.jsonl").write_text("{}\n")  # not a LongBench task name: ignored
    assert main(["longbench-local", str(data), "--out", str(tmp_path / "tasks")]) == 0
    assert "longbench_local_hotpotqa" in capsys.readouterr().out
    config = load_yaml(tmp_path / "tasks" / "longbench_local_hotpotqa.yaml", resolve_func=False)
    assert config["task"] == "longbench_local_hotpotqa"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(data / "hotpotqa.jsonl")
    assert "{{question}}" in config["doc_to_text"]  # the prompt comes from lm-eval's own longbench_hotpotqa
    assert not (tmp_path / "tasks" / "longbench_local_notes.yaml").exists()


def test_longbench_local_maps_input_to_question():
    datasets = pytest.importorskip("datasets")
    from hf_longattn.eval.longbench import input_as_question

    rows = input_as_question(datasets.Dataset.from_list([{"input": "Who?", "context": "c", "answers": ["A"]}]))
    assert rows[0]["question"] == "Who?"


def test_longbench_local_without_files(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    assert "no LongBench files" in _error(capsys, "longbench-local", str(tmp_path), "--out", str(tmp_path / "t"))
