"""``VarianceNet``: one small MLP per block, stacked, evaluated with one batched einsum.

The paper's PertNN_b is ``Linear(5, 64) -> Tanh -> Linear(64, 1) -> abs`` per block (reference
§1.4), i.e. 449 parameters per block, independently initialised with PyTorch's default
U(+-1/sqrt(fan_in)). Here the B MLPs are four stacked tensors, so B blocks cost one kernel and a
handful of safetensors entries instead of B modules:

    h_b     = act(x_b @ w1_b + b1_b)          x [B, F'], w1 [B, F', H], b1 [B, H]
    sigma_b = positive(h_b . w2_b + b2_b)     w2 [B, H], b2 [B]

Options beyond the paper (``NetSpec``, all off by default): softplus instead of |.|, a learned
embedding per block kind and a relative-depth input (both appended to the features, F' = F + extras),
``shared`` (one MLP for every block, leading dimension 1, so the net transfers across depths), and
``kind_scale``: a learned log-scale per block kind multiplying the output,

    sigma_b = positive(...) * exp(kind_log_scale[kind(b)])     kind_log_scale [num_kinds], zeros at init,

so a net is its untrained twin (same seed) re-weighted by a per-kind table, and ES can fit that table alone
(``es_space: kind``, ~11 numbers on a Llama) instead of searching the MLPs.
With the static-curvature feature the net also holds the measured per-block values (buffer
``static_curvature`` [B]), so they are stored in the artifact with the weights.
The net's parameters are fp32 whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import einops
import torch
from torch import Tensor, nn

from l2zo.engine.blocks import block_depth, block_kind
from l2zo.errors import L2ZOError, unknown_choice
from l2zo.learned.features import FeatureSpec

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
}
POSITIVE: dict[str, Callable[[Tensor], Tensor]] = {"abs": torch.abs, "softplus": nn.functional.softplus}


@dataclass(frozen=True)
class NetSpec:
    """Architecture of the variance net; the defaults are the paper's.

    Attributes:
        hidden: H, the hidden width.
        activation: one of ``ACTIVATIONS``.
        positive: "abs" (the paper) or "softplus".
        features: feature options (``FeatureSpec``).
        role_embedding_dim: > 0 adds a learned embedding per block kind (``block_kind``) to the inputs.
        depth_feature: adds layer_index / num_layers (``block_depth``; -1 for blocks outside the layers).
        shared: one MLP for all blocks; tell blocks apart with role/depth inputs.
        kind_scale: multiplies the output by exp(kind_log_scale[kind]), a learned log-scale per block kind (zeros
            at init, so the net starts as the same seed's net without it).
    """

    hidden: int = 64
    activation: str = "tanh"
    positive: str = "abs"
    features: FeatureSpec = field(default_factory=FeatureSpec)
    role_embedding_dim: int = 0
    depth_feature: bool = False
    shared: bool = False
    kind_scale: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise unknown_choice("activation", self.activation, ACTIVATIONS)
        if self.positive not in POSITIVE:
            raise unknown_choice("positive", self.positive, POSITIVE)
        if self.hidden < 1 or self.role_embedding_dim < 0:
            raise L2ZOError(
                f"hidden must be >= 1 and role_embedding_dim >= 0, got {self.hidden}, {self.role_embedding_dim}"
            )

    @property
    def num_inputs(self) -> int:
        """F' = the features (the paper's 5 + the extras on) + depth (1) + role embedding (role_embedding_dim)."""
        return self.features.num_features + int(self.depth_feature) + self.role_embedding_dim

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["features"] = self.features.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise L2ZOError(
                f"unknown variance-net option(s) {', '.join(unknown)}; this l2zo knows {', '.join(sorted(known))}"
            )
        d = dict(d)
        feats = d.pop("features", {}) or {}
        bad = sorted(set(feats) - {f.name for f in fields(FeatureSpec)})
        if bad:
            raise L2ZOError(f"unknown feature option(s) {', '.join(bad)}; this l2zo knows "
                            f"{', '.join(f.name for f in fields(FeatureSpec))}: use the l2zo version that wrote it")  # fmt: skip
        return cls(features=FeatureSpec(**feats), **d)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float) -> Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class VarianceNet(nn.Module):
    """Per-block MLPs F' -> H -> 1 stacked: w1 [B, F', H], b1 [B, H], w2 [B, H], b2 [B] (leading dim 1 if shared).

    Args:
        spec: architecture.
        block_names: the blocks, in optimizer order; kinds and depths are derived from the names.
        seed: init seed; every block's MLP gets its own independent U(+-1/sqrt(fan_in)) draws.
    """

    def __init__(self, spec: NetSpec, block_names: Sequence[str], seed: int = 0) -> None:
        super().__init__()
        if not block_names:
            raise L2ZOError("a VarianceNet needs at least one block")
        self.spec = spec
        self.block_names: list[str] = list(block_names)
        self.kinds: list[str] = sorted({block_kind(n) for n in self.block_names})
        rows = 1 if spec.shared else len(self.block_names)
        f_in, hidden = spec.num_inputs, spec.hidden
        gen = torch.Generator().manual_seed(int(seed))
        # PyTorch's Linear default (kaiming_uniform(a=sqrt(5)) and its bias rule) is U(+-1/sqrt(fan_in)).
        self.w1 = nn.Parameter(_uniform(gen, (rows, f_in, hidden), 1 / math.sqrt(f_in)))
        self.b1 = nn.Parameter(_uniform(gen, (rows, hidden), 1 / math.sqrt(f_in)))
        self.w2 = nn.Parameter(_uniform(gen, (rows, hidden), 1 / math.sqrt(hidden)))
        self.b2 = nn.Parameter(_uniform(gen, (rows,), 1 / math.sqrt(hidden)))
        if spec.role_embedding_dim:
            self.role_emb = nn.Parameter(torch.randn(len(self.kinds), spec.role_embedding_dim, generator=gen))
        if spec.kind_scale:  # zeros, drawn from no generator: the MLPs are the same seed's net without it
            self.kind_log_scale = nn.Parameter(torch.zeros(len(self.kinds), dtype=torch.float32))
        if spec.features.static_curvature:
            # Measured once per base model at meta-training time (``l2zo.blockstats.static``), not learned; a
            # persistent buffer, so it travels in the artifact's safetensors (and its sha256) and in checkpoints.
            self.register_buffer("static_curvature", torch.zeros(len(self.block_names), dtype=torch.float32))
        # Derived from the names, so not saved (persistent=False): the artifact stores only what is learned.
        kind_ix = [self.kinds.index(block_kind(n)) for n in self.block_names]
        self.register_buffer("kind_index", torch.tensor(kind_ix, dtype=torch.long), persistent=False)
        depths = [block_depth(n) for n in self.block_names]
        num_layers = max((d for d in depths if d is not None), default=-1) + 1
        rel = [-1.0 if d is None else d / max(num_layers, 1) for d in depths]
        self.register_buffer("depth", torch.tensor(rel, dtype=torch.float32), persistent=False)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def inputs(self, features: Tensor) -> Tensor:
        """[B, F] features -> [B, F'] net inputs (features, then depth, then role embedding)."""
        x = features.to(device=self.w1.device, dtype=self.w1.dtype)
        extras = []
        if self.spec.depth_feature:
            extras.append(self.depth[:, None])
        if self.spec.role_embedding_dim:
            extras.append(self.role_emb[self.kind_index])
        return torch.cat([x, *extras], dim=1) if extras else x

    def forward(self, features: Tensor) -> Tensor:
        """[B, F] fp32 features -> [B] raw (unnormalised) sigma >= 0; differentiable w.r.t. the parameters."""
        if features.shape != (self.num_blocks, self.spec.features.num_features):
            expected = [self.num_blocks, self.spec.features.num_features]
            raise L2ZOError(f"VarianceNet expects features {expected}, got {list(features.shape)}")
        # The net is tiny and its output scales every block's step: keep it in the net's dtype even when the
        # caller runs under bf16 autocast (bf16-mixed meta-training or fine-tuning).
        with torch.autocast(features.device.type, enabled=False):
            raw = self._mlp(self.inputs(features))
            return raw * self.kind_log_scale[self.kind_index].exp() if self.spec.kind_scale else raw

    def _mlp(self, x: Tensor) -> Tensor:
        act, pos = ACTIVATIONS[self.spec.activation], POSITIVE[self.spec.positive]
        if self.spec.shared:
            h = act(x @ self.w1[0] + self.b1[0])
            return pos(h @ self.w2[0] + self.b2[0])
        h = act(einops.einsum(x, self.w1, "b f, b f h -> b h") + self.b1)
        return pos(einops.einsum(h, self.w2, "b h, b h -> b") + self.b2)

    @torch.no_grad()
    def copy_rows_from(self, src: VarianceNet, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the MLPs of ``src`` block ``i`` into this net's block ``j`` for each ``(i, j)`` in ``pairs``.

        Shared nets copy their one MLP; role embeddings and kind log-scales are copied by kind name for kinds both
        nets know.
        """
        if src.spec != self.spec:
            raise L2ZOError("copy_rows_from needs two nets with the same NetSpec")
        if self.spec.shared:
            for name in ("w1", "b1", "w2", "b2"):
                getattr(self, name).copy_(getattr(src, name))
        elif pairs:
            i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            for name in ("w1", "b1", "w2", "b2"):
                getattr(self, name)[j] = getattr(src, name)[i].to(getattr(self, name))
        if self.spec.features.static_curvature and pairs:
            i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            self.static_curvature[j] = src.static_curvature[i]
        if self.spec.role_embedding_dim:
            for k, kind in enumerate(self.kinds):
                if kind in src.kinds:
                    self.role_emb[k] = src.role_emb[src.kinds.index(kind)]
        if self.spec.kind_scale:
            for k, kind in enumerate(self.kinds):
                if kind in src.kinds:
                    self.kind_log_scale[k] = src.kind_log_scale[src.kinds.index(kind)]
