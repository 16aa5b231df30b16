"""SimNPO (arXiv 2410.07163): NPO without a reference model, length-normalised.

With s(x) = S(x) / |x| the mean token NLL of forget row x::

    L_SimNPO = (2 / beta) * mean_x softplus(gamma - beta * s(x))   (note: -log sigma(-z) = softplus(z))
    L        = forget_weight * L_SimNPO + remain_weight * mean_{remain tokens} CE

dL/dCE_token = -(2 / (n_forget_rows * |x|)) * sigmoid(gamma - beta * s(x)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from noencore.methods.base import Method, Rows


class SimNPO(Method):
    name = "simnpo"

    def __init__(self, beta: float = 2.5, gamma: float = 0.0, forget_weight: float = 1.0,
                 remain_weight: float = 1.0):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight)
        if beta <= 0:
            raise ValueError(f"SimNPO beta must be positive, got {beta}")
        self.beta, self.gamma = float(beta), float(gamma)

    def weights(self, rows: Rows) -> tuple[torch.Tensor, float]:
        forget = rows.forget
        n_f = max(rows.forget_rows, 1.0)  # global: ranks see part of the batch
        length = rows.seq_tokens().clamp_min(1.0)
        z = self.gamma - self.beta * rows.seq_nll() / length
        seq_w = -self.forget_weight * 2.0 / n_f * torch.sigmoid(z) / length
        w = torch.where(rows.is_forget, seq_w[rows.item],
                        torch.full_like(seq_w[rows.item],
                                        self.remain_weight / max(rows.remain_tokens, 1.0)))
        sim = float((2.0 / self.beta) * (F.softplus(z) * forget).sum() / n_f)
        remain = float((rows.nll * ~rows.is_forget).sum() / max(rows.remain_tokens, 1.0))
        return w.float(), self.forget_weight * sim + self.remain_weight * remain

    def describe(self) -> dict:
        return {**super().describe(), "beta": self.beta, "gamma": self.gamma}
