"""The fused CE-with-ascent op: every backend against float64 autograd and each other.

All backends run the same tests: "torch" (reference), "cpp" (C++ extension) and
"triton" (through TRITON_INTERPRET=1 on CPU, so its sizes stay small). Inputs live on
the ``device`` fixture's device (CUDA for "triton" and "torch" when there is a GPU).
Outputs are poisoned with NaN before each call so that an element a kernel forgot to
write fails.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import noencore.ops as ops
from noencore.ops.dispatch import backend_module
from noencore.ops.random_labels import label_key, resolve_targets

BACKENDS = ["torch", "cpp", "triton"]
SHAPES = [(1, 257, 2049), (17, 1, 2048), (17, 257, 2049)]  # (N, D, V): no block multiples
DTYPES = [torch.float32, torch.bfloat16]


def _skip_unavailable(backend: str) -> None:
    if backend == "cpp" and not ops.cpp_available():
        if os.environ.get("NOENCORE_REQUIRE_CPP") == "1":
            pytest.fail("NOENCORE_REQUIRE_CPP=1 but the C++ extension noencore._C is not built")
        pytest.skip("C++ extension not built")
    if backend == "triton" and not ops.triton_available():
        pytest.skip("triton unavailable (needs a GPU or TRITON_INTERPRET=1)")


def _rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: max-abs error over max-abs value; bf16: relative L2 error."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    if dtype == torch.float32:
        return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of CPU-made inputs on ``device`` (fresh tensors: callers may set requires_grad)."""
    return [t.to(device, copy=True) for t in tensors]


def _f64_objective(hidden, weight, labels, row_weight, reduction, cap, logits=None):
    """Float64 autograd ground truth. labels: resolved int64 (-1 = ignored)."""
    if logits is None:
        z = hidden @ weight.T
    else:
        z = logits
    valid = labels >= 0
    loss = torch.logsumexp(z, 1) - z.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if cap is not None:
        capped = (row_weight < 0) & (loss.detach() > cap)
        loss = torch.where(capped, loss.detach(), loss)  # counted, but no gradient
    per = row_weight.double() * loss
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / max(int(valid.sum()), 1)


def _inputs(n, d, v, dtype, seed, *, cap_mode="active"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    targets[torch.rand(n, generator=g) < 0.2] = ops.RANDOM_LABEL
    row_weight = torch.randn(n, generator=g)  # mixed signs: descent and ascent rows
    cap = None
    if cap_mode == "active":
        with torch.no_grad():
            lab = resolve_targets(targets, label_key(5), 3, v, -100)
            z = hidden.double() @ weight.double().T
            loss = torch.logsumexp(z, 1) - z.gather(1, lab.clamp_min(0)[:, None])[:, 0]
        # Some ascent rows above the cap, some below, none near it (bf16 logits differ
        # slightly between backends: a row on the edge would flip its capping).
        lv = loss[lab >= 0].sort().values
        if lv.numel() < 2:
            cap = float(lv.sum()) / 2
        else:
            i = int((lv[1:] - lv[:-1]).argmax())
            cap = float(lv[i] + lv[i + 1]) / 2
    return hidden, weight, targets, row_weight, cap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_float64(backend, dtype, reduction, shape, poisoned, device):
    _skip_unavailable(backend)
    n, d, v = shape
    seed = zlib.crc32(f"{backend}{dtype}{reduction}{shape}".encode())
    hidden, weight, targets, row_weight, cap = _inputs(n, d, v, dtype, seed)
    h, w, t, rw = _on(device, hidden, weight, targets, row_weight)
    h.requires_grad_()
    w.requires_grad_()
    out, lse = ops.linear_ce_ascent(h, w, t, rw, random_labels=5, row_offset=3, loss_cap=cap,
                                    reduction=reduction, backend=backend, return_lse=True)
    upstream = torch.randn(out.shape)  # any upstream gradient, scalar or per row
    (out * upstream.to(device)).sum().backward()
    out, lse = out.cpu(), lse.cpu()

    labels = resolve_targets(targets, label_key(5), 3, v, -100)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = _f64_objective(h64, w64, labels, row_weight, reduction, cap)
    (ref * upstream.double()).sum().backward()

    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out.detach(), ref.detach(), torch.float32 if dtype == torch.float32 else
                torch.bfloat16) < _tol(dtype)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert _rel(h.grad.cpu(), h64.grad, dtype) < _tol(dtype), "d hidden"
    assert _rel(w.grad.cpu(), w64.grad, dtype) < _tol(dtype), "d weight"
    # Each row's logsumexp from the same pass (fp32 logits, also for bf16 inputs: the
    # float64 product of the same bf16 values is the exact reference); NaN when ignored.
    assert lse.dtype == torch.float32 and not lse.requires_grad
    ignored = targets == -100
    assert torch.isnan(lse[ignored]).all()
    lse64 = torch.logsumexp(hidden.double() @ weight.double().T, 1)
    torch.testing.assert_close(lse[~ignored].double(), lse64[~ignored], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_reduction_weight_grad_any_upstream(backend, device):
    """Liger-Kernel #968: with reduction="none", dW must use each row's upstream gradient."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, _ = _inputs(13, 24, 300, torch.float32, 1,
                                                    cap_mode="off")
    h, w, t, rw = _on(device, hidden, weight, targets, row_weight)
    w.requires_grad_()
    out = ops.linear_ce_ascent(h, w, t, rw, random_labels=5, row_offset=3,
                               reduction="none", backend=backend)
    upstream = torch.randn(13) * torch.arange(13)  # very unequal per-row factors
    out.backward(upstream.to(device))
    w64 = weight.double().requires_grad_()
    labels = resolve_targets(targets, label_key(5), 3, 300, -100)
    _f64_objective(hidden.double(), w64, labels, row_weight, "none", None).backward(
        upstream.double())
    assert _rel(w.grad.cpu(), w64.grad, torch.float32) < 1e-5
    # The wrong answer (upstream mean times the summed gradient) is far from it.
    w.grad = None
    ops.linear_ce_ascent(h, w, t, rw, random_labels=5, row_offset=3,
                         reduction="sum", backend=backend).backward(upstream.mean().to(device))
    assert _rel(w.grad.cpu(), w64.grad, torch.float32) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_ce_on_logits_matches_float64(backend, dtype, reduction, inplace, poisoned, device):
    _skip_unavailable(backend)
    n, v = (17, 2049)
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    targets[1::4] = ops.RANDOM_LABEL
    row_weight = torch.randn(n, generator=g)
    cap = 9.0
    x, t, rw = _on(device, logits, targets, row_weight)
    x.requires_grad_()
    leaf = x
    if inplace:
        x = x * 1  # a non-leaf whose value nothing else needs
    out = ops.ce_ascent(x, t, rw, random_labels=9, row_offset=100, loss_cap=cap,
                        reduction=reduction, backend=backend, inplace=inplace)
    upstream = torch.randn(out.shape)
    (out * upstream.to(device)).sum().backward()
    out = out.cpu()

    labels = resolve_targets(targets, label_key(9), 100, v, -100)
    z64 = logits.double().requires_grad_()
    ref = _f64_objective(None, None, labels, row_weight, reduction, cap, logits=z64)
    (ref * upstream.double()).sum().backward()
    assert _rel(out.detach(), ref.detach(), torch.float32 if dtype == torch.float32 else
                torch.bfloat16) < _tol(dtype)
    assert leaf.grad.dtype == dtype
    assert _rel(leaf.grad.cpu(), z64.grad, dtype) < _tol(dtype)
    if not inplace:
        assert torch.equal(x.detach().cpu(), logits), "logits must be left untouched"


def test_ce_inplace_overwrite_is_detected():
    """Autograd refuses to reuse logits that the op overwrote with their gradient."""
    x = torch.randn(4, 10, requires_grad=True)
    y = x * 1
    z = torch.sin(y)  # saves y for its backward
    loss = ops.ce_ascent(y, torch.tensor([1, 2, 3, 4]), inplace=True) + z.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_labels_identical_across_backends(backend, device):
    _skip_unavailable(backend)
    for seed, offset, v in [(0, 0, 2048), (123456789, 17, 2049), (2**40 + 3, 2**32 - 5, 7)]:
        key = label_key(seed)
        expected = ops.random_label(seed, torch.arange(offset, offset + 1000), v)
        if backend == "cpp":
            got = backend_module("cpp").random_labels(key, offset, 1000, v)
        elif backend == "triton":
            got = backend_module("triton").random_labels(key, offset, 1000, v, device=device)
        else:
            got = resolve_targets(torch.full((1000,), ops.RANDOM_LABEL, device=device), key,
                                  offset, v, -100)
        assert torch.equal(got.cpu(), expected), (seed, offset, v)
    # Known values pin the hash down: changing it would silently change RL experiments.
    assert ops.random_label(0, torch.arange(4), 2048).tolist() == _pinned_labels()


def _pinned_labels() -> list[int]:
    """fmix32(fmix32(0x9E3779B9) ^ row) % 2048 for rows 0..3, by plain Python ints."""
    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)
    key = fmix(0x9E3779B9)
    return [fmix(key ^ r) % 2048 for r in range(4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_labels_global_rows(backend, device):
    """Relabelled rows equal explicit targets; splitting rows with row_offset changes nothing."""
    _skip_unavailable(backend)
    hidden, weight, _, row_weight, _ = _inputs(12, 16, 500, torch.float32, 3, cap_mode="off")
    hidden, weight, row_weight, targets, explicit_targets = _on(
        device, hidden, weight, row_weight, torch.full((12,), ops.RANDOM_LABEL),
        ops.random_label(77, torch.arange(40, 52), 500))
    kw = dict(random_labels=77, reduction="none", backend=backend)
    whole = ops.linear_ce_ascent(hidden, weight, targets, row_weight, row_offset=40, **kw)
    explicit = ops.linear_ce_ascent(hidden, weight, explicit_targets, row_weight,
                                    backend=backend, reduction="none")
    first = ops.linear_ce_ascent(hidden[:5], weight, targets[:5], row_weight[:5], row_offset=40,
                                 **kw)
    second = ops.linear_ce_ascent(hidden[5:], weight, targets[5:], row_weight[5:],
                                  row_offset=45, **kw)
    torch.testing.assert_close(whole, explicit, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction, device):
    _skip_unavailable(backend)
    h = torch.randn(5, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, device=device, requires_grad=True)
    out = ops.linear_ce_ascent(h, w, torch.full((5,), -100, device=device), reduction=reduction,
                               backend=backend)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_cap(backend, device):
    """Capped ascent rows: loss reported, no gradient; an unreachable cap changes nothing."""
    _skip_unavailable(backend)
    hidden, weight, targets, _, _ = _inputs(9, 16, 300, torch.float32, 4, cap_mode="off")
    targets[targets < 0] = 1
    h, weight, targets = _on(device, hidden, weight, targets)
    h.requires_grad_()
    neg = -torch.ones(9, device=device)
    out = ops.linear_ce_ascent(h, weight, targets, neg, loss_cap=0.0, reduction="sum",
                               backend=backend)
    out.backward()
    assert out.item() < 0 and torch.count_nonzero(h.grad) == 0
    grads = []
    for cap in (None, 1e6):
        h.grad = None
        ops.linear_ce_ascent(h, weight, targets, neg, loss_cap=cap, backend=backend).backward()
        grads.append(h.grad.clone())
    assert torch.count_nonzero(grads[0]) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_kernel_chunks_agree(backend, dtype, poisoned, device):
    """Row chunking (awkward chunk sizes) gives the same loss and gradients as one chunk."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, cap = _inputs(23, 40, 333, dtype, 6)
    hidden, weight, targets, row_weight = _on(device, hidden, weight, targets, row_weight)
    kern = backend_module(backend)
    kw = dict(ignore_index=-100, key=label_key(5), row_offset=3, cap=cap, need_dh=True,
              need_dw=True)
    coef = row_weight / 23
    one = kern.linear_ce_fwd(hidden, weight, targets, coef, chunk=1024, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for chunk in (7, 3):  # 4 chunks (C++ bf16: dW summed in bf16), 8 (summed in fp32)
        many = kern.linear_ce_fwd(hidden, weight, targets, coef, chunk=chunk, **kw)
        for a, b in zip(one, many):  # loss, lse (NaN on ignored rows), dh, dw
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_weight_and_no_grad(backend, device):
    """Frozen head: only d hidden; under no_grad: the same loss, no gradient work."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, _ = _inputs(10, 16, 100, torch.float32, 8,
                                                    cap_mode="off")
    h, weight, targets, row_weight = _on(device, hidden, weight, targets, row_weight)
    h.requires_grad_()
    out = ops.linear_ce_ascent(h, weight, targets, row_weight, random_labels=1, backend=backend)
    out.backward()
    assert weight.grad is None and torch.count_nonzero(h.grad) > 0
    kern = backend_module(backend)
    asked = []
    real = kern.linear_ce_fwd

    def spy(*args, **kwargs):
        asked.append((kwargs["need_dh"], kwargs["need_dw"]))
        return real(*args, **kwargs)

    kern.linear_ce_fwd = spy
    try:
        with torch.no_grad():
            again = ops.linear_ce_ascent(h, weight.requires_grad_(), targets, row_weight,
                                         random_labels=1, backend=backend)
    finally:
        kern.linear_ce_fwd = real
        weight.requires_grad_(False)
    assert asked == [(False, False)], "no gradient work under no_grad"
    torch.testing.assert_close(again, out.detach(), rtol=1e-6, atol=1e-6)


def test_autocast_bf16_matches_bf16_inputs():
    """Under autocast, fp32 master tensors train through the bf16 kernels."""
    hidden, weight, targets, row_weight, _ = _inputs(9, 32, 200, torch.float32, 9,
                                                    cap_mode="off")
    targets[targets == ops.RANDOM_LABEL] = 0
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.linear_ce_ascent(h, w, targets, row_weight)
    out.backward()
    hb = hidden.bfloat16().requires_grad_()
    wb = weight.bfloat16().requires_grad_()
    ref = ops.linear_ce_ascent(hb, wb, targets, row_weight)
    ref.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, hb.grad.float())
    torch.testing.assert_close(w.grad, wb.grad.float())


def test_backend_resolution():
    x = torch.zeros(2, 2)
    expected = "cpp" if ops.cpp_available() else "torch"
    assert ops.resolve_backend(x) == expected
    assert ops.resolve_backend(x.half()) == "torch"  # fp16 on CPU: reference path
    assert ops.resolve_backend(x, "torch") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend(x, "cuda")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        ops.resolve_backend(x.half(), "cpp")


def test_cpp_extension_built_when_required():
    """`make test` sets NOENCORE_REQUIRE_CPP=1: a silently missing extension fails CI."""
    if os.environ.get("NOENCORE_REQUIRE_CPP") != "1":
        pytest.skip("NOENCORE_REQUIRE_CPP is not set")
    assert ops.cpp_available(), "noencore._C did not build: run `pip install --no-build-isolation -e .`"
    assert ops.resolve_backend(torch.zeros(1)) == "cpp"


def test_bad_inputs_have_clear_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"targets\[2\] = 10"):
        ops.linear_ce_ascent(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="random_labels=seed"):
        ops.linear_ce_ascent(h, w, torch.tensor([0, ops.RANDOM_LABEL, 1, 2]))
    with pytest.raises(ValueError, match=r"weight \[V, D\]"):
        ops.linear_ce_ascent(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="share a dtype"):
        ops.linear_ce_ascent(h, w.bfloat16(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        ops.ce_ascent(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="row_weight"):
        ops.ce_ascent(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="leaf tensor"):
        ops.ce_ascent(torch.randn(4, 10, requires_grad=True), torch.zeros(4, dtype=torch.long),
                      inplace=True)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_token_stats_matches_float64(backend, dtype, poisoned, device):
    _skip_unavailable(backend)
    hidden, weight, targets, _, _ = _inputs(30, 20, 257, dtype, 10, cap_mode="off")
    st = ops.token_stats(*_on(device, hidden, weight, targets), random_labels=3, chunk=7,
                         backend=backend)
    st = ops.TokenStats(*(x.cpu() for x in st))
    labels = resolve_targets(targets, label_key(3), 0, 257, -100)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, 1)
    valid = labels >= 0
    nll = -logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    p = logp.exp()
    mu = (p * logp).sum(1)
    var = (p * (logp - mu[:, None]) ** 2).sum(1)
    assert torch.isnan(st.nll[~valid]).all() and not st.correct[~valid].any()
    torch.testing.assert_close(st.nll[valid].double(), nll[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.logp_mean[valid].double(), mu[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.logp_var[valid].double(), var[valid], rtol=1e-4, atol=1e-4)
    assert torch.equal(st.correct[valid], (logp.argmax(1) == labels)[valid])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_per_token_loss_error_as_small_as_reference(backend, device):
    """bf16 inputs: logits in fp32 (not rounded to bf16), per-token loss against float64.

    The reference computes its logits in fp32 (max error ~1.5e-6 nats here); logits rounded
    to bf16 gave up to ~3e-2 nats, which loss caps and row targets would read.
    """
    _skip_unavailable(backend)
    g = torch.Generator().manual_seed(21)
    n, d, v = 64, 1024, 2048  # the interpreter is slow: few rows, MusicGen-sized head
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d) * 3).bfloat16()
    targets = torch.randint(0, v, (n,), generator=g)
    loss = ops.linear_ce_ascent(*_on(device, hidden, weight, targets), reduction="none",
                                backend=backend).cpu().double()
    z = hidden.double() @ weight.double().T  # the same bf16 inputs, exactly
    expected = torch.logsumexp(z, 1) - z.gather(1, targets[:, None])[:, 0]
    assert float((loss - expected).abs().max()) < 1e-5


def test_triton_reads_the_logits_only_before_its_gradient_writes():
    """The row kernel may write gradients over the logits (in place) with no barrier
    between its passes: a logit read after the writes began (the target logit, once)
    could be another warp's gradient on a GPU. The interpreter cannot show that race, so
    this checks the kernel's source: the logits are loaded in the two block loops (pass
    2 reads each block just before writing it) or, on the one-block path, once before
    any store (its reductions wait for every warp's loads)."""
    import ast
    import inspect
    import textwrap

    pytest.importorskip("triton")
    from noencore.kernels import ce_ascent as tk

    kernel = tk._ce_rows_kernel
    while hasattr(kernel, "fn"):  # autotuner -> heuristics -> jit -> the Python function
        kernel = kernel.fn
    fn = ast.parse(textwrap.dedent(inspect.getsource(kernel))).body[0]
    in_loop = set()
    for loop in ast.walk(fn):
        if isinstance(loop, ast.For):
            in_loop.update(id(node) for node in ast.walk(loop))
    calls = [node for node in ast.walk(fn) if isinstance(node, ast.Call)]
    loads = [node for node in calls if ast.unparse(node.func) == "tl.load"
             and "z_row" in ast.unparse(node.args[0])]
    first_store = min(node.lineno for node in calls
                      if ast.unparse(node.func) in ("tl.store", "_store_grad")
                      and "LOSS" not in ast.unparse(node.args[0])
                      and "LSE" not in ast.unparse(node.args[0]))
    outside = [node for node in loads if id(node) not in in_loop]
    assert len(loads) == 3 and len(outside) == 1, [ast.unparse(node) for node in loads]
    assert outside[0].lineno < first_store


def _nonfinite_rows(dtype: torch.dtype, vocab: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [10, vocab] with one non-finite case per row, targets, coef (cap 5)."""
    g = torch.Generator().manual_seed(30)
    z = torch.randn(10, vocab, generator=g) * 3
    t = torch.randint(0, 2048, (10,), generator=g)
    z[0, 5] = math.nan                     # NaN: NaN loss, NaN gradient row
    z[1, 7] = math.inf                     # +inf elsewhere: loss inf, NaN at the inf
    z[2, 9] = math.inf
    t[2] = 9                               # +inf at the target: loss NaN
    z[3] = -math.inf                       # every logit -inf: NaN row
    z[4, 11] = -math.inf
    t[4] = 11                              # -inf at the target: loss inf, finite gradient
    z[5, 13] = math.nan
    t[5] = -100                            # ignored: loss 0 and gradient 0, NaN or not
    z[6, :vocab - 400] = -math.inf
    t[6] = vocab - 300                     # the first blocks all -inf: a finite row
    z[7, 3:5] = math.inf                   # two +inf, ascent row over the cap
    z[8, 20] = math.nan
    t[8] = ops.RANDOM_LABEL                # a relabelled NaN row
    coef = torch.tensor([1.0, 0.5, -1.0, 2.0, 1.0, 1.0, 0.3, -2.0, 1.0, 0.7])
    return z.to(dtype), t, coef


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [2048, 2500])  # Triton: the row in one block, or two passes
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf in the interpreter
def test_nonfinite_logits_follow_torch(backend, dtype, vocab, poisoned, device):
    """NaN and inf logits give what torch gives (NaN/inf losses and gradients, never a
    finite stand-in that would slip past the engine's NaN guard); ignored rows stay 0."""
    _skip_unavailable(backend)
    z, t, coef = _nonfinite_rows(dtype, vocab)
    kw = dict(ignore_index=-100, key=label_key(4), row_offset=0, cap=5.0)
    zd, td, cd = _on(device, z, t, coef)
    grad = torch.empty_like(zd)
    loss, lse = (x.cpu() for x in backend_module(backend).ce_fwd(zd, td, cd, grad=grad, **kw))
    grad = grad.cpu().float()

    # torch's own semantics, written out in float64 (capped row 7: coef 0, so 0 * NaN).
    labels = resolve_targets(t, label_key(4), 0, z.shape[1], -100)
    z64 = z.double()
    lse = torch.logsumexp(z64, 1)
    exp_loss = lse - z64.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    exp_loss[5] = 0.0
    c = coef.double().clone()
    c[7] = 0.0
    exp_grad = (torch.exp(z64 - lse[:, None])
                - torch.nn.functional.one_hot(labels.clamp_min(0), z.shape[1])) * c[:, None]
    exp_grad[5] = 0.0
    assert torch.isnan(loss[[0, 2, 3, 8]]).all() and torch.isinf(loss[[1, 4, 7]]).all()
    assert torch.isnan(grad[[0, 3, 8]]).all() and torch.isnan(grad[[1, 2, 7]]).any(dim=1).all()
    assert torch.equal(grad[5], torch.zeros_like(grad[5])) and loss[5] == 0
    torch.testing.assert_close(loss.double(), exp_loss, equal_nan=True, rtol=1e-5, atol=1e-5)
    # logsumexp: torch's for every row (also -inf, NaN, +inf), NaN for the ignored one
    exp_lse = torch.where(torch.arange(10) == 5, math.nan, torch.logsumexp(z64, 1))
    torch.testing.assert_close(lse.double(), exp_lse, equal_nan=True, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), exp_grad, equal_nan=True, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_state_poisons_its_row(backend, poisoned, device):
    """A NaN in one row of hidden states: NaN loss for that row (not a finite 9.7)."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, _ = _inputs(6, 16, 300, torch.bfloat16, 31,
                                                    cap_mode="off")
    targets[:] = 7
    hidden[2, 3] = math.nan
    h, w, t, rw = _on(device, hidden, weight, targets, row_weight)
    h.requires_grad_()
    loss = ops.linear_ce_ascent(h, w, t, rw, reduction="none", backend=backend)
    loss.sum().backward()
    loss, dh = loss.detach().cpu(), h.grad.cpu()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(dh[2]).all() and torch.isfinite(dh[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unvalidated_bad_targets_give_nan_rows(backend, poisoned, device):
    """Targets the front does not check (on a GPU it would sync): a target that is not a
    class gives a NaN loss and gradient row, the other rows are untouched."""
    _skip_unavailable(backend)
    z = torch.randn(5, 300)
    t = torch.tensor([3, 300, -1, ops.RANDOM_LABEL, -100])  # 300 = V; -2 without a key
    zd, td, cd = _on(device, z, t, torch.ones(5))
    grad = torch.empty_like(zd)
    loss = backend_module(backend).ce_fwd(zd, td, cd, ignore_index=-100, key=None,
                                          row_offset=0, cap=math.inf, grad=grad)[0].cpu()
    grad = grad.cpu()
    assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all()
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0]).all()
    assert loss[4] == 0 and torch.count_nonzero(grad[4]) == 0


def test_target_validation_reads_no_device_tensor():
    """The front checks targets on CPU only: reading a check's answer off a GPU would
    synchronise the device at every call (meta tensors stand in for CUDA here)."""
    from noencore.ops.linear_ce import _check_common

    t = torch.zeros(4, dtype=torch.long, device="meta")
    _check_common(4, 10, t, None, t.device, -100, None, None, "sum", 0)
    with pytest.raises(ValueError, match=r"targets\[1\] = 10"):
        _check_common(4, 10, torch.tensor([0, 10, 1, 2]), None, torch.device("cpu"), -100,
                      None, None, "sum", 0)


def _c_ext():
    if not ops.cpp_available():
        pytest.skip("C++ extension not built")
    import noencore._C as ext

    return ext


def test_cpp_refuses_out_of_range_targets_before_writing(poisoned):
    """The C++ entry points are callable directly: they check targets before any write."""
    ext = _c_ext()
    z = torch.randn(3, 50)
    t = torch.tensor([1, 50, 2])
    coef, loss, lse, grad = torch.ones(3), torch.empty(3), torch.empty(3), torch.empty(3, 50)
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 50 is not a class in \[0, 50\)"):
        ext.ce_fwd(z, t, coef, -100, -1, 0, math.inf, loss, lse, grad)
    dh, dw = torch.empty(3, 8), torch.empty(50, 8)
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 50"):
        ext.linear_ce_fwd(torch.randn(3, 8), torch.randn(50, 8), t, coef, -100, -1, 0,
                          math.inf, loss, lse, dh, dw, 2)
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -2"):  # RANDOM_LABEL, no key
        ext.ce_fwd(z, torch.tensor([-2, 1, 2]), coef, -100, -1, 0, math.inf, loss, lse, grad)
    for out in (loss, lse, grad, dh, dw):
        assert torch.isnan(out).all(), "nothing written before the check"


def _cpu_isa_from_flags() -> str:
    """What /proc/cpuinfo says the C++ kernels may use (x86-64 Linux)."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                     [])
    if not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        return "portable"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx512"


def test_cpp_isa_is_chosen_at_run_time(monkeypatch):
    """The extension runs on any CPU of its architecture and picks its vector path from
    what the CPU reports; NOENCORE_CPU_ISA only lowers that choice."""
    ext = _c_ext()
    monkeypatch.delenv("NOENCORE_CPU_ISA", raising=False)
    import platform

    if platform.machine() != "x86_64":
        assert ext.isa() == "portable"
    elif os.path.exists("/proc/cpuinfo"):
        assert ext.isa() == _cpu_isa_from_flags()
    monkeypatch.setenv("NOENCORE_CPU_ISA", "portable")
    assert ext.isa() == "portable" and backend_module("cpp").isa() == "portable"
    monkeypatch.setenv("NOENCORE_CPU_ISA", "avx2")
    with pytest.raises(RuntimeError, match="portable, avx512, avx512_bf16"):
        ext.isa()


@pytest.mark.parametrize("isa", ["portable", "avx512", "avx512_bf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cpp_isa_paths_match_reference(isa, dtype, poisoned, monkeypatch):
    """Every instruction-set path this CPU can take agrees with the torch reference (the
    portable one too, forced on a vector CPU): fused linear op, logits op, statistics."""
    ext = _c_ext()
    monkeypatch.setenv("NOENCORE_CPU_ISA", isa)
    if ext.isa() != isa:
        pytest.skip(f"this CPU has no {isa}")
    cpp, ref = backend_module("cpp"), backend_module("torch")
    hidden, weight, targets, row_weight, cap = _inputs(50, 67, 2049, dtype, 12)
    kw = dict(ignore_index=-100, key=label_key(5), row_offset=3, cap=cap)
    coef = row_weight / 50
    expected = ref.linear_ce_fwd(hidden, weight, targets, coef, need_dh=True, need_dw=True, **kw)
    got = cpp.linear_ce_fwd(hidden, weight, targets, coef, need_dh=True, need_dw=True,
                            chunk=16, **kw)
    for a, b in zip(got[:2], expected[:2]):  # loss, lse: fp32 logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, equal_nan=True)
    for a, b in zip(got[2:], expected[2:]):
        assert a.dtype == dtype and _rel(a, b, dtype) < _tol(dtype)
    logits = (hidden.float() @ weight.float().T).to(dtype)
    grad, grad_ref = torch.empty_like(logits), torch.empty_like(logits)
    got = cpp.ce_fwd(logits, targets, coef, grad=grad, **kw)
    expected = ref.ce_fwd(logits, targets, coef, grad=grad_ref, **kw)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, equal_nan=True)
    assert _rel(grad, grad_ref, dtype) < _tol(dtype)
    st = ops.token_stats(hidden, weight, targets, random_labels=5, row_offset=3, backend="cpp")
    st_ref = ops.token_stats(hidden, weight, targets, random_labels=5, row_offset=3,
                             backend="torch")
    torch.testing.assert_close(st.nll, st_ref.nll, rtol=1e-5, atol=2e-5, equal_nan=True)


def test_cpp_baseline_code_has_no_avx512():
    """Only the run-time-chosen kernels (noencore::avx512::*) hold AVX/AVX-512
    instructions: the rest of the extension runs on any x86-64 (no -march=native)."""
    import platform
    import shutil
    import subprocess

    ext = _c_ext()
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__],
                         check=True, capture_output=True, text=True).stdout
    vector_code, current = set(), None
    for line in asm.splitlines():
        if line.endswith(">:"):
            current = line[line.index("<") + 1:-2]
        elif current is not None and ("%ymm" in line or "%zmm" in line or "{%k" in line):
            vector_code.add(current)
    assert vector_code, "no AVX-512 kernels found at all"
    # The name before the parameters (templates demangle with their return type first).
    outside = sorted(f for f in vector_code if "noencore::avx512::" not in f.split("(")[0])
    assert not outside, outside[:10]


def test_last_backend_records_each_call(device):
    """Metrics and reports record which backend ran: last_backend() after each call."""
    h, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    t = torch.tensor([1, 2, 3, -100], device=device)
    ops.linear_ce_ascent(h, w, t, backend="torch")
    assert ops.last_backend() == "torch"
    ops.linear_ce_ascent(h, w, t)
    assert ops.last_backend() == ops.resolve_backend(h)
    ops.ce_ascent(h @ w.T, t, backend="torch")
    assert ops.last_backend() == "torch"
    ops.token_stats(h, w, t, backend="triton")  # no Triton kernel for the statistics
    assert ops.last_backend() == "torch"
    if ops.cpp_available():
        ops.token_stats(h.cpu(), w.cpu(), t.cpu())
        assert ops.last_backend() == "cpp"


def test_auto_fallback_to_torch_warns_once(monkeypatch):
    """backend="auto" leaving accelerator tensors to the torch path warns, once a process."""
    from noencore.ops import dispatch

    monkeypatch.setattr(dispatch, "_warned_fallback", False)
    x = torch.empty(2, 2, device="meta")  # a non-CPU tensor with no fused kernel
    with pytest.warns(RuntimeWarning, match="slow torch reference path on meta tensors"):
        assert dispatch.use_backend(x) == "torch"
    assert ops.last_backend() == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.use_backend(x)  # second time: silent
        dispatch.use_backend(torch.zeros(2, 2))  # CPU: never
    if torch.cuda.is_available():
        monkeypatch.setattr(dispatch, "_warned_fallback", False)
        monkeypatch.setattr(dispatch, "triton_available", lambda: False)
        monkeypatch.setattr(dispatch, "_triton_missing", lambda: "triton does not import")
        with pytest.warns(RuntimeWarning, match="on cuda tensors: triton does not import"):
            assert dispatch.use_backend(torch.zeros(2, 2, device="cuda")) == "torch"
