"""LongHeads: options, RoPE re-placement for every family's variant, the gather kernel, representatives and the whole
method against a brute-force statement of the paper's algorithm, exactness at a budget that covers the context, decode
state (incremental = prefill, beam search reorders, new sequences) and left padding."""

import itertools
import logging
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

from hf_longattn import ConfigError, attention, patch_model, patched
from hf_longattn.kernels import dense_attention
from hf_longattn.kernels.longheads_chunks import chunk_representatives
from hf_longattn.kernels.longheads_gather import gather_rotate_reference, gather_rotate_triton
from hf_longattn.methods import AttentionCall
import hf_longattn.kernels.longheads_chunks as longheads_chunks
import hf_longattn.methods.longheads as LongHeadsModule
from hf_longattn.methods.longheads import LongHeads, LongHeadsConfig
from hf_longattn.rope import UnsupportedRopeError, layer_inv_freq, rotate
from tiny_models import COMMON, FAMILIES, FULL_BUDGET, make_model, random_batch

TOL = dict(atol=2e-5, rtol=1e-4)
SMALL = dict(chunk_size=8, cap=48, block_size_q=4)  # 6 chunks: first + 3 selected + 2 local


def _rotate_from_scratch(model, x, positions, layer_idx=0):
    """x [..., N, D] rotated at positions [..., N] by the model's own rotary embedding (transformers' code)."""
    rotary, config = model.model.rotary_emb, model.config
    extra = ()
    if isinstance(getattr(config, "rope_parameters", {}).get("full_attention"), dict):
        extra = (config.layer_types[layer_idx],)
    cos, sin = rotary(x, positions.reshape(1, -1), *extra)
    cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
    return x * cos + rotate_half(x) * sin


def _module(model, layer_idx=0):
    return types.SimpleNamespace(config=model.config, layer_idx=layer_idx)


# --- options --------------------------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    c = LongHeadsConfig()
    assert (c.chunk_size, c.cap, c.block_size_q, c.shared_kv_heads) == (256, None, 256, True)
    assert LongHeadsConfig(chunk_size=64).block_size_q == 64
    assert LongHeadsConfig.from_options("longheads", c.options()) == c


@pytest.mark.parametrize("options,message", [
    ({"cap": 1300}, "use cap=1280"),
    ({"chunk_size": 64, "cap": 128}, "at least 4"),
    ({"block_size_q": 512}, "block_size_q <= 256"),
    ({"min_seq_len": 100}, "leave min_seq_len=0"),
    ({"shared_kv_heads": "yes"}, "shared_kv_heads"),
    ({"chunk_size": 0}, "positive"),
    ({"budget": 4096}, "no option budget"),
])
def test_bad_options_fail_with_a_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        patch_model(make_model("llama"), "longheads", **options)


def test_default_cap_is_the_trained_context_at_most_4096():
    method = LongHeads(LongHeadsConfig(chunk_size=8))
    for trained, cap in [(4096, 4096), (8192, 4096), (100, 96)]:
        config = LlamaConfig(**{**COMMON, "max_position_embeddings": trained})
        module = types.SimpleNamespace(config=config, layer_idx=0)
        method._layers.clear()
        assert method.layer(AttentionCall(0, 1.0, None, None, module=module), torch.device("cpu"))[1] == cap


def test_without_the_attention_module_the_error_says_what_is_missing():
    method = LongHeads(LongHeadsConfig(**SMALL))
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 60, 16)
    with pytest.raises(RuntimeError, match="AttentionCall.module"):
        method.attend(q, k, k, AttentionCall(0, 0.25, None, None))


# --- RoPE: a relative rotation of a rotated key is the key rotated at the new position -------------------------------

def _variant(name):
    """Tiny models of every family, plus Llama with the other static scalings and Gemma 3 with a scaled global base."""
    if name in FAMILIES:
        return make_model(name)
    torch.manual_seed(0)
    rope = {"linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}}
    if name in rope:
        return LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope[name])).eval()
    model = make_model("gemma3_text")
    config = model.config
    config.rope_parameters["full_attention"] = {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    return type(model)(config).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES) + ["linear", "yarn", "gemma3_scaled"])
def test_relative_rotation_equals_rotating_at_the_new_position(name):
    model = _variant(name)
    config = model.config
    dim = config.head_dim or config.hidden_size // config.num_attention_heads
    raw = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(1))
    old = torch.tensor([0, 17, 900, 3000, 4095])
    new = torch.tensor([5, 1, 4000, 2, 4095])
    for layer in range(config.num_hidden_layers):
        cached = _rotate_from_scratch(model, raw, old.expand(3, 5), layer)
        moved = rotate(cached, (new - old).expand(3, 5), layer_inv_freq(config, layer))
        expected = _rotate_from_scratch(model, raw, new.expand(3, 5), layer)
        torch.testing.assert_close(moved, expected, atol=2e-3, rtol=0)  # float32 angles of positions up to 4K
        wrong = rotate(cached, (old - new).expand(3, 5), layer_inv_freq(config, layer))
        assert (wrong - expected).abs().max() > 0.1  # the check can fail


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused_with_the_fix(rope_type):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=1024)
    config = LlamaConfig(**COMMON, rope_parameters=params)
    with pytest.raises(UnsupportedRopeError, match="rope_type 'linear', 'yarn' or 'llama3'"):
        LongHeads.check_model_config(config)
    model = LlamaForCausalLM(config).eval()
    patch_model(model, "longheads", **SMALL)
    with pytest.raises(UnsupportedRopeError, match=rope_type):
        model(torch.randint(3, 100, (1, 60)))


# --- the gather kernel ----------------------------------------------------------------------------------------------

def _gather_case(seed=0, heads=3):
    """Cache [2, 3, 50, 16]; per (row, head, block): 3 slots, some unused (-1), some running past the cache."""
    gen = torch.Generator().manual_seed(seed)
    key, value = torch.randn(2, 3, 50, 16, generator=gen), torch.randn(2, 3, 50, 16, generator=gen)
    src_start = torch.randint(-1, 50, (2, heads, 2, 3), generator=gen)
    delta = torch.randint(-900, 900, (2, heads, 2, 3), generator=gen)
    return key, value, src_start, delta, layer_inv_freq(make_model("llama").config, 0)


@pytest.mark.parametrize("heads", [3, 6], ids=["per-kv-head", "per-query-head"])
def test_gather_reference_copies_turns_and_zeroes(heads):
    key, value, src, delta, inv_freq = _gather_case(heads=heads)
    keys, values = gather_rotate_reference(key, value, src, delta, 8, inv_freq)
    assert keys.shape == values.shape == (2 * 2, heads, 3 * 8, 16)  # [B * nQB, H, slots * chunk_size, D]
    keys, values = keys.view(2, 2, heads, 3, 8, 16), values.view(2, 2, heads, 3, 8, 16)
    for b, h, j, s, t in itertools.product(range(2), range(heads), range(2), range(3), range(8)):
        p, kv = int(src[b, h, j, s]) + t, h * 3 // heads
        if src[b, h, j, s] < 0 or p >= 50:
            assert not keys[b, j, h, s, t].any() and not values[b, j, h, s, t].any()
        else:
            torch.testing.assert_close(values[b, j, h, s, t], value[b, kv, p])
            torch.testing.assert_close(keys[b, j, h, s, t], rotate(key[b, kv, p], delta[b, h, j, s], inv_freq))


@pytest.mark.parametrize("heads", [3, 6], ids=["per-kv-head", "per-query-head"])
def test_gather_triton_kernel_matches_reference(heads):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 on CPU (tests/conftest.py)
    key, value, src, delta, inv_freq = _gather_case(seed=1, heads=heads)
    expected = gather_rotate_reference(key, value, src, delta, 8, inv_freq)
    got = gather_rotate_triton(*(t.to(device) for t in (key, value, src, delta)), 8, inv_freq, block_tokens=4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e, atol=1e-5, rtol=1e-5)


# --- brute force: the paper's algorithm, one query at a time, keys rotated from scratch at their new positions --------

def _brute_force(model, q_raw, k_raw, v, starts, q_len, options, scale, softcap=None):
    """out [B, Lq, Hq, D] for the last q_len queries; positions count from each row's first real key."""
    size, cap, block = options["chunk_size"], options["cap"], options["block_size_q"]
    shared = options.get("shared_kv_heads", True)
    m = cap // size
    batch, num_q_heads, k_len, dim = q_raw.shape
    num_kv_heads = k_raw.shape[1]
    group = num_q_heads // num_kv_heads
    heads = num_kv_heads if shared else num_q_heads

    def attend(q, keys, values):
        logits = scale * keys @ q
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.softmax(logits, 0) @ values

    out = torch.zeros(batch, q_len, num_q_heads, dim)
    for b in range(batch):
        s = int(starts[b])
        positions = torch.arange(k_len) - s
        q_rot = _rotate_from_scratch(model, q_raw[b], positions.expand(num_q_heads, -1))
        k_rot = _rotate_from_scratch(model, k_raw[b], positions.expand(num_kv_heads, -1))
        reps = {}  # (query head, chunk) -> representative
        for c in range((k_len - s) // size):
            span = range(s + c * size, s + (c + 1) * size)
            for hq in range(num_q_heads):
                kv = hq // group
                outputs = torch.stack([attend(q_rot[hq, i], k_rot[kv, span], v[b, kv, span]) for i in span])
                local = _rotate_from_scratch(model, k_raw[b, kv, span], torch.arange(size))
                weights = torch.softmax(scale * local @ outputs.mean(0), 0)
                reps[hq, c] = weights @ local
        for j in range(-(-q_len // block)):
            block_pos = [p for p in range(k_len - q_len + j * block, min(k_len - q_len + (j + 1) * block, k_len))]
            real = [p for p in block_pos if p >= s]
            if not real:
                continue
            own_first, own_last = (max(block_pos[0] - s, 0)) // size, (block_pos[-1] - s) // size
            local_lo = max(own_first - 1, 0)
            n_select = m - 1 - (own_last - local_lo + 1)
            candidates = list(range(1, local_lo))
            for h in range(heads):
                q_heads = range(h * group, (h + 1) * group) if shared else [h]
                best = {}
                for c in candidates:
                    probs = []
                    for hq in q_heads:
                        for p in real:
                            scores = torch.stack([scale * q_raw[b, hq, p] @ reps[hq, x] for x in candidates])
                            probs.append(torch.log_softmax(scores, 0)[candidates.index(c)])
                    best[c] = max(probs)
                chosen = sorted(sorted(candidates, key=lambda c: -best[c])[:n_select])
                far = ([0] if local_lo >= 1 else []) + chosen
                local_start = s + local_lo * size
                for p in real:
                    keys_at = [t for c in far for t in range(s + c * size, s + (c + 1) * size)]
                    new_at = list(range(local_start - len(keys_at), local_start))
                    keys_at += list(range(local_start, p + 1))
                    new_at += list(range(local_start, p + 1))
                    for hq in q_heads:
                        kv = hq // group
                        keys = _rotate_from_scratch(model, k_raw[b, kv, keys_at], torch.tensor(new_at) - s)
                        out[b, p - (k_len - q_len), hq] = attend(q_rot[hq, p], keys, v[b, kv, keys_at])
    return out


def _method_inputs(model, starts, q_len, k_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_raw = torch.randn(2, 4, k_len, 16, generator=gen)
    k_raw, v = torch.randn(2, 2, k_len, 16, generator=gen), torch.randn(2, 2, k_len, 16, generator=gen)
    q, k = torch.empty_like(q_raw), torch.empty_like(k_raw)
    for b in range(2):
        positions = torch.arange(k_len) - int(starts[b])
        q[b] = _rotate_from_scratch(model, q_raw[b], positions.expand(4, -1))
        k[b] = _rotate_from_scratch(model, k_raw[b], positions.expand(2, -1))
    return q_raw, k_raw, q[:, :, k_len - q_len:], k, v


@pytest.mark.parametrize("case", [
    dict(q_len=72, k_len=72),  # prefill; the padded row's blocks straddle chunk boundaries
    dict(q_len=1, k_len=75),  # decode
    dict(q_len=9, k_len=75, softcap=5.0),  # a chunked-prefill call, Gemma 2's softcap
    dict(q_len=72, k_len=72, shared_kv_heads=False),  # a selection per query head
    dict(q_len=72, k_len=72, model_layout=True),  # queries in transformers' memory order, read where they are
], ids=["prefill", "decode", "chunked-softcap", "per-head", "model-layout"])
def test_method_matches_the_papers_algorithm_one_query_at_a_time(case, monkeypatch):
    if case["q_len"] == 72 and case.get("shared_kv_heads", True):  # rounds of one query block / one chunk each
        monkeypatch.setitem(LongHeadsModule._ROUND_ELEMENTS, "cpu", 1)
        monkeypatch.setattr(longheads_chunks, "_SELECT_SCORES", 1)
    model = make_model("llama")  # Llama 3 scaled RoPE
    starts = torch.tensor([0, 5])
    options = dict(SMALL, shared_kv_heads=case.get("shared_kv_heads", True))
    q_raw, k_raw, q, k, v = _method_inputs(model, starts, case["q_len"], case["k_len"])
    if case.get("model_layout"):
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        assert LongHeadsModule._blocked_queries(q, 72).data_ptr() == q.data_ptr()  # no copy
    softcap = case.get("softcap")
    # The representatives come from the queries of every chunk: a first call shows the method all earlier queries.
    method, state = LongHeads(LongHeadsConfig(**options)), {}
    earlier = case["k_len"] - case["q_len"]
    if earlier:
        full_q = _method_inputs(model, starts, case["k_len"], case["k_len"])[2]
        method.attend(full_q[:, :, :earlier], k[:, :, :earlier], v[:, :, :earlier],
                      AttentionCall(0, 0.3, softcap, starts, state, module=_module(model)))
    out = method.attend(q, k, v, AttentionCall(0, 0.3, softcap, starts, state, module=_module(model)))
    expected = _brute_force(model, q_raw, k_raw, v, starts, case["q_len"], options, 0.3, softcap)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-3)
    assert (out - dense_attention(q, k, v, 0.3, softcap, kv_start=starts)).abs().max() > 1e-2  # not dense


def test_representative_is_the_attention_weighted_mean_of_the_chunk_local_keys():
    model = make_model("llama")
    q_raw, k_raw, q, k, v = _method_inputs(model, torch.tensor([0, 0]), 16, 16, seed=3)
    chunk = torch.tensor([1, 1])  # the second chunk of 8
    reps = chunk_representatives(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], chunk, 8, layer_inv_freq(model.config, 0),
                                 0.3, None)
    for b in range(2):
        for hq in range(4):
            kv = hq // 2
            outputs = torch.softmax(0.3 * q[b, hq, 8:] @ k[b, kv, 8:].T, -1) @ v[b, kv, 8:]
            local = _rotate_from_scratch(model, k_raw[b, kv, 8:], torch.arange(8))
            expected = torch.softmax(0.3 * local @ outputs.mean(0), 0) @ local
            torch.testing.assert_close(reps[b, hq], expected, atol=1e-4, rtol=1e-4)


def test_chunks_whose_queries_were_never_seen_use_their_keys_with_a_warning(caplog, monkeypatch):
    """A state that starts mid-sequence (lost, e.g. by a cache rolled back): a chunk that began before the first query
    it saw is represented with its keys standing in for all its queries; later chunks use their own queries."""
    model = make_model("llama")
    starts = torch.tensor([0, 3])
    _, _, q, k, v = _method_inputs(model, starts, 30, 40, seed=5)  # the state sees the queries from position 10 on
    method = LongHeads(LongHeadsConfig(**SMALL))
    call = AttentionCall(0, 0.3, None, starts, {}, module=_module(model))
    inv_freq = method.layer(call, q.device)[0]
    monkeypatch.setattr(attention, "_warned", set())
    with caplog.at_level(logging.WARNING, "hf_longattn"):
        state = method.update_state(q, k, v, call, inv_freq)
    assert any("did not see the queries" in r.getMessage() for r in caplog.records)
    assert state.done == [5, 4]
    for b, start in enumerate(starts.tolist()):
        for c in range(state.done[b]):
            pos = torch.arange(start + 8 * c, start + 8 * c + 8)
            unseen = start + 8 * c < 10
            chunk_q = k[b, :, pos].repeat_interleave(2, 0) if unseen else q[b, :, pos - 10]
            expected = chunk_representatives(chunk_q[None], k[b:b + 1, :, pos], v[b:b + 1, :, pos], torch.tensor([c]),
                                             8, inv_freq, 0.3, None)[0]
            torch.testing.assert_close(state.reps[b, :, c], expected, **TOL)


# --- exactness when everything fits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 20.0])
def test_selected_path_with_a_covering_cap_is_dense(softcap):
    model = make_model("llama")
    starts = torch.tensor([0, 11])
    _, _, q, k, v = _method_inputs(model, starts, 40, 56)
    method = LongHeads(LongHeadsConfig(chunk_size=8, cap=64, block_size_q=4))
    call = AttentionCall(0, 0.3, softcap, starts, {}, module=_module(model))
    inv_freq, cap = method.layer(call, q.device)
    state = method.update_state(q, k, v, call, inv_freq)
    out = method.attend_selected(q, k, v, call, state, inv_freq, cap)  # the gather path, not the dense shortcut
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3, softcap, kv_start=starts), **TOL)


# --- decode state -----------------------------------------------------------------------------------------------------

def test_decoding_token_by_token_equals_prefill():
    # With one query per block, prefill selects per query as decode does: the representatives built chunk by chunk
    # from the decode calls' queries must give the same logits as those built at once.
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=44, pad=0)
    options = dict(chunk_size=4, cap=16, block_size_q=1)
    with torch.no_grad(), patched(model, "longheads", **options):
        prefill = model(ids).logits
        past, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
        chunked = model(ids[:, :25], use_cache=True)
        rest = model(ids[:, 25:], past_key_values=chunked.past_key_values).logits
    torch.testing.assert_close(torch.cat(steps, 1), prefill, **TOL)
    torch.testing.assert_close(rest, prefill[:, 25:], **TOL)
    assert not torch.allclose(prefill, model(ids).logits, atol=1e-3)  # the selection ran


def test_state_follows_rows_that_beam_search_reorders():
    model = make_model("llama")
    _, _, q, k, v = _method_inputs(model, torch.tensor([0, 0]), 55, 55, seed=4)  # the first step completes a chunk
    steps = torch.randn(3, 2, 4, 1, 16), torch.randn(3, 2, 2, 1, 16), torch.randn(3, 2, 2, 1, 16)
    swap = torch.tensor([1, 0])

    def run(prompt_order):
        method, state = LongHeads(LongHeadsConfig(**SMALL)), {}
        call = lambda: AttentionCall(0, 0.3, None, None, state, module=_module(model))  # noqa: E731
        method.attend(q[prompt_order], k[prompt_order], v[prompt_order], call())
        keys, values, outs = k[swap], v[swap], []  # the cache after beam search moved row 1 to row 0 and back
        for sq, sk, sv in zip(*steps):
            keys, values = torch.cat([keys, sk], 2), torch.cat([values, sv], 2)
            outs.append(method.attend(sq, keys, values, call()))
        return torch.stack(outs), state["longheads"].reps

    reordered, reps = run(torch.tensor([0, 1]))  # the state saw the rows before the swap
    fresh, fresh_reps = run(swap)  # the state saw them already in the new order
    torch.testing.assert_close(reordered, fresh, **TOL)
    torch.testing.assert_close(reps, fresh_reps, **TOL)


def test_beam_search_with_full_budget_matches_unpatched():
    model = make_model("llama")
    ids, _ = random_batch(batch=1, length=30, pad=0)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
        with patched(model, "longheads", **FULL_BUDGET["longheads"]):
            assert torch.equal(model.generate(ids, **kwargs), reference)


def test_left_padded_row_generates_what_it_generates_alone():
    # Chunks start at each row's first real key, and generate() numbers positions from there: padding changes nothing.
    model = make_model("llama")
    ids, mask = random_batch(length=60, pad=9)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), patched(model, "longheads", **SMALL):
        both = model.generate(ids, attention_mask=mask, **kwargs)
        alone = model.generate(ids[1:, 9:], **kwargs)
    assert torch.equal(both[1, 60:], alone[0, 51:])


def test_a_new_sequence_starts_a_fresh_state():
    model = make_model("llama")
    first, second = (torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    with torch.no_grad(), patched(model, "longheads", **SMALL):
        alone = model.generate(second, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.generate(first, max_new_tokens=4, do_sample=False, pad_token_id=0)
        again = model.generate(second, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(alone, again)


def test_context_within_the_cap_runs_dense_attention():
    model = make_model("llama")
    ids, mask = random_batch(length=48)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        with patched(model, "longheads", chunk_size=8, cap=48):
            logits = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], reference[valid], **TOL)


# --- the eval CLI past the trained context ------------------------------------------------------------------------------

def test_cli_runs_dense_beside_a_context_extending_method_with_a_note(capsys):
    from hf_longattn.eval.cli import UsageError, check_lengths

    check_lengths([8192, 16384], 8192, allow_extrapolation=False, methods=["dense", "longheads"])
    note = capsys.readouterr().err
    assert "16384" in note and "longheads extend(s) the context" in note and "dense run there too" in note
    with pytest.raises(UsageError, match="none of the methods extends the context"):
        check_lengths([8192, 16384], 8192, allow_extrapolation=False, methods=["dense", "hip"])


def test_cli_niah_dense_and_longheads_past_the_trained_context_reaches_the_model(monkeypatch, tmp_path):
    from hf_longattn.eval.cli import main

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        raise Loaded

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    trained = LlamaConfig(**{**COMMON, "max_position_embeddings": 8192})
    monkeypatch.setattr("hf_longattn.eval.cli.load_config", lambda path, gguf_file: trained)
    monkeypatch.setattr("hf_longattn.bundled.load_model", load_model)
    with pytest.raises(Loaded):  # every argument check passed without --allow-extrapolation
        main(["niah", "--model", str(model_dir), "--methods", "dense,longheads", "--lengths", "8k,16k,32k",
              "--out", str(tmp_path / "out")])


def test_cli_refuses_longheads_on_a_model_whose_rope_it_cannot_honour():
    from hf_longattn.eval.cli import UsageError, check_model_for_methods

    config = LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UsageError, match="--methods longheads: .*dynamic"):
        check_model_for_methods(config, ["dense", "longheads"])
    check_model_for_methods(make_model("llama").config, ["dense", "longheads"])


# --- the selection kernel -------------------------------------------------------------------------------------------

SELECT_CASES = [  # (q_len, k_len, block_size_q, per query head, chunk_size, kernel's query tile)
    (70, 70, 4, False, 8, 16),  # prefill; the padded row's blocks straddle chunk boundaries
    (1, 90, 1, False, 8, 16),  # decode
    (9, 77, 4, True, 8, 16),  # a chunked-prefill call, one selection per query head
    (40, 100, 8, False, 8, 16),
    (200, 260, 32, False, 32, 16),  # two query tiles a block
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=["prefill", "decode", "chunked-per-head", "block8", "two-tiles"])
def test_selection_kernel_matches_reference(case):
    from hf_longattn.kernels.longheads_chunks import select_layout_reference, select_layout_triton

    q_len, k_len, block, per_head, chunk_size, block_m = case
    device = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 on CPU (tests/conftest.py)
    gen = torch.Generator().manual_seed(q_len)
    query, reps = torch.randn(2, 4, q_len, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    start, inv_freq = torch.tensor([0, 5]), layer_inv_freq(make_model("llama").config, 0)
    options = dict(k_len=k_len, first_block=1 if q_len > 8 else 0, n_blocks=(q_len - 1) // block, block_size_q=block,
                   chunk_size=chunk_size, num_chunks=6, scale=0.3, heads=4 if per_head else 2)
    options["n_blocks"] = max(options["n_blocks"], 1)
    expected = select_layout_reference(query, reps, start, inv_freq, **options)
    got = select_layout_triton(query.to(device), reps.to(device), start.to(device), inv_freq, block_m=block_m,
                               **options)
    for name, value in expected.items():
        assert torch.equal(got[name].cpu().long(), value.long()), name
    assert (expected["delta"] != 0).any()  # chunks moved: the case selects
    for name in ("kv_start", "q_offset"):  # one per (row, query block): prefill reads head 0's for all heads
        assert torch.equal(expected[name], expected[name][:, :1].expand_as(expected[name])), name


def test_the_kernels_chunk_vector_does_not_grow_with_the_state_up_to_128k():
    """A state's capacity doubles as chunks complete (32, 64, ... 512 chunks of 256 up to 128K); the kernels' vector
    of chunks is a compile-time size, and one that followed the capacity recompiled them at each doubling (several
    seconds of a chunked 128K prefill on the H200)."""
    from hf_longattn.kernels.longheads_chunks import chunk_pad

    assert {chunk_pad(n) for n in (1, 32, 64, 300, 512)} == {512}
    assert all(chunk_pad(n) >= n and chunk_pad(n) & (chunk_pad(n) - 1) == 0 for n in (513, 1000, 4096, 5000))


# --- the representatives kernel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_representatives_kernel_matches_reference(softcap):
    """Chunks read as the method reads them (strided views of [H, L, D] rows), a chunk size that is not a power of 2."""
    from hf_longattn.kernels.longheads_chunks import chunk_representatives_reference, chunk_representatives_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 on CPU (tests/conftest.py)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(heads, 36, 16, generator=gen) for heads in (4, 2, 2))
    views = [x.unflatten(1, (3, 12)).transpose(0, 1) for x in (q, k, v)]  # 3 chunks of 12: [3, H, 12, D]
    chunk_index, inv_freq = torch.tensor([2, 3, 4]), layer_inv_freq(make_model("llama").config, 0)
    expected = chunk_representatives_reference(*views, chunk_index, 12, inv_freq, 0.3, softcap)
    got = chunk_representatives_triton(*(x.to(device) for x in views), chunk_index.to(device), 12, inv_freq, 0.3,
                                       softcap)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_representatives_kernel_in_bf16_on_gpu_matches_reference():
    """Llama-3-8B's heads, chunks of 256 (the interpreter's bf16 dots are wrong: only the GPU checks bf16)."""
    from hf_longattn.kernels.longheads_chunks import chunk_representatives_reference, chunk_representatives_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(32, 64 * 256, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(8, 64 * 256, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    views = [x.unflatten(1, (64, 256)).transpose(0, 1) for x in (q, k, v)]
    chunk_index = torch.arange(100, 164, device="cuda")
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, device="cuda") / 128)
    got = chunk_representatives_triton(*views, chunk_index, 256, inv_freq, 128**-0.5, None)
    expected = chunk_representatives_reference(*(x.float() for x in views), chunk_index, 256, inv_freq, 128**-0.5, None)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def _through_triton(monkeypatch):
    """Every LongHeads kernel dispatched to Triton on CPU tensors too (run by the interpreter)."""
    from hf_longattn.kernels import ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(LongHeadsModule, "gather_rotate", gather_rotate_triton)
    monkeypatch.setattr(LongHeadsModule, "chunk_representatives", longheads_chunks.chunk_representatives_triton)
    monkeypatch.setattr(LongHeadsModule, "select_layout", lambda *args, **options:
                        longheads_chunks.select_layout_triton(*args, **options))


@pytest.mark.parametrize("path", ["interpreted", pytest.param("gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("q_len", [320, 322], ids=["whole-blocks-in-place", "padded-block"])
def test_prefill_through_the_kernels_matches_the_reference_path(q_len, path, monkeypatch):
    """The method's prefill through its Triton kernels (float32: the same selections) = through the PyTorch
    references: left padding, queries in transformers' memory order, blocks of 32 queries (the shared kernel's prefill
    path, not its decode path for up to 16), rounds of a few blocks."""
    for device in ("cpu", "cuda"):
        monkeypatch.setitem(LongHeadsModule._ROUND_ELEMENTS, device, 1 << 14)
    model = make_model("llama")
    starts = torch.tensor([0, 13])
    _, _, q, k, v = _method_inputs(model, starts, q_len, q_len, seed=7)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    options = dict(chunk_size=32, cap=192, block_size_q=32)

    def prefill(device):
        call = AttentionCall(0, 0.3, None, starts.to(device), {}, module=_module(model))
        return LongHeads(LongHeadsConfig(**options)).attend(q.to(device), k.to(device), v.to(device), call).cpu()

    expected = prefill("cpu")
    with monkeypatch.context() as patches:
        if path == "interpreted":
            _through_triton(patches)
        got = prefill("cpu" if path == "interpreted" else "cuda")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (expected - dense_attention(q, k, v, 0.3, None, kv_start=starts)).abs().max() > 1e-2  # chunks selected


# --- the one-launch decode step -------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [2, 4], ids=["per-kv-head", "per-query-head"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_decode_kernel_matches_reference(heads, softcap):
    """Selection, re-placement, attention and the merge in one launch = the prefill path's references composed, on a
    row that selects 3 of 9 candidate chunks, one that selects 3 of 5 after left padding, and one that fits whole."""
    from hf_longattn.kernels.longheads_decode import longheads_decode_reference, longheads_decode_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 on CPU (tests/conftest.py)
    gen = torch.Generator().manual_seed(heads)
    query = torch.randn(3, 4, 1, 16, generator=gen)
    key, value = torch.randn(3, 2, 90, 16, generator=gen), torch.randn(3, 2, 90, 16, generator=gen)
    reps = torch.randn(3, 4, 16, 16, generator=gen)  # room for 16 chunks, as the decode state grows it
    start, inv_freq = torch.tensor([0, 30, 45]), layer_inv_freq(make_model("llama").config, 0)
    options = dict(chunk_size=8, num_chunks=6, scale=0.3, softcap=softcap, heads=heads)
    expected = longheads_decode_reference(query, key, value, reps, start, inv_freq, **options)
    got = longheads_decode_triton(*(t.to(device) for t in (query, key, value, reps, start)), inv_freq, **options)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    # The row of 45 keys fits the cap (48): exact dense attention; the others are not.
    dense = dense_attention(query, key, value, 0.3, softcap, kv_start=start)
    torch.testing.assert_close(expected[2], dense[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[:2], dense[:2], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shared", [True, False], ids=["per-kv-head", "per-query-head"])
def test_decode_kernel_in_bf16_on_gpu_matches_reference(shared):
    """Llama-3-8B's heads over 32K keys in chunks of 256, cap 4096 (the interpreter's bf16 dots are wrong: only the GPU
    checks bf16). The reference runs in float32 on the same bf16 values."""
    from hf_longattn.kernels.longheads_decode import longheads_decode_reference, longheads_decode_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    key, value = (torch.randn(2, 8, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    start = torch.tensor([0, 1000], device="cuda", dtype=torch.int32)
    reps = torch.randn(2, 32, 128, 128, device="cuda", generator=gen)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, device="cuda") / 128)  # Llama 3's base, head_dim 128
    options = dict(chunk_size=256, num_chunks=16, scale=128**-0.5, softcap=None, heads=8 if shared else 32)
    got = longheads_decode_triton(query, key, value, reps, start, inv_freq, **options)
    expected = longheads_decode_reference(query.float(), key.float(), value.float(), reps, start, inv_freq, **options)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
