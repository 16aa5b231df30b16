"""The shape of one optimizer step: a global batch over ranks and micro-batches.

One object for the engine (DeepSpeed's micro-batch, the micro-batches a rank's rows are
cut into, the windows per forward pass when it scores a set) and the planner (the
micro-batch whose memory it models), so that they never compute it two ways.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    """``batch`` windows per optimizer step (all ranks together), split over ``world``
    ranks, each running ``accumulation`` micro-batches."""

    batch: int
    world: int = 1
    accumulation: int = 1

    @property
    def rank_rows(self) -> int:
        """A rank's rows of the step, ceil(B / G) (the last ranks' rows padded)."""
        return -(-self.batch // self.world)

    @property
    def micro_batch(self) -> int:
        """A rank's rows per micro-batch (DeepSpeed's ``train_micro_batch_size_per_gpu``)."""
        return self.rank_rows // self.accumulation

    @property
    def scoring_batch(self) -> int:
        """Windows per forward pass when the engine scores a whole set (reference NLLs,
        the stop rule): B / (G A) rounded down, at least 1."""
        return max(1, self.batch // (self.world * self.accumulation))

    @property
    def whole(self) -> bool:
        """Whether B splits into G x A whole, equal micro-batches."""
        return self.batch >= self.world * self.accumulation and \
            self.batch % (self.world * self.accumulation) == 0
