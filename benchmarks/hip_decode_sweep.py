"""HiP's decode search by slice width and merge, and the sparse decode attention by split (needs a CUDA GPU).

One query over 128K keys, Llama-3-8B shape (32 query heads, 8 kv heads, head_dim 128), bf16, batch 1. Each entry is
(us as a replayed CUDA graph, us back to back eagerly with the host). What is varied:

* the search's slices (`decode_slices`; the defaults are SLICE_GROUPS = 16 groups a slice), the digit of the
  oversampled merge's radix select (`merge_bits`; 0 sorts instead), the log-sum-exp tiles (`tile_keys`) and warps;
  `score="logit"` and `decode_oversample=1` show what the estimate and the merge cost;
* the sparse decode attention on the default selection, by splits of the key tiles and key tile size (`BLOCK_N`).

    PYTHONPATH=$PWD python benchmarks/hip_decode_sweep.py benchmarks/results/hip_decode_search_h200/after.json

`--attend-merge` instead times the decode attention by key tile, splits and partials merged at a time (`MERGE`), on
the default selection and on a 2K sink+window pattern (the table of hip_decode_search_h200/README.md, fifth session):

    PYTHONPATH=$PWD python benchmarks/hip_decode_sweep.py attend_merge.json --attend-merge
"""

from __future__ import annotations

import json
import sys

import triton

import torch
import torch.nn.functional as F

from benchmarks.bench_hip import DIM, graph_us, loop_us, mask_options, qkv
from hf_longattn.kernels.hip_mask import hip_mask_triton
from hf_longattn.kernels.pattern import window_pattern
from hf_longattn.kernels.triton_decode import sparse_decode
from hf_longattn.methods.hip import HipConfig

SCALE = DIM**-0.5
# (preset, slices, launch overrides, config overrides): the variants measured on the H200 (results/.../README.md).
SEARCHES = (
    [("retrieval", s, {"merge_bits": 4}, {}) for s in (32, 64, 128, 256)]
    + [("paper", s, {"merge_bits": 4}, {}) for s in (16, 32, 64, 128)]
    + [("retrieval", s, {"merge_bits": b}, {}) for b in (0, 2) for s in (64, 128, 256)]
    + [("paper", s, {"merge_bits": b}, {}) for b in (0, 2) for s in (32, 64, 128)]
    + [("retrieval", 128, {"merge_bits": b}, {}) for b in (1, 8)]
    + [("retrieval", 128, dict(launch, merge_bits=4), {}) for launch in (
        {"tile_keys": 64}, {"tile_keys": 256}, {"num_warps": 2}, {"num_warps": 8})]
    + [("retrieval", 128, {"merge_bits": 0, "num_warps": 8}, {}),
       ("retrieval", 128, {"merge_bits": 4}, {"score": "logit"}),
       ("retrieval", 64, {}, {"decode_oversample": 1}), ("retrieval", 128, {}, {"decode_oversample": 1})]
)
ATTENDS = [{"BLOCK_N": n, **({"splits": s} if s else {})} for s in (None, 4, 8, 13, 16) for n in (64, 128)]


def attend_merge(q, k, v) -> dict:
    """The decode attention's graph-replayed us by (pattern, key tile, splits, MERGE)."""
    patterns = {"retrieval": hip_mask_triton(q, k, **mask_options(HipConfig(), decode=True)),
                "window 2K": window_pattern(1, 8, 1, 128, 128, 128, 1920, device="cuda")}
    out = {}
    for name, pattern in patterns.items():
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        for block_n in (64, 128):
            # None: the default split count (one wave of programs); two waves, as the default once was; 8; 16
            for splits in (None, triton.cdiv(2 * sms, 8), 8, 16):
                for merge in (1, 2, 4, 8):
                    config = {"BLOCK_N": block_n, "MERGE": merge, **({"splits": splits} if splits else {})}
                    attend = lambda: sparse_decode(q, k, v, pattern, SCALE, None, None, config=config)  # noqa: E731
                    out[f"attend {name} {config}"] = graph_us(attend)
                    print(list(out.items())[-1], flush=True)
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("hip_decode_sweep.py needs a CUDA GPU")
    q, k, v = qkv(1, 131072, seed=1)
    if "--attend-merge" in sys.argv:
        with open(sys.argv[1], "w") as f:
            json.dump(attend_merge(q, k, v), f, indent=1)
        return
    dense = lambda: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)  # noqa: E731
    out = {"dense SDPA": (graph_us(dense), loop_us(dense))}
    for preset, slices, launch, extra in SEARCHES:
        options = mask_options(HipConfig(preset=preset, decode_slices=slices, **extra), decode=True)
        search = lambda: hip_mask_triton(q, k, launch=launch, **options)  # noqa: E731
        out[f"search {preset} slices={slices} {launch} {extra}"] = (graph_us(search), loop_us(search, 50))
        print(list(out.items())[-1], flush=True)
    pattern = hip_mask_triton(q, k, **mask_options(HipConfig(), decode=True))
    for config in ATTENDS:
        attend = lambda: sparse_decode(q, k, v, pattern, SCALE, None, None, config=config)  # noqa: E731
        out[f"attend retrieval {config}"] = (graph_us(attend), loop_us(attend))
        print(list(out.items())[-1], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
