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

# `make sanitize` (scripts/sanitize.sh) runs the op tests on a second build of the C++
# extension, with AddressSanitizer and UBSan: NOENCORE_TEST_EXTENSION names that file, which
# is loaded here as noencore._C before any test can import the installed one.
if os.environ.get("NOENCORE_TEST_EXTENSION"):
    import importlib.util
    import sys

    import noencore

    _spec = importlib.util.spec_from_file_location("noencore._C",
                                                   os.environ["NOENCORE_TEST_EXTENSION"])
    _ext = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_ext)
    sys.modules["noencore._C"] = noencore._C = _ext

# Property tests (hypothesis): "ci", the default, draws few examples from a fixed seed
# (derandomize), so that every run of the suite tries the same cases in bounded time;
# "dev" (NOENCORE_HYPOTHESIS_PROFILE=dev) draws 20x as many from a fresh seed, for local
# runs after changing an op (see tests/test_ops_properties.py).
# (A machine without hypothesis, such as the GPU check's, skips those tests only.)
try:
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None,
                              database=None, print_blob=True)
    settings.register_profile("dev", max_examples=400, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("NOENCORE_HYPOTHESIS_PROFILE", "ci"))

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
    """New float outputs hold NaN until written (op tests), and so does the C++ kernels'
    scratch: ``NOENCORE_CPU_DEBUG=1`` also makes their gradient GEMMs read each operand
    up to its row stride, as AMX kernels may (csrc/ce_ascent.cpp, ``widen_k``)."""
    _poison_empty(monkeypatch, float("nan"))
    monkeypatch.setenv("NOENCORE_CPU_DEBUG", "1")


@pytest.fixture
def finite_poison(monkeypatch):
    """New float outputs hold -7777 until written: shows an unwritten element whose
    written value would be NaN (the logsumexp of an ignored row)."""
    _poison_empty(monkeypatch, -7777.0)
