"""Random Labeling (RL): train the forget rows toward wrong codes, by *descent*.

    L = forget_weight * mean_{forget} CE(random label) + remain_weight * mean_{remain} CE

Two sources of wrong codes (``labels``):

- ``"random_tokens"`` (default): each forget token's target becomes a uniformly random
  code, drawn inside the fused op from the documented hash of (seed, row), so no label
  tensor is built and every backend draws the same codes.
- ``"remain_clip"``: each forget row's codes are replaced by those of a random remain
  row of the same (global) batch, keeping the forget caption: the model learns to answer
  the forget caption with someone else's music. Needs remain rows in every batch. The
  engine does the swap when it reads the batch (``UnlearningSets.step_batch``).
"""
from __future__ import annotations

import torch

from noencore.methods.base import Method, Rows, random_label_targets

LABEL_SOURCES = ("random_tokens", "remain_clip")


class RandomLabeling(Method):
    name = "rl"

    def __init__(self, labels: str = "random_tokens", forget_weight: float = 1.0,
                 remain_weight: float = 0.0, remain_anchor: bool = False):
        if labels not in LABEL_SOURCES:
            raise ValueError(f"RL labels must be one of {LABEL_SOURCES}, got {labels!r}")
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
        self.labels = labels
        self.swaps_codes = labels == "remain_clip"

    def targets(self, rows: Rows) -> torch.Tensor:
        return random_label_targets(rows) if self.labels == "random_tokens" else rows.targets

    def weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        w_r, _ = self.remain_weights(rows)
        w = torch.where(rows.is_forget, self.forget_weight / rows.forget_tokens.clamp_min(1.0),
                        w_r)
        # the loss value is the op's (on the random targets, not the true codes' NLL)
        return w.float(), torch.full((), float("nan"), device=w.device)

    def describe(self) -> dict:
        return {**super().describe(), "labels": self.labels}

