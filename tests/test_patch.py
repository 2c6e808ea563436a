"""The patcher: patch / unpatch, layer policy, clear errors and warnings, accelerate, torch.compile.

Exactness of every method under every generate() mode lives in test_every_method.py.
"""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_longattn
from hf_longattn import ConfigError, UnsupportedModelError, attention, patch_model, patched, unpatch_model
from hf_longattn.recall import model_recall
from tiny_models import FAMILIES, assert_prefill_matches_unpatched, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pattern_with_a_sink_and_small_query_blocks_matches_unpatched(family):
    """The sink and the window split the keys of a full-coverage pattern; together they are still dense."""
    assert_prefill_matches_unpatched(make_model(family), "streaming", {"sink": 4, "window": 1 << 20, "block_size_q": 8},
                                     **TOL)


def test_chunked_prefill_queries_are_the_last_positions():
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=48, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
        patch_model(model, "streaming", sink=2, window=1 << 20, block_size_q=8)
        first = model(ids[:, :30], use_cache=True)
        second = model(ids[:, 30:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(second, reference[:, 30:], **TOL)


def test_sparse_pattern_is_used_and_differs_from_dense():
    """A small window must change the output: proves the patched path really runs the sparse pattern."""
    model = make_model("llama")
    ids, mask = random_batch(batch=1, length=64, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
        with patched(model, "streaming", sink=0, window=8, block_size_q=8):
            sparse = model(ids).logits
    assert not torch.allclose(sparse[:, 8:], reference[:, 8:], atol=1e-3)
    torch.testing.assert_close(sparse[:, :8], reference[:, :8], **TOL)  # inside the window: exact


def test_layer_policy_dense_layers_and_min_seq_len():
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=64, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
        with patched(model, "streaming", sink=0, window=8, dense_layers=4):  # all 4 layers dense
            torch.testing.assert_close(model(ids).logits, reference, **TOL)
        with patched(model, "streaming", sink=0, window=8, dense_layers=[0, 1, 2, 3]):
            torch.testing.assert_close(model(ids).logits, reference, **TOL)
        with patched(model, "streaming", sink=0, window=8, min_seq_len=65):  # input shorter: dense
            torch.testing.assert_close(model(ids).logits, reference, **TOL)
        with patched(model, "streaming", sink=0, window=8, dense_layers=[0, 1, 2]):  # one sparse layer
            assert not torch.allclose(model(ids).logits, reference, atol=1e-3)


def test_sliding_window_layers_keep_their_window_by_default():
    model = make_model("gemma2")  # alternating local (window 16) / global layers
    ids, _ = random_batch(batch=1, length=48, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
        with patched(model, "streaming", sink=0, window=1 << 20):
            torch.testing.assert_close(model(ids).logits, reference, **TOL)
        with patched(model, "streaming", sink=0, window=1 << 20, keep_sliding_window=False):
            # local layers now see the whole context: a different (context-extended) model
            assert not torch.allclose(model(ids).logits, reference, atol=1e-3)


def test_unpatch_restores_bit_identical_logits_and_implementation():
    model = make_model("gemma2", attn_implementation="eager")
    ids, mask = random_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        patch_model(model, "streaming", sink=0, window=4)
        patch_model(model, "dense")  # patching twice replaces, it does not stack
        assert model.config._attn_implementation == "longattn_dense"
        unpatch_model(model)
        after = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "hf_longattn_runner") for m in model.modules())
    assert torch.equal(before, after)
    unpatch_model(model)  # a no-op on an unpatched model


def test_patched_context_restores_previous_patch():
    model = make_model("llama")
    patch_model(model, "streaming", window=32)
    with patched(model, "dense"):
        assert model.config._attn_implementation == "longattn_dense"
    assert model.config._attn_implementation == "longattn_streaming"
    runner = model.model.layers[0].self_attn.hf_longattn_runner
    assert runner.config.window == 32


def test_errors_are_clear():
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown method 'nope'.*available methods: .*dense"):
        patch_model(model, "nope")
    with pytest.raises(ConfigError, match="no option budgett.*options are: .*window"):
        patch_model(model, "streaming", budgett=3)
    with pytest.raises(ConfigError, match="window=0 must be a positive integer"):
        patch_model(model, "streaming", window=0)
    with pytest.raises(ConfigError, match="dense_layers"):
        patch_model(model, "dense", dense_layers="all")
    assert not hf_longattn.is_patched(model)  # a failed patch changes nothing
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'.*Supported: llama"):
        patch_model(gpt2, "dense")


def test_from_pretrained_with_registered_name_and_save_without_package(tmp_path):
    model = make_model("mistral")
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="longattn_streaming")
    assert loaded.config._attn_implementation == "longattn_streaming"
    ids, _ = random_batch(batch=1, length=20, pad=0)
    with torch.no_grad():
        loaded(ids)  # runs with the method's defaults
    patch_model(model, "streaming", window=8)
    model.save_pretrained(tmp_path / "patched")
    config = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert "longattn" not in json.dumps(config)  # loads anywhere, without hf_longattn installed


def test_mask_the_kernel_cannot_honour_falls_back_to_dense_with_one_warning(caplog, monkeypatch):
    """A padding mask with a hole in the middle is not causal + window + left padding: exact dense, warned once."""
    monkeypatch.setattr("hf_longattn.attention._warned", set())  # another test may have seen the warning already
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=32, pad=0)
    mask = torch.ones_like(ids)
    mask[0, 10:14] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        with patched(model, "streaming", sink=0, window=4), caplog.at_level(logging.WARNING, "hf_longattn"):
            logits = model(ids, attention_mask=mask).logits
            model(ids, attention_mask=mask)
    torch.testing.assert_close(logits[0, 14:], reference[0, 14:], **TOL)
    warnings = [r for r in caplog.records if "more than causal" in r.getMessage()]
    assert len({r.getMessage() for r in warnings}) == len(warnings) >= 1  # once per layer, not per call


def test_accelerate_offloaded_model_patches_and_matches(tmp_path):
    """Serving with accelerate: layers offloaded to disk (device_map) still run the patched attention exactly."""
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    ids, _ = random_batch(batch=1, length=40, pad=0)
    with torch.no_grad():
        reference = model(ids).logits
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload", attn_implementation="eager")
    patch_model(offloaded, "streaming", sink=0, window=1 << 20)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, reference, **TOL)


def test_patched_model_runs_under_torch_compile():
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=40, pad=0)
    patch_model(model, "streaming", sink=4, window=16, block_size_q=16)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, **TOL)
    assert not torch.allclose(compiled, patched_reference_dense(model, ids), atol=1e-3)  # the sparse path ran


def patched_reference_dense(model, ids):
    with patched(model, "dense"), torch.no_grad():
        return model(ids).logits


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    monkeypatch.setattr(attention, "_pending", set())


def test_right_padding_runs_dense_and_says_why(caplog, fresh_warnings):
    model = make_model("llama")
    ids, mask = random_batch(side="right")
    with torch.no_grad(), patched(model, "streaming", sink=0, window=4), caplog.at_level(logging.WARNING, "hf_longattn"):
        model(ids, attention_mask=mask)
    assert any("padding_side='left'" in r.getMessage() for r in caplog.records)


def test_model_recall_says_why_a_sliding_window_model_has_no_layers(caplog, fresh_warnings):
    model = make_model("mistral")  # every layer is a sliding-window layer
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    options = dict(sink=0, window=8, block_size_q=8)
    with caplog.at_level(logging.WARNING, "hf_longattn"):
        assert model_recall(model, ids, "streaming", **options) == {}
    assert any("keep_sliding_window=False" in r.getMessage() for r in caplog.records)
    assert sorted(model_recall(model, ids, "streaming", keep_sliding_window=False, **options)) == [0, 1, 2, 3]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_dense_attention_places_queries_by_q_offset_like_the_sparse_kernel(softcap):
    """A static cache under torch.compile: queries at q_offset[b], the keys after them an empty tail (dense fallback)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((4, 5), (2, 40), (2, 40)))
    q_offset, kv_start = torch.tensor([12, 35]), torch.tensor([0, 3])
    covering = hf_longattn.kernels.window_pattern(2, 2, 5, 8, 8, sink=0, window=1 << 20)
    expected = hf_longattn.sparse_attention(q, k, v, covering, scale=0.3, softcap=softcap, kv_start=kv_start,
                                            q_offset=q_offset, backend="reference")
    out = hf_longattn.dense_attention(q, k, v, 0.3, softcap, kv_start=kv_start, q_offset=q_offset)
    torch.testing.assert_close(out, expected, **TOL)
    window = hf_longattn.dense_attention(q, k, v, 0.3, softcap, kv_start=kv_start, window=4, q_offset=q_offset)
    torch.testing.assert_close(window[0, 0], hf_longattn.dense_attention(
        q[:1, :, :1], k[:1, :, 9:13], v[:1, :, 9:13], 0.3, softcap)[0, 0], **TOL)  # query 12 sees keys 9..12


def test_compiled_decode_over_a_dynamic_cache_keeps_the_usual_layout():
    """With dynamic shapes the cache length is symbolic: the queries are still the last keys, so a method that cannot
    place queries by q_offset still runs there (no dense fallback) and matches the unpatched model."""
    torch._dynamo.reset()
    model = make_model("llama")
    ids, mask = random_batch(length=20)
    step, step_mask = torch.full((2, 1), 5), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)

    def decode_step(forward):
        past = model(ids, attention_mask=mask, use_cache=True).past_key_values
        return forward(input_ids=step, attention_mask=step_mask, past_key_values=past).logits

    with torch.no_grad():
        expected = decode_step(model.forward)
        patch_model(model, "blocktopk", k=256, block_size_q=8, block_size_k=8, sink=2, window=4)
        method = model.model.layers[0].self_attn.hf_longattn_runner.method
        attend, traced = method.attend, type("Traced", (), {"usual_layout": None})()

        def recording(query, key, value, call):
            if torch.compiler.is_compiling():  # written, never read, in the graph: no guard, no recompile
                traced.usual_layout = call.q_offset is None
            return attend(query, key, value, call)

        method.attend = recording
        logits = decode_step(torch.compile(model.forward, backend="aot_eager", dynamic=True, fullgraph=True))
    torch.testing.assert_close(logits, expected, **TOL)
    assert traced.usual_layout is True
