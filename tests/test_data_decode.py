"""Streaming decode: block resampling equals whole-signal resampling, a decode's memory is
bounded by segments."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from noencore.data.audio import BLOCK_SAMPLES, Resampler, decode_job, resample

# Rates whose ratios to 32 kHz are awkward (44100: up 320 / down 441), integer, or prime.
RATES = [44100, 48000, 22050, 8000, 96000, 11025, 32000, 31991]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("length", [1, 7, 4410, 100_003])
def test_resampler_in_blocks_equals_whole_signal(rate, length):
    rng = np.random.default_rng(length + rate)
    x = rng.uniform(-1, 1, length).astype(np.float32)
    want = resample(x, rate, 32000)
    for sizes in ([length], [1] * min(length, 50) + [length], rng.integers(1, 5000, 200)):
        r, out, pos = Resampler(rate, 32000), [], 0
        for n in sizes:  # the stream cut at awkward places, down to single samples
            out.append(r.push(x[pos:pos + n]))
            pos += n
            if pos >= length:
                break
        out.append(r.flush())
        got = np.concatenate(out)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def write_long(path: Path, seconds: float, rate: int, channels: int) -> None:
    """Tones + noise written block by block (the test itself stays small in memory)."""
    rng = np.random.default_rng(0)
    freqs = 110.0 * np.arange(1, channels + 1)
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as f:
        for start in range(0, int(seconds * rate), rate):
            t = np.arange(start, min(int(seconds * rate), start + rate))[:, None] / rate
            x = 0.3 * np.sin(2 * np.pi * freqs * t) + 0.01 * rng.standard_normal((t.shape[0], 1))
            f.write(x.astype(np.float32))


@pytest.mark.parametrize("seconds,rate,channels", [(240, 48000, 2), (40, 96000, 6)])
def test_decode_memory_is_bounded_by_segments_not_the_file(tmp_path, seconds, rate, channels):
    path = tmp_path / "long.wav"
    write_long(path, seconds, rate, channels)
    seg = 10 * 32000
    import scipy.signal  # noqa: F401 (its first import would count as decode memory)

    tracemalloc.start()
    try:
        samples = 0
        for kind, payload in decode_job(str(path), 32000, 640, seg):  # what a worker runs
            assert kind != "failed", payload
            if kind == "segment":
                assert payload.dtype == np.float32 and payload.shape[0] <= seg
                samples += payload.shape[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert samples == seconds * 32000
    # The segment handed out, the one filling, and the temporaries of a few blocks; the
    # file as float32 (what a whole-file decode held) is 88 MiB here, the bound 6.4 MiB.
    bound = 2 * seg * 4 + 8 * BLOCK_SAMPLES * 4
    assert peak < bound < seconds * rate * channels * 4 / 10, peak
