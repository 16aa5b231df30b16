"""Random labels for the Random Labeling (RL) method: one integer hash, every backend.

A row is relabelled when its target equals :data:`RANDOM_LABEL` (-2) and the op is
called with ``random_labels=seed``. Its label depends only on the seed, the row's
*global* index ``row_offset + n`` and the vocabulary size ``V``, so labels agree bit
for bit across backends (torch, C++, Triton), chunks and data-parallel ranks.

The hash uses 32-bit unsigned arithmetic only (wrapping multiply, xor, shifts), the
finaliser of MurmurHash3 (``fmix32``)::

    fmix32(x):  x ^= x >> 16;  x *= 0x85EBCA6B;  x ^= x >> 13;  x *= 0xC2B2AE35;  x ^= x >> 16
    key   = fmix32((seed + 0x9E3779B9) mod 2**32)          # once per call, on the host
    label = fmix32(key ^ (row mod 2**32)) mod V            # per row, inside the kernels

All products are taken modulo 2**32. Backends without a native uint32 type (torch
int64 tensors, Triton in the interpreter) split each multiply into 16-bit halves so
that no intermediate exceeds 2**48, then mask to 32 bits.
"""
from __future__ import annotations

import torch

RANDOM_LABEL: int = -2
"""Target value that marks a row for random relabelling (needs ``random_labels=seed``)."""

_MASK32 = 0xFFFFFFFF
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def _fmix32_int(x: int) -> int:
    """fmix32 on a Python int (exact, arbitrary precision then masked)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 13
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def label_key(seed: int) -> int:
    """The per-call key ``fmix32((seed + 0x9E3779B9) mod 2**32)``, in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_labels must be an int seed, got {type(seed).__name__}")
    return _fmix32_int((seed + _GOLDEN) & _MASK32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding values in [0, 2**32)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 13)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def labels_from_key(key: int, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """Labels for global row indices ``rows`` (int64 tensor, any shape) -> int64, in [0, vocab)."""
    x = (rows.to(torch.int64) & _MASK32) ^ key
    return torch.remainder(_fmix32(x), vocab)


def random_label(seed: int, rows: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """The random label of global row index/indices ``rows`` for ``seed`` over ``vocab`` classes.

    Args:
        seed: the ``random_labels`` seed given to the op.
        rows: an int or an integer tensor of global row indices (``row_offset + n``).
        vocab: number of classes V (> 0).

    Returns:
        int64 tensor with the shape of ``rows`` (0-dim for an int), values in [0, vocab).
    """
    if vocab <= 0:
        raise ValueError(f"vocab must be positive, got {vocab}")
    if not isinstance(rows, torch.Tensor):
        rows = torch.tensor(rows, dtype=torch.int64)
    return labels_from_key(label_key(seed), rows, vocab)


def resolve_targets(targets: torch.Tensor, key: int | None, row_offset: int, vocab: int,
                    ignore_index: int) -> torch.Tensor:
    """Effective labels: random ones where ``targets == RANDOM_LABEL``, -1 for ignored rows.

    targets: [N] integer. Returns int64 [N]. Used by the torch path; C++ and Triton
    compute the same inside their kernels.
    """
    t = targets.to(torch.int64)
    out = torch.where(t == ignore_index, torch.full_like(t, -1), t)
    if key is not None:
        rows = torch.arange(t.numel(), device=t.device, dtype=torch.int64) + row_offset
        out = torch.where(t == RANDOM_LABEL, labels_from_key(key, rows, vocab), out)
    return out
