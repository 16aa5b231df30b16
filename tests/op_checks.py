"""Float64 ground truth for the fused CE op and the per-token accuracy bounds of
docs/CONTRACTS.md (ops, "Accuracy"), shared by the edge-case and property tests.

Every bound is per token (per row, per element), never an average that one bad row could
hide in, and each is scaled by what the computation can know of its own rounding:

* loss and lse: ``|err| <= TOL_LOSS * (1 + max_v (|h_n| @ |W|^T)_v)``: fp32 logits (for
  bf16 inputs too) carry an error proportional to the magnitudes their dot products
  sum, whatever backend forms them;
* logits gradient ``c_n * (softmax - onehot)``: ``|err| <= rtol * |ref| + ETA * |c_n|``
  (fp32 softmax arithmetic, plus the input dtype's rounding of the result);
* dh and dW, componentwise as a GEMM allows: ``|err| <= rtol * (|dz| @ |W|) + ETA * |c_n|
  * |W[t_n]|`` and ``rtol * (|dz|^T @ |h|) + ETA * (sum over rows labelled v of |c_n| |h_n|)``
  (the absolute term is the label element's: ``p_t - 1`` cancels in fp32), so a token
  whose gradient is small is held to a small error, not to the largest in the tensor.
"""
from __future__ import annotations

import math

import torch

TOL_LOSS = 1e-5          # loss / lse, relative to 1 + the row's largest |h| . |w_v|
ETA = 1e-6               # absolute floor of a logits-gradient element, times |c_n|
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -6}


def f64_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  coef: torch.Tensor, cap: float = math.inf, logits: torch.Tensor | None = None,
                  upstream: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
    """Loss, lse, the gradient factor actually applied (``c``: 0 for ignored and capped
    rows), dz = c * (softmax - onehot) and, from hidden/weight, dh and dW, all float64.

    labels: resolved int64 [N] (-1 = ignored). Either hidden and weight (z = h @ W^T of
    their exact values, so bf16 inputs are represented exactly) or ``logits``. Rows are
    capped on the sign of ``coef`` (the op's row factor), then ``c`` is multiplied by
    ``upstream`` (the gradient flowing into the op's value: a scalar or one per row).
    """
    if logits is None:
        h, w = hidden.double(), weight.double()
        z = h @ w.T
        mag = 1 + (h.abs() @ w.abs().T).amax(1)
    else:
        h = w = None
        z = logits.double()
        mag = 1 + z.abs().amax(1)
    valid = labels >= 0
    lab = labels.clamp_min(0)
    lse = torch.logsumexp(z, 1)
    loss = torch.where(valid, lse - z.gather(1, lab[:, None])[:, 0], torch.zeros_like(lse))
    c = torch.where(valid, coef.double(), torch.zeros_like(lse))
    if math.isfinite(cap):
        c = torch.where((c < 0) & (loss > cap), torch.zeros_like(c), c)
    c = c * (upstream.double() if isinstance(upstream, torch.Tensor) else upstream)
    onehot = torch.nn.functional.one_hot(lab, z.shape[1]).double()
    dz = (torch.softmax(z, 1) - onehot) * c[:, None]
    out = dict(loss=loss, lse=torch.where(valid, lse, math.nan), c=c, dz=dz, mag=mag,
               valid=valid)
    if h is not None:
        out["dh"], out["dw"] = dz @ w, dz.T @ h
        out["dh_mag"], out["dw_mag"] = dz.abs() @ w.abs(), dz.abs().T @ h.abs()
        label_c = onehot * c.abs()[:, None]  # |c_n| at each row's label
        out["dh_floor"], out["dw_floor"] = label_c @ w.abs(), label_c.T @ h.abs()
    return out


def _worst(err: torch.Tensor, bound: torch.Tensor) -> str:
    ratio = err / bound.clamp_min(1e-300)
    i = int(ratio.flatten().argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), ratio.shape))
    return f"worst at {idx}: error {float(err.flatten()[i]):.3g} > bound {float(bound.flatten()[i]):.3g}"


def assert_within(name: str, got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor
                  ) -> float:
    """Every element finite and within its bound; returns the largest error / bound."""
    got = got.detach().cpu().double()
    expected, bound = expected.detach().double(), bound.detach().double()
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    bad = ~torch.isfinite(got)
    assert not bad.any(), f"{name}: non-finite at {bad.nonzero()[:5].tolist()} (unwritten or junk)"
    err = (got - expected).abs()
    assert (err <= bound).all(), f"{name}: {_worst(err, bound)}"
    return float((err / bound.clamp_min(1e-300)).max()) if err.numel() else 0.0


def check_rows(ref: dict, loss: torch.Tensor, lse: torch.Tensor) -> None:
    """Per-row loss (0 on ignored rows) and lse (NaN exactly on ignored rows)."""
    valid = ref["valid"]
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    lse = lse.detach().cpu().double()
    assert_within("loss", loss, ref["loss"], TOL_LOSS * ref["mag"])
    assert torch.isnan(lse[~valid]).all(), "lse of an ignored row must be NaN"
    assert_within("lse", lse[valid], ref["lse"][valid], TOL_LOSS * ref["mag"][valid])
    assert (loss.detach().cpu()[~valid] == 0).all(), "loss of an ignored row must be 0"


def check_logits_grad(ref: dict, grad: torch.Tensor, dtype: torch.dtype) -> None:
    """The gradient of the logits, per element; exactly 0 on ignored rows."""
    bound = GRAD_RTOL[dtype] * ref["dz"].abs() + ETA * ref["c"].abs()[:, None]
    assert grad.dtype == dtype
    assert_within("d logits", grad, ref["dz"], bound)
    assert (grad.detach().cpu()[~ref["valid"]] == 0).all(), "ignored rows: gradient exactly 0"


def check_linear_grads(ref: dict, dh: torch.Tensor | None, dw: torch.Tensor | None,
                       dtype: torch.dtype) -> None:
    """dh per token and dW per element, componentwise; ignored rows of dh exactly 0."""
    if dh is not None:
        assert dh.dtype == dtype
        assert_within("dh", dh, ref["dh"],
                      GRAD_RTOL[dtype] * ref["dh_mag"] + ETA * ref["dh_floor"])
        assert (dh.detach().cpu()[~ref["valid"]] == 0).all(), "ignored rows: dh exactly 0"
    if dw is not None:
        assert dw.dtype == dtype
        assert_within("dW", dw, ref["dw"],
                      GRAD_RTOL[dtype] * ref["dw_mag"] + ETA * ref["dw_floor"])
