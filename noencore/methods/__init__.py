"""Unlearning methods: each turns a batch's rows into targets and signed row weights.

``get_method(name, **options)`` builds one by name: ga, bounded_ga, match, graddiff, rl,
npo, simnpo, and finetune
(descent on both sets: builds a memorised starting point or a retrained baseline).
"""
from __future__ import annotations

from noencore.methods.base import Method, Plan, Rows
from noencore.methods.bounded_ga import BoundedGradientAscent
from noencore.methods.finetune import Finetune
from noencore.methods.ga import GradientAscent
from noencore.methods.graddiff import GradDiff
from noencore.methods.match import TargetMatching
from noencore.methods.npo import NPO
from noencore.methods.rl import RandomLabeling
from noencore.methods.simnpo import SimNPO

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (GradientAscent, BoundedGradientAscent, TargetMatching, GradDiff,
                              RandomLabeling, NPO, SimNPO, Finetune)
}


def get_method(name: str | Method, **options) -> Method:
    """A method instance from its name and options (or the instance itself)."""
    if isinstance(name, Method):
        if options:
            raise ValueError("options given with a Method instance; set them on the instance")
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise ValueError(f"method {name!r}: bad options {options} ({exc})") from exc


__all__ = ["METHODS", "Method", "NPO", "Plan", "Rows", "BoundedGradientAscent", "GradDiff",
           "Finetune", "GradientAscent", "RandomLabeling", "SimNPO", "TargetMatching",
           "get_method"]
