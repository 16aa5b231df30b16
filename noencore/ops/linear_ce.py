"""The public op and its autograd functions: cross-entropy with per-row signed weights.

Per valid row n (target != ignore_index), with z_n = hidden_n @ weight^T in fp32::

    loss_n    = logsumexp(z_n) - z_n[t_n]
    objective = sum_n row_weight_n * loss_n          ("sum")
              = objective / number of valid rows     ("mean"; 0 when no row is valid)
    "none"    -> the per-row terms row_weight_n * loss_n, [N] fp32 (0 for ignored rows)

A negative row weight pushes that row's loss *up* (gradient ascent on the forget set).
``loss_cap``: a row with negative weight whose loss already exceeds the cap gets no
gradient (its loss is still counted in the returned value). ``row_weight`` is a
constant: no gradient flows into it.

For "mean"/"sum" the gradients are computed inside the forward pass and only scaled
by the upstream scalar in backward. For "none" the upstream gradient is a vector, so
the forward stores nothing of size V and the backward runs the kernel again with
per-row factors ``grad_out_n * row_weight_n`` (exact for any upstream gradient).

GEMMs per chunk of rows (each N x D x V): "mean"/"sum" 3 in the forward (logits, dh,
dW) and none in backward; "none" 1 in the forward (logits) and 3 in backward; under
no_grad 1. ``return_lse=True`` adds none: each row's logsumexp comes from the pass that
computes its loss.
"""
from __future__ import annotations

import math

import torch

from noencore.ops.dispatch import backend_module, use_backend
from noencore.ops.random_labels import RANDOM_LABEL, label_key

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_common(n: int, vocab: int, targets: torch.Tensor, row_weight: torch.Tensor | None,
                  device: torch.device, ignore_index: int, random_labels: int | None,
                  loss_cap: float | None, reduction: str, row_offset: int) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if vocab < 1:
        raise ValueError("the vocabulary is empty (V = 0: weight [0, D] or logits [N, 0]); "
                         "there is no class to score")
    if ignore_index == RANDOM_LABEL:
        raise ValueError(f"ignore_index must differ from RANDOM_LABEL ({RANDOM_LABEL})")
    if targets.dim() != 1 or targets.numel() != n:
        raise ValueError(f"targets must be [N]={n}, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets on {targets.device}, inputs on {device}")
    if row_weight is not None:
        if row_weight.dim() != 1 or row_weight.numel() != n:
            raise ValueError(f"row_weight must be [N]={n}, got shape {tuple(row_weight.shape)}")
        if not row_weight.dtype.is_floating_point:
            raise ValueError(f"row_weight must be floating point, got {row_weight.dtype}")
        if row_weight.device != device:
            raise ValueError(f"row_weight on {row_weight.device}, inputs on {device}")
    if loss_cap is not None and not math.isfinite(float(loss_cap)):
        raise ValueError(f"loss_cap must be a finite number or None, got {loss_cap}")
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    i = first_bad_target(targets, vocab, ignore_index, random_ok=random_labels is not None)
    if i is not None:
        value = int(targets[i])
        hint = " (RANDOM_LABEL rows need random_labels=seed)" if value == RANDOM_LABEL else ""
        raise ValueError(f"targets[{i}] = {value} is not a class in [0, {vocab}), "
                         f"ignore_index ({ignore_index}) or RANDOM_LABEL{hint}")


def first_bad_target(targets: torch.Tensor, vocab: int, ignore_index: int, *,
                     random_ok: bool) -> int | None:
    """Index of the first target that is no class in [0, vocab), not ``ignore_index`` and
    not RANDOM_LABEL (when ``random_ok``); None when every target is one of those.

    Checks CPU tensors only (None otherwise): off the CPU, reading the answer would
    synchronise the device at every call. The kernels there never read or write outside
    a row for such a target: Triton and the torch reference give its row a NaN loss and
    a NaN gradient (which the engine's NaN guard stops on).
    """
    if targets.numel() == 0 or targets.device.type != "cpu":
        return None
    t = targets.to(torch.int64)
    bad = (t >= vocab) | ((t < 0) & (t != ignore_index) & (t != RANDOM_LABEL))
    if not random_ok:
        bad |= t == RANDOM_LABEL
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight cast to the autocast dtype when autocast is on for their device
    (so that fp32 master weights train through the bf16 kernels), else unchanged."""
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        dt = torch.get_autocast_dtype(dev_type)
        return hidden.to(dt), weight.to(dt)
    return hidden, weight


def _coef(targets: torch.Tensor, row_weight: torch.Tensor | None, ignore_index: int,
          reduction: str) -> torch.Tensor:
    """Per-row factor fp32 [N]: row weight x reduction scale, 0 on ignored rows (no host sync)."""
    valid = targets != ignore_index
    w = (row_weight.detach().float() if row_weight is not None
         else torch.ones(targets.shape, device=targets.device, dtype=torch.float32))
    w = torch.where(valid, w, torch.zeros_like(w))
    if reduction == "mean":
        w = w / valid.sum().clamp_min(1).float()
    return w


def _is_one(grad_out: torch.Tensor) -> bool:
    """True for a CPU scalar upstream gradient of exactly 1 (``loss.backward()``).

    Lets backward skip a full pass over the stashed gradients. Not checked on GPU, where
    reading the value would synchronise the stream.
    """
    return grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0


def _take(ctx, name: str):
    """Remove and return a gradient stashed by forward (so autograd can take ownership)."""
    if not hasattr(ctx, name):
        raise RuntimeError("backward ran twice through the fused CE op: its gradients are "
                           "computed in forward and handed over once (retain_graph=True "
                           "with a second backward is not supported)")
    value = getattr(ctx, name)
    delattr(ctx, name)
    return value


class _LinearCEAscent(torch.autograd.Function):
    """Outputs (value, lse); lse has no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, opts):
        kern = backend_module(opts["backend"])
        # needs_input_grad says True under no_grad too: opts["grad"] holds the grad mode
        # of the caller, so that evaluation never pays for gradients.
        need_dh = ctx.needs_input_grad[0] and opts["grad"]
        need_dw = ctx.needs_input_grad[1] and opts["grad"]
        kw = dict(ignore_index=opts["ignore_index"], key=opts["key"],
                  row_offset=opts["row_offset"], cap=opts["cap"])
        if opts["reduction"] == "none":
            loss, lse, _, _ = kern.linear_ce_fwd(hidden, weight, targets, coef, need_dh=False,
                                                 need_dw=False, **kw)
            ctx.save_for_backward(hidden, weight, targets, coef, loss)
        else:
            loss, lse, dh, dw = kern.linear_ce_fwd(hidden, weight, targets, coef,
                                                   need_dh=need_dh, need_dw=need_dw, **kw)
            # Plain attributes, not save_for_backward: backward hands these buffers to
            # autograd as the gradients themselves, and a second reference would make
            # AccumulateGrad copy them instead of taking them.
            ctx.dh, ctx.dw = dh, dw
        ctx.opts, ctx.kw = opts, kw
        ctx.mark_non_differentiable(lse)
        out = coef * loss
        return (out if opts["reduction"] == "none" else out.sum()), lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.opts["reduction"] != "none":
            dh, dw = _take(ctx, "dh"), _take(ctx, "dw")
            if not _is_one(grad_out):
                dh = dh * grad_out.to(dh.dtype) if dh is not None else None
                dw = dw * grad_out.to(dw.dtype) if dw is not None else None
            return (dh if need_dh else None), (dw if need_dw else None), None, None, None
        hidden, weight, targets, coef, loss = ctx.saved_tensors
        # Capped rows were decided on the forward losses; the re-run must not re-decide
        # them from the sign of grad_out * coef, hence cap=inf and the rows zeroed here.
        eff = coef * grad_out.float()
        cap = ctx.opts["cap"]
        if math.isfinite(cap):
            eff = torch.where((coef < 0) & (loss > cap), torch.zeros_like(eff), eff)
        kw = dict(ctx.kw, cap=math.inf)
        kern = backend_module(ctx.opts["backend"])
        _, _, dh, dw = kern.linear_ce_fwd(hidden, weight, targets, eff, need_dh=need_dh,
                                          need_dw=need_dw, **kw)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def linear_ce_ascent(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     row_weight: torch.Tensor | None = None, *, ignore_index: int = -100,
                     random_labels: int | None = None, row_offset: int = 0,
                     loss_cap: float | None = None, reduction: str = "mean",
                     backend: str = "auto", return_lse: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused linear head + cross-entropy with per-row signed weights, without [N, V] logits.

    Args:
        hidden: [N, D] float32 / bfloat16 / float16, the states before the head.
        weight: [V, D], same dtype and device (one codebook head).
        targets: [N] integer classes in [0, V); ``ignore_index`` rows contribute
            nothing (zero loss and gradient); ``RANDOM_LABEL`` (-2) rows get
            ``random_label(seed, row_offset + n, V)``. Other values raise ValueError for
            CPU tensors; on a GPU they are not checked (that would synchronise the
            device) and give their row a NaN loss and gradient.
        row_weight: [N] float or None (all 1). Negative = gradient ascent on that row.
        ignore_index: target value of rows to skip.
        random_labels: the seed for RANDOM_LABEL rows (required if any row has it).
        row_offset: global index of row 0 (chunks and ranks then draw the same labels).
        loss_cap: rows with negative weight and loss > cap get no gradient.
        reduction: "mean" (over valid rows), "sum" or "none" (per-row [N] fp32).
        backend: "auto" | "triton" | "cpp" | "torch" (see :func:`resolve_backend`;
            :func:`last_backend` says which one ran).
        return_lse: also return each row's logsumexp, from the same pass (no extra GEMM).

    Returns:
        0-dim fp32 tensor ("mean"/"sum") or [N] fp32 ("none"); with ``return_lse`` the
        pair ``(value, lse)``, lse fp32 [N] without gradient: ``logsumexp_v z_nv`` of the
        row's fp32 logits whatever its target (a random label or a capped row too), NaN
        for ignored rows (their logits are not looked at). The NLL of any other code c
        of row n is ``lse_n - hidden_n . weight_c`` (:func:`target_nll`). Logits are
        fp32 (fp32 accumulation and fp32 result, also from bf16/fp16 inputs) and so is
        the softmax math; gradients come back in the inputs' dtype (the dh and dW GEMMs
        run in it). Non-finite logits follow torch: a NaN gives a NaN loss and gradient
        row (and a NaN lse).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first (so fp32
    master weights train through bf16 kernels).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    dev_type = hidden.device.type
    hidden, weight = autocast_inputs(hidden, weight)
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a dtype in {_DTYPES}, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight on {weight.device}, hidden on {hidden.device}")
    n, vocab = hidden.shape[0], weight.shape[0]
    _check_common(n, vocab, targets, row_weight, hidden.device, ignore_index, random_labels,
                  loss_cap, reduction, row_offset)
    opts = dict(backend=use_backend(hidden, backend), ignore_index=ignore_index,
                key=None if random_labels is None else label_key(random_labels),
                row_offset=row_offset, cap=math.inf if loss_cap is None else float(loss_cap),
                reduction=reduction, grad=torch.is_grad_enabled())
    coef = _coef(targets, row_weight, ignore_index, reduction)
    with torch.autocast(dev_type, enabled=False):
        value, lse = _LinearCEAscent.apply(hidden.contiguous(), weight.contiguous(),
                                           targets.contiguous(), coef, opts)
    return (value, lse) if return_lse else value


class _CEAscent(torch.autograd.Function):
    """Outputs (value, lse); lse has no gradient."""

    @staticmethod
    def forward(ctx, logits, targets, coef, opts):
        kern = backend_module(opts["backend"])
        grad = None
        if ctx.needs_input_grad[0] and opts["grad"]:  # see _LinearCEAscent.forward
            grad = logits if opts["inplace"] else torch.empty_like(logits)
        loss, lse = kern.ce_fwd(logits, targets, coef, ignore_index=opts["ignore_index"],
                                key=opts["key"], row_offset=opts["row_offset"],
                                cap=opts["cap"], grad=grad)
        if grad is not None and opts["inplace"]:
            # The logits now hold the gradient: make any other autograd user of them fail
            # loudly (version check) instead of silently reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        ctx.grad = grad  # not save_for_backward: see _LinearCEAscent.forward
        ctx.reduction = opts["reduction"]
        ctx.mark_non_differentiable(lse)
        out = coef * loss
        return (out if opts["reduction"] == "none" else out.sum()), lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        grad = _take(ctx, "grad")
        if ctx.reduction == "none":
            # The stash holds coef_n * (p_n - onehot_n) per row: per-row scaling is exact.
            return grad.mul_(grad_out.to(grad.dtype)[:, None]), None, None, None
        if _is_one(grad_out):
            return grad, None, None, None  # loss.backward(): skip a full pass over [N, V]
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None


def ce_ascent(logits: torch.Tensor, targets: torch.Tensor,
              row_weight: torch.Tensor | None = None, *, ignore_index: int = -100,
              random_labels: int | None = None, row_offset: int = 0,
              loss_cap: float | None = None, reduction: str = "mean",
              backend: str = "auto", inplace: bool = False, return_lse: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same loss as :func:`linear_ce_ascent` on given logits [N, V].

    For models whose heads are not plain linears. Arguments as in
    :func:`linear_ce_ascent`; ``logits`` is [N, V] float32 / bfloat16 / float16.
    ``inplace=True`` writes the gradient over ``logits`` (saves an [N, V] buffer; the
    logits must not be used afterwards, and autograd refuses other users of them).
    Returns a 0-dim fp32 tensor ("mean"/"sum") or [N] fp32 ("none"), and with
    ``return_lse`` the pair ``(value, lse)`` as :func:`linear_ce_ascent` does.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be one of {_DTYPES}, got {logits.dtype}")
    n, vocab = logits.shape
    _check_common(n, vocab, targets, row_weight, logits.device, ignore_index, random_labels,
                  loss_cap, reduction, row_offset)
    opts = dict(backend=use_backend(logits, backend), ignore_index=ignore_index,
                key=None if random_labels is None else label_key(random_labels),
                row_offset=row_offset, cap=math.inf if loss_cap is None else float(loss_cap),
                reduction=reduction, inplace=inplace, grad=torch.is_grad_enabled())
    coef = _coef(targets, row_weight, ignore_index, reduction)
    if inplace and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace=True would overwrite a leaf tensor that requires grad; "
                         "pass the head's output (a non-leaf) or use inplace=False")
    if not logits.is_contiguous():
        if inplace:
            raise ValueError("inplace=True needs contiguous logits")
        logits = logits.contiguous()
    value, lse = _CEAscent.apply(logits, targets.contiguous(), coef, opts)
    return (value, lse) if return_lse else value
