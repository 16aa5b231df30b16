"""The one-process AdamW (``noencore.engine.optim``): the implementation chosen by the
device's capability, each one's update equal to torch's per-parameter loop, and the run's
metrics saying which ran."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from noencore.engine.optim import adamw, adamw_implementation

sys.path.insert(0, str(Path(__file__).parent))
from test_engine import RUN, _fresh, data  # noqa: E402,F401


def _params(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (3, 5), (33, 17), (2, 3, 129)]  # awkward sizes, a scalar-like one
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _run(impl: str, seed: int, dtype: torch.dtype, steps: int) -> list[torch.Tensor]:
    params = _params(seed, dtype)
    opt, got = adamw(params, lr=3e-2, weight_decay=0.1, implementation=impl)
    assert got == impl
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):  # fresh random gradients each step, poisoned grads overwritten
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params]


# the one-process engine keeps fp32 weights (bf16 is autocast); with bf16 weights the fused
# kernel rounds once per step and the loop after every operation, a few ulps apart
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_chosen_adamw_equals_the_per_parameter_loop(dtype, tol, seed):
    impl = adamw_implementation(_params(seed, dtype))
    assert impl in ("fused", "foreach")  # torch >= 2.4 has fused AdamW on the CPU too
    plain = _run("single", seed, dtype, steps=5)
    fast = _run(impl, seed, dtype, steps=5)
    start = _params(seed, dtype)
    for a, b, s in zip(fast, plain, start):
        assert not torch.equal(b, s)  # the steps moved every tensor
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_the_choice_follows_the_device_capability():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    cpu = [torch.zeros(3)]
    want = "fused" if "cpu" in _get_fused_kernels_supported_devices() else "single"
    assert adamw_implementation(cpu) == want
    assert adamw_implementation([torch.zeros(3, dtype=torch.int32)]) == "single"
    opt, impl = adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0)
    assert opt.defaults["fused"] is (impl == "fused")
    with pytest.raises(ValueError, match="choose one of"):
        adamw(cpu, lr=1e-3, weight_decay=0.0, implementation="apex")


def test_metrics_record_which_adamw_ran(data):  # noqa: F811
    from noencore import unlearn

    _, shards = data
    res = unlearn(_fresh(), shards, **{**RUN, "steps": 2}, save=False)
    want = adamw_implementation([torch.zeros(1)])
    assert [r["optimizer"] for r in res.metrics] == [want, want]
