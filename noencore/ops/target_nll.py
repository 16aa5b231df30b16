"""The NLL of given codes from each row's logsumexp: an indexed dot product, no [N, V] work.

``linear_ce_ascent(..., return_lse=True)`` hands back each row's logsumexp from the pass
that trains the row on its own target (a random label for RL, say). The NLL of any other
code c of row n follows without the logits::

    nll_n = lse_n - hidden_n . weight_c

one gathered row of the head and one dot product of length D per row: N x D work next
to the N x D x V of a logits GEMM.
"""
from __future__ import annotations

import math

import torch

from noencore.ops.linear_ce import autocast_inputs, first_bad_target

# Rows per chunk: the gathered head rows and their fp32 copies stay around this size.
CHUNK_BYTES = 32 << 20


@torch.no_grad()
def target_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               lse: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Per-row NLL of ``targets``: ``lse_n - hidden_n . weight[targets_n]``, fp32 [N].

    Args:
        hidden: [N, D] float32 / bfloat16 / float16, the states given to the op.
        weight: [V, D], same dtype and device (the head given to the op).
        targets: [N] integer codes in [0, V); ``ignore_index`` rows give NaN.
        lse: fp32 [N] from ``linear_ce_ascent(hidden, weight, ..., return_lse=True)``.
        ignore_index: target value of rows to skip.

    The dot product runs in fp32 on the inputs' values (cast to the autocast dtype first
    under ``torch.autocast``, as the op casts them, so that both read the same numbers),
    ``CHUNK_BYTES`` of rows at a time. No gradient. Targets are validated (ValueError)
    for CPU tensors; on a GPU a target that is not a code gives NaN (no host sync).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    n, d = hidden.shape
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("the vocabulary is empty (V = 0: weight [0, D]); there is no code "
                         "to score")
    if targets.shape != (n,) or lse.shape != (n,):
        raise ValueError(f"targets and lse must be [N]={n}, got {tuple(targets.shape)} and "
                         f"{tuple(lse.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    i = first_bad_target(targets, vocab, ignore_index, random_ok=False)
    if i is not None:
        raise ValueError(f"targets[{i}] = {int(targets[i])} is not a code in [0, {vocab}) "
                         f"or ignore_index ({ignore_index})")
    hidden, weight = autocast_inputs(hidden, weight)
    t = targets.to(torch.int64)
    known = (t >= 0) & (t < vocab)  # ignored rows, and unchecked bad targets on a GPU
    idx = t.clamp(0, vocab - 1)
    dot = torch.empty(n, device=hidden.device, dtype=torch.float32)
    rows = max(1, CHUNK_BYTES // (4 * max(d, 1)))
    with torch.autocast(hidden.device.type, enabled=False):  # the dot stays fp32
        for s in range(0, n, rows):
            e = min(s + rows, n)
            w_t = weight.index_select(0, idx[s:e])
            dot[s:e] = torch.linalg.vecdot(hidden[s:e].float(), w_t.float())
    return torch.where(known, lse.float() - dot, math.nan)
