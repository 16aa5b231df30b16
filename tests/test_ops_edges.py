"""The op at the edges of the vocabulary, on every backend, with nothing left to chance.

Vocabulary sizes sit around every vector width and block size of the kernels (AVX-512's
16 lanes, the C++ GEMM's 32-column panels, AMX's 32-element K tiles, Triton's 2048
block); labels sit at 0, V-1, the ignore index and the random-label marker; rows run as
one chunk and as many (with a short last chunk, and more chunks than the C++ op sums in
bf16). Every output is poisoned with NaN before the call (``poisoned``), which also runs
the C++ kernels with ``NOENCORE_CPU_DEBUG=1``: their scratch starts as NaN, and their
gradient GEMMs read each operand the way an AMX kernel may (past the last column, up
to the row stride; csrc/ce_ascent.cpp, ``widen_k``). An element that a kernel relies on
but never wrote therefore fails here on any CPU, not only where a GEMM happens to read
it. Each case is compared per token with float64 (tests/op_checks.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from op_checks import (
    TOL_LOSS,
    assert_within,
    check_linear_grads,
    check_logits_grad,
    check_rows,
    f64_reference,
)
from test_ops import BACKENDS, DTYPES, _skip_unavailable

import noencore.ops as ops
from noencore.ops.dispatch import backend_module
from noencore.ops.random_labels import label_key, resolve_targets

VOCABS = [1, 15, 16, 17, 31, 32, 33, 333, 2047, 2048, 2049]
N, D = 11, 19  # odd D: the C++ GEMM's half pair and an odd K for the dW GEMM
SEED, OFFSET = 5, 3


def _isas(backend: str) -> list[str | None]:
    """Every instruction-set path of the C++ kernels this CPU runs (None: not C++)."""
    if backend != "cpp":
        return [None]
    import os

    found = []
    saved = os.environ.get("NOENCORE_CPU_ISA")
    try:
        for isa in ("portable", "avx512", "avx512_bf16"):
            os.environ["NOENCORE_CPU_ISA"] = isa
            if backend_module("cpp").isa() == isa:
                found.append(isa)
    finally:
        if saved is None:
            os.environ.pop("NOENCORE_CPU_ISA", None)
        else:
            os.environ["NOENCORE_CPU_ISA"] = saved
    return found


def _edge_inputs(vocab: int, dtype: torch.dtype, seed: int):
    """hidden [N, D], weight [V, D], targets with 0, V-1, ignored and random-label rows
    (and random codes), per-row factors of both signs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(vocab, D, generator=g) * 3 / math.sqrt(D)).to(dtype)
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[[0, 5]] = 0
    targets[[1, 6, N - 1]] = vocab - 1
    targets[[2, 7]] = -100
    targets[[3, 8]] = ops.RANDOM_LABEL
    coef = torch.randn(N, generator=g)
    return hidden, weight, targets, coef


def _labels(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return resolve_targets(targets, label_key(SEED), OFFSET, vocab, -100)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_kernel_at_the_edges(backend, dtype, vocab, poisoned, device, monkeypatch):
    """The kernel entry point (loss, lse, dh, dW) in one chunk, in 3 (the last one
    short) and in 6 (more than the C++ op sums in bf16), on every ISA path."""
    _skip_unavailable(backend)
    hidden, weight, targets, coef = _edge_inputs(vocab, dtype, vocab)
    ref = f64_reference(hidden, weight, _labels(targets, vocab), coef)
    h, w, t, c = (x.to(device, copy=True) for x in (hidden, weight, targets, coef))
    kern = backend_module(backend)
    for isa in _isas(backend):
        if isa is not None:
            monkeypatch.setenv("NOENCORE_CPU_ISA", isa)
        # 6 chunks: past the 4 the C++ op sums in bf16 (Triton's interpreter: 1 and 3 only).
        for chunk in (N, 4) if backend == "triton" else (N, 4, 2):
            where = f"isa={isa} chunk={chunk}"
            loss, lse, dh, dw = kern.linear_ce_fwd(
                h, w, t, c, ignore_index=-100, key=label_key(SEED), row_offset=OFFSET,
                cap=math.inf, need_dh=True, need_dw=True, chunk=chunk)
            try:
                check_rows(ref, loss.cpu(), lse.cpu())
                check_linear_grads(ref, dh.cpu(), dw.cpu(), dtype)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            # Loss only (reduction="none"'s forward, evaluation): the same rows.
            loss2, lse2, none_dh, none_dw = kern.linear_ce_fwd(
                h, w, t, c, ignore_index=-100, key=label_key(SEED), row_offset=OFFSET,
                cap=math.inf, need_dh=False, need_dw=False, chunk=chunk)
            assert none_dh is None and none_dw is None
            torch.testing.assert_close(loss2.cpu(), loss.cpu(), rtol=0, atol=0, msg=where)
            torch.testing.assert_close(lse2.cpu(), lse.cpu(), rtol=0, atol=0, equal_nan=True,
                                       msg=where)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_none_reduction_and_target_nll_at_the_edges(backend, dtype, vocab, poisoned, device):
    """The public op with reduction="none" (a loss-only forward, then backward re-runs
    the kernel with each row's upstream gradient), its lse, and target_nll from it."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight = _edge_inputs(vocab, dtype, 100 + vocab)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(vocab))
    labels = _labels(targets, vocab)
    ref = f64_reference(hidden, weight, labels, row_weight * upstream)
    h, w, t, rw = (x.to(device, copy=True) for x in (hidden, weight, targets, row_weight))
    h.requires_grad_()
    w.requires_grad_()
    out, lse = ops.linear_ce_ascent(h, w, t, rw, random_labels=SEED, row_offset=OFFSET,
                                    reduction="none", backend=backend, return_lse=True)
    (out * upstream.to(device)).sum().backward()
    per_row = row_weight.double() * ref["loss"]
    assert_within("none", out.detach().cpu(), per_row,
                  TOL_LOSS * ref["mag"] * row_weight.double().abs())
    valid = ref["valid"]
    lse = lse.cpu()
    assert torch.isnan(lse[~valid]).all(), "lse of an ignored row must be NaN"
    assert_within("lse", lse[valid], ref["lse"][valid], TOL_LOSS * ref["mag"][valid])
    check_linear_grads(ref, h.grad.cpu(), w.grad.cpu(), dtype)
    # The NLL of code 0 (random-label rows too) from the op's lse.
    codes = torch.where(targets == -100, targets, torch.zeros_like(targets))
    nll = ops.target_nll(h.detach(), w.detach(), codes.to(device), lse.to(device)).cpu()
    z64 = hidden.double() @ weight.double().T
    expected = torch.logsumexp(z64, 1) - z64[:, 0]
    assert torch.isnan(nll[~valid]).all()
    assert_within("target_nll", nll[valid], expected[valid], TOL_LOSS * ref["mag"][valid])


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_on_logits_at_the_edges(backend, dtype, vocab, poisoned, device, monkeypatch):
    """ce_fwd on given logits, into a fresh (poisoned) gradient and in place."""
    _skip_unavailable(backend)
    g = torch.Generator().manual_seed(200 + vocab)
    logits = (torch.randn(N, vocab, generator=g) * 3).to(dtype)
    _, _, targets, coef = _edge_inputs(vocab, dtype, 300 + vocab)
    ref = f64_reference(None, None, _labels(targets, vocab), coef, logits=logits)
    kern = backend_module(backend)
    for isa in _isas(backend):
        if isa is not None:
            monkeypatch.setenv("NOENCORE_CPU_ISA", isa)
        for inplace in (False, True):
            z, t, c = (x.to(device, copy=True) for x in (logits, targets, coef))
            grad = z if inplace else torch.empty_like(z)
            loss, lse = kern.ce_fwd(z, t, c, ignore_index=-100, key=label_key(SEED),
                                    row_offset=OFFSET, cap=math.inf, grad=grad)
            try:
                check_rows(ref, loss.cpu(), lse.cpu())
                check_logits_grad(ref, grad.cpu(), dtype)
            except AssertionError as exc:
                raise AssertionError(f"isa={isa} inplace={inplace}: {exc}") from None


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])  # no Triton kernel for the statistics
def test_token_stats_at_the_edges(backend, dtype, vocab, poisoned, device, monkeypatch):
    """NLL, top-1 and the log-prob moments per token, one chunk and many."""
    _skip_unavailable(backend)
    hidden, weight, targets, _ = _edge_inputs(vocab, dtype, 400 + vocab)
    labels = _labels(targets, vocab)
    valid = labels >= 0
    h64, w64 = hidden.double(), weight.double()
    z = h64 @ w64.T
    mag = (1 + (h64.abs() @ w64.abs().T).amax(1))[valid]
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    mu = (p * logp).sum(1)
    var = (p * (logp - mu[:, None]) ** 2).sum(1)
    nll = -logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    for isa in _isas(backend):
        if isa is not None:
            monkeypatch.setenv("NOENCORE_CPU_ISA", isa)
        for chunk in (N, 4):
            st = ops.token_stats(hidden.to(device), weight.to(device), targets.to(device),
                                 random_labels=SEED, row_offset=OFFSET, chunk=chunk,
                                 backend=backend)
            st = ops.TokenStats(*(x.cpu() for x in st))
            where = f"isa={isa} chunk={chunk}"
            assert torch.isnan(st.nll[~valid]).all() and not st.correct[~valid].any(), where
            assert torch.isnan(st.logp_mean[~valid]).all(), where
            assert torch.isnan(st.logp_var[~valid]).all(), where
            assert_within(f"nll {where}", st.nll[valid], nll[valid], TOL_LOSS * mag)
            assert_within(f"mean {where}", st.logp_mean[valid], mu[valid], TOL_LOSS * mag)
            assert_within(f"var {where}", st.logp_var[valid], var[valid],
                          10 * TOL_LOSS * mag * mag)
            assert torch.equal(st.correct[valid], (z.argmax(1) == labels)[valid]), where


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [16, 32, 1024])
def test_triton_blocks_at_the_edges(block, dtype, poisoned, device):
    """The Triton row kernel at block widths a GPU may tune to, against vocabularies on
    each side of them: one block exactly full, one lane short, one lane over (the
    two-pass path with a 1-wide last block). The interpreter runs one fixed block (2048)
    through the op; here the kernel is launched at each width directly."""
    _skip_unavailable("triton")
    from noencore.kernels import ce_ascent as tk

    limit = {16: 33, 32: 333}.get(block)  # the interpreter walks every block of a row
    vocabs = [v for v in VOCABS if v <= limit] if limit else [1023, 1024, 1025, 2049]
    kernel = tk._ce_rows_kernel.fn  # the heuristics under the autotuner: no tuning
    for vocab in vocabs:
        g = torch.Generator().manual_seed(500 + vocab)
        logits = (torch.randn(N, vocab, generator=g) * 3).to(dtype)
        _, _, targets, coef = _edge_inputs(vocab, dtype, 600 + vocab)
        ref = f64_reference(None, None, _labels(targets, vocab), coef, logits=logits)
        for inplace in (False, True):
            z, t, c = (x.to(device, copy=True) for x in (logits, targets, coef))
            grad = z if inplace else torch.empty_like(z)
            loss, lse = torch.empty(N, device=device), torch.empty(N, device=device)
            kernel[(N,)](z, grad, t, c, loss, lse, z.stride(0), grad.stride(0), vocab,
                         -100, label_key(SEED), OFFSET, math.inf, tk._MASK32, HAS_KEY=True,
                         HAS_GRAD=True, G_BF16=dtype == torch.bfloat16, BLOCK_V=block)
            try:
                check_rows(ref, loss.cpu(), lse.cpu())
                check_logits_grad(ref, grad.cpu(), dtype)
            except AssertionError as exc:
                raise AssertionError(f"V={vocab} inplace={inplace}: {exc}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_hidden_dim(backend, dtype, poisoned, device):
    """D = 0: every logit is an empty sum, 0, so each valid row's loss and lse are log V
    (the C++ bf16 GEMM had written nothing at all for K = 0)."""
    _skip_unavailable(backend)
    vocab = 33
    _, _, targets, coef = _edge_inputs(vocab, dtype, 700)
    valid = _labels(targets, vocab) >= 0
    h = torch.zeros(N, 0, dtype=dtype, device=device)
    w = torch.zeros(vocab, 0, dtype=dtype, device=device)
    for chunk in (N, 4):
        loss, lse, dh, dw = backend_module(backend).linear_ce_fwd(
            h, w, targets.to(device), coef.to(device), ignore_index=-100, key=label_key(SEED),
            row_offset=OFFSET, cap=math.inf, need_dh=True, need_dw=True, chunk=chunk)
        loss, lse = loss.cpu(), lse.cpu()
        expected = torch.full((N,), math.log(vocab))
        torch.testing.assert_close(loss[valid], expected[valid])
        torch.testing.assert_close(lse[valid], expected[valid])
        assert (loss[~valid] == 0).all() and torch.isnan(lse[~valid]).all()
        assert dh.shape == (N, 0) and dw.shape == (vocab, 0)


def test_empty_vocabulary_is_refused():
    """V = 0 has no class to score: a clear error from every entry point (the C++ ones
    too), never a division by zero in the random-label hash or a read of nothing."""
    h, w = torch.randn(3, 4), torch.randn(0, 4)
    t = torch.full((3,), -100)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        ops.linear_ce_ascent(h, w, t)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        ops.ce_ascent(torch.randn(3, 0), torch.full((3,), ops.RANDOM_LABEL), random_labels=1)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        ops.token_stats(h, w, t)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        ops.target_nll(h, w, t, torch.zeros(3))
    if ops.cpp_available():
        import noencore._C as ext

        out = [torch.empty(3) for _ in range(2)]
        with pytest.raises(RuntimeError, match="vocabulary is empty"):
            ext.linear_ce_fwd(h, w, torch.full((3,), -2), torch.ones(3), -100, 7, 0, math.inf,
                              *out, None, None, 4)
        with pytest.raises(RuntimeError, match="vocabulary is empty"):
            ext.ce_fwd(torch.randn(3, 0), torch.full((3,), -2), torch.ones(3), -100, 7, 0,
                       math.inf, *out, None)
