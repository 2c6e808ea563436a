"""Small random-weight models of every supported family (no downloads): the dense output is the reference."""

import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM, GemmaConfig, GemmaForCausalLM,
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
)

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 512})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=24)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**{**COMMON, "head_dim": 32})),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        **{**COMMON, "head_dim": 32}, sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    "gemma3_text": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **{**COMMON, "head_dim": 32, "num_hidden_layers": 6}, sliding_window=16, query_pre_attn_scalar=24)),
}


def make_model(family: str, attn_implementation: str = "eager", dtype=torch.float32):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def random_batch(batch=2, length=40, pad=7, seed=0, side="left"):
    """Token ids and attention mask; with batch > 1 the second row is padded by `pad` tokens on `side`."""
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        pads = slice(0, pad) if side == "left" else slice(length - pad, length)
        mask[1, pads], ids[1, pads] = 0, 0
    return ids, mask


def assert_prefill_matches_unpatched(model, method: str, options: dict, **tolerance):
    """Patched with `method`, the model's logits on a left-padded batch equal its unpatched logits (real tokens)."""
    from hf_longattn import patched

    ids, mask = random_batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        with patched(model, method, **options):
            logits = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], reference[valid], **tolerance)


# Options under which each method's selection covers every key of the tiny test contexts (<= 128 tokens), so that it
# must reproduce the unpatched model exactly. A new method adds its entry here and joins every exactness test.
FULL_BUDGET = {
    "dense": {},
    "streaming": {"sink": 0, "window": 1 << 20, "block_size_q": 16},
    "blocktopk": {"k": 256, "block_size_q": 8, "block_size_k": 8, "sink": 2, "window": 4},
    "hip": {"k": 128, "block_size_q": 8, "block_size_k": 2, "query_stride": 2, "sink": 2, "window": 4,
            "refresh_interval": 1},
    # Leaves of 16-31 tokens, blocks of 8 and every key sampled: the recursion, the sorted blocks and the residual
    # all run, and together they are exact.
    "hyper": {"min_seq_len": 16, "block_size": 8, "sink": 0, "sample_size": 1 << 20, "last_layers": "all"},
    "dhsa": {"budget": 128, "block_size_q": 8, "block_size_k": 4, "chunk_size": 8, "max_chunk": 16, "sink": 2,
             "window": 4},
    "longheads": {"chunk_size": 8, "cap": 128, "block_size_q": 4},
}
