"""The training stage: ``unlearn`` (one process or DeepSpeed ZeRO), checkpoints, metrics."""
from __future__ import annotations

from noencore.engine.loop import DivergenceError, UnlearnResult, unlearn

__all__ = ["DivergenceError", "UnlearnResult", "unlearn"]
