"""pytest-benchmark: batched token evaluation vs the per-item loop on the tiny LM.

    python -m pytest benchmarks/bench_eval.py --benchmark-only

The ratio over larger workloads is printed by ``benchmarks/eval_ratios.py``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ITEMS, FRAMES = 16, 100


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    from noencore.data.shards import TokenShards
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen
    from noencore.models.text import build_condition_cache

    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2048, size=(4, FRAMES)) for _ in range(ITEMS)]
    caps = [f"caption {i % 4}" for i in range(ITEMS)]
    path = write_code_shards(tmp_path_factory.mktemp("bench") / "shards", codes, caps,
                             ["forget"] * ITEMS)
    model = load_musicgen("tiny")
    cache = build_condition_cache(path / "conditions", caps, model.text_encoder, progress=False)
    return model, TokenShards(path), cache


@pytest.mark.parametrize("batch_size", [1, ITEMS], ids=["per_item", "batched"])
def test_token_stats_throughput(benchmark, workload, batch_size):
    from noencore.evaluation.token_metrics import collect_set_stats

    model, shards, cache = workload
    stats = benchmark(collect_set_stats, model, shards, cache, batch_size=batch_size,
                      progress=False)
    assert stats.n_items == ITEMS and np.isfinite(stats.nll).all()
    benchmark.extra_info["items_per_s"] = ITEMS / benchmark.stats.stats.min
