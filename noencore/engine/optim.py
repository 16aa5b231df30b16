"""The one-process optimizer: torch AdamW in the fastest form the parameters' device has.

``adamw`` chooses by capability, before the first step, and says which it chose:

- "fused": one kernel per parameter group (``fused=True``), where torch has fused AdamW
  kernels for the parameters' device type (CUDA, and the CPU in torch >= 2.4) and every
  parameter is a floating-point tensor;
- "foreach": multi-tensor kernels (``foreach=True``), where the device has those (CUDA)
  but not the fused ones;
- "single": torch's per-parameter loop, everywhere else.

The three compute the same update (equal to rounding: ``tests/test_engine_optim.py``).
Under DeepSpeed the engine hands ZeRO a plain torch AdamW (``noencore.engine.zero``), whose
update DeepSpeed runs on its own flat fp32 partitions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

IMPLEMENTATIONS = ("fused", "foreach", "single")


def adamw_implementation(params: Sequence[torch.Tensor]) -> str:
    """"fused", "foreach" or "single": the fastest AdamW torch has for ``params`` (all on
    one device type; an empty list gets "single")."""
    # torch's own capability tables (what ``torch.optim.AdamW`` checks before a fused step)
    from torch.utils._foreach_utils import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    kinds = {p.device.type for p in params}
    if len(kinds) != 1:
        return "single"
    kind = kinds.pop()
    if kind in _get_fused_kernels_supported_devices() and all(
            torch.is_floating_point(p) for p in params):
        return "fused"
    if kind in _get_foreach_kernels_supported_devices():
        return "foreach"
    return "single"


def adamw(params: Sequence[torch.Tensor], *, lr: float, weight_decay: float,
          implementation: str | None = None) -> tuple[torch.optim.AdamW, str]:
    """(torch AdamW over ``params``, the implementation it runs: ``IMPLEMENTATIONS``).
    ``implementation``: force one (default: ``adamw_implementation``)."""
    impl = implementation or adamw_implementation(params)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation {impl!r}: choose one of {IMPLEMENTATIONS}")
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
             "single": {"foreach": False}}[impl]
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, **flags), impl
