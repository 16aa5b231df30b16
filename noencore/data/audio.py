"""Decode one audio file for the codec: read, downmix to mono, resample, cut, check.

Decoding streams: the file is read ``BLOCK_SAMPLES`` samples at a time, each block is
downmixed and resampled (the resampler carries its filter's context from block to
block) and the output is cut into segments as it accumulates. A decode therefore holds
a few segments and blocks, whatever the file's duration, channel count and rate (a
whole-file decode of one hour of 48 kHz stereo peaked at 3.3 GiB).

Runs inside precompute's worker processes, so it imports only numpy, scipy and
soundfile (no torch: workers start fast and never fight the encoder for threads).
soundfile (libsndfile) reads wav, flac, ogg and mp3.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Peak below one 16-bit step: nothing audible, and a codec would only encode noise floor.
SILENCE_PEAK = 1.0 / 32768
# Samples (frames x channels) read per block: 512 KiB of float32, 1.4 s of 48 kHz stereo.
BLOCK_SAMPLES = 1 << 17
_HASH_BLOCK = 1 << 20


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
    """Polyphase resampling of a whole float32 [samples] signal (band-limited; exact
    length ratio). The reference that ``Resampler`` reproduces block by block."""
    if rate_in == rate_out:
        return wav
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(wav, rate_out // g, rate_in // g).astype(np.float32, copy=False)


class Resampler:
    """``resample`` of a signal that arrives in blocks, with the same output floats.

    Output sample n is scipy's ``resample_poly`` filter (Kaiser 5.0, 10 zero crossings
    per side, float32 taps for float32 input) centred on input position n * down / up.
    It is emitted once every input under the filter has arrived, or at ``flush`` (past
    the end the signal is zero, as ``resample`` pads). Each emission filters the input
    still held, which starts at a multiple of ``down``: the polyphase phases then line up
    with those of the whole signal, so every output is computed from the same products.
    Holds the new block plus 2 x 10 x max(up, down) / up samples of context.
    """

    def __init__(self, rate_in: int, rate_out: int):
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.taps = None
        self.half = 0
        if self.up != self.down:
            from scipy.signal import firwin

            self.half = 10 * max(self.up, self.down)
            self.taps = firwin(2 * self.half + 1, 1.0 / max(self.up, self.down),
                               window=("kaiser", 5.0)).astype(np.float32)
        self.held = np.zeros(0, np.float32)  # input samples from index self.start on
        self.start = 0
        self.n_in = 0
        self.n_out = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        """Add float32 [n] input; return the float32 [m] outputs it completed (m may be 0)."""
        if self.taps is None:
            return block
        self.held = np.concatenate((self.held, block))
        self.n_in += block.shape[0]
        # Output n reads inputs up to floor((n * down + half) / up), which must be < n_in.
        return self._emit((self.n_in * self.up - 1 - self.half) // self.down + 1)

    def flush(self) -> np.ndarray:
        """End of the signal: the remaining outputs (ceil(n_in * up / down) in all)."""
        if self.taps is None:
            return np.zeros(0, np.float32)
        return self._emit(-(-self.n_in * self.up // self.down))

    def _emit(self, end: int) -> np.ndarray:
        if end <= self.n_out:
            return np.zeros(0, np.float32)
        from scipy.signal import resample_poly

        y = resample_poly(self.held, self.up, self.down, window=self.taps)
        first = self.start * self.up // self.down  # output index of y[0]
        out = y[self.n_out - first:end - first]
        self.n_out = end
        # Keep what the next output reaches back to, from a multiple of down (phase).
        keep = max(0, -(-(end * self.down - self.half) // self.up))
        keep -= keep % self.down
        self.held = self.held[keep - self.start:]
        self.start = keep
        return out


def _cut(blocks: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of float32 [*] arrays into float32 [n] pieces (the last one
    shorter), each filled in its own buffer: a piece handed out pins nothing else."""
    piece, filled = np.empty(n, np.float32), 0
    for block in blocks:
        pos = 0
        while pos < block.shape[0]:
            take = min(n - filled, block.shape[0] - pos)
            piece[filled:filled + take] = block[pos:pos + take]
            filled, pos = filled + take, pos + take
            if filled == n:
                yield piece
                piece, filled = np.empty(n, np.float32), 0
    if filled:
        yield piece[:filled].copy()


def _riff_promised_frames(f: BinaryIO, size: int) -> int | None:
    """Frames a RIFF/WAVE header promises when its data chunk claims more bytes than the
    file holds (a truncated file); None otherwise or for other formats."""
    f.seek(0)
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, frame_bytes = 12, None
    while pos + 8 <= size:
        f.seek(pos)
        chunk = f.read(8)
        name, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
        if name == b"fmt ":
            fmt = f.read(16)  # format, channels, rate, byte rate, block align, bits
            channels = int.from_bytes(fmt[2:4], "little")
            bits = int.from_bytes(fmt[14:16], "little")
            frame_bytes = max(1, channels * bits // 8)
        elif name == b"data":
            if length <= size - pos - 8 or frame_bytes is None:
                return None
            return length // frame_bytes
        pos += 8 + length + (length & 1)
    return None


def _undecodable(path: Path, exc: Exception) -> AudioError:
    # libsndfile's message starts "Error opening <file object>: "; keep only the cause.
    cause = getattr(exc, "error_string", None) or str(exc).strip() or type(exc).__name__
    return AudioError(f"not decodable audio (not wav/flac/ogg/mp3, or truncated): {path}: "
                      f"{cause}")


class AudioStream:
    """One audio file decoded block by block into mono segments at ``sample_rate``.

    Iterating yields float32 [segment_samples] arrays (the last one shorter) and raises
    AudioError with the reason when the file is missing, empty, not audio, truncated,
    silent, has NaN/inf samples or gives fewer than ``min_samples`` samples (one codec
    frame). Checks that need the whole file (truncation, silence, length) raise at its
    end, after earlier segments: only a stream iterated to its end was accepted.
    ``sha256`` (of the file's bytes), ``source_rate`` and ``channels`` are set before the
    first segment.
    """

    def __init__(self, path: str | Path, sample_rate: int, min_samples: int,
                 segment_samples: int):
        self.path = Path(path)
        self.sample_rate, self.min_samples = sample_rate, min_samples
        self.segment_samples = segment_samples
        self.sha256: str | None = None
        self.source_rate: int | None = None
        self.channels: int | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        path = self.path
        try:
            # a named pipe or a device would block (or never end) on open and read: only a
            # regular file (or a link to one) is audio
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                raise AudioError(f"not a regular file (a named pipe, socket or device): {path}")
            f = open(path, "rb")  # noqa: SIM115 (closed below, after the generator's last yield)
        except FileNotFoundError:
            raise AudioError(f"file not found: {path}") from None
        except IsADirectoryError:
            raise AudioError(f"is a folder, not an audio file: {path}") from None
        except OSError as exc:
            raise AudioError(f"cannot read {path}: {exc.strerror or exc}") from None
        with f:
            # One pass for the checksum (and the head that mp3 length headers sit in), then
            # libsndfile reads the same open file again, mostly from the page cache.
            digest, size, head = hashlib.sha256(), 0, b""
            try:
                while block := f.read(_HASH_BLOCK):
                    head = head or block[:8192]
                    digest.update(block)
                    size += len(block)
            except OSError as exc:
                raise AudioError(f"cannot read {path}: {exc.strerror or exc}") from None
            if not size:
                raise AudioError(f"empty file (0 bytes): {path}")
            self.sha256 = digest.hexdigest()
            promised = _riff_promised_frames(f, size)  # before libsndfile takes the file
            f.seek(0)
            try:
                snd = sf.SoundFile(f)
            except Exception as exc:  # libsndfile's errors: unknown format, broken stream
                raise _undecodable(path, exc) from None
            with snd:
                self.source_rate, self.channels = int(snd.samplerate), int(snd.channels)
                # Only a Xing/Info header states an mp3's length; without one libsndfile
                # guesses it from the file size, which VBR files would fail.
                if snd.format in ("MP3", "MPEG") and (b"Xing" in head or b"Info" in head):
                    promised = int(snd.frames)
                yield from _cut(self._mono_blocks(snd, promised), self.segment_samples)

    def _mono_blocks(self, snd: Any, promised: int | None) -> Iterator[np.ndarray]:
        """float32 [*] blocks of mono audio at ``sample_rate``; the checks that need the
        whole file run before the last block."""
        path, rate = self.path, self.source_rate
        resampler = Resampler(rate, self.sample_rate)
        frames, peak = 0, 0.0
        block_frames = max(1, BLOCK_SAMPLES // self.channels)
        while True:
            try:
                block = snd.read(block_frames, dtype="float32", always_2d=True)
            except Exception as exc:  # a stream that breaks part way
                raise _undecodable(path, exc) from None
            if not block.shape[0]:
                break
            if not np.isfinite(block).all():
                raise AudioError(f"NaN or infinite samples: {path}")
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            frames += block.shape[0]
            peak = max(peak, float(np.abs(mono).max()))
            yield resampler.push(mono)
        if frames == 0:
            raise AudioError(f"no audio samples (empty or truncated stream): {path}")
        # mp3 headers (Xing) state the length; decoders pad/trim a few frames, hence 1 %.
        if promised is not None and frames < 0.99 * promised:
            raise AudioError(f"truncated: the header promises {promised / rate:.2f} s, the "
                             f"file holds {frames / rate:.2f} s: {path}")
        if peak < SILENCE_PEAK:
            raise AudioError(f"silence only (peak below -90 dBFS): {path}")
        out = -(-frames * self.sample_rate // rate)
        if out < self.min_samples:
            raise AudioError(f"too short: {out / self.sample_rate * 1000:.1f} ms, shorter than "
                             f"one codec frame ({self.min_samples / self.sample_rate * 1000:.1f}"
                             f" ms): {path}")
        yield resampler.flush()


def decode_file(path: str | Path, sample_rate: int, min_samples: int) -> Decoded:
    """Read ``path`` whole and return mono float32 at ``sample_rate`` (for files that fit
    in memory; precompute streams ``AudioStream``'s segments instead). Raises AudioError
    with the reason, as ``AudioStream`` does."""
    stream = AudioStream(path, sample_rate, min_samples, segment_samples=1 << 22)
    wav = np.concatenate(list(stream))
    return Decoded(wav, stream.sha256, stream.source_rate, stream.channels)


def decode_job(path: str, sample_rate: int, min_samples: int,
               segment_samples: int) -> Iterator[tuple[str, Any]]:
    """Worker entry point: the decode of one file as messages, ``("segment", float32
    [segment_samples])`` for each segment (the last may be shorter), then ``("done",
    sha256)`` or ``("failed", reason)``.

    Failures are messages rather than exceptions, so that every outcome crosses the
    process boundary the same way.
    """
    if os.environ.get("NOENCORE_FAULT") == f"stall:{Path(path).name}":
        time.sleep(3600)  # fault injection for the decode-timeout test: a stalled mount
    stream = AudioStream(path, sample_rate, min_samples, segment_samples)
    try:
        for piece in stream:
            yield "segment", piece
    except AudioError as exc:
        yield "failed", str(exc)
        return
    except Exception as exc:  # an unforeseen decoder bug must name the file, not kill the run
        yield "failed", f"unexpected error decoding {path}: {type(exc).__name__}: {exc}"
        return
    yield "done", stream.sha256
