"""Keep library chatter out of l2zo's own output (here under train/: it imports Lightning)."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Lightning (re)sets its loggers to INFO when first imported, after the CLI quietened them, and
    prints tips and banners per run; transformers draws weight-loading bars. l2zo prints its own summary."""
    import lightning  # noqa: F401
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
