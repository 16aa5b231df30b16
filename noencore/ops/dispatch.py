"""Which backend runs the op: Triton (CUDA), C++ (CPU) or the torch reference.

Every backend module exposes the same two kernel functions, ``linear_ce_fwd`` and
``ce_fwd`` (see :mod:`noencore.ops.reference` for their contract), so the autograd
functions never branch on the backend.

:func:`last_backend` says which backend the latest call ran (for metrics and reports);
``backend="auto"`` warns once per process when it leaves tensors on a GPU (or any other
accelerator) to the slow torch path.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

_last_backend: str | None = None
_warned_fallback = False


def cpp_available() -> bool:
    """True when the C++ extension ``noencore._C`` was built and imports.

    The build is portable (no ``-march``; its AVX-512 kernels are chosen at run time from
    what the CPU reports), so an extension that imports also runs on this CPU.
    """
    import torch  # noqa: F401  (the extension links against libtorch)

    try:
        import noencore._C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _triton_missing() -> str | None:
    """Why Triton cannot run here, or None when it can (a CUDA GPU, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton does not import ({exc})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA GPU (and TRITON_INTERPRET is not 1)"


def triton_available() -> bool:
    """True when Triton imports and can run here: a CUDA GPU, or ``TRITON_INTERPRET=1``."""
    return _triton_missing() is None


def resolve_backend(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The backend that runs the op on ``tensor``: "triton", "cpp" or "torch".

    "auto" picks Triton for CUDA tensors (when Triton imports), C++ for fp32/bf16 CPU
    tensors (when the extension is built), the torch reference otherwise. An explicit
    backend that cannot run on this tensor raises ValueError instead of falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = tensor.device.type
    if backend == "auto":
        if dev == "cuda" and triton_available():
            return "triton"
        if dev == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16) and cpp_available():
            return "cpp"
        return "torch"
    if backend == "cpp":
        if dev != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got a {dev} tensor")
        if tensor.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"backend='cpp' supports float32 and bfloat16, got {tensor.dtype}; "
                             "use backend='torch'")
        if not cpp_available():
            raise ValueError("backend='cpp' but the C++ extension noencore._C is not built; "
                             "rebuild with `pip install --no-build-isolation -e .`")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs triton and a CUDA GPU "
                             "(or TRITON_INTERPRET=1 for testing)")
        if dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' runs on CUDA tensors, got a {dev} tensor")
    return backend


def use_backend(tensor: torch.Tensor, backend: str = "auto") -> str:
    """:func:`resolve_backend` for a call that runs now: records the answer for
    :func:`last_backend`, and warns once per process when "auto" sends a non-CPU tensor
    to the torch reference (Triton missing, or no fused kernel for that device)."""
    name = resolve_backend(tensor, backend)
    if backend == "auto" and name == "torch" and tensor.device.type != "cpu":
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            why = (_triton_missing() if tensor.device.type == "cuda"
                   else f"no fused kernel for {tensor.device.type} tensors")
            warnings.warn(f"noencore.ops: backend='auto' runs the slow torch reference path on "
                          f"{tensor.device.type} tensors: {why}. noencore.ops.last_backend() "
                          "says which backend ran (warned once per process)",
                          RuntimeWarning, stacklevel=3)
    record_backend(name)
    return name


def record_backend(name: str) -> None:
    """Note that backend ``name`` ("triton", "cpp" or "torch") runs the current call."""
    global _last_backend
    _last_backend = name


def last_backend() -> str | None:
    """The backend that ran the latest call of ``linear_ce_ascent``, ``ce_ascent`` or
    ``token_stats`` in this process: "triton", "cpp" or "torch" (None before any call).

    Cheap (a module variable): read it after a step to record which path ran; with
    "cpp", ``noencore.ops.cpp.isa()`` adds which instruction-set path.
    """
    return _last_backend


def backend_module(name: str) -> ModuleType:
    """The module holding ``linear_ce_fwd`` / ``ce_fwd`` for a resolved backend name."""
    if name == "torch":
        from noencore.ops import reference
        return reference
    if name == "cpp":
        from noencore.ops import cpp
        return cpp
    if name == "triton":
        from noencore.kernels import ce_ascent
        return ce_ascent
    raise ValueError(f"unknown backend {name!r}")
