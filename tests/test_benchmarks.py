"""The benchmark command (benchmarks/run.py) and its shared timing module, at tiny sizes on a CPU.

The figures of a CPU run mean nothing; what is tested is that the command runs end to end for every registered
method, writes its files and says that they are not a performance figure, and that the pieces a GPU run relies on
(FlexAttention given the same mask as the shared kernel, decode state restored before each timed call, the token
clock of generate()) do what they claim.
"""

import json
import warnings

import pytest
import torch

from benchmarks import run
from benchmarks.run import LayerInputs, flex_block_mask, flex_inapplicable, random_blocks_pattern
from benchmarks.timing import time_generate, time_ms
from hf_longattn import available_methods, sparse_attention
from hf_longattn.kernels import window_pattern
from hf_longattn.methods import get_method

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny smoke run is the CPU path")


def tiny_inputs(context=512):
    x = LayerInputs(context, q_heads=4, kv_heads=2, head_dim=32, steps=1)
    return x, x.q.float(), x.k.float(), x.v.float()


@pytest.mark.parametrize("case", ["sink+window", "random blocks", "blocktopk"])
def test_flex_gets_exactly_the_mask_the_kernel_gets(case):
    """FlexAttention is timed 'on the same mask': its output must equal the shared kernel's on that pattern."""
    from torch.nn.attention.flex_attention import flex_attention

    x, q, k, v = tiny_inputs()
    if case == "sink+window":
        pattern = window_pattern(1, 2, 512, 128, 128, 16, 100)
    elif case == "random blocks":
        pattern = random_blocks_pattern(x, per_row=2)
    else:  # a real selection: 64-token blocks, per kv head, with sink and window
        method_cls = get_method("blocktopk")
        pattern = method_cls(method_cls.Config(k=128, window=64, sink=16)).select(q, k, x.call({}))
    assert flex_inapplicable(pattern) is None
    block_mask = flex_block_mask(pattern, 4, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex on a CPU warns that it is the slow path
        theirs = flex_attention(q, k, v, block_mask=block_mask, scale=x.scale, enable_gqa=True).transpose(1, 2)
    ours = sparse_attention(q, k, v, pattern, scale=x.scale)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_flex_declines_token_sized_key_blocks():
    x, q, k, _ = tiny_inputs(256)
    pattern = get_method("hip")(get_method("hip").Config(k=64)).select(q, k, x.call({}))
    assert "key blocks of 2 tokens" in flex_inapplicable(pattern)


def test_time_ms_restores_the_state_before_every_timed_call():
    seen = []
    state = {}

    def step():
        seen.append(state.get("steps", 0))
        state["steps"] = state.get("steps", 0) + 1

    time_ms(step, setup=lambda: state.update(steps=0), min_reps=4)
    assert seen and set(seen) == {0}


def test_time_generate_clocks_every_new_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(3, 64, (1, 20))
    result = time_generate(model, ids, new_tokens=3)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=0)[0, 20:].tolist()
    assert result["tokens"] == expected
    assert result["ttft_s"] > 0 and result["decode_ms_per_token"] > 0


@cpu_only
def test_command_runs_every_method_at_tiny_sizes(tmp_path):
    """Layer and end-to-end parts, every registered method, written files, marked as no performance figure."""
    run.main(["--tiny", "--parts", "layer,e2e", "--out", str(tmp_path)])  # what `python -m benchmarks.run` calls
    record = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert record["performance_figure"] is False and "Not a performance figure" in markdown
    assert record["environment"]["command"].startswith("python -m benchmarks.run --tiny")
    methods = [m for m in available_methods() if m != "dense"]
    assert record["settings"]["methods"] == methods
    for context in (256, 512):
        rows = {r["name"]: r for r in record["layer"] if r["context"] == context}
        assert {"dense", "kernel, 2K sink+window", "kernel, 2K random blocks", *methods} <= set(rows)
        for name in methods:
            assert "errors" not in rows[name], rows[name]["errors"]
            assert rows[name]["prefill_ms"] > 0 and rows[name]["decode_eager_us"] > 0
            assert f"| {context} | {name} |" in markdown
    e2e = {(r["name"], r["chunk"]): r for r in record["e2e"]}
    for name in ["dense", *methods]:
        for chunk in (None, 128):
            row = e2e[(name, chunk)]
            assert "errors" not in row, row["errors"]
            assert row["ttft_s"] > 0 and len(row["tokens"]) == record["settings"]["new_tokens"] + 1
    for plot in ("layer.png", "speedup.png", "e2e.png"):
        assert (tmp_path / plot).stat().st_size > 0


@cpu_only
@pytest.mark.slow
def test_command_quality_part_on_the_bundled_model(tmp_path, smollm2, monkeypatch):
    """Passkey and recall on SmolLM2: a window that covers the whole prompt keeps all of the attention mass."""
    monkeypatch.setattr(run, "load_quality_model", lambda: smollm2)  # loaded once per test session
    run.main(["--tiny", "--parts", "quality", "--methods", "streaming", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["quality"]}
    assert set(rows) == {"dense", "streaming"}
    assert rows["dense"]["prompts"] == 1 and rows["dense"]["passkey"] in (0.0, 1.0)
    assert rows["streaming"]["recall"] == pytest.approx(1.0, abs=1e-4)  # default window 496 > 320 tokens
    assert "| streaming |" in (tmp_path / "results.md").read_text()


@cpu_only
def test_command_refuses_a_full_size_run_without_a_gpu_and_bad_arguments(tmp_path, capsys):
    for argv, message in ((["--out", str(tmp_path)], "add --tiny"),
                          (["--tiny", "--methods", "nope"], "unknown methods ['nope']; available: blocktopk, dense"),
                          (["--tiny", "--parts", "layer,speed"], "choose from layer, e2e, quality"),
                          (["--tiny", "--contexts", "4q"], "--contexts: length '4q'")):
        with pytest.raises(SystemExit) as exit_info:
            run.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_report_judges_the_issue_targets_at_128k():
    """Figures made up by hand: hip meets the TTFT and decode targets, misses the chunked-memory one (34 GiB)."""
    from benchmarks.report import markdown, targets

    n = 131072
    e2e = [
        {"context": n, "name": "dense", "chunk": None, "ttft_s": 12.0, "decode_ms_per_token": 90.0, "peak_gib": 45.6,
         "tokens": [5, 6]},
        {"context": n, "name": "hip", "chunk": None, "ttft_s": 4.0, "decode_ms_per_token": 50.0, "peak_gib": 45.0,
         "tokens": [7, 8]},
        {"context": n, "name": "hip", "chunk": 8192, "ttft_s": 4.2, "decode_ms_per_token": 50.0, "peak_gib": 34.0,
         "tokens": [7, 8]},
    ]
    layer = [{"context": n, "name": "dense", "kind": "dense", "prefill_ms": 260.0, "tflops": 600.0},
             {"context": n, "name": "kernel, 2K sink+window", "kind": "kernel", "kernel_ms": 8.0, "prefill_ms": 8.0,
              "flex_ms": 13.0, "floor_ms": 7.0}]
    record = {"settings": {"methods": ["hip"], "chunk": 8192, "decode_steps": 16, "new_tokens": 16,
                           "recall_prompts": 2},
              "e2e": e2e, "layer": layer, "quality": [], "seconds": {}, "performance_figure": True,
              "environment": {k: "x" for k in ("device", "command", "date", "torch", "cuda", "triton", "transformers",
                                               "python", "commit")}}
    verdicts = {(row[0].split(":")[0].split(" >=")[0], row[1]): row[3] for row in targets(record)}
    assert verdicts == {
        ("TTFT at 128K", "hip"): "**met**",                          # 12 / 4 = 3.0x
        ("decode at 128K", "hip"): "not met",                        # 90 / 50 = 1.8x
        ("128K prefill, chunk 8192", "hip"): "not met",              # 34 GiB > 33
        ("layer prefill, 2K budget, 128K", "kernel, 2K sink+window"): "**met**",  # 13/8 = 1.63x Flex, 8/7 = 1.14x
    }
    text = markdown(record)
    assert "3.00x (4.00 s vs 12.00 s)" in text and "34.0 GiB (unchunked 45.0)" in text
    assert "| 128K | hip | 4.000 | 3.00x | 50.0 | 1.80x | 45.0 | 4.200 | 1.05x | 34.0 | yes |" in text
