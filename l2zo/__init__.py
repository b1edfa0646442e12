"""l2zo: learned zeroth-order optimizers for fine-tuning LLMs.

The algorithm lives in pure functions (``l2zo.engine``) and ``torch.optim.Optimizer`` subclasses
(``l2zo.optim``); Lightning only drives the loops (``l2zo.train``).
"""

__version__ = "0.1.0"
