"""Manifest parsing and audio decoding (no torch, no codec), plus the synthetic corpus
the other data tests build on (``make_corpus``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from noencore.data.audio import AudioError, decode_file, resample
from noencore.data.manifest import read_manifest
from noencore.errors import NoencoreError

# (file name, sample rate, channels, seconds): every format, odd rates and lengths.
GOOD = [("a0.wav", 44100, 2, 2.37), ("a1.flac", 32000, 1, 0.83), ("a2.ogg", 48000, 2, 1.61),
        ("a3.mp3", 44100, 2, 1.3), ("a4.wav", 22050, 1, 0.41)]
BROKEN = {"b_garbage": "garbage.mp3", "b_empty": "empty.wav", "b_missing": "missing.flac",
          "b_silent": "silent.wav", "b_short": "short.wav", "b_nan": "nan.wav",
          "b_trunc": "trunc.flac", "b_trunc_wav": "trunc.wav", "b_trunc_mp3": "trunc.mp3"}


def music(rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    """A few seconds of 'music': decaying harmonic notes plus a little noise, float32 [S, C]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = np.zeros_like(t)
    for note in range(4):
        f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
        env = np.exp(-3 * ((t - note * seconds / 4) % (seconds / 4 + 1e-9)))
        x += 0.2 * env * np.sin(2 * np.pi * f0 * t) + 0.05 * env * np.sin(4 * np.pi * f0 * t)
    x += 0.01 * rng.standard_normal(t.size)
    pan = np.linspace(0.6, 1.0, channels)
    return (x[:, None] * pan[None, :]).astype(np.float32)


def make_corpus(folder: Path, broken: bool = True, extra: int = 0) -> Path:
    """Write audio files and a JSONL manifest into ``folder``; return the manifest path.

    ``extra`` appends that many more good items (for the add-items test)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rate, ch, sec) in enumerate(GOOD):
        sf.write(folder / name, music(rate, ch, sec, i), rate)
        rows.append({"id": f"song{i}", "path": name, "caption": f"song number {i}",
                     "split": "forget" if i < 2 else "remain", "artist": f"artist{i % 2}"})
    for j in range(extra):
        name = f"x{j}.wav"
        sf.write(folder / name, music(32000, 1, 0.7 + 0.3 * j, 100 + j), 32000)
        rows.append({"id": f"extra{j}", "path": str((folder / name).resolve()),
                     "caption": f"extra {j}", "split": "holdout"})
    if broken:
        (folder / "garbage.mp3").write_bytes(b"this is not audio at all" * 50)
        (folder / "empty.wav").write_bytes(b"")
        sf.write(folder / "silent.wav", np.zeros(16000, np.float32), 32000)
        sf.write(folder / "short.wav", music(32000, 1, 0.005, 9), 32000)
        nan = music(32000, 1, 0.5, 10)
        nan[100] = np.nan
        sf.write(folder / "nan.wav", nan, 32000, subtype="FLOAT")
        sf.write(folder / "full.flac", music(32000, 1, 1.0, 11), 32000)
        (folder / "trunc.flac").write_bytes((folder / "full.flac").read_bytes()[:30])
        for ext in ("wav", "mp3"):  # cut in half: the header promises more than is there
            sf.write(folder / f"full.{ext}", music(32000, 2, 1.0, 12), 32000)
            data = (folder / f"full.{ext}").read_bytes()
            (folder / f"trunc.{ext}").write_bytes(data[:len(data) // 2])
        for bid, name in BROKEN.items():
            rows.append({"id": bid, "path": name, "caption": "broken"})
    manifest = folder / "manifest.jsonl"
    with open(manifest, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        if broken:
            f.write('{"id": "song0", "path": "a1.flac", "caption": "dup"}\n')
            f.write("{this is not json\n")
            f.write('{"id": "nopath", "caption": "x"}\n')
    return manifest


def test_manifest_jsonl_keeps_order_meta_and_reports_bad_lines(tmp_path):
    manifest = make_corpus(tmp_path)
    items, failures = read_manifest(manifest)
    assert [it.id for it in items] == [f"song{i}" for i in range(5)] + list(BROKEN)
    assert items[0].path == (tmp_path / "a0.wav").resolve()
    assert items[0].meta == {"artist": "artist0"} and items[0].split == "forget"
    assert items[5].split is None and items[5].line == 6
    reasons = {f.line: f.reason for f in failures}
    n = len(GOOD) + len(BROKEN)
    assert set(reasons) == {n + 1, n + 2, n + 3}
    assert "duplicate id" in reasons[n + 1] and f"line {n + 1}" in reasons[n + 1]
    assert "not valid JSON" in reasons[n + 2] and "manifest.jsonl line" in reasons[n + 2]
    assert "missing 'path'" in reasons[n + 3]


def test_manifest_csv_and_absolute_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    abs_path = str((tmp_path / "abs.wav").resolve())
    (tmp_path / "sub" / "m.csv").write_text(
        "id,path,caption,split,license\n"
        f"a,rel.wav,\"a, with comma\",forget,cc-by\n"
        f"b,{abs_path},plain,,\n"
        "c,too,many,fields,here,extra\n"
        ",nopath.wav,missing id,,\n")
    items, failures = read_manifest(tmp_path / "sub" / "m.csv")
    assert [(it.id, it.caption, it.split) for it in items] == [
        ("a", "a, with comma", "forget"), ("b", "plain", None)]
    assert items[0].path == (tmp_path / "sub" / "rel.wav").resolve()
    assert str(items[1].path) == abs_path and items[0].meta == {"license": "cc-by"}
    assert [f.line for f in failures] == [4, 5]
    assert "CSV fields" in failures[0].reason and "missing 'id'" in failures[1].reason


def test_manifest_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(NoencoreError, match="manifest .*nothere.jsonl not found"):
        read_manifest(tmp_path / "nothere.jsonl")


@pytest.mark.parametrize("name,rate,channels,seconds", GOOD)
def test_decode_every_format_downmixes_and_resamples(tmp_path, name, rate, channels, seconds):
    wav = music(rate, channels, seconds, 3)
    sf.write(tmp_path / name, wav, rate)
    dec = decode_file(tmp_path / name, 32000, 640)
    assert dec.wav.dtype == np.float32 and dec.wav.ndim == 1
    assert dec.source_rate == rate and dec.channels == channels
    expected = -(-wav.shape[0] * 32000 // rate)  # polyphase output: ceil(n * up / down)
    if name.endswith(".mp3"):  # mp3 frames add encoder delay/padding
        assert abs(dec.wav.shape[0] - expected) < 0.1 * 32000
    else:
        assert dec.wav.shape[0] == expected
    if name.endswith((".wav", ".flac")):  # lossless: compare with a plain reference
        ref = resample(wav.mean(axis=1).astype(np.float32), rate, 32000)
        np.testing.assert_allclose(dec.wav, ref, atol=2e-4)


def test_resample_keeps_a_tone(tmp_path):
    t = np.arange(44100) / 44100
    y = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 44100, 32000)
    assert y.shape == (32000,)
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) - 440) <= 1  # 1 s of audio: bin = Hz


def test_decode_failures_name_the_reason(tmp_path):
    make_corpus(tmp_path)
    expect = {"garbage.mp3": "not decodable audio", "empty.wav": "empty file",
              "missing.flac": "file not found", "silent.wav": "silence only",
              "short.wav": "too short", "nan.wav": "NaN", "trunc.flac": "not decodable",
              "trunc.wav": "truncated: the header promises 1.00 s",
              "trunc.mp3": "truncated: the header promises 1.0"}
    for name in ("full.wav", "full.mp3"):  # the untruncated originals decode
        assert decode_file(tmp_path / name, 32000, 640).wav.shape[0] >= 31000
    for name, reason in expect.items():
        with pytest.raises(AudioError, match=reason) as exc:
            decode_file(tmp_path / name, 32000, 640)
        assert name in str(exc.value) and "BytesIO" not in str(exc.value)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread for the data tests (imported by each data test module): on a
    shared, loaded CPU, OpenMP spin-waits make tiny convolutions up to 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
