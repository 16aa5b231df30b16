"""Fused cross-entropy with ascent: the op at the heart of unlearning.

One function per input kind, three backends behind them:

* :func:`linear_ce_ascent` (hidden states + head weight; logits never held in full)
* :func:`ce_ascent` (given logits)
* :func:`token_stats` (no-grad per-token NLL, top-1, Min-K%++ moments)
* :func:`target_nll` (no-grad NLL of given codes from the op's ``return_lse``: an
  indexed dot product, no logits)

Backends: Triton (``noencore.kernels``, CUDA), C++ (``noencore._C``, CPU), and the
plain-torch chunked reference (:mod:`noencore.ops.reference`) that both are tested
against. ``backend="auto"`` picks one; :func:`resolve_backend` says which it would pick,
:func:`last_backend` which one the latest call ran.
Random labels: :data:`RANDOM_LABEL` and the hash in :mod:`noencore.ops.random_labels`.
"""
from __future__ import annotations

from noencore.ops.dispatch import cpp_available, last_backend, resolve_backend, triton_available
from noencore.ops.linear_ce import ce_ascent, linear_ce_ascent
from noencore.ops.random_labels import RANDOM_LABEL, random_label
from noencore.ops.target_nll import target_nll
from noencore.ops.token_stats import TokenStats, token_stats

__all__ = [
    "RANDOM_LABEL",
    "TokenStats",
    "ce_ascent",
    "cpp_available",
    "last_backend",
    "linear_ce_ascent",
    "random_label",
    "resolve_backend",
    "target_nll",
    "token_stats",
    "triton_available",
]
