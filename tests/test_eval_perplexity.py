"""Sliding-window perplexity: the windows, the loss against a direct computation, dense beside a patched run."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from hf_longattn.eval.perplexity import main, run_perplexity, window_losses, windows
from tiny_models import make_model

SMALL = {"min_seq_len": 16, "block_size": 8, "last_layers": "all"}  # hyper's recursion on tiny contexts


def test_windows_slide_by_the_stride_and_keep_whole_windows():
    ids = list(range(10))
    assert windows(ids, 4, 2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert windows(ids, 4, 2, limit=2) == [[0, 1, 2, 3], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids, 11, 2)
    with pytest.raises(ValueError, match="stride=5"):
        windows(ids, 4, 5)


def test_window_loss_is_the_nll_of_the_last_tokens():
    model = make_model("llama")
    batch = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_probs = model(batch).logits.log_softmax(-1)
    expected = -log_probs[:, 11:19].gather(-1, batch[:, 12:].unsqueeze(-1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(torch.tensor(window_losses(model, batch.tolist(), 8)), expected, atol=1e-4, rtol=1e-5)


def test_runs_score_the_same_windows():
    model = make_model("llama")
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    runs = {"dense": {"method": "dense"},
            "covering": {"method": "hyper", **SMALL, "sample_size": 1 << 20},
            "sampled": {"method": "hyper", **SMALL, "sample_size": 2}}
    results = run_perplexity(model, ids, runs, [64], max_windows=3, batch_size=2)[64]
    assert len(results["dense"]["nll"]) == 3 and results["dense"]["tokens"] == 96
    assert math.isclose(results["covering"]["perplexity"], results["dense"]["perplexity"], rel_tol=1e-5)
    assert not math.isclose(results["sampled"]["perplexity"], results["dense"]["perplexity"], rel_tol=1e-4)


def test_command_line_writes_json_and_markdown(tmp_path, monkeypatch):
    def tokenizer(text, add_special_tokens):  # characters as tokens of the tiny model's vocabulary
        return SimpleNamespace(input_ids=[3 + ord(c) % 125 for c in text[:2000]])
    monkeypatch.setattr("hf_longattn.bundled.load_model", lambda *args, **kwargs: (make_model("llama"), tokenizer))
    runs = json.dumps({"hyper-all": {"method": "hyper", **SMALL, "sample_size": 2}})
    options = ["--lengths", "64", "--max-windows", "2", "--runs", runs, "--device", "cpu", "--out", str(tmp_path)]
    assert main(options) == 0
    record = json.loads((tmp_path / "perplexity.json").read_text())
    dense, hyper = (record["results"]["64"][label]["perplexity"] for label in ("dense", "hyper-all"))
    assert 1 < dense < 1000 and 1 < hyper < 1000 and dense != hyper
    assert "| hyper-all |" in (tmp_path / "perplexity.md").read_text()
    with pytest.raises(SystemExit, match="needs a \"method\""):
        main(["--runs", '{"x": {"window": 3}}', "--out", str(tmp_path)])
