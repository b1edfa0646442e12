"""``run_probe``: per-block statistics of a model on a task at a few states, and what they predict per allocation.

States are points of one MeZO trajectory from the loaded model (``states`` = step counts, 0 = as loaded). At
each state ``pairs`` independent batch pairs give ``BlockStats``; the allocations (MeZO, the untrained and the
meta-trained nets, a permuted untrained net, per-block-const, the oracles) are fixed at the first state (the
nets' settled sigma there; the oracles from the statistics pooled over all states), then scored at every
state and on the pooled statistics: A, T, V, Bq, the re-tuned one-step gain and R, and the K-step prediction
of the block-quadratic model with eta re-tuned for each allocation.

Checkpointed per pair: with ``pairs_dir``, each measured pair is saved there (``state<S>-pair<K>.pt``, a few KB)
the moment it is done, and a pair found there is loaded instead of measured, so an interrupted probe (a pair costs
minutes on a 135M model) continues where it stopped, and a finished one re-scores its allocations (other oracle
parameters, other artifacts) without measuring again. The batches are drawn in the same order either way, so the
result is the same bits as an uninterrupted probe's; ``MEASURE_KEYS`` are the settings the saved pairs depend on.

No Lightning: batches come from the task's train split through the shared ``CandidateScorer``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2zo.blockstats.allocations import const_sigma, net_sigma, permuted, sigma_mapping
from l2zo.blockstats.coupling_stats import Gram, gradient_gram
from l2zo.blockstats.gain import QuadraticModel, kstep, step_terms
from l2zo.blockstats.oracles import gsl, hizoo, water_filling, water_filling_eta
from l2zo.blockstats.select import artifact_tag
from l2zo.blockstats.stats import BatchFns, BlockStats, PairSample, combine, measure_pair
from l2zo.blockstats.zo_energy import ZOEnergy, zo_block_energy
from l2zo.engine.blocks import Block, partition
from l2zo.errors import L2ZOError
from l2zo.optim.base import eval_mode

log = logging.getLogger("l2zo")


@dataclasses.dataclass
class ProbeConfig:
    """The keys of ``l2zo probe-blocks`` (see ``l2zo/cli/probe_blocks_cmd.py`` for their help)."""

    model: str = "tiny"
    task: str = "synth-sentiment"
    data_dir: str | None = None
    batch_size: int = 16
    max_length: int = 256
    num_train: int = 1000
    data_seed: int = 0
    seed: int = 0
    artifacts: list[str] = dataclasses.field(default_factory=list)
    states: list[int] = dataclasses.field(default_factory=lambda: [0])
    mezo_lr: float = 1e-4
    eps: float = 1e-3
    pairs: int = 4
    probes: int = 8
    gHg_probes: int = 2
    fisher_samples: int = 4
    zo_probes: int = 0
    curvature: str = "auto"
    horizon: int = 300
    gsl_temperature: float | None = None
    hizoo_gamma: float | None = None
    wf_eta: float | None = None
    net_seed: int = 0
    perm_seed: int = 0
    settle: int = 6
    device: str = "cpu"
    output: str = "runs/probe-blocks"

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_length", "num_train", "pairs", "probes", "gHg_probes", "horizon"):
            if getattr(self, key) < 1:
                raise L2ZOError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.curvature not in ("auto", "fisher", "hessian"):
            raise L2ZOError(f"--curvature must be auto, fisher or hessian, got {self.curvature!r}")
        if self.zo_probes < 0:
            raise L2ZOError(f"--zo-probes must be >= 0 (0: no forward-only G), got {self.zo_probes}")
        if self.fisher_samples < 0:
            raise L2ZOError(f"--fisher-samples must be >= 0, got {self.fisher_samples}")
        if self.settle < 2:
            raise L2ZOError(f"--settle must be >= 2 (the first step's sigma is discarded), got {self.settle}")
        if not self.states or any(s < 0 for s in self.states) or len(set(self.states)) != len(self.states):
            raise L2ZOError(f"--states must be distinct step counts >= 0, e.g. 0,100,200; got {self.states}")
        if self.wf_eta is not None and not self.wf_eta > 0:
            raise L2ZOError(f"--wf-eta must be > 0, got {self.wf_eta}; leave it out to use MeZO's one-step optimum")
        self.states = sorted(self.states)


# The settings a measured pair depends on: a saved pair is reused only under the same values of all of them.
MEASURE_KEYS: tuple[str, ...] = ("model", "task", "data_dir", "batch_size", "max_length", "num_train", "data_seed",
                                 "seed", "states", "mezo_lr", "eps", "pairs", "probes", "gHg_probes",
                                 "fisher_samples")  # fmt: skip


def pair_path(pairs_dir: Path, state: int, k: int) -> Path:
    return pairs_dir / f"state{state}-pair{k}.pt"


def save_pair(path: Path, sample: PairSample) -> None:
    """One pair's raw estimates, written atomically (a pair half-written by a kill is never read back)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({f.name: getattr(sample, f.name) for f in dataclasses.fields(PairSample)}, tmp)
    os.replace(tmp, path)


def zo_path(pairs_dir: Path, state: int, k: int) -> Path:
    return pairs_dir / f"state{state}-pair{k}-zo.pt"


def save_zo(path: Path, energy: ZOEnergy) -> None:
    """One pair's forward-only G (``zo_energy``), written atomically beside the pair's backprop statistics."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = {"G": energy.G, "sq": energy.sq, "G_se": energy.G_se, "probes": energy.probes, "forwards": energy.forwards}
    if energy.fisher is not None:
        data["fisher"] = energy.fisher
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_zo(path: Path, num_blocks: int, probes: int | None = None, fisher: bool = False) -> ZOEnergy | None:
    """A pair's saved forward-only G; None where it is absent, was measured with another number of probes, or
    lacks the forward-only Fisher that ``fisher`` asks for."""
    if not path.is_file():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data["G"].shape[0] != num_blocks:
        raise L2ZOError(f"{path} holds {data['G'].shape[0]} blocks, the model {num_blocks}: it is another model's "
                        "probe; start again with --overwrite")  # fmt: skip
    if (probes is not None and int(data["probes"]) != probes) or (fisher and "fisher" not in data):
        return None
    return ZOEnergy(G=data["G"], sq=data["sq"], G_se=data["G_se"], probes=int(data["probes"]),
                    forwards=int(data["forwards"]), fisher=data.get("fisher"))  # fmt: skip


def load_pair(path: Path, num_blocks: int) -> PairSample:
    """A pair saved by :func:`save_pair`, refused unless it holds ``num_blocks`` blocks (another model's probe)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    try:
        sample = PairSample(**{f.name: data[f.name] for f in dataclasses.fields(PairSample)})
    except (KeyError, TypeError):
        raise L2ZOError(f"{path} is not a probe pair of this l2zo version; start the probe again with "
                        "--overwrite") from None  # fmt: skip
    if sample.G.shape[0] != num_blocks:
        raise L2ZOError(f"{path} holds {sample.G.shape[0]} blocks, the model {num_blocks}: it is another model's "
                        "probe; start again with --overwrite")  # fmt: skip
    return sample


class _Batches:
    """Training batches: independent random draws (statistics) and epoch-ordered ones (the MeZO trajectory)."""

    def __init__(self, examples: list[Any], scorer: Any, loss_kind: str, batch_size: int, seed: int, device: Any):
        if len(examples) < batch_size:
            raise L2ZOError(f"the train split has {len(examples)} examples, fewer than --batch-size {batch_size}")
        self.examples, self.scorer, self.loss_kind = examples, scorer, loss_kind
        self.batch_size, self.device = batch_size, device
        self.draw_gen = torch.Generator().manual_seed(seed * 1_000_003 + 1)
        self.epoch_gen = torch.Generator().manual_seed(seed)
        self._epoch: list[int] = []

    def _loss(self, idx: list[int], model: torch.nn.Module) -> Callable[[], Tensor]:
        batch = self.scorer.collate([self.examples[i] for i in idx]).to(self.device)
        return lambda: self.scorer.loss(model, batch, self.loss_kind)

    def draw(self, model: torch.nn.Module) -> BatchFns:
        """A batch drawn independently of every other (without replacement inside it)."""
        idx = torch.randperm(len(self.examples), generator=self.draw_gen)[: self.batch_size].tolist()
        batch = self.scorer.collate([self.examples[i] for i in idx]).to(self.device)
        scorer = self.scorer

        def loss() -> Tensor:
            return scorer.loss(model, batch, self.loss_kind)

        def labels(scores: Tensor, gen: torch.Generator) -> Tensor:
            # labels drawn from the model's own candidate distribution (the Fisher's)
            probs = torch.softmax(scores.detach().double().cpu(), dim=-1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(scores.device)

        def sampled_loss(gen: torch.Generator) -> Tensor:
            scores = scorer.candidate_scores(model, batch)  # [B, C]
            return torch.nn.functional.cross_entropy(scores, labels(scores, gen))

        def fixed_sampled(gen: torch.Generator) -> Callable[[], Tensor]:
            with torch.no_grad():
                y = labels(scorer.candidate_scores(model, batch), gen)
            return lambda: torch.nn.functional.cross_entropy(scorer.candidate_scores(model, batch), y)

        if self.loss_kind != "classification":
            return BatchFns(loss=loss, batch_size=len(idx))
        return BatchFns(loss=loss, sampled_loss=sampled_loss, batch_size=len(idx), fixed_sampled=fixed_sampled)

    def skip_draw(self) -> None:
        """Advance the draws as :meth:`draw` does, without building a batch (a pair loaded from its checkpoint)."""
        torch.randperm(len(self.examples), generator=self.draw_gen)

    def next(self, model: torch.nn.Module) -> Callable[[], Tensor]:
        """The next batch of a shuffled pass over the train split (a fine-tune's order)."""
        if len(self._epoch) < self.batch_size:
            self._epoch = torch.randperm(len(self.examples), generator=self.epoch_gen).tolist()
        idx, self._epoch = self._epoch[: self.batch_size], self._epoch[self.batch_size :]
        return self._loss(idx, model)


def _states(cfg: ProbeConfig, model: torch.nn.Module, batches: _Batches) -> Iterator[int]:
    """Yield at each state of the MeZO trajectory (the model is updated in place between yields)."""
    from l2zo.optim.registry import build_optimizer

    opt = None
    done = 0
    for target in cfg.states:
        if target > done and opt is None:
            opt = build_optimizer("mezo", model, lr=cfg.mezo_lr, eps=cfg.eps, seed=cfg.seed)
        while done < target:
            assert opt is not None
            opt.step(batches.next(model))
            done += 1
        yield done


def curvature_stats(stats: BlockStats, curvature: str) -> BlockStats:
    """``stats`` with the curvature the oracles and the K-step model use ("auto": the Fisher where measured)."""
    if curvature == "fisher" or (curvature == "auto" and stats.has_fisher):
        return stats.with_fisher_curvature()
    return stats


def _allocations(cfg: ProbeConfig, model: torch.nn.Module, blocks: list[Block], batches: _Batches,
                 pooled: BlockStats) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:  # fmt: skip
    """Every allocation, normalised, in report order, and the oracles' parameters. The nets' sigma at the current
    weights; the oracles from ``pooled`` (already in the chosen curvature)."""
    settle = [batches.next(model) for _ in range(cfg.settle)]
    allocs: dict[str, Tensor] = {"mezo": torch.ones(len(blocks), dtype=torch.float64)}
    rnd = net_sigma("learned-random", model, blocks, settle, net_seed=cfg.net_seed, eps=cfg.eps, seed=cfg.seed)
    allocs["learned-random"] = rnd
    allocs["learned-random-permuted"] = permuted(rnd, blocks, cfg.perm_seed)
    for i, artifact in enumerate(cfg.artifacts):
        tag = artifact_tag(i, len(cfg.artifacts))
        allocs[f"learned{tag}"] = net_sigma("learned", model, blocks, settle, artifact=artifact, eps=cfg.eps,
                                            seed=cfg.seed)  # fmt: skip
        allocs[f"per-block-const{tag}"] = const_sigma("per-block-const", model, blocks, artifact=artifact)
    eta = water_filling_eta(pooled, cfg.wf_eta)
    params: dict[str, dict[str, float]] = {}
    if eta is None:
        # Skipped, not fatal: the statistics took the probe most of its time and the other allocations stand.
        log.warning("probe-blocks: water-filling skipped: MeZO's one-step optimal eta is not positive (the summed "
                    "gradient energy A <= 0: the gradient is not resolved from the minibatch noise, or the curvature "
                    "is negative); give --wf-eta to place it")  # fmt: skip
    else:
        allocs["water-filling"] = water_filling(pooled, eta)
        params["water-filling"] = {"eta": eta}
    quad = QuadraticModel.from_stats(pooled)
    temperature = _tempered(lambda t: gsl(pooled, t), cfg.gsl_temperature, GSL_TEMPERATURES, quad, cfg.horizon)
    gamma = _tempered(lambda g: hizoo(pooled, g), cfg.hizoo_gamma, HIZOO_GAMMAS, quad, cfg.horizon)
    allocs["gsl"] = gsl(pooled, temperature)
    allocs["hizoo"] = hizoo(pooled, gamma)
    params.update({"gsl": {"temperature": temperature}, "hizoo": {"gamma": gamma}})
    return allocs, params


# The oracles' temperature grids: without a given value, the one the K-step model predicts best is used.
GSL_TEMPERATURES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
HIZOO_GAMMAS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def _tempered(family: Callable[[float], Tensor], given: float | None, grid: tuple[float, ...],
              quad: QuadraticModel, horizon: int) -> float:  # fmt: skip
    """``given``, or the member of ``grid`` whose allocation has the lowest predicted K-step loss."""
    if given is not None:
        return given
    scored = [(float(kstep(family(t), quad, horizon).loss), i, t) for i, t in enumerate(grid)]
    best = min(scored)[2]
    log.info("probe-blocks: oracle parameter %g chosen from %s by the K-step model", best, grid)
    return best


def _score(allocs: dict[str, Tensor], stats: BlockStats) -> dict[str, dict[str, float]]:
    """A, T, V, Bq, eta*, gain and R of every allocation on one set of statistics ({} without them)."""
    if not bool(torch.isfinite(stats.tau).all()):
        return {}
    base = step_terms(allocs["mezo"], stats).gain()
    out = {}
    for name, s in allocs.items():
        terms = step_terms(s, stats)
        out[name] = {**terms.to_dict(), "R": float(terms.gain() / base)}
    return out


def _kstep_scores(allocs: dict[str, Tensor], stats: BlockStats, horizon: int) -> dict[str, dict[str, float]]:
    model = QuadraticModel.from_stats(stats)
    res = {name: kstep(s, model, horizon) for name, s in allocs.items()}
    base = res["mezo"].decrease
    return {name: {"eta": r.eta, "f0": r.f0, "fK": float(r.loss), "R_K": r.decrease / base if base > 0 else float("nan")}
            for name, r in res.items()}  # fmt: skip


def _load(cfg: ProbeConfig) -> tuple[Any, Any, Any]:
    from l2zo.models import load_model
    from l2zo.tasks.base import SplitSizes, get_task

    task = get_task(cfg.task)
    # dev/test are not used; the train split is the compare's for the same num_train and data_seed
    default = task.default_sizes
    data = task.load(Path(cfg.data_dir) if cfg.data_dir else None,
                     SplitSizes(train=cfg.num_train, dev=default.dev, test=default.test), cfg.data_seed)  # fmt: skip
    if not data.train:
        raise L2ZOError(f"task {task.name!r} has an empty train split")
    loaded = load_model(cfg.model)
    return task, data, loaded


def probe_gram(cfg: ProbeConfig, chunk: int = 100) -> Gram:
    """The Hessian Gram of the block gradients (``coupling_stats.gradient_gram``) of ``cfg``'s model on its whole
    train split, in chunks of ``chunk`` examples (a remainder smaller than a chunk is left out, so that the chunks'
    mean is a mean over examples), at the model's initial state (dropout off)."""
    from l2zo.tasks.scoring import CandidateScorer

    if chunk < 1:
        raise L2ZOError(f"--chunk must be >= 1, got {chunk}")
    task, data, loaded = _load(cfg)
    model = loaded.model.to(torch.device("cpu")).float()
    scorer = CandidateScorer(loaded.tokenizer, max_length=cfg.max_length)
    examples = list(data.train)
    if len(examples) < chunk:
        raise L2ZOError(f"the train split has {len(examples)} examples, fewer than one chunk of {chunk}")
    batches = [scorer.collate(examples[i : i + chunk]) for i in range(0, len(examples) - chunk + 1, chunk)]
    fns = [lambda batch=batch: scorer.loss(model, batch, task.loss_kind) for batch in batches]
    with eval_mode(model):
        return gradient_gram(partition(model), fns)


def run_probe(
    cfg: ProbeConfig, pairs_dir: Path | None = None, on_pair: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Measure, score and return the report (JSON-ready; ``sigma`` holds each allocation's fixed-sigma mapping).

    ``pairs_dir``: where each pair is saved when measured and loaded from if there (see the module docstring).
    ``on_pair``: called after each pair (a safe point to stop at, e.g. ``SignalGuard.check``).
    """
    t0 = time.perf_counter()
    task, data, loaded = _load(cfg)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")  # fmt: skip
    model = loaded.model.to(device).float()
    from l2zo.tasks.scoring import CandidateScorer

    scorer = CandidateScorer(loaded.tokenizer, max_length=cfg.max_length)
    batches = _Batches(list(data.train), scorer, task.loss_kind, cfg.batch_size, cfg.seed, device)
    blocks = partition(model)
    per_state: dict[int, list[PairSample]] = {}
    zo_energy: list[ZOEnergy] = []
    first_state_weights: list[Tensor] | None = None
    if pairs_dir is not None:
        pairs_dir.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        for state in _states(cfg, model, batches):
            samples = []
            for k in range(cfg.pairs):
                saved = pair_path(pairs_dir, state, k) if pairs_dir is not None else None
                zo_saved = zo_path(pairs_dir, state, k) if pairs_dir is not None else None
                zo = (load_zo(zo_saved, len(blocks), cfg.zo_probes, fisher=task.loss_kind == "classification")
                      if zo_saved is not None and cfg.zo_probes else None)  # fmt: skip
                if saved is not None and saved.is_file() and (zo is not None or not cfg.zo_probes):
                    samples.append(load_pair(saved, len(blocks)))
                    if zo is not None:
                        zo_energy.append(zo)
                    batches.skip_draw()
                    batches.skip_draw()
                    log.info("probe-blocks: state %d, pair %d/%d loaded from %s", state, k + 1, cfg.pairs, saved)
                    continue
                a, b = batches.draw(model), batches.draw(model)
                seed = cfg.seed * 7919 + state * 131 + k
                if saved is not None and saved.is_file():  # only the forward-only G is missing
                    sample = load_pair(saved, len(blocks))
                else:
                    sample = measure_pair(blocks, a, b, probes=cfg.probes, gHg_probes=cfg.gHg_probes,
                                          fisher_samples=cfg.fisher_samples, seed=seed)  # fmt: skip
                    if saved is not None:
                        save_pair(saved, sample)
                if cfg.zo_probes:
                    fa = fb = None
                    if a.fixed_sampled is not None and b.fixed_sampled is not None:  # the Fisher's labels, at theta
                        gen = torch.Generator().manual_seed(seed + 104_729)
                        fa, fb = a.fixed_sampled(gen), b.fixed_sampled(gen)
                    zo = zo_block_energy(blocks, a.loss, b.loss, eps=cfg.eps, probes=cfg.zo_probes, seed=seed,
                                         fisher_a=fa, fisher_b=fb, batch_size=a.batch_size)  # fmt: skip
                    if zo_saved is not None:
                        save_zo(zo_saved, zo)
                    zo_energy.append(zo)
                samples.append(sample)
                # a pair costs minutes on SmolLM2-135M: say where the probe is
                log.info("probe-blocks: state %d, pair %d/%d measured (%.0f s so far)", state, k + 1, cfg.pairs,
                         time.perf_counter() - t0)  # fmt: skip
                if on_pair is not None:
                    on_pair()
            per_state[state] = samples
            log.info("probe-blocks: state %d measured (%d pairs, %.0f s so far)", state, cfg.pairs,
                     time.perf_counter() - t0)  # fmt: skip
            if first_state_weights is None:
                first_state_weights = [b.param.detach().clone() for b in blocks]
        pooled = combine(blocks, [s for v in per_state.values() for s in v])
        curv = curvature_stats(pooled, cfg.curvature)
        # The nets' sigma at the first state (where a fine-tune from it starts), not after the trajectory.
        assert first_state_weights is not None
        current = [b.param.detach().clone() for b in blocks]
        with torch.no_grad():
            for b, w in zip(blocks, first_state_weights):
                b.param.copy_(w)
        allocs, oracle_params = _allocations(cfg, model, blocks, batches, curv)
        zo_report = None
        if zo_energy:
            zo_G = torch.stack([z.G for z in zo_energy])  # [pairs, B]
            zo_F = (torch.stack([z.fisher for z in zo_energy]).mean(dim=0)  # type: ignore[misc]
                    if all(z.fisher is not None for z in zo_energy) and curv.has_fisher else None)  # fmt: skip
            zo_stats = dataclasses.replace(curv, G=zo_G.mean(dim=0))
            allocs["gsl-zo"] = gsl(zo_stats, oracle_params["gsl"]["temperature"])
            if zo_F is not None and curv.tau is curv.fisher:
                # both halves forward-only: the task's oracle without a backward pass
                allocs["gsl-zo-fisher"] = gsl(
                    dataclasses.replace(zo_stats, tau=zo_F), oracle_params["gsl"]["temperature"]
                )
            zo_report = _zo_report(zo_energy, curv, zo_G, zo_F)
        with torch.no_grad():
            for b, w in zip(blocks, current):
                b.param.copy_(w)
    state_stats = {state: combine(blocks, samples) for state, samples in per_state.items()}
    return {
        "config": dataclasses.asdict(cfg),
        "model_name_or_path": loaded.name_or_path,
        "task": task.name,
        "loss_kind": task.loss_kind,
        "num_blocks": len(blocks),
        "wall_time_s": time.perf_counter() - t0,
        "blocks": pooled.rows(),
        "states": {str(k): {"loss": v.loss, "blocks": v.rows()} for k, v in state_stats.items()},
        "curvature": "fisher" if curv is not pooled else "hessian",
        "oracle_params": oracle_params,
        "allocations": {
            "hessian": _score(allocs, pooled),
            "fisher": _score(allocs, pooled.with_fisher_curvature()) if pooled.has_fisher else {},
            "per_state": {str(k): _score(allocs, v) for k, v in state_stats.items()},
            "per_state_fisher": {
                str(k): _score(allocs, v.with_fisher_curvature()) for k, v in state_stats.items() if v.has_fisher
            },
            "kstep": _kstep_scores(allocs, curv, cfg.horizon),
        },
        "sigma": {name: sigma_mapping(blocks, s) for name, s in allocs.items()},
        **({"zo": zo_report} if zo_report is not None else {}),
    }


def _zo_report(energy: list[ZOEnergy], stats: BlockStats, G: Tensor, F: Tensor | None) -> dict[str, Any]:
    """The forward-only G (and Fisher, where measured) pooled over the pairs, its cost, and how well it reproduces
    the backprop statistics (``stats``): the correlation of the log gradient shares and of the log per-element
    Fisher traces. ``G``: [pairs, B] the forward-only G per pair; ``F``: [B] the pooled forward-only Fisher or None."""
    # transfer imports this module (for load_pair), so its helpers are imported here, not at the top
    from l2zo.blockstats.transfer import log_gradient_share, pearson

    se = G.std(dim=0) / len(energy) ** 0.5 if len(energy) > 1 else torch.full_like(G[0], float("nan"))
    zo = dataclasses.replace(stats, G=G.mean(dim=0))
    fisher = None
    if F is not None:
        floor = 1e-300  # logs of a trace estimate that is positive by construction
        per_element = [torch.log((f / stats.n).clamp_min(floor)) for f in (F, stats.fisher)]
        fisher = {"corr": pearson(*per_element), "per_block": F.tolist()}
    return {
        "probes": energy[0].probes,
        "pairs": len(energy),
        "forwards": sum(z.forwards for z in energy),
        "forwards_per_pair": energy[0].forwards,
        "share_corr": pearson(log_gradient_share(zo), log_gradient_share(stats)),
        "fisher": fisher,
        "blocks": [
            {"name": n, "G_zo": float(g), "G_zo_se": float(e), "G": float(b)}
            for n, g, e, b in zip(stats.names, zo.G, se, stats.G)
        ],  # fmt: skip
    }
