"""Integrations of l2zo's optimizers with other training loops.

``l2zo.integrations.transformers``: ``ZOTrainer``, a drop-in for ``transformers.Trainer``, and
``ZOTrainerMixin``, the same for any Trainer subclass (TRL's ``SFTTrainer``, a project's own). Nothing is
imported here, so ``import l2zo`` never pulls in a framework the user does not use.
"""
