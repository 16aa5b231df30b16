"""Which backend runs the op: Triton (CUDA), C++ (CPU) or the torch reference.

Every backend module exposes the same two kernel functions, ``linear_ce_fwd`` and
``ce_fwd`` (see :mod:`noencore.ops.reference` for their contract), so the autograd
functions never branch on the backend.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")


def cpp_available() -> bool:
    """True when the C++ extension ``noencore._C`` was built and imports."""
    import torch  # noqa: F401  (the extension links against libtorch)

    try:
        import noencore._C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports and can run here: a CUDA GPU, or ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


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
