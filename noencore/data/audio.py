"""Decode one audio file for the codec: read, downmix to mono, resample, check.

Runs inside precompute's worker processes, so it imports only numpy, scipy and
soundfile (no torch: workers start fast and never fight the encoder for threads).
soundfile (libsndfile) reads wav, flac, ogg and mp3.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

# Peak below one 16-bit step: nothing audible, and a codec would only encode noise floor.
SILENCE_PEAK = 1.0 / 32768


class AudioError(Exception):
    """A file that cannot become codec input; the message is the failure reason."""


@dataclass
class Decoded:
    """Mono audio ready for the codec: ``wav`` float32 [samples] at the codec rate."""

    wav: np.ndarray
    sha256: str
    source_rate: int
    channels: int


def resample(wav: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling of float32 [samples] (band-limited; exact length ratio)."""
    if rate_in == rate_out:
        return wav
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(wav, rate_out // g, rate_in // g).astype(np.float32, copy=False)


def _promised_frames(data: bytes, sf) -> int | None:
    """Frames the file's header promises, where it states them independently of the file
    size (a RIFF/WAVE data chunk size; an mp3 Xing/LAME header); None when unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        pos = 12
        while pos + 8 <= len(data):
            size = int.from_bytes(data[pos + 4:pos + 8], "little")
            if data[pos:pos + 4] == b"data":
                available = len(data) - pos - 8
                if size <= available:
                    return None
                # bytes per frame from the fmt chunk: channels x bits / 8
                fmt = data.find(b"fmt ", 12)
                if fmt < 0:
                    return None
                channels = int.from_bytes(data[fmt + 10:fmt + 12], "little")
                bits = int.from_bytes(data[fmt + 22:fmt + 24], "little")
                frame_bytes = max(1, channels * bits // 8)
                return size // frame_bytes
            pos += 8 + size + (size & 1)
        return None
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # the read itself succeeded; only the promise is unknown
        return None
    # Only a Xing/Info header states an mp3's length; without one libsndfile guesses it
    # from the file size, which VBR files would fail.
    head = data[:8192]
    if info.format in ("MP3", "MPEG") and (b"Xing" in head or b"Info" in head):
        return int(info.frames)
    return None


def decode_file(path: str | Path, sample_rate: int, min_samples: int) -> Decoded:
    """Read ``path`` and return mono float32 at ``sample_rate``; raise AudioError with the
    reason when the file is missing, empty, not audio, truncated, silent, has NaN/inf
    samples or gives fewer than ``min_samples`` samples (one codec frame)."""
    import soundfile as sf

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise AudioError(f"is a folder, not an audio file: {path}") from None
    except OSError as exc:
        raise AudioError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise AudioError(f"empty file (0 bytes): {path}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors: unknown format, broken stream
        # libsndfile's message starts "Error opening <BytesIO ...>: "; keep only the cause.
        cause = str(exc).rsplit(">: ", 1)[-1].strip() or type(exc).__name__
        raise AudioError(f"not decodable audio (not wav/flac/ogg/mp3, or truncated): {path}: "
                         f"{cause}") from None
    if wav.shape[0] == 0:
        raise AudioError(f"no audio samples (empty or truncated stream): {path}")
    promised = _promised_frames(data, sf)
    # mp3 headers (Xing) state the length; decoders pad/trim a few frames, hence 1 %.
    if promised is not None and wav.shape[0] < 0.99 * promised:
        raise AudioError(f"truncated: the header promises {promised / rate:.2f} s, the file "
                         f"holds {wav.shape[0] / rate:.2f} s: {path}")
    if not np.isfinite(wav).all():
        raise AudioError(f"NaN or infinite samples: {path}")
    mono = wav.mean(axis=1, dtype=np.float32) if wav.shape[1] > 1 else wav[:, 0]
    if float(np.abs(mono).max()) < SILENCE_PEAK:
        raise AudioError(f"silence only (peak below -90 dBFS): {path}")
    mono = resample(np.ascontiguousarray(mono), int(rate), sample_rate)
    if mono.shape[0] < min_samples:
        raise AudioError(f"too short: {mono.shape[0] / sample_rate * 1000:.1f} ms, shorter "
                         f"than one codec frame ({min_samples / sample_rate * 1000:.1f} ms): "
                         f"{path}")
    return Decoded(np.ascontiguousarray(mono, dtype=np.float32), digest, int(rate),
                   int(wav.shape[1]))


def decode_job(path: str, sample_rate: int, min_samples: int) -> tuple[np.ndarray, str] | str:
    """Worker entry point: (mono float32 [samples], source sha256), or the failure reason.

    Returns the reason as a string rather than raising, so that every outcome crosses
    the process boundary the same way.
    """
    try:
        dec = decode_file(path, sample_rate, min_samples)
    except AudioError as exc:
        return str(exc)
    except Exception as exc:  # an unforeseen decoder bug must name the file, not kill the run
        return f"unexpected error decoding {path}: {type(exc).__name__}: {exc}"
    return dec.wav, dec.sha256
