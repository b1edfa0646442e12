"""Small builders shared by the engine, optimizer and training tests (no network, no files)."""

from __future__ import annotations

import math

import torch
import transformers


def tiny_llama(tie: bool = True, seed: int = 0, vocab: int = 97, hidden: int = 16, layers: int = 2) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama built from a config (eager attention, fp32)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32 for a [B, T] batch of token ids."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Quadratic(torch.nn.Module):
    """L(theta) = 0.5 * sum_b theta_b^T A_b theta_b + b_b^T theta_b over two blocks (a matrix and a vector)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3, 2, generator=g))
        self.v = torch.nn.Parameter(torch.randn(4, generator=g))
        self.a_w = torch.rand(6, generator=g) + 0.5
        self.a_v = torch.rand(4, generator=g) + 0.5
        self.b_w = torch.randn(6, generator=g)
        self.b_v = torch.randn(4, generator=g)

    def loss(self) -> torch.Tensor:
        w, v = self.w.reshape(-1), self.v
        return (
            0.5 * (self.a_w * w * w).sum()
            + (self.b_w * w).sum()
            + 0.5 * (self.a_v * v * v).sum()
            + (self.b_v * v).sum()
        )

    def grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return (self.a_w * self.w.reshape(-1) + self.b_w).reshape(3, 2), self.a_v * self.v + self.b_v


class LinearModel(torch.nn.Module):
    """A two-block fp64 linear model for meta-gradient checks: L = mean((x W^T + v - y)^2)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + self.v


def exact_weight_stats(blocks, device=None) -> torch.Tensor:
    """[B, 2] mean and unbiased var in fp32, exact for fp64 weights (weight_stats' stand-in in gradient checks)."""
    return torch.stack([torch.stack(torch.var_mean(b.param.detach())[::-1]).float() for b in blocks])


def block_stats(G, noise, tau, gHg, n):
    """``BlockStats`` from per-block lists (float64); the Fisher and gFg equal tau and gHg, the errors are nan."""
    from l2zo.blockstats import BlockStats

    t = [torch.tensor(x, dtype=torch.float64) for x in (G, noise, tau, gHg, n)]
    nan = torch.full_like(t[0], math.nan)
    return BlockStats(
        names=tuple(f"b{i}" for i in range(len(G))), kinds=tuple("w" for _ in G), n=t[4], G=t[0], noise=t[1],
        tau=t[2], gHg=t[3], G_se=nan, noise_se=nan, tau_se=nan, gHg_se=nan, fisher=t[2], gFg=t[3], fisher_se=nan,
        gFg_se=nan, loss=0.0, pairs=1, probes=1,
    )  # fmt: skip
