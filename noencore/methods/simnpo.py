"""SimNPO (arXiv 2410.07163): NPO without a reference model, length-normalised.

With s(x) = S(x) / |x| the mean token NLL of forget row x::

    L_SimNPO = (2 / beta) * mean_x softplus(gamma - beta * s(x))   (note: -log sigma(-z) = softplus(z))
    L        = forget_weight * L_SimNPO + remain_weight * mean_{remain tokens} CE

dL/dCE_token = -(2 / (n_forget_rows * |x|)) * sigmoid(gamma - beta * s(x)).
"""
from __future__ import annotations

import torch

from noencore.methods.base import Rows
from noencore.methods.npo import NPO


class SimNPO(NPO):
    """NPO whose margin is the length-normalised NLL against a fixed ``gamma``."""

    name = "simnpo"
    needs_reference = False

    def __init__(self, beta: float = 2.5, gamma: float = 0.0, forget_weight: float = 1.0,
                 remain_weight: float = 1.0, remain_anchor: bool = False):
        super().__init__(beta=beta, forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
        self.gamma = float(gamma)

    def margin(self, rows: Rows) -> torch.Tensor:
        """float32 [B]: gamma - beta * s(x), s the row's mean token NLL."""
        return self.gamma - self.beta * rows.seq_nll() / rows.seq_tokens().clamp_min(1.0)

    def token_scale(self, rows: Rows) -> torch.Tensor:
        """float32 [B]: 1 / |x| (the margin uses the row's mean NLL)."""
        return 1.0 / rows.seq_tokens().clamp_min(1.0)

    def describe(self) -> dict:
        return {**super().describe(), "gamma": self.gamma}
