"""Test tooling: write TensorBoard scalars the way Lightning's logger does (one events file per writer)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def write_scalars(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """One new events file in ``folder`` holding ``tag -> [(step, value)]``."""
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for tag, series in scalars.items():
            for step, value in series:
                writer.add_scalar(tag, value, step)
    finally:
        writer.close()
