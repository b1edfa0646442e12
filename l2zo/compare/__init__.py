"""``l2zo compare`` / ``l2zo report``: several optimizers on the same data, seeds and batches; tables and plots.

- :mod:`l2zo.compare.spec`: the compare config, ``--optimizers`` items, per-optimizer hyperparameters, sweeps.
- :mod:`l2zo.compare.run`: :func:`run_compare` (checks everything first, then runs; failures are recorded).
- :mod:`l2zo.compare.events`: runs read back from TensorBoard event files.
- :mod:`l2zo.compare.summary`: summary.md / summary.csv / sweep.csv; :mod:`l2zo.compare.plots`: the PNGs.
- :mod:`l2zo.compare.heldout`: many compares (model x task) gathered into one table and win counts.
- :mod:`l2zo.compare.meta_curves`: a meta-train run's curves read back from its events, and their plot.
"""

from __future__ import annotations

from l2zo.compare.spec import CompareConfig

__all__ = ["CompareConfig", "run_compare", "write_report"]


def __getattr__(name: str):  # lazy: `l2zo --help` should not import torch and matplotlib
    if name == "run_compare":
        from l2zo.compare.run import run_compare

        return run_compare
    if name == "write_report":
        from l2zo.compare.summary import write_report

        return write_report
    raise AttributeError(name)
