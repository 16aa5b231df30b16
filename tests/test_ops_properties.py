"""Property tests of the fused CE op: hypothesis draws the cases, float64 judges them.

Shapes (N, D, V, vocabulary sizes at the kernels' vector widths and block sizes among
them), dtypes, chunk sizes, labels (0, V-1, ignored, random-label rows, any code), row
weights of both signs, loss caps, reductions and row offsets are drawn; every backend
(C++, torch, Triton in its interpreter at small sizes) is compared per token with a
float64 computation of the same inputs, at the bounds of docs/CONTRACTS.md (ops,
"Accuracy"; tests/op_checks.py). Outputs are poisoned with NaN before each call and the
C++ kernels run with NOENCORE_CPU_DEBUG=1 (``poisoned``).

Example counts come from the hypothesis profile (tests/conftest.py): "ci" (the default:
few examples, derandomized, so every run of the suite draws the same cases) or "dev"
(``NOENCORE_HYPOTHESIS_PROFILE=dev``, many more, a fresh seed each run) for local work.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from op_checks import (
    TOL_LOSS,
    assert_within,
    check_linear_grads,
    check_logits_grad,
    check_rows,
    f64_reference,
)
from test_ops import BACKENDS, _skip_unavailable

import noencore.ops as ops
from noencore.ops.dispatch import backend_module
from noencore.ops.random_labels import label_key, resolve_targets

EDGE_VOCABS = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 333, 2047, 2048, 2049]
KINDS = ("code", "zero", "last", "ignore", "random")
# A poisoning fixture holds for every example of a test, which is what it is for.
FIXTURES_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow,
                                              HealthCheck.data_too_large])


def _limits(backend: str) -> tuple[int, int]:
    """Largest N and D drawn: the Triton interpreter runs one Python program per row."""
    return (8, 24) if backend == "triton" else (48, 96)


@st.composite
def cases(draw, backend: str, *, logits: bool = False):
    """One case: inputs made from a drawn seed, plus every option of the op."""
    max_n, max_d = _limits(backend)
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(0, max_d))  # D = 0: every logit an empty sum
    vocab = draw(st.one_of(st.sampled_from(EDGE_VOCABS), st.integers(1, 2100)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    scale = draw(st.sampled_from([0.05, 1.0, 3.0, 10.0]))  # logits' spread (peaked at 10)
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=n, max_size=n))
    # Row factors of both signs, or 0 (gradients far below fp32's normal range, from
    # factors like 1e-38, are not held to relative bounds).
    factor = st.one_of(st.just(0.0), st.builds(lambda m, neg: -m if neg else m,
                                               st.floats(2.0**-10, 4, width=32), st.booleans()))
    coef = draw(st.lists(factor, min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    if logits:
        hidden = weight = None
        z = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    else:
        hidden = torch.randn(n, d, generator=g).to(dtype)
        weight = (torch.randn(vocab, d, generator=g) * scale / math.sqrt(max(d, 1))).to(dtype)
        z = None
    codes = torch.randint(0, vocab, (n,), generator=g)
    fixed = {"zero": 0, "last": vocab - 1, "ignore": -100, "random": ops.RANDOM_LABEL}
    targets = torch.tensor([fixed.get(k, int(c)) for k, c in zip(kinds, codes)])
    return dict(hidden=hidden, weight=weight, logits=z, targets=targets,
                coef=torch.tensor(coef, dtype=torch.float32), dtype=dtype, vocab=vocab,
                label_seed=draw(st.integers(0, 2**40)),
                row_offset=draw(st.integers(0, 2**33)), chunk=draw(st.integers(1, n + 3)),
                cap_pick=draw(st.one_of(st.none(), st.floats(0, 1))))


def _cap(case: dict, labels: torch.Tensor) -> float:
    """math.inf, or a cap in the middle of a gap between the rows' float64 losses (a row
    within fp32 rounding of the cap could be capped by one backend and not another)."""
    if case["cap_pick"] is None:
        return math.inf
    ref = f64_reference(case["hidden"], case["weight"], labels, case["coef"],
                        logits=case["logits"])
    lv = ref["loss"][ref["valid"]].sort().values
    assume(lv.numel() >= 2)
    i = min(int(case["cap_pick"] * (lv.numel() - 1)), lv.numel() - 2)
    assume(float(lv[i + 1] - lv[i]) > 1e-3 * float(ref["mag"].max()))
    return float(lv[i] + lv[i + 1]) / 2


def _resolve(case: dict) -> tuple[torch.Tensor, int]:
    key = label_key(case["label_seed"])
    return resolve_targets(case["targets"], key, case["row_offset"], case["vocab"], -100), key


def _note(case: dict, **more) -> None:
    note({k: (tuple(v.shape) if isinstance(v, torch.Tensor) and v.dim() > 1 else v)
          for k, v in {**case, **more}.items() if k not in ("coef",)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kernel_property(backend, poisoned, device):
    """linear_ce_fwd at a drawn chunk size: loss, lse, dh and dW per token."""
    _skip_unavailable(backend)

    @FIXTURES_OK
    @given(case=cases(backend))
    def run(case):
        labels, key = _resolve(case)
        cap = _cap(case, labels)
        _note(case, cap=cap)
        ref = f64_reference(case["hidden"], case["weight"], labels, case["coef"], cap)
        h, w, t, c = (x.to(device, copy=True) for x in
                      (case["hidden"], case["weight"], case["targets"], case["coef"]))
        loss, lse, dh, dw = backend_module(backend).linear_ce_fwd(
            h, w, t, c, ignore_index=-100, key=key, row_offset=case["row_offset"], cap=cap,
            need_dh=True, need_dw=True, chunk=case["chunk"])
        check_rows(ref, loss.cpu(), lse.cpu())
        check_linear_grads(ref, dh.cpu(), dw.cpu(), case["dtype"])

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_property(backend, poisoned, device):
    """linear_ce_ascent with a drawn reduction, row weights (or none), cap and upstream
    gradient: the value per token ("none") or in total, and both gradients."""
    _skip_unavailable(backend)

    @FIXTURES_OK
    @given(case=cases(backend), reduction=st.sampled_from(["mean", "sum", "none"]),
           weighted=st.booleans())
    def run(case, reduction, weighted):
        labels, _ = _resolve(case)
        cap = _cap(case, labels) if weighted else math.inf
        _note(case, cap=cap, reduction=reduction, weighted=weighted)
        n = labels.numel()
        rw = case["coef"] if weighted else torch.ones(n)
        valid = labels >= 0
        scale = 1 / max(int(valid.sum()), 1) if reduction == "mean" else 1.0
        upstream = torch.randn(n if reduction == "none" else (),
                               generator=torch.Generator().manual_seed(n))
        ref = f64_reference(case["hidden"], case["weight"], labels, rw.double() * scale,
                            cap, upstream=upstream)
        h, w, t = (x.to(device, copy=True) for x in
                   (case["hidden"], case["weight"], case["targets"]))
        h.requires_grad_()
        w.requires_grad_()
        out = ops.linear_ce_ascent(
            h, w, t, rw.to(device) if weighted else None, random_labels=case["label_seed"],
            row_offset=case["row_offset"], loss_cap=None if cap == math.inf else cap,
            reduction=reduction, backend=backend)
        (out * upstream.to(device)).sum().backward()
        # The value: per-row terms w_n * loss_n (capped rows keep their loss), summed.
        base = f64_reference(case["hidden"], case["weight"], labels, rw)
        per_row = torch.where(valid, rw.double(), 0.0) * base["loss"] * scale
        bound = TOL_LOSS * base["mag"] * rw.double().abs() * scale
        if reduction == "none":
            assert_within("value", out.detach().cpu(), per_row, bound)
        else:
            assert_within("value", out.detach().cpu(), per_row.sum(), bound.sum() + 1e-6)
        check_linear_grads(ref, h.grad.cpu(), w.grad.cpu(), case["dtype"])

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_on_logits_property(backend, poisoned, device):
    """ce_fwd on given logits, into a fresh gradient or in place, per element."""
    _skip_unavailable(backend)

    @FIXTURES_OK
    @given(case=cases(backend, logits=True), inplace=st.booleans())
    def run(case, inplace):
        labels, key = _resolve(case)
        cap = _cap(case, labels)
        _note(case, cap=cap, inplace=inplace)
        ref = f64_reference(None, None, labels, case["coef"], cap, logits=case["logits"])
        z, t, c = (x.to(device, copy=True) for x in
                   (case["logits"], case["targets"], case["coef"]))
        grad = z if inplace else torch.empty_like(z)
        loss, lse = backend_module(backend).ce_fwd(
            z, t, c, ignore_index=-100, key=key, row_offset=case["row_offset"], cap=cap,
            grad=grad)
        check_rows(ref, loss.cpu(), lse.cpu())
        check_logits_grad(ref, grad.cpu(), case["dtype"])

    run()


@pytest.mark.parametrize("backend", ["torch", "cpp"])  # no Triton kernel for the statistics
def test_token_stats_property(backend, poisoned, device):
    """token_stats at a drawn chunk size: NLL, top-1 and the log-prob moments per token."""
    _skip_unavailable(backend)

    @FIXTURES_OK
    @given(case=cases(backend))
    def run(case):
        _note(case)
        labels, _ = _resolve(case)
        h64, w64 = case["hidden"].double(), case["weight"].double()
        z = h64 @ w64.T
        logp = torch.log_softmax(z, 1)
        top2 = z.topk(min(2, z.shape[1]), 1).values
        # A tie (or a near one, within fp32 rounding) at the top makes top-1 ambiguous.
        assume(top2.shape[1] < 2 or bool(((top2[:, 0] - top2[:, 1]) > 1e-4).all()))
        st_ = ops.token_stats(case["hidden"].to(device), case["weight"].to(device),
                              case["targets"].to(device), random_labels=case["label_seed"],
                              row_offset=case["row_offset"], chunk=case["chunk"],
                              backend=backend)
        st_ = ops.TokenStats(*(x.cpu() for x in st_))
        valid = labels >= 0
        mag = (1 + (h64.abs() @ w64.abs().T).amax(1))[valid]
        p = logp.exp()
        mu = (p * logp).sum(1)
        var = (p * (logp - mu[:, None]) ** 2).sum(1)
        nll = -logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
        assert torch.isnan(st_.nll[~valid]).all() and not st_.correct[~valid].any()
        assert_within("nll", st_.nll[valid], nll[valid], TOL_LOSS * mag)
        assert_within("mean", st_.logp_mean[valid], mu[valid], TOL_LOSS * mag)
        assert_within("var", st_.logp_var[valid], var[valid], 10 * TOL_LOSS * mag * mag)
        assert torch.equal(st_.correct[valid], (z.argmax(1) == labels)[valid])

    run()
