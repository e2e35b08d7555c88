"""Dual LoRA's warm-up fitted to a transformers or TRL Trainer's run: ``callbacks=[DualLoraWarmupCallback()]``."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .warmup import fit_warmup_to_run

logger = logging.getLogger(__name__)


class DualLoraWarmupCallback(TrainerCallback):
    """At the start of training, give every Dual LoRA adapter with ``warmup_steps="auto"`` the warm-up of the
    Trainer's run: ``min(100, ceil(max_steps / 10))`` optimizer steps (:func:`~duallora.auto_warmup_steps`), with
    ``max_steps`` as the Trainer counts it (gradient accumulation and epochs included). An explicit
    ``warmup_steps`` is kept."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, steps in fit_warmup_to_run(model, state.max_steps).items():
                logger.info("Dual LoRA adapter %r: warm-up of %d steps for a run of %d", name, steps, state.max_steps)
        return control
