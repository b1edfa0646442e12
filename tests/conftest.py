"""Shared pytest fixtures (offline: no hub, no network). Add new fixtures in their own clearly named section."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

# ------------------------------------------------------------------------------------------- real task data

# The real GLUE/SuperGLUE files live next to the repository, never inside it (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The ../shared/data folder, or skip when this checkout has none next to it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real task data not found at {SHARED_DATA} (expected ../shared/data next to the repository)")
    return SHARED_DATA


# ------------------------------------------------------------------------------- tiny tokenizer and tiny LM

_CORPUS = [
    "a gripping film . It was great",
    "a dull and tedious mess . It was terrible",
    "Does this mean that the hypothesis is true? Yes or No?\nYes",
    "Suppose the premise. Can we infer that the claim? Yes, No, or Maybe?\nMaybe",
    "The man turned on the faucet so water flowed from the spout.",
    "I found this answer. Is that correct? Yes or No?\nNo",
]


def build_tiny_tokenizer(add_eos: bool = False, with_pad: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 300) trained on a few sentences; adds <s> in front (and </s> after if add_eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    single = "<s> $A </s>" if add_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, tok.token_to_id(s)) for s in ("<s>", "</s>")]
    )
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm() -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (vocab 300, hidden 32), fp32, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).eval()
