"""``MetaTrainConfig``: every knob of ``l2zo meta-train`` (flags and YAML keys via ``l2zo.config.parser``).

Defaults reproduce the paper's objective (greedy one-step look-ahead on the inner batch, states from a
first-order teacher with periodic reset) with hyperparameters that actually move the variance network on
the tiny world: Adam at 1e-3 on the net and a look-ahead step size eta_meta (``inner_lr``) at the scale a
ZO run on the tiny model uses. The paper's SGD at 0.05-0.1 with eta_meta = 1e-6 gives meta-gradients of
order 1e-6 and leaves the net where it started (its released nets are barely trained).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from l2zo.config import DataArgs, DistributedArgs, PeftArgs, check_fields, parse_scalar, split_list
from l2zo.errors import L2ZOError
from l2zo.tasks.synthetic import SYNTH_META_TRAIN


def _meta_data() -> DataArgs:
    # Meta-training reads train and dev splits only (one test example keeps the loader's checks happy).
    return DataArgs(num_train=500, num_dev=100, num_test=1, max_length=128, device="cpu")


@dataclasses.dataclass
class MetaTrainConfig:
    """Meta-training run"""

    # Meta-training draws its own tasks (--tasks) and never evaluates on test.
    cli_skip: ClassVar[tuple[str, ...]] = ("data.task", "data.num_test", "data.eval_batch_size")

    # -- what to meta-train on
    data: DataArgs = dataclasses.field(default_factory=_meta_data)
    """the base model (the artifact is keyed to its blocks) and each task's data"""
    dist: DistributedArgs = dataclasses.field(default_factory=DistributedArgs)
    """devices, nodes and the strategy"""
    adapter: PeftArgs = dataclasses.field(default_factory=PeftArgs)
    """a PEFT adapter: the net then learns a sigma per adapter tensor, and the artifact binds to this adapter"""
    tasks: list[str] | str = dataclasses.field(default_factory=lambda: list(SYNTH_META_TRAIN))
    """task family: comma-separated task names or a YAML list (default: the synth-* meta-training tasks)"""
    task_weights: list[float] | str | None = None
    """sampling weight per task (default: uniform)"""
    # -- the meta-objective
    objective: Literal["greedy", "unrolled", "expected", "distill", "es"] = "greedy"
    """greedy: the paper's one-step look-ahead L(theta - eta*c*g*sigma*z); unrolled: K differentiable ZO steps;
    expected: the z-free K-step expected loss of the block quadratic; distill: regress log sigma onto an oracle;
    es: antithetic evolution strategies on the dev-loss drop of K ZO steps (needs --outer-batch heldout)"""
    unroll_steps: int = 1
    """K, the unrolled (or es) objective's number of inner ZO steps (each on its own inner batch)"""
    differentiable_g: bool = False
    """unrolled only: let the meta-gradient flow through g = (L+ - L-)/(2 eps) too (paper: detached)"""
    outer_batch: Literal["inner", "heldout"] = "inner"
    """inner: the outer loss on the (last) inner batch, as the paper; heldout: on a dev batch"""
    # -- objectives expected and distill (per-block statistics at each state; l2zo.blockstats.expected/distill)
    expected_horizon: int = 300
    """expected: K, the ZO steps of the closed-form expected loss (a fine-tune's budget)"""
    expected_eta: Literal["tuned", "inner-lr"] = "tuned"
    """expected: the ZO step size of the model: re-tuned per meta-step for the net's allocation, or --inner-lr"""
    distill_oracle: Literal["gsl", "hizoo", "water-filling"] = "gsl"
    """distill: the oracle allocation to regress log sigma onto"""
    distill_temperature: float = 0.5
    """distill gsl: temperature of s^2 ~ (G/tau)^(1/temperature) (1/2: the best measured on the tiny world)"""
    distill_gamma: float = 1.0
    """distill hizoo: exponent of s^2 ~ (n/tau)^gamma"""
    distill_wf_eta: float | None = None
    """distill water-filling: its fixed eta (default: MeZO's one-step optimal eta at the state)"""
    distill_floor: float = 1e-2
    """distill: the smallest target sigma, relative to MeZO's 1"""
    stats_probes: int = 1
    """expected/distill: Hutchinson probes (HVPs) per meta-step for tau"""
    stats_gHg_probes: int = 1
    """expected/distill: HVPs per meta-step for g^T H g (the curvature along the gradient)"""
    stats_fisher_samples: int = 1
    """expected/distill: sampled label sets per batch for the Fisher (classification tasks)"""
    stats_curvature: Literal["auto", "fisher", "hessian"] = "auto"
    """expected/distill: curvature of the model: the Fisher where the task has one (auto), fisher, or hessian"""
    # -- end of the expected/distill block
    inner_lr: float = 1e-3
    """eta_meta: the look-ahead / unrolled ZO step size, also the on-policy trajectory's ZO lr"""
    eps: float = 1e-3
    """ZO perturbation radius"""
    normalization: Literal["numel", "paper", "none"] = "numel"
    """sigma normalization: numel, paper (embedding rule; its batch size is --batch-size) or none (raw sigma, c = 1)"""
    # -- es objective (issue 15, 2b): l2zo.learned.es ---------------------------------------------------------
    es_pairs: int = 8
    """es: P, antithetic pairs per meta-step (each pair runs 2 x K ZO steps per start state)"""
    es_sigma: float = 0.01
    """es: standard deviation of the perturbation of the net's parameters"""
    es_space: Literal["all", "last", "bias", "kind"] = "bias"
    """es: parameters searched: bias (b2: one scalar per block), last (the output layer w2, b2), all, or kind (the
    per-kind log-scale of --kind-scale: one number per block kind). With P = 8, two independent estimates agree
    (cosine) ~0.4 on bias, ~0.02 on last and ~0.005 on all (20 blocks, hidden 64)"""
    es_starts: Literal["trajectory", "both"] = "trajectory"
    """es: start states of the runs: the trajectory's theta, or both it and the pretrained theta_0"""
    # -- end of the es block --------------------------------------------------------------------------------
    # -- the trajectory the states come from
    p_teacher: float = 1.0
    """probability that a trajectory step is the first-order teacher's (1: paper; 0: on-policy LearnedZO)"""
    teacher_lr: float = 0.01
    """teacher SGD learning rate, decayed linearly to 0 within each restart period"""
    teacher_momentum: float = 0.8
    """teacher SGD momentum (paper: 0.8)"""
    teacher_clip: float = 1.0
    """teacher gradient-norm clip (paper: 1.0, the HF default)"""
    reset_every: int = 100
    """meta-steps per restart period: theta goes back to the pretrained weights after each"""
    # -- the variance network and its optimizer
    hidden: int = 64
    """variance net hidden width (paper: 64)"""
    activation: str = "tanh"
    """variance net activation (paper: tanh)"""
    positive: str = "abs"
    """how the net's output is made positive: abs (paper) or softplus"""
    log_scale: bool = False
    """beyond paper: signed log1p of weight_var and the losses"""
    normalize_features: bool = False
    """beyond paper: losses relative to the first loss, var relative to the initial var"""
    role_embedding_dim: int = 0
    """beyond paper: >0 adds a learned embedding per block kind"""
    depth_feature: bool = False
    """beyond paper: adds layer_index/num_layers as an input"""
    shared: bool = False
    """beyond paper: one MLP for all blocks (use with role/depth inputs)"""
    kind_scale: bool = False
    """beyond paper: a learned log-scale per block kind multiplying the net's output (zeros at init)"""
    # -- per-block features beyond the paper (issue 15 item 3; l2zo.learned.features; each off by default)
    feature_log_numel: bool = False
    """adds log n_b, the block's number of entries"""
    feature_weight_norm: bool = False
    """adds ||theta_b|| / sqrt(n_b), the per-element weight norm"""
    feature_drift: bool = False
    """adds ||theta_b - theta_b0|| / ||theta_b0|| (DiZO), theta_b0 the weights at the start of the run"""
    feature_curvature: Literal["none", "fisher", "hessian"] = "none"
    """adds the static per-element curvature, measured once on the base model and stored in the artifact: fisher
    (tr(F_b)/n_b, classification tasks) or hessian (Hutchinson tr(H_b)/n_b)"""
    feature_curvature_pairs: int = 2
    """batch pairs per task for the static curvature measurement"""
    feature_grad_rms: bool = False
    """adds log1p of the running RMS of the projected gradient (global; no extra forward)"""
    # -- end of per-block features
    net_seed: int = 0
    """seed of the variance net's initialisation"""
    meta_optimizer: Literal["adam", "sgd"] = "adam"
    """optimizer of the net's parameters: adam or sgd (paper: sgd, no momentum)"""
    meta_lr: float = 1e-3
    """learning rate of the net's optimizer"""
    meta_grad_clip: float | None = None
    """clip the meta-gradient's norm (default: no clipping)"""
    # -- the run
    steps: int = 600
    """meta-steps"""
    seed: int = 0
    """seed of task sampling, batches, z and the teacher/on-policy coin"""
    attn_implementation: str | None = "eager"
    """attention kernel for meta-training (eager: supports every autograd path on CPU)"""
    output: str = "checkpoints/tiny/zo-finetuner"
    """artifact folder written at the end (e.g. checkpoints/tiny/<name>)"""
    logdir: str = "runs/meta-train/tiny"
    """run folder: TensorBoard events, Lightning checkpoints (last.ckpt), config.yaml, summary.json"""
    checkpoint_every: int = 100
    """save a resumable Lightning checkpoint every N meta-steps"""
    histogram_every: int = 25
    """log sigma histograms every N meta-steps"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        self.tasks = split_list(self.tasks)
        if not self.tasks:
            raise L2ZOError("--tasks must name at least one task")
        if self.task_weights is not None:
            weights = [parse_scalar(w) if isinstance(w, str) else w for w in split_list(self.task_weights)]
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise L2ZOError(f"--task-weights must be numbers, got {self.task_weights}")
            self.task_weights = [float(w) for w in weights]
            if len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
                raise L2ZOError("--task-weights needs one non-negative weight per task, not all zero")
        check_fields(self, positive=("steps", "unroll_steps", "reset_every", "checkpoint_every", "histogram_every",
                                     "hidden", "inner_lr", "eps", "meta_lr", "teacher_lr",
                                     "feature_curvature_pairs"))  # fmt: skip
        if not 0.0 <= self.p_teacher <= 1.0:
            raise L2ZOError(f"--p-teacher must be in [0, 1], got {self.p_teacher}")
        if self.objective == "greedy" and (self.unroll_steps != 1 or self.differentiable_g):
            raise L2ZOError("--unroll-steps and --differentiable-g belong to --objective unrolled")
        # -- expected/distill checks
        if self.objective in ("expected", "distill"):
            if self.dist.world_size > 1:  # their statistics are not sliced over processes: the sum would count N times
                raise L2ZOError(f"--objective {self.objective} runs on one process; drop --devices/--num-nodes")
            if self.unroll_steps != 1 or self.differentiable_g or self.outer_batch != "inner":
                raise L2ZOError(f"--unroll-steps, --differentiable-g and --outer-batch do not apply to --objective "
                                f"{self.objective} (its meta-loss comes from two train batches at the state)")  # fmt: skip
            check_fields(self, positive=("expected_horizon", "stats_probes", "stats_gHg_probes",
                                         "distill_temperature", "distill_floor"))  # fmt: skip
            if self.stats_fisher_samples < 0 or self.distill_gamma < 0:
                raise L2ZOError("--stats-fisher-samples and --distill-gamma must be >= 0")
            if self.distill_wf_eta is not None and not self.distill_wf_eta > 0:
                raise L2ZOError(f"--distill-wf-eta must be > 0, got {self.distill_wf_eta}")
            if self.stats_curvature == "fisher" and self.stats_fisher_samples < 1:
                raise L2ZOError("--stats-curvature fisher needs --stats-fisher-samples >= 1")
        # -- es checks
        if self.objective == "es":
            if self.dist.world_size > 1:  # its K-step runs score the whole batches: the sum would count N times
                raise L2ZOError("--objective es runs on one process; drop --devices/--num-nodes")
            check_fields(self, positive=("es_pairs", "es_sigma"))
            if self.outer_batch != "heldout":
                raise L2ZOError("--objective es measures its reward on a held-out dev batch: add --outer-batch heldout")
            if self.differentiable_g:
                raise L2ZOError("--differentiable-g belongs to --objective unrolled (es differentiates nothing)")
            if self.es_space == "kind" and not self.kind_scale:
                raise L2ZOError("--es-space kind searches the per-kind log-scale of --kind-scale: add --kind-scale")

    @property
    def objective_name(self) -> str:
        """A one-line label for the artifact record, e.g. "greedy" or "unrolled-K4-dg-heldout"."""
        if self.objective == "greedy":
            label = "greedy"
        elif self.objective == "expected":  # e.g. expected-K300-tuned-auto
            return f"expected-K{self.expected_horizon}-{self.expected_eta}-{self.stats_curvature}"
        elif self.objective == "distill":  # e.g. distill-gsl-t0.5-auto
            param = {"gsl": f"t{self.distill_temperature:g}", "hizoo": f"g{self.distill_gamma:g}",
                     "water-filling": "eta" + ("mezo" if self.distill_wf_eta is None else f"{self.distill_wf_eta:g}")}  # fmt: skip
            return f"distill-{self.distill_oracle}-{param[self.distill_oracle]}-{self.stats_curvature}"
        elif self.objective == "es":
            label = f"es-K{self.unroll_steps}-P{self.es_pairs}-s{self.es_sigma:g}-{self.es_space}"
            label += "-both" if self.es_starts == "both" else ""
        else:
            label = f"unrolled-K{self.unroll_steps}" + ("-dg" if self.differentiable_g else "")
        return label + ("-heldout" if self.outer_batch == "heldout" else "")
