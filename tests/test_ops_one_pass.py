"""The op's one-pass outputs for the training step: each row's logsumexp from the pass
that computes its loss and gradients, the NLL of the true code from it (``target_nll``),
per-row weights from the op's own losses (``reduction="none"``), the GEMMs each call
runs, and no host reads of device values.

Conventions as in test_ops.py (every backend against float64, fresh inputs of awkward
sizes, outputs poisoned before the call).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import noencore.ops as ops
from noencore.ops.dispatch import backend_module
from noencore.ops.random_labels import label_key

sys.path.insert(0, str(Path(__file__).parent))
from test_ops import (  # noqa: E402
    BACKENDS,
    DTYPES,
    _inputs,
    _on,
    _rel,
    _skip_unavailable,
    _tol,
)

GEMMS = {"aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm"}
# Ops that read a device value on the host (a CUDA stream sync): scalars, and anything
# whose output size depends on the data.
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero",
              "aten.masked_select", "aten.unique_consecutive", "aten._unique2"}


class OpLog(TorchDispatchMode):
    """Records the aten ops dispatched inside it (also those called from C++ kernels)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else ()) if i is not None):
            name += "(bool mask)"  # boolean indexing: a nonzero inside
        self.ops.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def gemms(self) -> int:
        return sum(name in GEMMS for name in self.ops)

    @property
    def host_reads(self) -> list[str]:
        return [name for name in self.ops if name in HOST_READS or "bool mask" in name]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_lse_changes_nothing_else(backend, reduction, finite_poison, device):
    """return_lse=True: the same value and gradients as without it, no extra GEMM, and a
    logsumexp written for every row (NaN for ignored ones, also on the logits op)."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, cap = _inputs(19, 40, 333, torch.float32, 2)
    runs = []
    for return_lse in (False, True):
        h, w, t, rw = _on(device, hidden, weight, targets, row_weight)
        h.requires_grad_()
        w.requires_grad_()
        log = OpLog()
        with log:
            out = ops.linear_ce_ascent(h, w, t, rw, random_labels=5, row_offset=3, loss_cap=cap,
                                       reduction=reduction, backend=backend,
                                       return_lse=return_lse)
            value = out[0] if return_lse else out
            value.sum().backward()
        runs.append((value.detach(), h.grad, w.grad, log.gemms))
    for a, b in zip(runs[0], runs[1]):
        if isinstance(a, int):
            assert a == b, "return_lse ran another GEMM"
        else:
            torch.testing.assert_close(a, b)
    lse = out[1].cpu()
    ignored = targets == -100
    assert torch.isnan(lse[ignored]).all() and torch.isfinite(lse[~ignored]).all()
    logits = (hidden @ weight.T).to(device)
    _, lse_logits = ops.ce_ascent(logits, t, rw, random_labels=5, row_offset=3, backend=backend,
                                  reduction=reduction, return_lse=True)
    torch.testing.assert_close(lse_logits.cpu(), lse, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_target_nll_of_true_codes_under_random_labels(backend, dtype, poisoned, device):
    """RL's step: the op trains on random labels and returns lse; the NLL of the true
    code is lse - h . W[true], against float64 (ignored rows NaN)."""
    _skip_unavailable(backend)
    hidden, weight, true, row_weight, _ = _inputs(23, 257, 2049, dtype, 3, cap_mode="off")
    true[true == ops.RANDOM_LABEL] = 2048
    trained = torch.where(true == -100, true, ops.RANDOM_LABEL)  # every valid row relabelled
    h, w, t, rw, tt = _on(device, hidden, weight, trained, row_weight, true)
    _, lse = ops.linear_ce_ascent(h, w, t, rw, random_labels=11, reduction="sum",
                                  backend=backend, return_lse=True)
    nll = ops.target_nll(h, w, tt, lse).cpu()
    z = hidden.double() @ weight.double().T
    valid = true != -100
    expected = torch.logsumexp(z, 1) - z.gather(1, true.clamp_min(0)[:, None])[:, 0]
    assert nll.dtype == torch.float32 and torch.isnan(nll[~valid]).all()
    torch.testing.assert_close(nll[valid].double(), expected[valid], rtol=1e-5, atol=1e-4)


def test_target_nll_checks_and_autocast():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    lse = torch.logsumexp(h @ w.T, 1)
    with pytest.raises(ValueError, match=r"targets\[1\] = 10 is not a code in \[0, 10\)"):
        ops.target_nll(h, w, torch.tensor([0, 10, 1, 2]), lse)
    with pytest.raises(ValueError, match=r"targets\[0\] = -2"):  # no random labels here
        ops.target_nll(h, w, torch.tensor([ops.RANDOM_LABEL, 1, 1, 2]), lse)
    with pytest.raises(ValueError, match="targets and lse must be"):
        ops.target_nll(h, w, torch.tensor([0, 1, 2]), lse)
    with pytest.raises(ValueError, match=r"weight \[V, D\]"):
        ops.target_nll(h, torch.randn(10, 7), torch.tensor([0, 1, 2, 3]), lse)
    # Under autocast the dot reads the values the op's GEMM read (bf16-rounded).
    t = torch.tensor([3, 1, -100, 9])
    hb, wb = h.bfloat16(), w.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.target_nll(h, w, t, lse)
    torch.testing.assert_close(got, ops.target_nll(hb, wb, t, lse), equal_nan=True)
    # Chunks: many small ones give the same numbers as one.
    import noencore.ops.target_nll  # noqa: F401  (the module, for its chunk size)

    module = sys.modules["noencore.ops.target_nll"]
    one = ops.target_nll(h, w, t, lse)
    saved = module.CHUNK_BYTES
    module.CHUNK_BYTES = 4 * 8  # one row per chunk
    try:
        torch.testing.assert_close(ops.target_nll(h, w, t, lse), one, equal_nan=True)
    finally:
        module.CHUNK_BYTES = saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_none_reduction_weights_from_its_own_losses(backend, dtype, poisoned, device):
    """NPO's step in one call: per-row losses from reduction="none" (no gradient work),
    weights computed from them (a sigmoid of each sequence's summed NLL), then backward
    with those weights as the upstream gradient: exactly the gradient of
    sum_n w_n(stop-grad) * loss_n, in 1 GEMM forward + 3 backward."""
    _skip_unavailable(backend)
    n, items = 29, 4
    hidden, weight, targets, _, _ = _inputs(n, 65, 2049, dtype, 4, cap_mode="off")
    targets[targets == ops.RANDOM_LABEL] = 7
    item = torch.arange(n) % items
    ref_seq = torch.randn(items) * 5 + 30
    h, w, t, it, rs = _on(device, hidden, weight, targets, item, ref_seq)
    h.requires_grad_()
    w.requires_grad_()
    fwd, bwd = OpLog(), OpLog()
    with fwd:
        loss = ops.linear_ce_ascent(h, w, t, reduction="none", backend=backend)
    seq = torch.zeros(items, device=device).index_add_(0, it, loss.detach())
    row_w = -torch.sigmoid(0.1 * (rs - seq))[it] / items
    with bwd:
        (row_w * loss).sum().backward()
    if dtype == torch.float32:  # the C++ bf16 logits GEMM is its own code, outside aten
        assert (fwd.gemms, bwd.gemms) == (1, 3)

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    z = h64 @ w64.T
    valid = targets != -100
    loss64 = torch.logsumexp(z, 1) - z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    loss64 = torch.where(valid, loss64, torch.zeros_like(loss64))
    seq64 = torch.zeros(items, dtype=torch.float64).index_add(0, item, loss64.detach())
    w_rows = -torch.sigmoid(0.1 * (ref_seq.double() - seq64))[item] / items
    (w_rows * loss64).sum().backward()
    out_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    assert _rel(loss.detach().cpu(), loss64.detach(), out_dtype) < _tol(dtype)
    assert _rel(h.grad.cpu(), h64.grad, dtype) < _tol(dtype), "d hidden"
    assert _rel(w.grad.cpu(), w64.grad, dtype) < _tol(dtype), "d weight"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemms_per_chunk(backend, monkeypatch, device):
    """Kernel level, fp32 (the C++ bf16 logits GEMM is its own code, outside aten): per
    chunk one logits GEMM, plus dh and dW when asked; Triton launches its row kernel once
    per chunk."""
    _skip_unavailable(backend)
    hidden, weight, targets, row_weight, _ = _inputs(23, 40, 333, torch.float32, 6,
                                                    cap_mode="off")
    hidden, weight, targets, coef = _on(device, hidden, weight, targets, row_weight / 23)
    kern = backend_module(backend)
    launches = []
    if backend == "triton":
        real = kern._ce_rows_kernel

        class Counting:
            def __getitem__(self, grid):
                launches.append(grid)
                return real[grid]

        monkeypatch.setattr(kern, "_ce_rows_kernel", Counting())
    kw = dict(ignore_index=-100, key=label_key(5), row_offset=0, cap=math.inf, chunk=7)
    for need, per_chunk in (((True, True), 3), ((True, False), 2), ((False, False), 1)):
        log = OpLog()
        del launches[:]
        with log:
            kern.linear_ce_fwd(hidden, weight, targets, coef, need_dh=need[0], need_dw=need[1],
                               **kw)
        assert log.gemms == 4 * per_chunk, (need, log.ops)  # 23 rows -> 4 chunks of <= 7
        if backend == "triton":
            assert len(launches) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_reads_in_the_step(backend, monkeypatch, device):
    """The op's calls in a training step read no device value on the host (each read is
    a stream sync on CUDA): checked on CPU by logging every aten op, with the two
    CPU-only conveniences set as on a GPU (target validation, the upstream-is-one test)."""
    _skip_unavailable(backend)
    from noencore.ops import linear_ce

    monkeypatch.setattr(linear_ce, "first_bad_target", lambda *a, **k: None)
    monkeypatch.setattr(sys.modules["noencore.ops.target_nll"], "first_bad_target",
                        lambda *a, **k: None)
    monkeypatch.setattr(linear_ce, "_is_one", lambda grad_out: False)
    hidden, weight, targets, row_weight, cap = _inputs(17, 40, 333, torch.float32, 7)
    h, w, t, rw = _on(device, hidden, weight, targets, row_weight)
    h.requires_grad_()
    w.requires_grad_()
    true = torch.where(t == ops.RANDOM_LABEL, 3, t)
    log = OpLog()
    with log:
        value, lse = ops.linear_ce_ascent(h, w, t, rw, random_labels=5, loss_cap=cap,
                                          reduction="sum", backend=backend, return_lse=True)
        ops.target_nll(h, w, true, lse)
        value.backward()
        loss = ops.linear_ce_ascent(h, w, true, reduction="none", backend=backend)
        (torch.sigmoid(loss.detach()) * loss).sum().backward()
        logits = (h @ w.T).detach().requires_grad_()
        ops.ce_ascent(logits, true, backend=backend).backward()
    assert not log.host_reads, log.host_reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_stream_sync_on_cuda():
    """On a GPU: the step's calls (and token_stats' torch path) under torch's sync debug
    mode set to raise."""
    hidden, weight, targets, row_weight, cap = _inputs(300, 64, 2048, torch.bfloat16, 8)
    h, w, t, rw = _on(torch.device("cuda"), hidden, weight, targets, row_weight)
    h.requires_grad_()
    w.requires_grad_()
    true = torch.where(t == ops.RANDOM_LABEL, 3, t)

    def step():
        value, lse = ops.linear_ce_ascent(h, w, t, rw, random_labels=5, loss_cap=cap,
                                          reduction="sum", return_lse=True)
        ops.target_nll(h, w, true, lse)
        value.backward()
        loss = ops.linear_ce_ascent(h, w, true, reduction="none")
        (torch.sigmoid(loss.detach()) * loss).sum().backward()
        ops.token_stats(h.detach(), w.detach(), true)

    step()  # first call: Triton compiles and autotunes (that syncs, once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
