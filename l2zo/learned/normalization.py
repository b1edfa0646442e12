"""The paper's sigma normalisation (reference §1.5), with every block weight n_b explicit.

    c = sqrt( sum_b n_b / sum_b n_b sigma_b^2 ),   sigma~_b = c * sigma_b,   so  sum_b n_b sigma~_b^2 = sum_b n_b

With n_b = numel_b this makes E||u||^2 equal MeZO's, so sigma only sets the *relative* scale of the
blocks and the learning rate keeps MeZO's meaning. c is a constant of the step (detached), as in
the official code. The paper counts an embedding as 15 * batch_size active rows (a proxy for the
rows that receive gradient) while perturbing the whole matrix; rule "paper" reproduces that, finding
embeddings by module type (``nn.Embedding``), never by parameter name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from l2zo.engine.blocks import Block
from l2zo.errors import L2ZOError, unknown_choice

# "none" is the paper's "without normalisation" ablation: c = 1 and the raw sigma is used as is.
NORMALIZATION_RULES: tuple[str, ...] = ("numel", "paper", "none")
EMBEDDING_ACTIVE_ROWS_PER_EXAMPLE = 15  # the official code's constant (15 * batch rows of the embedding)


def _storage_key(p: Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))


def embedding_params(model: nn.Module) -> dict[tuple[int, int, tuple[int, ...]], int]:
    """Parameters owned directly by an ``nn.Embedding`` (or a subclass), keyed by storage: ``{key: embedding_dim}``.

    Keyed by storage rather than object identity because ``partition`` de-duplicates tied weights by
    storage: the block kept may be another Parameter object over the embedding's memory.
    """
    out: dict[tuple[int, int, tuple[int, ...]], int] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                out[_storage_key(p)] = int(m.embedding_dim)
    return out


def block_weights(
    blocks: Sequence[Block], rule: str = "numel", *, model: nn.Module | None = None, batch_size: int = 16
) -> Tensor:
    """The normalisation weight n_b of every block.

    Args:
        blocks: the optimizer's blocks.
        rule: "numel" (n_b = numel/1e6), "paper" (the same, except blocks owned by an ``nn.Embedding``:
            15 * batch_size * embedding_dim / 1e6), or "none" (numel/1e6, but the optimizer skips normalising).
        model: the module owning the blocks; needed by "paper" to find embeddings.
        batch_size: the global training batch size (rule "paper").

    Returns:
        [B] float64 on CPU (sums over hundreds of blocks stay exact enough to keep c == 1 at sigma == 1).
    """
    if rule not in NORMALIZATION_RULES:
        raise unknown_choice("normalization rule", rule, NORMALIZATION_RULES)
    n = torch.tensor([b.numel / 1e6 for b in blocks], dtype=torch.float64)
    if rule == "paper":
        if model is None:
            raise L2ZOError(
                "normalization 'paper' needs the model (to find its nn.Embedding blocks); build the optimizer "
                "from the model, not from a list of parameters, or use normalization='numel'"
            )
        if batch_size < 1:
            raise L2ZOError(f"batch_size must be >= 1 for normalization 'paper', got {batch_size}")
        emb = embedding_params(model)
        for b in blocks:
            dim = emb.get(_storage_key(b.param))
            if dim is not None:
                n[b.index] = EMBEDDING_ACTIVE_ROWS_PER_EXAMPLE * batch_size * dim / 1e6
    return n


def normalize_sigma(sigma: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Scale sigma so that sum_b n_b (c sigma_b)^2 = sum_b n_b.

    Args:
        sigma: [B] raw sigma (may carry grad, for meta-training).
        n: [B] block weights from ``block_weights``.

    Returns:
        (c, c * sigma): c a detached 0-dim float64 tensor; c * sigma [B] in sigma's dtype, differentiable
        through sigma only. An all-zero sigma gives c = 0-safe finite scaling (c * sigma = 0, no NaN).
    """
    n = n.to(device=sigma.device, dtype=torch.float64)
    s = sigma.detach().to(torch.float64)
    denom = (n * s * s).sum()
    # tiny floor: an all-zero sigma must give a zero step, not 0 * inf = nan
    c = torch.sqrt(n.sum() / denom.clamp_min(1e-300))
    return c, sigma * c.to(sigma.dtype)
