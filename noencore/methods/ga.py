"""Gradient Ascent (GA): raise the forget set's token cross-entropy.

    L = - mean_{forget tokens} CE

The remain rows of a mixed batch are only measured (weight 0). Unbounded: the forget
loss can grow without limit and drag the remain set with it (see bounded GA, NPO).
"""
from __future__ import annotations

from noencore.methods.base import Method


class GradientAscent(Method):
    name = "ga"

    def __init__(self, forget_weight: float = 1.0):
        super().__init__(forget_weight=forget_weight, remain_weight=0.0)
