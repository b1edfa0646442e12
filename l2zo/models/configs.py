"""Randomly initialised Llamas built from a config, for scaling benchmarks (``l2zo bench --model llama-30m``).

They share the tiny world's tokenizer (vocabulary 1024), so almost all of their parameters are in the
transformer blocks, and their proportions (head dim 64, GQA, SwiGLU ~2.7x) follow SmolLM2's. The weights
are random (seed 0): good for timing and memory, meaningless for accuracy.
"""

from __future__ import annotations

import torch
import transformers

# name -> (hidden, intermediate, layers, heads, kv heads)
_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "llama-10m": (320, 864, 8, 5, 5),
    "llama-30m": (512, 1376, 10, 8, 4),
}
CONFIG_MODELS: dict[str, str] = {
    name: f"random-init Llama, ~{name.split('-')[1].upper()} parameters, tiny's tokenizer (benchmarks only)"
    for name in _SHAPES
}


def config_model(name: str, vocab_size: int, attn_implementation: str | None = None) -> transformers.LlamaForCausalLM:
    """Build ``name`` (a key of ``CONFIG_MODELS``) in fp32, eval mode, initialised from seed 0."""
    hidden, inter, layers, heads, kv = _SHAPES[name]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    return model.float().eval()
