"""``MetaTrainConfig``: every knob of ``l2zo meta-train``, read from YAML and flags by ``l2zo.config.build_config``.

Defaults reproduce the paper's objective (greedy one-step look-ahead on the inner batch, states from a
first-order teacher with periodic reset) with hyperparameters that actually move the variance network on
the tiny world: Adam at 1e-3 on the net and a look-ahead step size eta_meta (``inner_lr``) at the scale a
ZO run on the tiny model uses. The paper's SGD at 0.05-0.1 with eta_meta = 1e-6 gives meta-gradients of
order 1e-6 and leaves the net where it started (its released nets are barely trained).
"""

from __future__ import annotations

import dataclasses

from l2zo.config import PRECISIONS, check_choice
from l2zo.errors import L2ZOError
from l2zo.tasks.synthetic import SYNTH_META_TRAIN

OBJECTIVES = ("greedy", "unrolled")
OUTER_BATCHES = ("inner", "heldout")
META_OPTIMIZERS = ("adam", "sgd")
NORMALIZATIONS = ("numel", "paper", "none")


@dataclasses.dataclass
class MetaTrainConfig:
    # -- what to meta-train on
    model: str = "tiny"
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(SYNTH_META_TRAIN))
    task_weights: list[float] | None = None
    data_dir: str | None = None
    num_train: int = 500
    num_dev: int = 100
    data_seed: int = 0
    max_length: int = 128
    batch_size: int = 16
    # -- the meta-objective
    objective: str = "greedy"
    unroll_steps: int = 1
    differentiable_g: bool = False
    outer_batch: str = "inner"
    inner_lr: float = 1e-3
    eps: float = 1e-3
    normalization: str = "numel"
    # -- the trajectory the states come from
    p_teacher: float = 1.0
    teacher_lr: float = 0.01
    teacher_momentum: float = 0.8
    teacher_clip: float = 1.0
    reset_every: int = 100
    # -- the variance network and its optimizer
    hidden: int = 64
    activation: str = "tanh"
    positive: str = "abs"
    log_scale: bool = False
    normalize_features: bool = False
    role_embedding_dim: int = 0
    depth_feature: bool = False
    shared: bool = False
    net_seed: int = 0
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    meta_grad_clip: float | None = None
    # -- the run
    steps: int = 600
    seed: int = 0
    attn_implementation: str | None = "eager"
    precision: str = "32"
    output: str = "checkpoints/tiny/zo-finetuner"
    logdir: str = "runs/meta-train/tiny"
    checkpoint_every: int = 100
    histogram_every: int = 25
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("outer_batch", self.outer_batch, OUTER_BATCHES)
        check_choice("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("precision", self.precision, PRECISIONS)
        if not self.tasks:
            raise L2ZOError("--tasks must name at least one task")
        if self.task_weights is not None:
            # build_config reads lists as strings; weights are numbers.
            try:
                self.task_weights = [float(w) for w in self.task_weights]
            except ValueError:
                raise L2ZOError(f"--task-weights must be numbers, got {self.task_weights}") from None
            if len(self.task_weights) != len(self.tasks) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
                raise L2ZOError("--task-weights needs one non-negative weight per task, not all zero")
        for key in ("steps", "batch_size", "num_train", "num_dev", "max_length", "unroll_steps", "reset_every",
                    "checkpoint_every", "histogram_every", "hidden"):  # fmt: skip
            if getattr(self, key) <= 0:
                raise L2ZOError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.p_teacher <= 1.0:
            raise L2ZOError(f"--p-teacher must be in [0, 1], got {self.p_teacher}")
        if self.objective == "greedy" and (self.unroll_steps != 1 or self.differentiable_g):
            raise L2ZOError("--unroll-steps and --differentiable-g belong to --objective unrolled")
        for key in ("inner_lr", "eps", "meta_lr", "teacher_lr"):
            if not getattr(self, key) > 0:
                raise L2ZOError(f"--{key.replace('_', '-')} must be > 0, got {getattr(self, key)}")

    @property
    def objective_name(self) -> str:
        """A one-line label for the artifact record, e.g. "greedy" or "unrolled-K4-dg-heldout"."""
        if self.objective == "greedy":
            label = "greedy"
        else:
            label = f"unrolled-K{self.unroll_steps}" + ("-dg" if self.differentiable_g else "")
        return label + ("-heldout" if self.outer_batch == "heldout" else "")


META_FIELD_HELP: dict[str, str] = {
    "model": "base model (alias, folder, .gguf or hub id); the artifact is keyed to its blocks",
    "tasks": "task family: comma-separated task names (default: the synth-* meta-training tasks)",
    "task_weights": "sampling weight per task (default: uniform)",
    "data_dir": "local data root for GLUE-style tasks (see `l2zo finetune --help`)",
    "num_train": "training examples sampled per task (inner batches, teacher steps)",
    "num_dev": "dev examples per task (the held-out outer batches)",
    "data_seed": "seed of the per-task train/dev sampling",
    "max_length": "max tokens per (prompt, candidate) sequence",
    "batch_size": "examples per inner/outer batch; also the 'paper' normalization's batch size",
    "objective": "greedy: the paper's one-step look-ahead L(theta - eta*c*g*sigma*z); unrolled: K differentiable ZO steps",
    "unroll_steps": "K, the unrolled objective's number of inner ZO steps (each on its own inner batch)",
    "differentiable_g": "unrolled only: let the meta-gradient flow through g = (L+ - L-)/(2 eps) too (paper: detached)",
    "outer_batch": "inner: the outer loss on the (last) inner batch, as the paper; heldout: on a dev batch",
    "inner_lr": "eta_meta: the look-ahead / unrolled ZO step size, also the on-policy trajectory's ZO lr",
    "eps": "ZO perturbation radius",
    "normalization": "sigma normalization: numel, paper (embedding rule) or none (raw sigma, c = 1)",
    "p_teacher": "probability that a trajectory step is the first-order teacher's (1: paper; 0: on-policy LearnedZO)",
    "teacher_lr": "teacher SGD learning rate, decayed linearly to 0 within each restart period",
    "teacher_momentum": "teacher SGD momentum (paper: 0.8)",
    "teacher_clip": "teacher gradient-norm clip (paper: 1.0, the HF default)",
    "reset_every": "meta-steps per restart period: theta goes back to the pretrained weights after each",
    "hidden": "variance net hidden width (paper: 64)",
    "activation": "variance net activation (paper: tanh)",
    "positive": "how the net's output is made positive: abs (paper) or softplus",
    "log_scale": "beyond paper: signed log1p of weight_var and the losses",
    "normalize_features": "beyond paper: losses relative to the first loss, var relative to the initial var",
    "role_embedding_dim": "beyond paper: >0 adds a learned embedding per block kind",
    "depth_feature": "beyond paper: adds layer_index/num_layers as an input",
    "shared": "beyond paper: one MLP for all blocks (use with role/depth inputs)",
    "net_seed": "seed of the variance net's initialisation",
    "meta_optimizer": "optimizer of the net's parameters: adam or sgd (paper: sgd, no momentum)",
    "meta_lr": "learning rate of the net's optimizer",
    "meta_grad_clip": "clip the meta-gradient's norm (default: no clipping)",
    "steps": "meta-steps",
    "seed": "seed of task sampling, batches, z and the teacher/on-policy coin",
    "attn_implementation": "attention kernel for meta-training (eager: supports every autograd path on CPU)",
    "output": "artifact folder written at the end (e.g. checkpoints/tiny/<name>)",
    "logdir": "run folder: TensorBoard events, Lightning checkpoints (last.ckpt), config.yaml, summary.json",
    "checkpoint_every": "save a resumable Lightning checkpoint every N meta-steps",
    "histogram_every": "log sigma histograms every N meta-steps",
    "precision": "32 (the paper) or bf16-mixed: bf16 autocast over fp32 weights and net, losses in fp32 (~3x faster on CPU)",
    "device": "auto, cpu or cuda",
    "progress": "show a progress bar",
}
