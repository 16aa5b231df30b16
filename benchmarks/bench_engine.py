"""pytest-benchmark: one unlearning step of the engine and of the audiocraft-solver-style
reference (see engine_ratios.py for the full comparison with ratios and memory).

    .venv/bin/python -m pytest benchmarks/bench_engine.py --benchmark-only
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine_ratios import run_step, setup  # noqa: E402

# a smaller workload than engine_ratios.py: MusicGen-small width, 1 layer, 2 s clips
LAYERS, BATCH, SECONDS = 1, 2, 2.0


@pytest.fixture(scope="module")
def states():
    return {v: setup(LAYERS, BATCH, SECONDS, v) for v in ("reference", "engine")}


@pytest.mark.parametrize("variant", ["reference-fp32", "engine-fp32", "reference-bf16",
                                     "engine-bf16"])
def test_unlearning_step(benchmark, states, variant):
    st = states[variant.split("-")[0]]
    run_step(variant, st)  # warm-up
    benchmark.pedantic(run_step, args=(variant, st), rounds=3, iterations=1)
    model = st["model"]
    benchmark.extra_info["tokens"] = BATCH * model.n_q * int(SECONDS * 50)
