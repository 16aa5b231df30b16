"""pytest-benchmark: one unlearning step of the engine and of audiocraft's MusicGen solver
step, with its token cache and with the codec in the step (see engine_ratios.py for the
comparison with ratios, memory and the FLOP floor).

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

from engine_ratios import VARIANTS, run_step, setup  # noqa: E402

# a smaller workload than engine_ratios.py: MusicGen-small width, 1 layer, 2 s clips
LAYERS, BATCH, SECONDS = 1, 2, 2.0


@pytest.fixture(scope="module")
def states():
    return {k: setup(LAYERS, BATCH, SECONDS, k) for k in ("cached", "codec", "engine")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_unlearning_step(benchmark, states, variant):
    st = states[variant.split("-")[0]]
    run_step(variant, st)  # warm-up
    benchmark.pedantic(run_step, args=(variant, st), rounds=3, iterations=1)
    model = st["model"]
    benchmark.extra_info["tokens"] = BATCH * model.n_q * int(SECONDS * 50)
