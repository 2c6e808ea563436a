"""The test a new user trusts most: the real SmolLM2-135M-Instruct, patched, finds a passkey in a ~2K-token haystack."""

import pytest
import torch

from hf_longattn import patched

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY = 40917


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int):
    repeats = n_tokens // len(tokenizer(FILLER).input_ids)
    parts = [FILLER] * repeats
    parts.insert(int(repeats * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    message = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
               + "".join(parts) + "\nWhat is the pass key?")
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")


@pytest.mark.slow
def test_patched_smollm2_finds_the_passkey(smollm2):
    model, tokenizer = smollm2
    inputs = passkey_prompt(tokenizer, 2000, 0.5, PASSKEY)
    assert 1900 < inputs.input_ids.shape[1] < 2200
    generate = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        unpatched = model.generate(**inputs, **generate)
        with patched(model, "dense"):
            dense = model.generate(**inputs, **generate)
        # The sparse-pattern path with a budget covering the whole context: the same answer.
        with patched(model, "streaming", sink=16, window=1 << 20):
            pattern = model.generate(**inputs, **generate)
    answer = tokenizer.decode(dense[0, inputs.input_ids.shape[1]:])
    assert str(PASSKEY) in answer
    assert torch.equal(dense, unpatched)
    assert torch.equal(pattern, unpatched)
