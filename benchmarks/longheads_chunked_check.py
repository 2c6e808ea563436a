"""LongHeads' prefill of one layer at 128K, in one call and in chunks of 8192 (as `prefill_chunk_size=8192` runs it),
to check that a state growing chunk by chunk compiles no kernel again (Llama-3-8B shape, bf16; needs a CUDA GPU).

The first call at 128K compiles the kernels; then each timing is one run, synchronised: unchunked, chunked twice
(the first chunked run would pay any recompilation), unchunked again.

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/longheads_chunked_check.py
"""

import sys
import time

import torch

from bench_longheads import fresh_call, inputs
from hf_longattn.methods.longheads import LongHeads, LongHeadsConfig

LENGTH, CHUNK = 131072, 8192


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("longheads_chunked_check.py needs a CUDA GPU")
    q, k, v = inputs(LENGTH, LENGTH)
    method = LongHeads(LongHeadsConfig())
    method.attend(q, k, v, fresh_call())  # compiles the kernels at 128K

    def unchunked():
        method.attend(q, k, v, fresh_call())

    def chunked():
        state: dict = {}
        for end in range(CHUNK, LENGTH + 1, CHUNK):
            method.attend(q[:, :, end - CHUNK:end], k[:, :, :end], v[:, :, :end], fresh_call(state))

    for name, fn in (("unchunked", unchunked), ("chunked first", chunked), ("chunked again", chunked),
                     ("unchunked again", unchunked)):
        print(name, timed(fn), flush=True)


if __name__ == "__main__":
    main()
