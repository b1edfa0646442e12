"""Peak memory, the same call on CPU and CUDA."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory so far in MiB: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
