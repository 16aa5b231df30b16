"""pytest-benchmark: one unlearning step of the engine with every parameter trained and
with ``train_layers`` = top:1 and top:2 (see train_layers_ratios.py for the ratios and
the memory).

    .venv/bin/python -m pytest benchmarks/bench_train_layers.py --benchmark-only
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine_ratios import engine_step  # noqa: E402
from train_layers_ratios import step_state, variants  # noqa: E402

# a smaller workload than train_layers_ratios.py: MusicGen-small width, 2 layers, 2 s clips
LAYERS, BATCH, SECONDS = 2, 2, 2.0


@pytest.mark.parametrize("variant", variants([1, 2]))
def test_train_layers_step(benchmark, variant):
    st = step_state(variant, LAYERS, BATCH, SECONDS)
    engine_step(st, False)  # warm-up
    benchmark.pedantic(engine_step, args=(st, False), rounds=3, iterations=1)
    benchmark.extra_info["tokens"] = BATCH * st["model"].n_q * int(SECONDS * 50)
    benchmark.extra_info["adamw"] = st["adamw"]
