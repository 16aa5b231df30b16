"""Streaming decode: block resampling equals whole-signal resampling, a decode's memory is
bounded by segments, workers are fresh interpreters, a hanging file times out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_data_corpus import GOOD, make_corpus, music

from noencore.cli import main as cli_main
from noencore.data import layout
from noencore.data.audio import BLOCK_SAMPLES, Resampler, decode_job, resample
from noencore.data.shards import TokenShards
from noencore.data.workers import DecodePool

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


def test_workers_are_fresh_interpreters_without_torch(tmp_path):
    """Workers are exec'd, not forked from this process (which has torch and its OpenMP
    runtime loaded), and import no torch themselves."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    assert "libtorch" in maps.read_text()  # the test process has torch: a fork would too
    sf.write(tmp_path / "a.wav", music(44100, 2, 1.0, 0), 44100)
    pool = DecodePool(workers=1, timeout=60, ahead=4)
    try:
        (segments, digest), = pool.map([(str(tmp_path / "a.wav"), 32000, 640, 32000)])
        assert sum(s.shape[0] for s in segments) == 32000 and len(digest) == 64
        pid = pool.alive[0].proc.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"noencore.data.workers"]
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
    finally:
        pool.close()


def test_a_hanging_file_times_out_and_the_rest_is_encoded(tmp_path, capsys, monkeypatch):
    """A decoder that never returns (a stalled mount: the worker is made to stall on one
    file by fault injection) must not stop the run; a named pipe is refused before it is
    opened (opening one waits for a writer forever)."""
    manifest = make_corpus(tmp_path, broken=False)
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "hang.wav").write_bytes((tmp_path / GOOD[0][0]).read_bytes())
    lines = manifest.read_text().splitlines(True)
    lines.insert(2, json.dumps({"id": "hang", "path": "hang.wav", "caption": "stall"}) + "\n")
    lines.insert(3, json.dumps({"id": "pipe", "path": "pipe.wav", "caption": "pipe"}) + "\n")
    manifest.write_text("".join(lines))
    monkeypatch.setenv("NOENCORE_FAULT", "stall:hang.wav")
    # If the refusal failed, a writer opening the pipe would end the wait (as an empty
    # file), so that a broken implementation fails this test instead of hanging it.
    guard = threading.Timer(300, lambda: os.close(os.open(tmp_path / "pipe.wav", os.O_RDWR)))
    guard.start()
    try:
        out = tmp_path / "out"
        code = cli_main(["precompute", str(manifest), str(out), "--codec", "tiny",
                         "--segment-seconds", "0.5", "--workers", "1", "--decode-timeout", "2",
                         "--quiet"])
    finally:
        guard.cancel()
    assert code == 0
    failures = {json.loads(x)["id"]: json.loads(x)["reason"]
                for x in (out / layout.FAILURES).read_text().splitlines()}
    assert sorted(failures) == ["hang", "pipe"]
    assert failures["hang"].startswith("decode timed out after 2 s")
    assert failures["pipe"].startswith("not a regular file (a named pipe")
    assert "hang: decode timed out after 2 s" in capsys.readouterr().err
    assert sorted(set(TokenShards(out, verify=True).ids)) == [f"song{i}" for i in range(len(GOOD))]


def test_precompute_from_a_script_without_main_guard(tmp_path):
    """Workers never import the caller's main script (multiprocessing's spawn and
    forkserver do: this script would run again in every worker)."""
    manifest = make_corpus(tmp_path, broken=False)
    script = tmp_path / "run.py"
    script.write_text(
        "from noencore.data.precompute import precompute\n"
        f"r = precompute({str(manifest)!r}, {str(tmp_path / 'out')!r}, codec='tiny', "
        "segment_seconds=0.5, workers=2, progress=False)\n"
        "print('encoded', r.encoded)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"encoded {len(GOOD)}"]
