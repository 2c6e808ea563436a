"""The test a new user trusts most: the real SmolLM2-135M-Instruct, patched, finds a passkey in a ~2K-token haystack."""

import pytest
import torch

from hf_longattn import patched
from hf_longattn.eval.niah import make_samples


@pytest.mark.slow
def test_patched_smollm2_finds_the_passkey(smollm2):
    model, tokenizer = smollm2
    (sample,) = make_samples(tokenizer, lengths=[2048], depths=[50.0], samples_per_cell=1, haystack="essays")
    inputs = torch.tensor([sample.input_ids])
    generate = dict(attention_mask=torch.ones_like(inputs), max_new_tokens=sample.needle.max_new_tokens,
                    do_sample=False)
    with torch.no_grad():
        unpatched = model.generate(inputs, **generate)
        with patched(model, "dense"):
            dense = model.generate(inputs, **generate)
        # The sparse-pattern path with a budget covering the whole context: the same answer.
        with patched(model, "streaming", sink=16, window=1 << 20):
            pattern = model.generate(inputs, **generate)
    answer = tokenizer.decode(dense[0, inputs.shape[1]:])
    assert sample.needle.score(answer) == 1.0, (answer, sample.needle.answers)
    assert torch.equal(dense, unpatched)
    assert torch.equal(pattern, unpatched)
