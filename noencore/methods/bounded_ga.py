"""Bounded gradient ascent: GA (plus optional remain descent) with a loss cap.

    L = - mean_{forget} min(CE, cap)  [+ remain_weight * mean_{remain} CE]

A forget token whose CE already exceeds ``loss_cap`` (nats; None = no token cap) gets no gradient, so ascent
stops pushing tokens that are already forgotten instead of blowing the model up. The
cap is applied inside the fused op (``loss_cap``). A natural cap is a little above
log(card) (7.6 nats for 2048 codes: the NLL of a uniform guess).

``row_target`` (nats per token, optional) bounds whole rows as well: a forget row whose
mean token NLL has reached it gets no gradient at all. Set it to the NLL the model gives
music it never saw (and move it as that level moves) and every forget item is raised to
that level and left there, instead of some items shooting past it while others lag.
"""
from __future__ import annotations

import torch

from noencore.methods.base import Check, Method, Rows


class BoundedGradientAscent(Method):
    name = "bounded_ga"

    def __init__(self, loss_cap: float | None = 8.0, forget_weight: float = 1.0,
                 remain_weight: float = 1.0, remain_anchor: bool = False,
                 row_target: float | None = None):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
        if loss_cap is None and row_target is None:
            raise ValueError("bounded_ga needs a bound: loss_cap (per token), row_target "
                             "(per row) or both")
        if loss_cap is not None and loss_cap <= 0:
            raise ValueError(f"loss_cap must be positive (nats), got {loss_cap}")
        if row_target is not None and row_target <= 0:
            raise ValueError(f"row_target must be positive (nats per token), got {row_target}")
        self.loss_cap = None if loss_cap is None else float(loss_cap)
        self.row_target = None if row_target is None else float(row_target)

    @property
    def needs_nll(self) -> bool:
        return super().needs_nll or self.row_target is not None

    def weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        w, loss = super().weights(rows)
        if self.row_target is None:
            return w, loss
        mean = rows.seq_nll() / rows.seq_tokens().clamp_min(1.0)          # [B]
        done = (mean >= self.row_target) & rows.forget
        keep = ~done[rows.item]
        loss = loss - rows.value(torch.where(keep, 0.0, w))  # the value of what is switched off
        return torch.where(keep, w, 0.0).float(), loss

    def on_check(self, check: Check) -> bool:
        """A ``row_target`` follows the non-members: forget rows are raised to where they
        are now."""
        if self.row_target is not None:
            self.row_target = check.nonmember_nll
        return True

    def describe(self) -> dict:
        return {**super().describe(), "row_target": self.row_target}
