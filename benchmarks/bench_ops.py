"""pytest-benchmark suite for the fused CE-with-ascent op (MusicGen-small heads).

Run: ``python -m pytest benchmarks/bench_ops.py --benchmark-group-by=group``. Each group
holds the audiocraft-style baseline and the fused op on the same inputs; the printed
ratios and floors come from ``benchmarks/ops_ratios.py``. Shapes: D=1024, V=2048, K=4,
B x T rows per codebook (``NOENCORE_BENCH_T`` overrides T=1500 for quick runs).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_ratios import K, baseline_step, ce_inputs, fused_step, make_inputs  # noqa: E402

import noencore.ops as ops  # noqa: E402

B = 4
T = int(os.environ.get("NOENCORE_BENCH_T", "1500"))


@pytest.mark.parametrize("mode", ["autocast", "bf16", "fp32"])
@pytest.mark.parametrize("variant", ["baseline", "fused"])
def test_linear_ce_fwd_bwd(benchmark, mode, variant):
    benchmark.group = f"linear-{mode}"
    inp = make_inputs(B, T, mode)
    step = fused_step if variant == "fused" else baseline_step
    benchmark.pedantic(step, args=(inp,), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["baseline", "fused", "inplace"])
def test_ce_on_logits_fwd_bwd(benchmark, dtype, variant):
    benchmark.group = f"ce-logits-{str(dtype)[6:]}"
    logits, targets = ce_inputs(B * T * K, dtype)

    def setup():  # a fresh non-leaf copy, as a head's output (untimed)
        return (logits.clone().requires_grad_() * 1,), {}

    def run(x):
        if variant == "baseline":
            loss = F.cross_entropy(x, targets)
        else:
            loss = ops.ce_ascent(x, targets, inplace=variant == "inplace")
        return torch.autograd.grad(loss, [x])

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
