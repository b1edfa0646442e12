"""Per-block first-order and curvature statistics at one model state, from gradients and Hessian-vector products.

For two independent minibatches a, b (same size as a fine-tuning batch) with gradients g^(a), g^(b):

    G_b     = <g_b^(a), g_b^(b)>                      unbiased for ||grad_b L||^2 (L: the loss over the train set)
    noise_b = (||g_b^(a)||^2 + ||g_b^(b)||^2)/2 - G_b  unbiased for tr(C_b), the minibatch-gradient covariance
    tau_b   = v_b^T (H v)_b, v Rademacher (Hutchinson) unbiased for tr(H_bb), H the Hessian of L
    gHg_b   = r_b <g_b^(a), (H^(b) w)_b>, w = sum_c r_c g_c^(a), r_c = +-1 per block
                                                       unbiased for E[g_b^T H_bb g_b] with g a minibatch gradient

and, where the loss is a cross-entropy whose labels can be drawn from the model (classification tasks), the
Fisher (the generalised Gauss-Newton of the cross-entropy; positive semi-definite, unlike H):

    F_b     = B ||g~_b||^2,  g~ the batch gradient at labels y ~ p_theta    unbiased for tr(F_bb) of the mean loss
    gFg_b   = B <g_b^(a), g~_b>^2  (g~ from batch b)                          unbiased for E[g_b^T F_bb g_b]

(the cross terms of different examples vanish because E_y[grad log p(y|x)] = 0). Hutchinson's tau of a block is
unresolved (standard error >= |tau|) on most blocks of a small LM and may be negative; the Fisher never is, so
the oracles and the K-step model can use it as the curvature (``BlockStats.with_fisher_curvature``).

Why these: they are the terms of the expected ZO step (``l2zo.blockstats.gain``). gHg uses the minibatch
gradient on purpose: a ZO step sees g^(a), so E[g^T S^2 H S^2 g] carries tr(H_bb C_b) as A + V carries tr(C_b).
The per-block random signs r_c cancel the cross-block terms g_b^T H_bc g_c in expectation, so one HVP gives
every block's diagonal-block term. H^(b) (the Hessian of batch b) is independent of g^(a), so gHg has no
batch-correlation bias; Hutchinson probes alternate between the two batches' Hessians (their mean is H's
estimate).

Memory: one double-backward graph at a time (batch a's, then batch b's) and one HVP at a time; besides the
graph, about four parameter-sized buffers (g^(a), g^(b) detached, the probe vector, its HVP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l2zo.engine.blocks import Block, block_kind
from l2zo.errors import L2ZOError

LossFn = Callable[[], Tensor]
SampledLossFn = Callable[[torch.Generator], Tensor]


@dataclass(frozen=True)
class BatchFns:
    """One batch's loss closures.

    Attributes:
        loss: the training loss on the batch (grad enabled, dropout off).
        sampled_loss: the same loss with the labels drawn from the model's own predictive distribution using
            the given generator (the Fisher's labels); None where the loss has no such form.
        batch_size: B, the number of examples the loss averages over.
        fixed_sampled: draws the Fisher's labels once, at the current parameters, and returns the loss at those
            labels (held fixed while the parameters move: what a forward-only probe of the Fisher differentiates);
            None where the loss has no such form.
    """

    loss: LossFn
    sampled_loss: SampledLossFn | None = None
    batch_size: int = 1
    fixed_sampled: Callable[[torch.Generator], LossFn] | None = None


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Scaled-dot-product attention on its math kernel: the fused CPU/CUDA kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: every kernel is tried, the math one included
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@dataclass(frozen=True)
class PairSample:
    """The raw estimates from one pair of batches (one model state).

    Attributes:
        G: [B] <g^(a)_b, g^(b)_b>.
        sq: [B] (||g^(a)_b||^2 + ||g^(b)_b||^2) / 2.
        tau: [P, B] one Hutchinson estimate of tr(H_bb) per probe.
        gHg: [Q, B] one sign-mixed estimate of g_b^T H_bb g_b per probe.
        fisher: [S, B] one estimate of tr(F_bb) per sampled label set (S = 0 without ``sampled_loss``).
        gFg: [S', B] one estimate of g_b^T F_bb g_b per sampled label set of batch b.
        loss: the mean of the two batch losses.
    """

    G: Tensor
    sq: Tensor
    tau: Tensor
    gHg: Tensor
    fisher: Tensor
    gFg: Tensor
    loss: float


@dataclass(frozen=True)
class BlockStats:
    """Per-block statistics, averaged over batch pairs (and model states); all tensors [B] float64 on CPU.

    Attributes:
        names, kinds: block names and ``block_kind``s, in partition order.
        n: numel per block.
        G: gradient energy ||grad_b L||^2 (unbiased; may be < 0 where the signal is below the noise).
        noise: tr(C_b), the minibatch-gradient noise of the block at the batch size used.
        tau: tr(H_bb) (Hutchinson; may be < 0: non-convex, or unresolved by the probes).
        gHg: E[g_b^T H_bb g_b] over minibatch gradients g.
        fisher, gFg: tr(F_bb) and E[g_b^T F_bb g_b] (nan when the loss gave no sampled labels).
        G_se, noise_se, tau_se, gHg_se, fisher_se, gFg_se: standard errors of the means (nan with one sample).
        loss: mean minibatch loss at the measured states.
        pairs: number of batch pairs averaged; probes: Hutchinson probes in all.
    """

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    n: Tensor
    G: Tensor
    noise: Tensor
    tau: Tensor
    gHg: Tensor
    G_se: Tensor
    noise_se: Tensor
    tau_se: Tensor
    gHg_se: Tensor
    fisher: Tensor
    gFg: Tensor
    fisher_se: Tensor
    gFg_se: Tensor
    loss: float
    pairs: int
    probes: int

    @property
    def has_fisher(self) -> bool:
        return bool(torch.isfinite(self.fisher).all())

    def with_fisher_curvature(self) -> BlockStats:
        """These statistics with the Fisher in place of the Hessian (tau := F_b, gHg := gFg)."""
        if not self.has_fisher:
            raise L2ZOError("no Fisher statistics: the task's loss gives no sampled labels (use the Hessian curvature)")
        return dataclasses.replace(self, tau=self.fisher, tau_se=self.fisher_se, gHg=self.gFg, gHg_se=self.gFg_se)

    @property
    def num_blocks(self) -> int:
        return len(self.names)

    def rows(self) -> list[dict[str, object]]:
        """One dict per block (JSON-ready)."""
        out = []
        for i, name in enumerate(self.names):
            out.append({
                "name": name, "kind": self.kinds[i], "n": int(self.n[i]),
                **{k: float(getattr(self, k)[i]) for k in _ROW_KEYS},
            })  # fmt: skip
        return out


_ROW_KEYS = ("G", "noise", "tau", "gHg", "fisher", "gFg", "G_se", "noise_se", "tau_se", "gHg_se", "fisher_se", "gFg_se")


def _rademacher(blocks: Sequence[Block], gen: torch.Generator) -> list[Tensor]:
    """One +-1 tensor per block (drawn on CPU from ``gen`` so the probes do not depend on the device)."""
    out = []
    for b in blocks:
        v = torch.randint(0, 2, b.shape, generator=gen, dtype=torch.int8).to(b.param.device, b.param.dtype)
        out.append(v.mul_(2).sub_(1))
    return out


def _block_dots(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """[B] float64: <x_b, y_b> per block."""
    return torch.stack([torch.dot(a.reshape(-1).double(), c.reshape(-1).double()) for a, c in zip(x, y)]).cpu()


class _Graph:
    """The gradient of one batch's loss with its double-backward graph, for HVPs against that batch's Hessian."""

    def __init__(self, blocks: Sequence[Block], loss_fn: LossFn) -> None:
        params = [b.param for b in blocks]
        with double_backward_attention():
            loss = loss_fn()
            if not bool(torch.isfinite(loss)):
                raise L2ZOError(
                    f"the loss is not finite ({float(loss):.4g}) at this state; statistics need a finite one"
                )
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        self.params = params
        # Blocks whose gradient does not depend on the parameters (e.g. a linear term) have a zero HVP.
        self._live = [i for i, g in enumerate(self.grads) if g.requires_grad]

    def detached(self) -> list[Tensor]:
        return [g.detach() for g in self.grads]

    def hvp(self, v: Sequence[Tensor]) -> list[Tensor]:
        """H v for this batch's Hessian (the graph is kept for further calls)."""
        hv = [torch.zeros_like(p) for p in self.params]
        if not self._live:
            return hv
        with double_backward_attention():
            out = torch.autograd.grad(
                [self.grads[i] for i in self._live], self.params, grad_outputs=[v[i] for i in self._live],
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
        return [h if o is None else o.detach() for h, o in zip(hv, out)]


def _fisher(blocks: Sequence[Block], fns: BatchFns, samples: int, gen: torch.Generator,
            along: Sequence[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``samples`` estimates of tr(F_bb) (and of g^T F_bb g along ``along``) from sampled-label gradients."""
    if fns.sampled_loss is None or samples == 0:
        return [], []
    params = [b.param for b in blocks]
    fisher, gfg = [], []
    for _ in range(samples):
        grads = torch.autograd.grad(fns.sampled_loss(gen), params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, grads)]
        fisher.append(fns.batch_size * _block_dots(g, g))
        if along is not None:
            gfg.append(fns.batch_size * _block_dots(along, g) ** 2)
    return fisher, gfg


def measure_pair(
    blocks: Sequence[Block],
    a: BatchFns,
    b: BatchFns,
    *,
    probes: int = 8,
    gHg_probes: int = 2,
    fisher_samples: int = 2,
    seed: int = 0,
) -> PairSample:
    """Raw per-block estimates from two independent batches at the current parameters.

    Args:
        blocks: the optimizer's blocks (``l2zo.engine.partition``); their parameters must require grad.
        a, b: the two batches' loss closures.
        probes: Hutchinson probes for tau (alternating between the two batches' Hessians), >= 1.
        gHg_probes: sign-mixed HVPs for gHg (on batch b's Hessian, along g^(a)), >= 1.
        fisher_samples: sampled label sets per batch for the Fisher (0: none).
        seed: seed of the Rademacher vectors, block signs and sampled labels.

    Returns:
        A ``PairSample``; the parameters are unchanged. Cost: 2 forwards and 2 double-backward-ready backwards,
        ``probes + gHg_probes`` HVPs, and ``2 * fisher_samples`` forward-backwards.
    """
    if probes < 1 or gHg_probes < 1 or fisher_samples < 0:
        raise L2ZOError(f"need >= 1 Hutchinson probe, >= 1 gHg probe and >= 0 Fisher samples, got {probes}, "
                        f"{gHg_probes} and {fisher_samples}")  # fmt: skip
    gen = torch.Generator().manual_seed(int(seed))
    taus: list[Tensor] = []
    n_a = (probes + 1) // 2
    with torch.enable_grad():
        graph = _Graph(blocks, a.loss)
        for _ in range(n_a):
            v = _rademacher(blocks, gen)
            taus.append(_block_dots(v, graph.hvp(v)))
        g_a, loss_val = graph.detached(), graph.loss
        del graph  # frees batch a's graph before batch b's is built
        graph = _Graph(blocks, b.loss)
        for _ in range(probes - n_a):
            v = _rademacher(blocks, gen)
            taus.append(_block_dots(v, graph.hvp(v)))
        ghg: list[Tensor] = []
        for _ in range(gHg_probes):
            r = torch.randint(0, 2, (len(blocks),), generator=gen).double().mul(2).sub(1)  # [B]
            w = [g * float(sign) for g, sign in zip(g_a, r.tolist())]
            ghg.append(r * _block_dots(g_a, graph.hvp(w)))
        g_b, loss_val = graph.detached(), (loss_val + graph.loss) / 2
        del graph
        fisher, _ = _fisher(blocks, a, fisher_samples, gen, None)
        fisher_b, gfg = _fisher(blocks, b, fisher_samples, gen, g_a)
    B = len(blocks)
    return PairSample(
        G=_block_dots(g_a, g_b), sq=(_block_dots(g_a, g_a) + _block_dots(g_b, g_b)) / 2, tau=torch.stack(taus),
        gHg=torch.stack(ghg), fisher=torch.stack(fisher + fisher_b) if fisher + fisher_b else torch.zeros(0, B),
        gFg=torch.stack(gfg) if gfg else torch.zeros(0, B, dtype=torch.float64), loss=loss_val,
    )  # fmt: skip


def _mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over dim 0 and its standard error (nan with one row; both nan with none)."""
    if x.shape[0] == 0:
        nan = torch.full(x.shape[1:], math.nan, dtype=torch.float64)
        return nan, nan.clone()
    m = x.mean(dim=0)
    if x.shape[0] < 2:
        return m, torch.full_like(m, math.nan)
    return m, x.std(dim=0, unbiased=True) / math.sqrt(x.shape[0])


def combine(blocks: Sequence[Block], samples: Sequence[PairSample]) -> BlockStats:
    """Average pair samples (from one state or several) into ``BlockStats`` with standard errors."""
    return combine_named([b.name for b in blocks], [b.numel for b in blocks], samples)


def combine_named(names: Sequence[str], numels: Sequence[int], samples: Sequence[PairSample]) -> BlockStats:
    """``combine`` from the blocks' names and sizes alone (a saved probe's pairs, without the model)."""
    if not samples:
        raise L2ZOError("no batch pairs were measured; use at least one pair")
    G, G_se = _mean_se(torch.stack([s.G for s in samples]))
    noise, noise_se = _mean_se(torch.stack([s.sq - s.G for s in samples]))
    tau, tau_se = _mean_se(torch.cat([s.tau for s in samples]))
    gHg, gHg_se = _mean_se(torch.cat([s.gHg for s in samples]))
    fisher, fisher_se = _mean_se(torch.cat([s.fisher.double() for s in samples]))
    gFg, gFg_se = _mean_se(torch.cat([s.gFg for s in samples]))
    return BlockStats(
        names=tuple(names), kinds=tuple(block_kind(n) for n in names),
        n=torch.tensor([float(n) for n in numels], dtype=torch.float64),
        G=G, noise=noise, tau=tau, gHg=gHg, G_se=G_se, noise_se=noise_se, tau_se=tau_se, gHg_se=gHg_se,
        fisher=fisher, gFg=gFg, fisher_se=fisher_se, gFg_se=gFg_se,
        loss=sum(s.loss for s in samples) / len(samples), pairs=len(samples),
        probes=sum(int(s.tau.shape[0]) for s in samples),
    )  # fmt: skip


def measure_block_stats(
    blocks: Sequence[Block],
    batch_pair: Callable[[int], tuple[BatchFns, BatchFns]],
    *,
    pairs: int = 4,
    probes: int = 8,
    gHg_probes: int = 2,
    fisher_samples: int = 2,
    seed: int = 0,
) -> BlockStats:
    """``pairs`` independent batch pairs at the current parameters, combined.

    Args:
        batch_pair: ``k -> (batch a_k, batch b_k)``; the batches of all pairs independent.
        pairs, probes, gHg_probes, fisher_samples, seed: see ``measure_pair`` (pair k uses seed ``seed + k``).
    """
    if pairs < 1:
        raise L2ZOError(f"pairs must be >= 1, got {pairs}")
    samples = []
    for k in range(pairs):
        a, b = batch_pair(k)
        samples.append(measure_pair(blocks, a, b, probes=probes, gHg_probes=gHg_probes,
                                    fisher_samples=fisher_samples, seed=seed + k))  # fmt: skip
    return combine(blocks, samples)
