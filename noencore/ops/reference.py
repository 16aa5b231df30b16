"""Plain-torch chunked reference: the ground truth every fast backend is tested against.

Also the fallback where neither the C++ extension (CPU) nor Triton (CUDA) is available.
Both functions follow the kernel contract shared by all backends:

* ``coef`` [N] fp32 is the gradient factor of each row (row weight x reduction scale,
  times the upstream gradient for ``reduction="none"``); ignored rows get none.
* A row whose ``coef`` is negative and whose loss exceeds ``cap`` gets zero gradient
  (its loss is still returned).
* Returned losses are the *unweighted* per-row ``logsumexp(z) - z[t]`` in fp32 (0 for
  ignored rows); gradients are ``coef_n * (softmax(z_n) - onehot(t_n))`` pushed through
  the head, exactly zero on ignored rows whatever their logits hold.
* Every call also returns each row's ``logsumexp(z)`` (fp32 [N], from the same logits
  and the same pass; it does not depend on the target): NaN for ignored rows, whose
  logits are not looked at.
* Non-finite logits follow torch: a NaN gives a NaN loss and a NaN gradient row; a +inf
  gives ``logsumexp = +inf`` (loss inf, NaN where ``z - lse`` is ``inf - inf``).
* A label that is not a class (a target the op's front did not validate: on CUDA it
  skips the check, which would synchronise the device) gives a NaN loss and a NaN
  gradient row, never an out-of-bounds access.

Memory stays O(chunk x V): logits exist one row chunk at a time, in fp32.
"""
from __future__ import annotations

import math

import torch

from noencore.ops.random_labels import resolve_targets

DEFAULT_CHUNK = 1024


def _row_loss(z: torch.Tensor, labels: torch.Tensor, ignored: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss [C], logsumexp [C] and the rows whose label is no class (bool [C]) of fp32
    logits z [C, V]; labels int64 [C] (resolved), ignored bool [C] (ignore_index rows)."""
    vocab = z.shape[1]
    bad = ((labels < 0) | (labels >= vocab)) & ~ignored
    lse = torch.logsumexp(z, dim=1)
    tz = z.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0]
    loss = torch.where(ignored, torch.zeros_like(lse), lse - tz)
    return loss.masked_fill_(bad, math.nan), lse, bad


def _row_grad(z: torch.Tensor, labels: torch.Tensor, ignored: torch.Tensor,
              coef: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss [C], logsumexp [C] and dz [C, V] (fp32) of one chunk of fp32 logits z [C, V];
    dz overwrites z."""
    loss, lse, bad = _row_loss(z, labels, ignored)
    valid = ~(ignored | bad)
    c = coef
    if math.isfinite(cap):
        c = torch.where((c < 0) & (loss > cap), torch.zeros_like(c), c)
    dz = z.sub_(lse[:, None]).exp_()
    # -1 at each valid row's label; a scatter, not boolean indexing, which would read the
    # row count off the device (a host sync on CUDA).
    onehot = valid.to(dz.dtype)[:, None]
    dz.scatter_add_(1, labels.clamp(0, z.shape[1] - 1)[:, None], -onehot)
    dz.mul_(c[:, None])
    # Ignored rows contribute nothing, also when their logits hold a NaN (0 * NaN is NaN).
    dz.masked_fill_(ignored[:, None], 0.0)
    return loss, lse, dz.masked_fill_(bad[:, None], math.nan)


def _lse_out(lse: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """The returned logsumexp: NaN on ignored rows (the kernel contract)."""
    return lse.masked_fill(ignored, math.nan)


def linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  coef: torch.Tensor, *, ignore_index: int, key: int | None, row_offset: int,
                  cap: float, need_dh: bool, need_dw: bool, chunk: int = DEFAULT_CHUNK
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
    """Per-row loss and logsumexp and, optionally, gradients of ``sum_n coef_n * loss_n``.

    hidden [N, D], weight [V, D] (same float dtype), targets [N] int, coef [N] fp32.
    Returns loss fp32 [N], lse fp32 [N] (NaN on ignored rows), dh [N, D] in hidden's
    dtype (or None), dw [V, D] in weight's dtype (or None; accumulated in fp32 here).
    One logits GEMM per chunk, plus the dh and dW GEMMs when asked for.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    labels = resolve_targets(targets, key, row_offset, vocab, ignore_index)
    ignored = targets == ignore_index
    w32 = weight.float()
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.empty(w32.shape, device=hidden.device, dtype=torch.float32) if need_dw else None
    if n == 0 and dw is not None:
        dw.zero_()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h = hidden[s:e].float()
        z = h @ w32.T
        if not (need_dh or need_dw):
            loss[s:e], row_lse, _ = _row_loss(z, labels[s:e], ignored[s:e])
            lse[s:e] = _lse_out(row_lse, ignored[s:e])
            continue
        loss[s:e], row_lse, dz = _row_grad(z, labels[s:e], ignored[s:e], coef[s:e], cap)
        lse[s:e] = _lse_out(row_lse, ignored[s:e])
        if dh is not None:
            dh[s:e] = dz @ w32
        if dw is not None:
            dw.addmm_(dz.T, h, beta=0 if s == 0 else 1)
    return loss, lse, dh, (dw.to(weight.dtype) if dw is not None else None)


def ce_fwd(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
           ignore_index: int, key: int | None, row_offset: int, cap: float,
           grad: torch.Tensor | None, chunk: int = DEFAULT_CHUNK
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and logsumexp, fp32 [N] each, of logits [N, V]; writes coef-scaled
    gradients into ``grad``.

    ``grad`` (same shape and dtype as logits, may be logits itself) or None for loss only.
    """
    n, vocab = logits.shape
    labels = resolve_targets(targets, key, row_offset, vocab, ignore_index)
    ignored = targets == ignore_index
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        # Work on a copy unless the gradient is meant to overwrite the logits.
        z = logits[s:e].to(torch.float32, copy=grad is not logits)
        loss[s:e], row_lse, dz = _row_grad(z, labels[s:e], ignored[s:e], coef[s:e], cap)
        lse[s:e] = _lse_out(row_lse, ignored[s:e])
        if grad is not None:
            grad[s:e] = dz
    return loss, lse
