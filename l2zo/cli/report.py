"""Plain-text summaries printed at the end of a command."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_finetune_summary(summary: dict[str, Any], logdir: str) -> None:
    print()
    print(f"{summary['optimizer']} on {summary['task']} ({summary['model']}), {summary['steps_done']} steps")
    print(
        f"  dev loss  {_fmt(summary['dev_loss_initial'])} -> {_fmt(summary['dev_loss_final'])}"
        f"   (best {_fmt(summary['dev_loss_best'])} at step {summary['dev_loss_best_step']})"
    )
    print(f"  dev acc   {_fmt(summary['dev_acc_initial'], '.3f')} -> {_fmt(summary['dev_acc_final'], '.3f')}")
    print(f"  test acc  {_fmt(summary['test_acc'], '.3f')}   test loss {_fmt(summary['test_loss'])}")
    print(f"  {_fmt(summary['time_per_step_s'], '.3f')} s/step, peak memory {_fmt(summary['peak_mem_mb'], '.0f')} MiB")
    print(f"  run folder: {logdir}  (tensorboard --logdir {logdir})")
