"""Bounded gradient ascent: GA (plus optional remain descent) with a loss cap.

    L = - mean_{forget} min(CE, cap)  [+ remain_weight * mean_{remain} CE]

A forget token whose CE already exceeds ``loss_cap`` (nats) gets no gradient, so ascent
stops pushing tokens that are already forgotten instead of blowing the model up. The
cap is applied inside the fused op (``loss_cap``). A natural cap is a little above
log(card) (7.6 nats for 2048 codes: the NLL of a uniform guess).
"""
from __future__ import annotations

from noencore.methods.base import Method


class BoundedGradientAscent(Method):
    name = "bounded_ga"

    def __init__(self, loss_cap: float = 8.0, forget_weight: float = 1.0,
                 remain_weight: float = 1.0):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight)
        if loss_cap <= 0:
            raise ValueError(f"loss_cap must be positive (nats), got {loss_cap}")
        self.loss_cap = float(loss_cap)
