"""Fine-tuning (plain descent on every row): how a model comes to know a corpus.

    L = forget_weight * mean_{forget tokens} CE + remain_weight * mean_{remain tokens} CE

Not an unlearning method: it builds the starting point of an experiment (a model that
has memorised the forget set, as a pre-trained MusicGen has seen its training data) and
the "retrained without the forget set" baseline (``forget_weight=0``).
"""
from __future__ import annotations

from noencore.methods.base import Method


class Finetune(Method):
    name = "finetune"

    def __init__(self, forget_weight: float = 1.0, remain_weight: float = 1.0):
        # the base class puts -forget_weight on forget tokens (ascent): negate for descent
        super().__init__(forget_weight=-forget_weight, remain_weight=remain_weight)
