"""LearnedZO and its parts: MeZO parity at sigma == 1, normalisation, features, the stacked net, ablations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from l2zo.engine import partition
from l2zo.engine.blocks import block_kind
from l2zo.errors import L2ZOError
from l2zo.learned import (
    FEATURE_NAMES,
    FeatureSpec,
    NetSpec,
    VarianceNet,
    block_weights,
    build_features,
    normalize_sigma,
    weight_stats,
)
from l2zo.learned.normalization import EMBEDDING_ACTIVE_ROWS_PER_EXAMPLE
from l2zo.optim import MeZO, build_optimizer
from l2zo.optim.methods.learned import LearnedZO, PerBlockConstZO
from tests.helpers import lm_loss, tiny_llama


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(seed))


def constant_one_net(names: list[str]) -> VarianceNet:
    """|0 . h + 1| == 1 for every block: the net that makes LearnedZO MeZO."""
    net = VarianceNet(NetSpec(positive="abs"), names, seed=3)
    with torch.no_grad():
        net.w2.zero_()
        net.b2.fill_(1.0)
    return net


def _names(model: nn.Module) -> list[str]:
    return [b.name for b in partition(model)]


# ------------------------------------------------------------------------------------------------ parity


def test_sigma_one_reproduces_mezo_bit_for_bit():
    m1, m2 = tiny_llama(), tiny_llama()
    mezo = MeZO(m1, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)
    learned = LearnedZO(m2, constant_one_net(_names(m2)), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)
    for s in range(4):
        l1 = mezo.step(lambda s=s: lm_loss(m1, _ids(s)))
        l2 = learned.step(lambda s=s: lm_loss(m2, _ids(s)))
        assert torch.equal(l1, l2)
        assert learned.last_c == 1.0 and bool((learned.last_sigma == 1.0).all())
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("rule", ["numel", "paper"])
def test_normalization_identity(rule):
    model = tiny_llama()
    blocks = partition(model)
    n = block_weights(blocks, rule, model=model, batch_size=8)
    sigma = (torch.rand(len(blocks), generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    c, eff = normalize_sigma(sigma, n)
    lhs = (n * eff.detach().double() ** 2).sum()
    torch.testing.assert_close(lhs, n.sum(), rtol=1e-6, atol=0)
    assert not c.requires_grad and eff.requires_grad  # c is a constant of the step; sigma keeps its graph
    eff.sum().backward()
    torch.testing.assert_close(sigma.grad, torch.full_like(sigma, float(c)))


def test_paper_rule_finds_embeddings_by_module_type_not_name():
    model = tiny_llama(tie=False, hidden=16)
    blocks = partition(model)
    n = block_weights(blocks, "paper", model=model, batch_size=4)
    by_name = {b.name: float(n[b.index]) for b in blocks}
    assert by_name["model.embed_tokens.weight"] == pytest.approx(EMBEDDING_ACTIVE_ROWS_PER_EXAMPLE * 4 * 16 / 1e6)
    assert by_name["lm_head.weight"] == pytest.approx(97 * 16 / 1e6)  # same shape, but an nn.Linear

    odd = nn.ModuleDict({"table": nn.Embedding(10, 4), "embed_proj": nn.Linear(4, 4)})
    w = dict(zip(_names(odd), block_weights(partition(odd), "paper", model=odd, batch_size=2).tolist(), strict=True))
    assert w["table.weight"] == pytest.approx(15 * 2 * 4 / 1e6)
    assert w["embed_proj.weight"] == pytest.approx(16 / 1e6) and w["embed_proj.bias"] == pytest.approx(4 / 1e6)
    with pytest.raises(L2ZOError, match="needs the model"):
        block_weights(partition(odd), "paper")


# ------------------------------------------------------------------------------------------------ features


def test_features_paper_order_and_detached():
    assert FEATURE_NAMES == ("weight_mean", "weight_var", "loss_plus_prev", "loss_minus_prev", "sigma_prev")
    blocks = partition(tiny_llama())
    stats = weight_stats(blocks)
    assert stats.shape == (len(blocks), 2) and stats.dtype == torch.float32
    for b in blocks:
        var, mean = torch.var_mean(b.param.detach())
        torch.testing.assert_close(stats[b.index], torch.stack((mean, var)))
    sigma_prev = torch.rand(len(blocks), requires_grad=True)
    feats = build_features(stats, 2.5, 2.25, sigma_prev, FeatureSpec())
    assert feats.shape == (len(blocks), 5) and not feats.requires_grad
    torch.testing.assert_close(feats[:, :2], stats)
    assert bool((feats[:, 2] == 2.5).all()) and bool((feats[:, 3] == 2.25).all())
    torch.testing.assert_close(feats[:, 4], sigma_prev.detach())


def test_stats_low_precision_and_ill_conditioned_blocks():
    """bf16 weights accumulate in fp32; a norm gain 1 + tiny noise (mean^2 >> var) keeps its var exactly."""
    g = torch.Generator().manual_seed(0)
    big = nn.Parameter((torch.randn(1_500_000, generator=g) * 0.02 + 0.01).to(torch.bfloat16))
    gain = nn.Parameter(1 + 1e-4 * torch.randn(64, generator=g))
    ones, scalar = nn.Parameter(torch.ones(32)), nn.Parameter(torch.tensor([3.0]))
    stats = weight_stats(partition([("big", big), ("gain", gain), ("ones", ones), ("scalar", scalar)])).double()
    for i, p in enumerate((big, gain)):
        var, mean = torch.var_mean(p.detach().double())
        # fp32 accumulation: ~1e-5 relative, plenty for a net input (the paper computes them in fp16)
        torch.testing.assert_close(stats[i], torch.stack((mean, var)), rtol=1e-4, atol=1e-9)
    assert stats[2].tolist() == [1.0, 0.0] and stats[3].tolist() == [3.0, 0.0]


# ----------------------------------------------------------------------------------------------------- net


def test_einsum_net_equals_a_loop_of_sequential_mlps():
    names = _names(tiny_llama())
    net = VarianceNet(NetSpec(), names, seed=5)
    assert sum(p.numel() for p in net.parameters()) == 449 * len(names)  # the paper's 5*64+64+64+1 per block
    feats = torch.randn(len(names), 5)
    out = net(feats)
    for b in range(len(names)):
        mlp = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
        with torch.no_grad():
            mlp[0].weight.copy_(net.w1[b].T)
            mlp[0].bias.copy_(net.b1[b])
            mlp[2].weight.copy_(net.w2[b][None])
            mlp[2].bias.copy_(net.b2[b][None])
        torch.testing.assert_close(out[b], mlp(feats[b]).abs()[0], rtol=1e-6, atol=1e-7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_net_options_shapes_and_spec_round_trip():
    names = _names(tiny_llama())
    spec = NetSpec(hidden=8, positive="softplus", role_embedding_dim=3, depth_feature=True, shared=True,
                   features=FeatureSpec(log_scale=True, normalize=True))  # fmt: skip
    net = VarianceNet(spec, names, seed=0)
    assert net.w1.shape == (1, 5 + 1 + 3, 8) and net.role_emb.shape == (len(net.kinds), 3)
    out = net(torch.randn(len(names), 5))
    assert out.shape == (len(names),) and bool((out > 0).all())
    assert NetSpec.from_dict(spec.to_dict()) == spec
    assert all(p.dtype == torch.float32 for p in VarianceNet(NetSpec(), names).to(torch.float64).float().parameters())
    with pytest.raises(L2ZOError, match="unknown activation"):
        NetSpec(activation="swish2")
    with pytest.raises(L2ZOError, match="unknown variance-net option"):
        NetSpec.from_dict({"hiddden": 3})


def test_kind_scale_is_the_same_seeds_net_times_a_per_kind_table():
    names = _names(tiny_llama())
    spec = NetSpec(hidden=8, role_embedding_dim=2)
    plain, scaled = VarianceNet(spec, names, seed=3), VarianceNet(NetSpec(hidden=8, role_embedding_dim=2,
                                                                          kind_scale=True), names, seed=3)  # fmt: skip
    feats = torch.randn(len(names), 5)
    assert torch.equal(scaled(feats), plain(feats))  # zeros at init, and the MLPs drawn as without it
    table = torch.linspace(-1, 1, len(scaled.kinds))
    with torch.no_grad():
        scaled.kind_log_scale.copy_(table)
    factor = torch.tensor([math.exp(float(table[scaled.kinds.index(block_kind(n))])) for n in names])
    torch.testing.assert_close(scaled(feats), plain(feats) * factor)
    scaled(feats).sum().backward()
    assert scaled.kind_log_scale.grad is not None and bool((scaled.kind_log_scale.grad != 0).all())
    assert NetSpec.from_dict(scaled.spec.to_dict()) == scaled.spec
    # a net for other blocks takes the table by kind name (the artifact's resize path)
    fresh = VarianceNet(scaled.spec, names[:5], seed=0)
    fresh.copy_rows_from(scaled, [(i, i) for i in range(5)])
    ix = [scaled.kinds.index(kind) for kind in fresh.kinds]
    assert torch.equal(fresh.kind_log_scale.detach(), scaled.kind_log_scale.detach()[ix])


# ------------------------------------------------------------------------------------------- optimizer state


def test_state_dict_round_trip_gives_the_identical_next_step():
    model = tiny_llama()
    spec = NetSpec(features=FeatureSpec(log_scale=True, normalize=True))
    net = VarianceNet(spec, _names(model), seed=2)
    opt = LearnedZO(model, net, lr=1e-2, seed=4)
    for s in range(2):
        opt.step(lambda s=s: lm_loss(model, _ids(s)))
    sd = copy.deepcopy(opt.state_dict())
    assert opt.sigma_prev.shape == (len(net.block_names),) and opt.ref.loss0 is not None

    model2 = copy.deepcopy(model)
    opt2 = LearnedZO(model2, net, lr=1e-2, seed=0)
    opt2.load_state_dict(sd)
    assert opt2.loss_prev == opt.loss_prev and torch.equal(opt2.sigma_prev, opt.sigma_prev)
    l1 = opt.step(lambda: lm_loss(model, _ids(5)))
    l2 = opt2.step(lambda: lm_loss(model2, _ids(5)))
    assert torch.equal(l1, l2) and torch.equal(opt.last_sigma, opt2.last_sigma)
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_recurrent_state_follows_the_paper():
    model = tiny_llama()
    opt = LearnedZO(model, VarianceNet(NetSpec(), _names(model), seed=1), lr=1e-3)
    assert opt.loss_prev == (0.0, 0.0) and bool((opt.sigma_prev == 1).all())
    opt.step(lambda: lm_loss(model, _ids()))
    probe = opt.last_probe
    assert opt.loss_prev == (float(probe.loss_plus), float(probe.loss_minus))
    torch.testing.assert_close(opt.sigma_prev * opt.last_c, opt.last_sigma)  # raw sigma kept, not c*sigma


def test_net_for_other_blocks_is_refused():
    with pytest.raises(L2ZOError, match="other blocks"):
        LearnedZO(tiny_llama(), VarianceNet(NetSpec(), _names(tiny_llama(layers=3))))


# ----------------------------------------------------------------------------------------------- ablations


def test_learned_random_is_deterministic_per_net_seed_and_steps():
    def first_sigma(net_seed: int) -> torch.Tensor:
        model = tiny_llama()
        opt = build_optimizer("learned-random", model, net_seed=net_seed, lr=1e-3)
        loss = opt.step(lambda: lm_loss(model, _ids()))
        assert torch.isfinite(loss)
        return opt.last_sigma

    assert torch.equal(first_sigma(0), first_sigma(0))
    assert not torch.equal(first_sigma(0), first_sigma(1))


def test_per_block_const_sigma_by_kind():
    model = tiny_llama()
    opt = build_optimizer("per-block-const", model, sigma_by_kind={"q_proj": 2.0}, lr=1e-3)
    assert isinstance(opt, PerBlockConstZO)
    s = {b.name: v for b, v in zip(opt.blocks, opt.sigma(), strict=True)}
    assert s["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(2 * s["model.layers.0.self_attn.k_proj.weight"])
    n = block_weights(opt.blocks)
    torch.testing.assert_close((n * opt.last_sigma.double() ** 2).sum(), n.sum())
    assert torch.isfinite(opt.step(lambda: lm_loss(model, _ids())))
    with pytest.raises(L2ZOError, match="unknown block kinds"):
        build_optimizer("per-block-const", model, sigma_by_kind={"qproj": 2.0})
    # Default: all 1, i.e. MeZO.
    assert build_optimizer("per-block-const", tiny_llama()).sigma() == [1.0] * len(opt.blocks)


def test_permute_seed_applies_the_nets_sigmas_to_shuffled_blocks():
    """The permutation control: the same net, the same recurrent state, its sigmas applied to other blocks."""
    from l2zo.blockstats.allocations import permute_sigma
    from l2zo.engine.blocks import block_permutation
    from l2zo.optim.methods.learned import LearnedRandomHParams
    from l2zo.optim.run_hparams import coerce_hparams

    hp = coerce_hparams("learned-random", LearnedRandomHParams, {"permute_seed": "3", "lr": "1e-3"})
    assert hp["permute_seed"] == 3
    m_plain, m_perm = tiny_llama(), tiny_llama()
    plain = build_optimizer("learned-random", m_plain, net_seed=1, lr=1e-3, seed=5)
    perm = build_optimizer("learned-random", m_perm, net_seed=1, seed=5, **hp)
    order = block_permutation(len(perm.blocks), 3)
    assert not torch.equal(order, torch.arange(len(order)))  # a real shuffle of tiny_llama's blocks
    plain.step(lambda: lm_loss(m_plain, _ids()))
    perm.step(lambda: lm_loss(m_perm, _ids()))
    # Step 1: both nets saw the same weights and initial state, so the same raw sigma; the control applies it shuffled
    # (renormalised: the probe's energy stays MeZO's) and keeps the net's own output as its recurrent input.
    assert torch.equal(perm.sigma_prev, plain.sigma_prev)
    n = block_weights(perm.blocks)
    torch.testing.assert_close(perm.last_sigma.double(), permute_sigma(plain.last_sigma.double(), n, 3))
    torch.testing.assert_close((n * perm.last_sigma.double() ** 2).sum(), n.sum())
    # The same run without a seed is the plain net; the shuffled one moved the weights differently.
    assert not all(torch.equal(a, b) for a, b in zip(m_plain.parameters(), m_perm.parameters(), strict=True))


def test_permute_within_kind_keeps_each_sigma_on_a_block_of_its_kind():
    from l2zo.engine.blocks import block_kind, block_permutation

    model = tiny_llama(layers=3)
    names = _names(model)
    kinds = [block_kind(n) for n in names]
    order = block_permutation(len(names), 0, kinds)
    assert [kinds[i] for i in order.tolist()] == kinds and not torch.equal(order, torch.arange(len(names)))
    assert torch.equal(order, block_permutation(len(names), 0, kinds))  # fixed by the seed
    opt = build_optimizer("learned-random", model, lr=1e-3, permute_seed=0, permute_within_kind=True)
    assert torch.equal(opt.perm, order)
    with pytest.raises(L2ZOError, match="give the shuffle's seed"):
        build_optimizer("learned-random", tiny_llama(), lr=1e-3, permute_within_kind=True)
    with pytest.raises(L2ZOError, match="3 group labels for 4 blocks"):
        block_permutation(4, 0, ["a", "a", "b"])
