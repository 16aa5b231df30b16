"""pytest-benchmark suite of the token-shard data path (ratios: ``shards_ratios.py``).

    python -m pytest benchmarks/bench_shards.py --benchmark-only

Reading 30 s windows from shards, against encoding 30 s windows on the fly with the
full-size MusicGen codec; the precompute pipeline, against the codec's encode alone.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from noencore.data.batches import iter_batches
from noencore.data.codec import load_codec
from noencore.data.precompute import precompute
from noencore.data.shards import TokenShards

BATCH, FRAMES = 4, 1500  # 30 s windows at 50 frames/s


@pytest.fixture(scope="module")
def full_codec():
    return load_codec("musicgen-32khz")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-shards")
    rows = []
    t = np.arange(30 * 32000) / 32000
    for i in range(8):
        sf.write(folder / f"r{i}.wav", (0.2 * np.sin(2 * np.pi * (100 + 9 * i) * t)
                                        + 0.01 * np.random.default_rng(i).standard_normal(t.size)
                                        ).astype(np.float32), 32000)
        rows.append(f'{{"id": "r{i}", "path": "r{i}.wav", "caption": "c{i}"}}\n')
    (folder / "m.jsonl").write_text("".join(rows))
    return folder


@pytest.fixture(scope="module")
def shards(corpus):
    precompute(corpus / "m.jsonl", corpus / "tiny", codec="tiny", segment_seconds=30,
               workers=0, progress=False)
    return TokenShards(corpus / "tiny")


def test_read_30s_windows_from_shards(benchmark, shards):
    def epoch():
        return sum(len(b) for b in iter_batches(shards, BATCH, FRAMES, seed=0))
    assert benchmark(epoch) == len(shards)


def test_encode_30s_windows_on_the_fly(benchmark, full_codec):
    wav = torch.randn(BATCH, 1, 30 * 32000) * 0.1
    codes = benchmark.pedantic(full_codec.encode, args=(wav,), rounds=1, iterations=1)
    assert codes.shape == (BATCH, 4, FRAMES)


def test_precompute_pipeline_full_codec(benchmark, corpus):
    out = corpus / "full"

    def run():
        shutil.rmtree(out, ignore_errors=True)
        return precompute(corpus / "m.jsonl", out, codec="musicgen-32khz",
                          segment_seconds=10, batch_size=BATCH, workers=1, progress=False)
    report = benchmark.pedantic(run, rounds=1, iterations=1)
    assert report.encoded == 8 and report.segments == 24
