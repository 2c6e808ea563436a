"""accelerate with a patched model: part of the model offloaded gives the logits of the model in memory (patched
before or after dispatch); layers split over two GPUs run their kernels on their own GPU; `accelerate launch` runs
the lm-eval entry point data-parallel with the scores of one process."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import FULL_BUDGET, make_model

HIP = {"k": 16, "window": 16, "sink": 4, "block_size_q": 16}  # sparse on a prompt of a few dozen tokens
PROMPT = ("Some facts. The sky is blue. Grass is green. Snow is white. Coal is black. Blood is red. The sun is yellow. "
          "Oranges are orange. Violets are purple. Lemons are yellow. Limes are green. The sea is blue. Clouds are "
          "white. The first ten prime numbers, in order, are 2, 3, 5, 7,")  # 81 tokens: HiP selects among them
REPO = Path(__file__).resolve().parents[1]


def logits_and_tokens(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    return logits.cpu(), tokens.cpu()


@pytest.mark.slow
def test_offloaded_patched_model_gives_the_logits_of_the_model_in_memory(smollm2, smollm2_dir, tmp_path):
    from accelerate import dispatch_model, infer_auto_device_map

    from hf_longattn import patch_model, patched
    from hf_longattn.serving.loading import load_for_serving

    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > sum(HIP.values())  # HiP selects among the keys: the sparse path runs
    with patched(model, "hip", **HIP):
        expected_logits, expected_tokens = logits_and_tokens(model, ids)

    # Patched after dispatch, the way `hf-longattn serve` loads: from_pretrained(device_map="auto", max_memory=...).
    after, _ = load_for_serving(str(smollm2_dir), None, "hip", HIP, "float32", "auto", {"cpu": "250MB"},
                                str(tmp_path / "a"))
    assert {"cpu", "disk"} <= set(after.hf_device_map.values())
    logits, tokens = logits_and_tokens(after, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    del after

    # Patched before dispatch.
    before = patch_model(copy.deepcopy(model), "hip", **HIP)
    device_map = infer_auto_device_map(before, max_memory={"cpu": "250MB"},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    assert "disk" in device_map.values()
    dispatch_model(before, device_map, offload_dir=str(tmp_path / "b"))
    logits, tokens = logits_and_tokens(before, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
         "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method, options", [("hip", HIP), *FULL_BUDGET.items()], ids=["hip-sparse", *FULL_BUDGET])
def test_layers_split_over_two_gpus_give_the_logits_of_one_gpu(method, options):
    """Triton launches on the current device: a layer on cuda:1 must still run its kernels on cuda:1."""
    from accelerate import dispatch_model

    from hf_longattn import patch_model

    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    one = patch_model(make_model("llama").to("cuda:0"), method, **options)
    expected_logits, expected_tokens = logits_and_tokens(one, ids.to("cuda:0"))
    split = dispatch_model(patch_model(make_model("llama"), method, **options), SPLIT)
    logits, tokens = logits_and_tokens(split, ids.to("cuda:0"))
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)


def lm_eval_args(model: Path, out: Path) -> list[str]:
    metadata = {"tokenizer": str(model), "max_seq_lengths": [512], "num_samples": 2}
    return ["run", "--model", "hf-longattn", "--model_args",
            f"pretrained={model},method=streaming,window=256,sink=4,dtype=float32",
            "--tasks", "longattn_ruler_niah_single_repeat", "--metadata", json.dumps(metadata),
            "--gen_kwargs", "max_gen_toks=8", "--device", "cpu", "--batch_size", "1",
            "--output_path", str(out), "--log_samples"]


def results(out: Path) -> tuple[dict, dict]:
    """(metrics, {doc_id: responses}) of the one lm-eval run written under `out`."""
    [result_file] = list(out.rglob("results_*.json"))
    [samples_file] = list(out.rglob("samples_*.jsonl"))
    metrics = json.loads(result_file.read_text())["results"]["longattn_ruler_niah_single_repeat"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return metrics, {s["doc_id"]: s["resps"] for s in samples}


@pytest.mark.slow
def test_accelerate_launch_runs_lm_eval_data_parallel_with_the_scores_of_one_process(smollm2_dir, tmp_path,
                                                                                    monkeypatch):
    pytest.importorskip("lm_eval")
    from hf_longattn.eval.lm_eval_model import lm_eval_main

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    # On CPUs `accelerate launch --cpu` starts a single process (its simple launcher); --multi_gpu with
    # ACCELERATE_USE_CPU starts N processes through torchrun, which accelerate runs as MULTI_CPU over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "hf_longattn.eval", "lm-eval", *lm_eval_args(smollm2_dir, tmp_path / "two")]
    done = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "on rank 1" in done.stderr + done.stdout  # lm-eval gave the second process its own share

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval_main(lm_eval_args(smollm2_dir, tmp_path / "one"))

    two_metrics, two_responses = results(tmp_path / "two")
    one_metrics, one_responses = results(tmp_path / "one")
    assert len(one_responses) == 2 and two_responses == one_responses
    assert two_metrics["score,none"] == one_metrics["score,none"]
