"""Gradient Difference (GradDiff): ascent on forget, descent on remain.

    L = - forget_weight * mean_{forget} CE + remain_weight * mean_{remain} CE
"""
from __future__ import annotations

from noencore.methods.base import Method


class GradDiff(Method):
    name = "graddiff"

    def __init__(self, forget_weight: float = 1.0, remain_weight: float = 1.0,
                 remain_anchor: bool = False):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
