"""The quick start's main job, on the embedded tiny world (offline, a few minutes on 2 CPU cores).

1. Reuse the shipped learned optimizer for ``tiny`` (``checkpoints/tiny/zo-finetuner``), or meta-train
   it with ``meta_configs/tiny.yaml`` when it is missing.
2. Fine-tune ``tiny-derived`` (a derivative of ``tiny``) on a synthetic task held out of meta-training
   with ``mezo``, ``learned`` and the ``learned-random`` ablation: same batches, seed and budget.
3. Print the comparison table; TensorBoard runs, plots and summary.md land in ``--logdir``.
"""

from __future__ import annotations

from pathlib import Path

from l2zo.cli.parser import CommandParser, command_parser
from l2zo.compare.spec import CompareConfig
from l2zo.config import DataArgs
from l2zo.errors import L2ZOError
from l2zo.tasks.synthetic import SYNTH_HELD_OUT

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "checkpoints" / "tiny" / "zo-finetuner"
META_CONFIG = ROOT / "meta_configs" / "tiny.yaml"
# Each optimizer at its own lr, picked on dev from the grid 1e-4 ... 1.6e-3 on tuning seeds 100 and 101 (mean final
# dev loss; an lr that diverges on either is out) by `bash scripts/tiny_recipes.sh robust` (EVALUATION.md §0b),
# never on the demo's own seeds: a shared lr favours whichever optimizer it happens to suit. (A ~1M-parameter
# model needs a far larger lr than MeZO's 1e-6/1e-7.) On seed 100 alone learned-random picked 8e-4, which
# diverges on seeds 0-2; two tuning seeds rule it out.
DEMO_LRS = {"mezo": 2e-4, "learned": 4e-4, "learned-random": 4e-4}
DEMO_SEEDS = "0,1,2"


def ensure_artifact() -> Path:
    """The shipped tiny artifact, meta-training it first if it is missing (a few minutes)."""
    if (ARTIFACT / "l2zo_artifact.json").is_file():
        print(f"l2zo demo: reusing the learned optimizer {ARTIFACT.relative_to(ROOT)}")
        return ARTIFACT
    if not META_CONFIG.is_file():
        raise L2ZOError(f"no artifact at {ARTIFACT} and no {META_CONFIG} to meta-train one; run from a checkout")
    from l2zo.config.parser import build_config
    from l2zo.learned.meta_config import MetaTrainConfig
    from l2zo.train.meta_train import run_meta_train

    print(f"l2zo demo: meta-training the learned optimizer with {META_CONFIG.relative_to(ROOT)} (a few minutes)")
    cfg = build_config(MetaTrainConfig, META_CONFIG, {"output": str(ARTIFACT), "progress": False})
    return run_meta_train(cfg)


def run_demo(logdir: str = "runs/demo", steps: int = 300) -> int:
    from l2zo.compare.run import run_compare

    artifact = ensure_artifact()
    task = SYNTH_HELD_OUT[0]
    print(f"l2zo demo: fine-tuning tiny-derived on the held-out task {task}: mezo vs learned vs learned-random, "
          f"seeds {DEMO_SEEDS} (the same batches and z seeds for all three), paired 95% CIs against mezo")  # fmt: skip
    lr = {name: f"lr={value:g}" for name, value in DEMO_LRS.items()}
    cfg = CompareConfig(
        data=DataArgs(model="tiny-derived", task=task, num_train=1000, num_dev=200, num_test=300),
        optimizers=f"mezo:{lr['mezo']},learned={artifact}:{lr['learned']},learned-random={artifact}:{lr['learned-random']}",
        steps=steps,
        seeds=DEMO_SEEDS,
        baseline="mezo",
        eval_every=max(steps // 3, 1),
        logdir=logdir,
    )
    from l2zo.cli.compare_cmd import print_report

    print_report(run_compare(cfg, overwrite=True), Path(logdir))
    print_against_untrained(Path(logdir))
    return 0


def print_against_untrained(logdir: Path) -> None:
    """The ablation the paper never ran: the meta-trained net against the same net untrained, paired over seeds."""
    from l2zo.compare.heldout import ci_text, compare_curves
    from l2zo.compare.paired import compare_paired

    by_opt = compare_curves(logdir)
    if by_opt.get("learned") and by_opt.get("learned-random"):
        p = compare_paired(by_opt["learned"], by_opt["learned-random"])
        print(f"\nlearned - learned-random (the same net untrained), final dev loss over {p.ci.n} paired seeds: "
              f"{ci_text(p)} (95% CI): {p.ci.verdict}")  # fmt: skip


def register(cli: CommandParser) -> None:
    text = "the quick start: learned vs MeZO on a held-out task of the embedded tiny world"
    p = command_parser(description=text)
    p.add_argument("--logdir", type=str, default="runs/demo", help="where the runs go")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per optimizer")
    cli.add_command("demo", p, lambda args: run_demo(logdir=args.logdir, steps=args.steps), help=text)
