"""Negative Preference Optimization (NPO, arXiv 2404.05868) with a remain NLL term.

With S(x) = summed token NLL of forget row x under the model and S_ref(x) under the
reference (the model before unlearning, cached once)::

    L_NPO = (2 / beta) * mean_x softplus(beta * (S_ref(x) - S(x)))     (forget rows)
    L     = forget_weight * L_NPO + remain_weight * mean_{remain tokens} CE
            (or the anchored remain hinge, ``remain_anchor``: ``Method.remain_weights``)

dL/dCE_token = -(2 / n_forget_rows) * sigmoid(beta * (S_ref - S)) for the row's tokens:
GA whose weight fades as a row drifts away from the reference, which is why NPO does
not collapse like GA. The engine uses these weights (at the current no-grad NLL) as
the op's row weights, which gives the exact NPO gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from noencore.methods.base import Method, Rows


class NPO(Method):
    name = "npo"
    needs_reference = True
    needs_nll = True

    def __init__(self, beta: float = 0.1, forget_weight: float = 1.0, remain_weight: float = 1.0,
                 remain_anchor: bool = False):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
        if beta <= 0:
            raise ValueError(f"{type(self).__name__} beta must be positive, got {beta}")
        self.beta = float(beta)

    def margin(self, rows: Rows) -> torch.Tensor:
        """float32 [B]: beta * (S_ref - S), the NPO log-ratio per row."""
        if rows.ref_nll is None:
            raise ValueError("NPO needs the reference NLL of the forget rows (ref_nll)")
        return self.beta * (rows.ref_nll - rows.seq_nll())

    def token_scale(self, rows: Rows) -> torch.Tensor | float:
        """d margin / d CE_token, up to the factor -beta (per row: float32 [B], or 1)."""
        return 1.0

    def weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        forget = rows.forget
        n_f = rows.forget_rows.clamp_min(1.0)  # global: ranks see part of the batch
        m = self.margin(rows)
        # dL/dCE_token per row: the softplus' derivative times d margin / d CE_token
        seq_w = -self.forget_weight * 2.0 / n_f * torch.sigmoid(m) * self.token_scale(rows)
        w_r, remain = self.remain_weights(rows)
        w = torch.where(rows.is_forget, seq_w[rows.item], w_r)
        npo = (2.0 / self.beta) * (F.softplus(m) * forget).sum() / n_f
        return w.float(), self.forget_weight * npo + remain

    def describe(self) -> dict:
        return {**super().describe(), "beta": self.beta}
