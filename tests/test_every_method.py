"""Every method at full budget computes what the unpatched model computes, in every situation a user hits.

Methods come from `FULL_BUDGET` (tests/tiny_models.py), which must name every registered method: a new method joins
every test here by adding its entry. The reference is the unpatched model with eager attention, on the same tiny
random-weight model of each family (llama, mistral, gemma, gemma2, gemma3_text). Greedy tokens must be equal and
logits equal to fp32 tolerance. Batches are left-padded (row 1 by 7 of 24 tokens) unless said otherwise.

Coverage (methods x families x modes):
* every method x every family: left-padded prefill; generate() with a dynamic cache, a static cache, chunked prefill
  (`prefill_chunk_size=16`), static + chunked, beam search (num_beams=2); a right-padded row (the first new token and
  the logits at every position, pad queries included); a layer's state kept across a continued cache (dynamic,
  static, sliding window) and emptied by a new prompt; `output_attentions=True` answered by one warning.
* compiled decode: transformers' own compiled decode step (static cache, `CompileConfig`, forced on CPU, backend
  aot_eager, fullgraph) on every family for the methods that place queries by `q_offset`
  (`supports_query_offset`: they run there), and on llama only for the others, which run exact dense attention there
  with one warning (the fallback does not depend on the method, so one family shows it).
* compiled forward (torch.compile, aot_eager, fullgraph) with a left-padded mask vs eager: every method on llama
  (GQA, rope scaling) and gemma2 (softcap, alternating local/global layers); dense on every family with and without
  a mask, which is what exercises the mask recognition of the sliding-window families.
Compiling costs seconds per case on CPU, so the compiled cases are the ones where the method or the family changes
what is traced; everything eager runs for every pair. The tiny Mistral has a sliding window, so every layer keeps it
and no method runs there: it checks the window path and the sliding caches (a Mistral without a window is a Llama to
a method).
"""

import logging

import pytest
import torch
from transformers import CompileConfig, StaticCache

from hf_longattn import attention, available_methods, patched
from hf_longattn.methods import get_method
from tiny_models import FAMILIES, FULL_BUDGET, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)
METHODS = sorted(FULL_BUDGET)
FAMILY_NAMES = sorted(FAMILIES)
PROMPT = dict(batch=2, length=24, pad=7)
NEW_TOKENS = 4
MODES = {
    "dynamic": {},
    "static": {"cache_implementation": "static"},
    "chunked": {"prefill_chunk_size": 16},
    "static-chunked": {"cache_implementation": "static", "prefill_chunk_size": 16},
    "beams": {"num_beams": 2},
}
QUERY_OFFSET_METHODS = [m for m in METHODS if get_method(m).supports_query_offset]
COMPILED_DECODE = [(f, m) for m in METHODS for f in (FAMILY_NAMES if m in QUERY_OFFSET_METHODS else ["llama"])]
COMPILED_FORWARD = [(f, m, True) for m in METHODS for f in (FAMILY_NAMES if m == "dense" else ["gemma2", "llama"])] + [
    (f, "dense", False) for f in ("gemma2", "gemma3_text", "mistral")] + [("llama", m, False) for m in METHODS]

_models: dict[str, torch.nn.Module] = {}
_references: dict[tuple, object] = {}


def test_full_budget_names_every_method():
    assert set(FULL_BUDGET) == set(available_methods())


def shared_model(family):
    """One model per family and worker for the eager tests (patched() restores it after each use)."""
    if family not in _models:
        _models[family] = make_model(family)
    return _models[family]


def greedy(model, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)


def reference(family, name, ids, mask, **kwargs):
    """The unpatched model's greedy output, computed once per worker."""
    key = (family, name)
    if key not in _references:
        _references[key] = greedy(shared_model(family), ids, mask, **kwargs)
    return _references[key]


def assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), **TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefill_matches_unpatched(family, method):
    model = shared_model(family)
    ids, mask = random_batch(batch=2, length=40, pad=7)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        with patched(model, method, **FULL_BUDGET[method]):
            logits = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], **TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_matches_unpatched(family, method, mode):
    model = shared_model(family)
    ids, mask = random_batch(**PROMPT)
    expected = reference(family, mode, ids, mask, **MODES[mode])
    with patched(model, method, **FULL_BUDGET[method]):
        assert_same_generation(greedy(model, ids, mask, **MODES[mode]), expected)


@pytest.mark.parametrize("mode", ["dynamic", "static", "static-chunked"])
@pytest.mark.parametrize("method", ["hip", "streaming"])
def test_generate_through_the_triton_kernels_matches_unpatched(method, mode, monkeypatch):
    """The generate() modes above run the PyTorch references on a CPU; here HiP's search and the shared sparse kernel
    run in Triton (interpreted), as on a GPU, so that how the launchers hand the kernels their inputs is checked too.
    A static cache's row starts once reached the kernels as a strided view, and row 1 read row 0's query offset."""
    from hf_longattn.kernels import hip_mask, ops

    if torch.cuda.is_available():
        pytest.skip("on a GPU these kernels are the ones test_generate_matches_unpatched runs")
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(hip_mask, "_search_eager", hip_mask.hip_mask_triton)
    model = shared_model("llama")
    ids, mask = random_batch(**PROMPT)
    expected = reference("llama", mode, ids, mask, **MODES[mode])
    with patched(model, method, **FULL_BUDGET[method]):
        assert_same_generation(greedy(model, ids, mask, **MODES[mode]), expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_right_padded_row_matches_unpatched(family, method):
    """Pad queries see what transformers' mask lets them see (the real keys), so generate's first token is the same."""
    model = shared_model(family)
    ids, mask = random_batch(batch=2, length=40, pad=9, side="right")
    expected = reference(family, "right-padded", ids, mask, max_new_tokens=1)
    with torch.no_grad():
        expected_logits = model(ids, attention_mask=mask).logits
    with patched(model, method, **FULL_BUDGET[method]):
        assert_same_generation(greedy(model, ids, mask, max_new_tokens=1), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected_logits, **TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_output_attentions_is_answered_with_one_warning(family, method, caplog, monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    model = shared_model(family)
    ids, mask = random_batch(batch=2, length=12, pad=3)
    with patched(model, method, **FULL_BUDGET[method]), torch.no_grad():
        with caplog.at_level(logging.WARNING, "hf_longattn"):
            out = model(ids, attention_mask=mask, output_attentions=True)
            model(ids, attention_mask=mask, output_attentions=True)
    warnings = [r.getMessage() for r in caplog.records if "output_attentions" in r.getMessage()]
    assert len(warnings) == 1 and "attn_implementation='eager'" in warnings[0]
    assert not any(a is not None and a.numel() for a in out.attentions)  # no maps, as with SDPA


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_state_lives_as_long_as_its_sequence(family, method):
    """A call that continues the cache (dynamic, static, sliding window) keeps a layer's state; a new prompt empties
    it, so a method never reuses what it kept for another sequence."""
    model = shared_model(family)
    ids, mask = random_batch(batch=2, length=20, pad=3)
    step, step_mask = torch.ones(2, 1, dtype=torch.long), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with patched(model, method, **FULL_BUDGET[method]), torch.no_grad():
        runner = model.model.layers[-1].self_attn.hf_longattn_runner
        for cache in (None, StaticCache(config=model.config, max_cache_len=24)):
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            runner.state["sentinel"] = True
            model(step, attention_mask=step_mask, past_key_values=out.past_key_values)
            assert runner.state.get("sentinel"), f"a call that continued the {cache or 'dynamic'} cache kept the state"
            model(ids, attention_mask=mask)
            assert "sentinel" not in runner.state, "a new prompt emptied the state"


def counting_aot_eager(graphs: list):
    """aot_eager (what inductor sees, without code generation) that also records every graph it compiles."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


class CompiledCalls:
    """What the patched method saw when a compiled graph was traced (written, never read, inside the graph, so that
    dynamo puts no guard on it and replays the write after each run)."""

    q_offset = None


def record_compiled_calls(model) -> CompiledCalls:
    seen = CompiledCalls()
    method = model.model.layers[0].self_attn.hf_longattn_runner.method  # one instance serves every layer
    attend = method.attend

    def recording(query, key, value, call):
        if torch.compiler.is_compiling():
            seen.q_offset = call.q_offset is not None
        return attend(query, key, value, call)

    method.attend = recording
    return seen


@pytest.mark.parametrize("family,method", COMPILED_DECODE)
def test_compiled_static_decode_matches_unpatched(family, method, caplog, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_warned", set())
    monkeypatch.setattr(attention, "_pending", set())
    model = make_model(family)
    ids, mask = random_batch(**PROMPT)
    expected = greedy(model, ids, mask, cache_implementation="static")
    graphs = []
    compile_config = CompileConfig(backend=counting_aot_eager(graphs), fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles the decode step on GPUs only otherwise
    with patched(model, method, **FULL_BUDGET[method]), caplog.at_level(logging.WARNING, "hf_longattn"):
        seen = record_compiled_calls(model)
        out = greedy(model, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert_same_generation(out, expected)
    assert graphs, "the decode step was compiled"
    fallback = [r for r in caplog.records if f"'{method}' cannot place the queries" in r.getMessage()]
    if method in QUERY_OFFSET_METHODS:
        # (Every Mistral layer is a sliding-window layer, which keeps its exact window: the method never runs there.)
        assert seen.q_offset is (None if family == "mistral" else True), "the compiled decode placed the queries"
        assert not fallback
    else:
        assert len(fallback) == 1, "the dense fallback of the compiled decode was announced once"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
@pytest.mark.parametrize("method", QUERY_OFFSET_METHODS)
def test_compiled_static_decode_with_cuda_graphs_matches_unpatched(method):
    """transformers' own compiled decode on a GPU (its default CompileConfig: CUDA graphs). The graphs own what their
    calls allocate; kernels that kept scratch buffers across calls failed there ('tensor(s) in the cudagraph pool not
    tracked as outputs'), which no CPU test can see."""
    torch._dynamo.reset()
    model = make_model("llama").cuda()
    ids, mask = (t.cuda() for t in random_batch(**PROMPT))
    expected = greedy(model, ids, mask, cache_implementation="static")
    with patched(model, method, **FULL_BUDGET[method]):
        out = greedy(model, ids, mask, cache_implementation="static")
    assert torch.equal(out.sequences, expected.sequences)
    # Inductor compiles the two models' graphs apart: the same math, float32 sums in another order.
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family,method,with_mask", COMPILED_FORWARD)
def test_compiled_forward_matches_eager(family, method, with_mask, caplog, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_warned", set())
    monkeypatch.setattr(attention, "_pending", set())
    model = make_model(family)
    ids, mask = random_batch(batch=2, length=24, pad=7 if with_mask else 0)
    kwargs = {"attention_mask": mask} if with_mask else {}
    with torch.no_grad():
        expected = model(ids, **kwargs).logits
        graphs = []
        with patched(model, method, **FULL_BUDGET[method]):
            compiled = torch.compile(model.forward, backend=counting_aot_eager(graphs), fullgraph=True)
            with caplog.at_level(logging.WARNING, "hf_longattn"):
                logits = compiled(input_ids=ids, **kwargs).logits
    assert len(graphs) == 1
    messages = [r.getMessage() for r in caplog.records] + list(attention._pending)  # a graph's warnings wait
    fallback = [m for m in messages if "torch.compile cannot trace" in m]
    cls = get_method(method)
    assert len(fallback) == (1 if not cls.traceable or (with_mask and not cls.traces_padded_rows) else 0)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], **TOL)
