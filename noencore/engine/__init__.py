"""The training stage: ``unlearn`` (one process or DeepSpeed ZeRO), checkpoints, metrics."""
from __future__ import annotations

from noencore.engine.config import UnlearnConfig
from noencore.engine.loop import DivergenceError, Trainer, UnlearnResult, unlearn

__all__ = ["DivergenceError", "Trainer", "UnlearnConfig", "UnlearnResult", "unlearn"]
