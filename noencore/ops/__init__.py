"""Fused cross-entropy with ascent. (Being built: see issue 3.)"""
from __future__ import annotations


def cpp_available() -> bool:
    """True when the C++ extension ``noencore._C`` was built and imports."""
    import torch  # noqa: F401  (the extension links against libtorch)

    try:
        import noencore._C  # noqa: F401
    except ImportError:
        return False
    return True
