"""Where HiP's search time goes on one attention layer (Llama-3-8B shape, bf16, batch 1; needs a CUDA GPU).

Decode at 128K and 32K: the search of each preset as it is, without the log-sum-exp estimate (score="logit"),
without oversampling (decode_oversample=1) and without both, and the sparse attention on the default selection; dense
SDPA beside them. Each entry is (us per call as a replayed CUDA graph, us per call back to back eagerly). Prefill at
128K: (the search's time, the attention's time) in us by query_stride (the queries that score each key block);
cuDNN beside them. The variants measure cost only: without the estimate or the oversampling the selection loses
recall (kernels/hip_mask.py).

    PYTHONPATH=$PWD python benchmarks/hip_search_breakdown.py benchmarks/results/hip_search_breakdown_h200/hip_breakdown.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_hip import DIM, gpu_us, graph_us, loop_us, mask_options, qkv
from hf_longattn.kernels import sparse_attention
from hf_longattn.kernels.hip_mask import hip_mask_triton
from hf_longattn.methods.hip import HipConfig

SCALE = DIM**-0.5
VARIANTS = ({}, {"score": "logit"}, {"decode_oversample": 1}, {"score": "logit", "decode_oversample": 1})


def decode(out: dict, context: int) -> None:
    q, k, v = qkv(1, context, seed=1)
    dense = lambda: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)  # noqa: E731
    out[f"{context} dense"] = (graph_us(dense), loop_us(dense))
    for preset in ("retrieval", "paper"):
        for extra in VARIANTS:
            config = HipConfig(preset=preset, **extra)
            options = mask_options(config, decode=True)
            search = lambda: hip_mask_triton(q, k, **options)  # noqa: E731
            out[f"{context} {preset} {extra} slices={config.decode_slices}"] = (graph_us(search), loop_us(search))
    pattern = hip_mask_triton(q, k, **mask_options(HipConfig(), decode=True))
    attend = lambda: sparse_attention(q, k, v, pattern, scale=SCALE)  # noqa: E731
    out[f"{context} attend retrieval"] = (graph_us(attend), loop_us(attend))


def cudnn_prefill_us(q, k, v) -> float:
    k_full, v_full = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))  # cuDNN takes equal heads
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return gpu_us(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=SCALE))


def prefill(out: dict, context: int) -> None:
    q, k, v = qkv(context, context, seed=0)
    out["prefill dense cudnn"] = cudnn_prefill_us(q, k, v)
    for preset in ("retrieval", "paper"):
        for stride in (2, 4, 8, 16):
            options = mask_options(HipConfig(preset=preset, query_stride=stride), decode=False)
            pattern = hip_mask_triton(q, k, **options)
            out[f"prefill {preset} stride {stride}"] = (gpu_us(lambda: hip_mask_triton(q, k, **options)),
                                                        gpu_us(lambda: sparse_attention(q, k, v, pattern, scale=SCALE)))


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("hip_search_breakdown.py needs a CUDA GPU")
    out: dict = {}
    for context in (131072, 32768):
        decode(out, context)
        print(json.dumps(out, indent=1), flush=True)
    prefill(out, 131072)
    print(json.dumps(out, indent=1), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
