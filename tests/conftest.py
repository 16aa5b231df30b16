"""Test-wide settings: offline, CPU-friendly, deterministic."""
from __future__ import annotations

import os

# Never touch the network: a hub call without these hangs retrying instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter (must be set before triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The op tests run every backend where it runs: the C++ kernels on CPU tensors, Triton and
# the torch reference on the GPU when there is one (Triton's interpreter on CPU otherwise).
OP_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device(request) -> torch.device:
    """The device of the op test's inputs: CPU for backend "cpp", else :data:`OP_DEVICE`."""
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "cpp":
        return torch.device("cpu")
    return OP_DEVICE


def _poison_empty(monkeypatch, float_fill: float) -> None:
    """Make torch.empty / empty_like return tensors filled with ``float_fill`` (floats) or
    -7777 (other non-bool dtypes), so that an element a kernel forgot to write shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float_fill)
        elif t.dtype != torch.bool:
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture
def poisoned(monkeypatch):
    """New float outputs hold NaN until written (op tests)."""
    _poison_empty(monkeypatch, float("nan"))


@pytest.fixture
def finite_poison(monkeypatch):
    """New float outputs hold -7777 until written: shows an unwritten element whose
    written value would be NaN (the logsumexp of an ignored row)."""
    _poison_empty(monkeypatch, -7777.0)
