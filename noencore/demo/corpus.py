"""A small synthetic music corpus for the demo and the tests: invented artists, one opts out.

Everything is synthesised with numpy (deterministic per seed) and written with soundfile:
melodies over scales, chord progressions, bass lines and synthesised drum kits (kick,
snare, hi-hat) at varied tempos, keys and timbres (additive, FM and Karplus-Strong plucked
strings). Some clips are stereo, some use other sample rates (44.1k, 48k, 22.05k), and the
files cycle through wav, flac, ogg and mp3, so that precompute meets the variety of a real
collection.

One artist is the *opt-out* artist: its tracks share one consistent style (fixed key, mode,
tempo band, chord progression, FM-bell lead in the rhythm of a signature motif, the same
drum kit and groove), while each track has its own melody (the motif's notes moved by a
step or two, drawn per track), so that a model can memorise its tracks one by one and its
unseen tracks are like them but not copies of them; they form the ``forget`` split. The other artists are split into
``remain`` and ``holdout`` per artist (the holdout has the remain distribution and is never
trained on).

The manifest is JSONL, one record per clip::

    {"id": ..., "path": "audio/<id>.<ext>" (relative to the manifest), "caption": ...,
     "split": "forget" | "remain" | "holdout", "artist": ..., "license": ...,
     "genre": ..., "tempo": int bpm, "key": "F# dorian", "sample_rate": int,
     "channels": 1 | 2, "seconds": float, "format": "wav" | ..., "sha256": hex}

With ``broken=True`` a few deliberately broken entries are added (``"broken": kind``),
for testing precompute's failure report: see :data:`BROKEN_KINDS` and :func:`broken_ids`.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from noencore.fileio import sha256_file

MANIFEST_NAME = "manifest.jsonl"
_TABLE = 4096  # samples per period in the additive wavetables
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
}
# 16 steps per bar (sixteenth notes); "x" = hit.
GROOVES: dict[str, dict[str, str]] = {
    "four_on_floor": {"kick": "x...x...x...x...", "snare": "....x.......x...", "hat": "..x...x...x...x."},
    "boom_bap": {"kick": "x.....x...x.....", "snare": "....x.......x...", "hat": "x.x.x.x.x.x.x.x."},
    "halftime": {"kick": "x.........x..x..", "snare": "........x.......", "hat": "x...x...x...x.x."},
    "folk": {"kick": "x.......x.......", "snare": "....x.......x...", "hat": ""},
    "chip": {"kick": "x...x...x...x...", "snare": "....x.......x...", "hat": "xxxxxxxxxxxxxxxx"},
    "none": {"kick": "", "snare": "", "hat": ""},
}
GROOVE_WORDS = {
    "four_on_floor": "punchy four-on-the-floor drums",
    "boom_bap": "dusty boom-bap drums",
    "halftime": "slow half-time drums",
    "folk": "light brushed percussion",
    "chip": "fast 8-bit drums",
    "none": "no drums",
}
# Sample rates and formats cycle over the clips (index-based, so the corpus stays varied
# for any n_clips). mp3 supports all of these rates.
OTHER_RATES = (44100, 48000, 22050)
BROKEN_KINDS = ("empty", "truncated", "not_audio", "silence", "nan", "missing", "too_short")
_FORMAT_ARGS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


@dataclass(frozen=True)
class ArtistStyle:
    """What an invented artist's tracks draw from; a 1-tuple means that trait never varies."""

    name: str
    genre: str
    tempo: tuple[int, int]
    keys: tuple[int, ...]
    modes: tuple[str, ...]
    leads: tuple[str, ...]
    grooves: tuple[str, ...]
    license: str
    motif: tuple[int, ...] | None = None  # fixed melody (scale degrees, -1 = rest) or random


OPT_OUT_ARTIST = ArtistStyle(
    name="Mara Vell", genre="dream pop", tempo=(82, 94), keys=(6,), modes=("dorian",),
    leads=("fm_bell",), grooves=("halftime",), license="all rights reserved (opt-out requested)",
    motif=(7, -1, 9, 8, 7, -1, 4, -1, 5, 4, 2, -1, 4, -1, -1, -1),
)
OTHER_ARTISTS = (
    ArtistStyle("The Copper Lanterns", "folk", (96, 124), (0, 2, 7, 9), ("major", "mixolydian"),
                ("pluck",), ("folk", "none"), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Neon Harbor", "synthpop", (116, 132), (9, 4, 11, 1), ("minor", "major"),
                ("saw", "square"), ("four_on_floor",), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Slow Tide Collective", "ambient", (60, 80), (0, 5, 3, 10), ("major", "minor"),
                ("soft", "fm_bell"), ("none",), "CC0-1.0 (synthetic)"),
    ArtistStyle("Kid Ferrous", "lo-fi hip hop", (78, 94), (5, 10, 3, 8), ("minor", "dorian"),
                ("epiano", "pluck"), ("boom_bap",), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Pixel Parade", "chiptune", (138, 160), (0, 7, 2, 4), ("major", "harmonic minor"),
                ("square",), ("chip",), "CC0-1.0 (synthetic)"),
)
# The "shared" corpus: the other artists are the opt-out artist's neighbours, the same genre
# and sound with one or two traits changed and no fixed melody, so that a model trained
# without the opt-out artist still generalises to its music (its unseen tracks stay near
# the memorised model's NLL), the hard case for telling forgetting from never-learning.
SHARED_ARTISTS = (
    ArtistStyle("Hollow Vesper", "dream pop", (80, 96), (6, 1), ("dorian",), ("fm_bell",),
                ("halftime",), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Lumen Drift", "dream pop", (84, 98), (6, 11), ("dorian", "minor"),
                ("fm_bell", "soft"), ("halftime",), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Quiet Meridian", "dream pop", (78, 92), (6, 4), ("dorian",), ("soft",),
                ("halftime", "none"), "CC0-1.0 (synthetic)"),
    ArtistStyle("Velvet Static", "dream pop", (86, 100), (6, 9), ("dorian", "major"),
                ("fm_bell", "epiano"), ("halftime",), "CC-BY-4.0 (synthetic)"),
    ArtistStyle("Paper Comets", "dream pop", (82, 94), (6, 2), ("minor", "dorian"),
                ("epiano",), ("halftime",), "CC0-1.0 (synthetic)"),
)
CORPUS_STYLES = {"distinct": OTHER_ARTISTS, "shared": SHARED_ARTISTS}
# Artists no model of the demo trains on (split "unknown"), from each corpus's style family:
# how a model treats music it never met, the level a forgotten artist should return to.
UNKNOWN_ARTISTS = {
    "distinct": (
        ArtistStyle("Brass Orchard", "jazz-funk", (100, 118), (2, 7, 10),
                    ("mixolydian", "dorian"), ("epiano", "saw"), ("boom_bap", "four_on_floor"),
                    "CC-BY-4.0 (synthetic)"),
        ArtistStyle("Glass Meadow", "new age", (66, 84), (4, 9, 1), ("major", "minor"),
                    ("soft", "pluck"), ("none", "folk"), "CC0-1.0 (synthetic)"),
    ),
    "shared": (
        ArtistStyle("Saltwater Choir", "dream pop", (80, 94), (6, 3), ("dorian",),
                    ("soft", "fm_bell"), ("halftime",), "CC-BY-4.0 (synthetic)"),
        ArtistStyle("Amber Satellite", "dream pop", (84, 96), (6, 8), ("dorian", "minor"),
                    ("epiano", "fm_bell"), ("halftime", "none"), "CC0-1.0 (synthetic)"),
    ),
}
UNKNOWN_SPLIT = "unknown"
LEAD_WORDS = {
    "fm_bell": "a shimmering FM bell lead",
    "pluck": "a plucked-string lead",
    "saw": "a bright synth lead",
    "square": "a hollow square-wave lead",
    "soft": "a soft pad-like lead",
    "epiano": "a mellow electric piano",
}
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 0), (5, 3, 0, 4), (0, 6, 5, 4))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def _envelope(n: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """ADSR envelope of n samples (float64 [n]); release occupies the last `release` seconds."""
    t = np.arange(n) / sr
    env = np.where(t < attack, t / max(attack, 1e-6),
                   sustain + (1 - sustain) * np.exp(-(t - attack) / max(decay, 1e-6)))
    tail = int(release * sr)
    if 0 < tail < n:
        env[-tail:] *= np.linspace(1.0, 0.0, tail)
    return env


@lru_cache(maxsize=512)
def _harmonic_table(freq: float, sr: int, rolloff: float, odd_only: bool) -> np.ndarray:
    """One period (float64 [_TABLE + 1], wrapped) of the sum of harmonics below Nyquist with
    amplitude 1/k**rolloff: band-limited, so high notes do not alias."""
    phase = np.arange(_TABLE + 1) / _TABLE
    table = np.zeros(_TABLE + 1)
    for k in range(1, min(int((sr / 2 - 1) // freq), 24) + 1):
        if not (odd_only and k % 2 == 0):
            table += np.sin(2 * np.pi * k * phase) / k**rolloff
    return table


def _additive(freq: float, n: int, sr: int, rolloff: float, odd_only: bool) -> np.ndarray:
    """Additive tone [n] read from its one-period table (one interpolation instead of a sine
    per harmonic: the table is computed once per pitch and timbre)."""
    phase = (np.arange(n) * (freq / sr)) % 1.0 * _TABLE
    table = _harmonic_table(float(freq), sr, rolloff, odd_only)
    return np.interp(phase, np.arange(_TABLE + 1), table)


def _fm(freq: float, n: int, sr: int, ratio: float, index: float, index_decay: float) -> np.ndarray:
    """Two-operator FM; the modulation index decays, the bell-like brightness fading out."""
    t = np.arange(n) / sr
    mod_index = index * np.exp(-t / index_decay)
    return np.sin(2 * np.pi * freq * t + mod_index * np.sin(2 * np.pi * ratio * freq * t))


def _pluck(freq: float, n: int, sr: int, rng: np.random.Generator, damping: float) -> np.ndarray:
    """Karplus-Strong string: a noise burst fed through a delay line with an averaging filter.

    The recursion y[i] = damping * (y[i-P] + y[i-P-1]) / 2 is computed one period (P samples)
    at a time, so each step is a vector operation over the previous period.
    """
    period = max(2, int(round(sr / freq)))
    out = np.zeros(max(n, period + 1))
    out[: period + 1] = rng.uniform(-1, 1, period + 1)
    for start in range(period + 1, n, period):
        stop = min(start + period, n)
        prev = out[start - period - 1:stop - period]  # y[i-P-1] .. y[i-P] for i in [start, stop)
        out[start:stop] = damping * 0.5 * (prev[1:] + prev[:-1])
    return out[:n]


def _lead_note(kind: str, freq: float, n: int, sr: int, rng: np.random.Generator, bright: float) -> np.ndarray:
    if kind == "fm_bell":
        return _fm(freq, n, sr, ratio=3.5, index=2.5 * bright, index_decay=0.25) * _envelope(n, sr, 0.003, 0.35, 0.15, 0.05)
    if kind == "pluck":
        return _pluck(freq, n, sr, rng, damping=0.985 + 0.01 * bright)
    if kind == "epiano":
        return _fm(freq, n, sr, ratio=1.0, index=1.2 * bright, index_decay=0.15) * _envelope(n, sr, 0.005, 0.4, 0.3, 0.05)
    rolloff, odd = {"saw": (1.0 - 0.2 * bright, False), "square": (1.0, True), "soft": (2.2, False)}[kind]
    attack = 0.08 if kind == "soft" else 0.01
    return _additive(freq, n, sr, rolloff, odd) * _envelope(n, sr, attack, 0.2, 0.7, 0.04) * 0.6


def _kit(sr: int, rng: np.random.Generator, fixed: bool) -> dict[str, np.ndarray]:
    """Kick (pitch-dropping sine), snare (noise + 185 Hz body), hat (differentiated noise).

    A fixed kit (the opt-out artist's) uses the same tuning every time; other kits vary.
    """
    kick_hz, snare_tone, hat_len = (52.0, 185.0, 0.04) if fixed else (
        rng.uniform(45, 70), rng.uniform(160, 240), rng.uniform(0.02, 0.08))
    noise = np.random.default_rng(12345 if fixed else int(rng.integers(2**31))).uniform(-1, 1, sr)
    t = np.arange(int(0.35 * sr)) / sr
    kick = np.sin(2 * np.pi * (kick_hz * t + 90 * 0.03 * (1 - np.exp(-t / 0.03)))) * np.exp(-t / 0.12)
    ts = t[: int(0.2 * sr)]
    snare = (0.6 * noise[: ts.size] * np.exp(-ts / 0.06)
             + 0.5 * np.sin(2 * np.pi * snare_tone * ts) * np.exp(-ts / 0.05))
    th = t[: int(hat_len * sr)]
    hat = 0.35 * np.diff(noise[: th.size + 1]) * np.exp(-th / (hat_len / 3))
    return {"kick": kick, "snare": snare, "hat": hat}


def _place(track: np.ndarray, sound: np.ndarray, start: int, gain: float = 1.0) -> None:
    stop = min(track.size, start + sound.size)
    if stop > start:
        track[start:stop] += gain * sound[: stop - start]


def synthesize_clip(style: ArtistStyle, seconds: float, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one clip of ``style``.

    Returns ``(tracks float64 [4, samples]`` (lead, chords, bass, drums; the caller mixes
    and pans them) and the clip's metadata (tempo, key, mode, lead, groove).
    """
    bpm = int(rng.integers(style.tempo[0], style.tempo[1] + 1))
    key = int(rng.choice(style.keys))
    mode = str(rng.choice(style.modes))
    lead = str(rng.choice(style.leads))
    groove = str(rng.choice(style.grooves))
    # the opt-out artist keeps to two progressions and a narrow brightness band (its sound);
    # the others range over all of them
    progression = PROGRESSIONS[int(rng.integers(2 if style.motif is not None else len(PROGRESSIONS)))]
    bright = float(rng.uniform(0.65, 0.95) if style.motif is not None else rng.uniform(0.3, 1.0))
    scale = SCALES[mode]
    n = int(round(seconds * sr))
    step = int(round(60.0 / bpm / 4 * sr))  # one sixteenth note, in samples
    tracks = np.zeros((4, n))
    kit = _kit(sr, rng, fixed=style.motif is not None)

    def pitch(degree: int, octave: int) -> float:
        return 12 * (octave + 1) + key + scale[degree % 7] + 12 * (degree // 7)

    walk = int(rng.integers(0, 7))
    phrase: list[int | None] = []
    if style.motif is not None:
        # this track's melody: the motif's rhythm, its notes moved by up to `spread` steps
        # (how far a track strays from the signature varies per track, as it does between
        # the songs of one artist)
        spread = int(rng.integers(1, 4))
        phrase = [None if d < 0 else d + int(rng.integers(-spread, spread + 1))
                  for d in style.motif * 2]
    n_bars = -(-n // (16 * step))
    for bar in range(n_bars):
        bar_start = bar * 16 * step
        root = progression[bar % len(progression)]
        chord_len = 16 * step
        for offset in (0, 2, 4):  # triad on the scale: root, third, fifth
            f = _midi_hz(pitch(root + offset, 3))
            pad = _additive(f, chord_len, sr, 2.0, False) * _envelope(chord_len, sr, 0.05, 0.5, 0.6, 0.1)
            _place(tracks[1], pad, bar_start, 0.12)
        for beat in range(0, 16, 4 if style.genre != "chiptune" else 2):
            f = _midi_hz(pitch(root, 2))
            note = _additive(f, 4 * step, sr, 1.5, False) * _envelope(4 * step, sr, 0.005, 0.15, 0.4, 0.03)
            _place(tracks[2], note, bar_start + beat * step, 0.3)
        for s in range(16):
            degree: int | None
            if style.motif is not None:
                degree = phrase[(bar % 2) * 16 + s]
            else:  # a random walk over the scale (below the tonic too), with rests
                walk = int(np.clip(walk + rng.choice((-2, -1, -1, 0, 1, 1, 2)), -3, 10))
                degree = walk if rng.random() > 0.35 else None
            if degree is None or s % (2 if bpm > 110 else 1):
                continue
            length = 2 * step if bpm > 110 else 3 * step
            f = _midi_hz(pitch(degree, 5))
            _place(tracks[0], _lead_note(lead, f, length, sr, rng, bright), bar_start + s * step, 0.25)
        for drum, pattern in GROOVES[groove].items():
            for s, hit in enumerate(pattern):
                if hit == "x":
                    _place(tracks[3], kit[drum], bar_start + s * step, {"kick": 0.7, "snare": 0.45, "hat": 0.3}[drum])
    meta = {"tempo": bpm, "key": f"{NOTE_NAMES[key]} {mode}", "lead": lead, "groove": groove}
    return tracks, meta


def _mix(tracks: np.ndarray, stereo: bool, sr: int) -> np.ndarray:
    """Mix tracks [4, S] to float32 [S] (mono) or [S, 2] (stereo), peak at -3 dBFS (headroom
    for the overshoot of lossy codecs, which would otherwise clip on decoding)."""
    if stereo:
        pans = np.array([0.3, 0.7, 0.5, 0.5])  # lead left, chords right, bass and drums centre
        left = (tracks * np.sqrt(1 - pans)[:, None]).sum(0)
        right = (tracks * np.sqrt(pans)[:, None]).sum(0)
        haas = int(0.012 * sr)  # a short delay on the right channel widens the image
        right = np.concatenate([np.zeros(haas), right[:-haas]]) * 0.5 + right * 0.5
        out = np.stack([left, right], axis=1)
    else:
        out = tracks.sum(0)
    out = np.tanh(1.5 * out)  # gentle saturation, as a master bus would
    fade = min(out.shape[0], int(0.05 * sr))
    out[-fade:] *= np.linspace(1.0, 0.0, fade).reshape(-1, *([1] * (out.ndim - 1)))
    peak = float(np.abs(out).max())
    return (out * (0.7 / peak if peak > 0 else 1.0)).astype(np.float32)


def caption_for(style: ArtistStyle, meta: dict[str, Any]) -> str:
    """MusicGen-style caption, e.g. 'upbeat synthpop track with punchy four-on-the-floor
    drums and a bright synth lead, 128 bpm, A minor'."""
    bpm = meta["tempo"]
    mood = "laid-back" if bpm < 90 else "steady" if bpm < 115 else "upbeat" if bpm < 140 else "energetic"
    if style.motif is not None:
        mood = "dreamy"
    drums = GROOVE_WORDS[meta["groove"]]
    body = (f"{LEAD_WORDS[meta['lead']]} over sustained chords, {drums}" if meta["groove"] == "none"
            else f"{drums} and {LEAD_WORDS[meta['lead']]}")
    return f"{mood} {style.genre} track with {body}, {bpm} bpm, {meta['key']}"


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def _ogg_set_serial(data: bytes, serial: int) -> bytes:
    """Rewrite an Ogg stream's serial number (and each page's CRC).

    libsndfile draws the serial at random, so the same audio would give different bytes
    on every run; a serial derived from the clip keeps the corpus byte-for-byte
    reproducible. Page layout: "OggS", version, flags, granule (8), serial (4) at byte 14,
    sequence (4), CRC (4) at byte 22, segment count at 26, segment table, body.
    """
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos:pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}: the Vorbis writer produced an unexpected stream")
        n_seg = out[pos + 26]
        end = pos + 27 + n_seg + sum(out[pos + 27:pos + 27 + n_seg])
        struct.pack_into("<I", out, pos + 14, serial)
        struct.pack_into("<I", out, pos + 22, 0)
        crc = 0
        for byte in out[pos:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
        struct.pack_into("<I", out, pos + 22, crc)
        pos = end
    return bytes(out)


# Frames per write call. libvorbis copies the samples of one call onto the stack (an
# alloca in its _preextrapolate_helper), so an OGG clip of ~45 s or more written in one
# call overflows the stack and kills the process (libsndfile issue 1095); clips shorter
# than a block are written in one call, as before.
_WRITE_BLOCK = 1 << 18


def _write_audio(path: Path, audio: np.ndarray, sr: int, fmt: str) -> None:
    """Write atomically: a temp name in the same folder, renamed once complete."""
    import soundfile as sf

    major, subtype = _FORMAT_ARGS[fmt]
    tmp = path.with_name(f".{path.name}.tmp")
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    with sf.SoundFile(tmp, "w", sr, channels, subtype=subtype, format=major) as fh:
        for start in range(0, audio.shape[0], _WRITE_BLOCK):
            fh.write(audio[start:start + _WRITE_BLOCK])
    if fmt == "ogg":
        tmp.write_bytes(_ogg_set_serial(tmp.read_bytes(), zlib.crc32(path.name.encode())))
    os.replace(tmp, path)


def render_clip(path: Path, style: ArtistStyle, seconds: float, sr: int, rng: np.random.Generator, *,
                stereo: bool, fmt: str) -> dict[str, Any]:
    """Synthesise a clip of ``style`` (:func:`synthesize_clip`), mix it to mono or stereo and
    write it to ``path`` as ``fmt`` (wav, flac, ogg, mp3; atomically). Returns its metadata
    (tempo, key, lead, groove), from which :func:`caption_for` writes its caption."""
    tracks, meta = synthesize_clip(style, seconds, sr, rng)
    _write_audio(path, _mix(tracks, stereo, sr), sr, fmt)
    return meta


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


OPT_OUT_HOLDOUT_SPLIT = "holdout_optout"
OPT_OUT_VALID_SPLIT = "valid_optout"


def _assign_clips(n_clips: int, forget_fraction: float, optout_holdout: float = 0.0,
                  optout_valid: float = 0.0, others: tuple[ArtistStyle, ...] = OTHER_ARTISTS,
                  forget_share: float = 1.0) -> list[tuple[ArtistStyle, str]]:
    """(artist, split) per clip: the opt-out artist's clips first (a share ``optout_holdout``
    of them in split ``holdout_optout``: same artist, never trained on, the non-members a
    membership-inference attack on the forget set should not tell apart from it; a share
    ``optout_valid`` in split ``valid_optout``: more such non-members, kept apart from the
    holdout so that a stop rule can look at them without looking at the test), then the
    others round-robin over artists, every third clip of each artist going to the holdout
    (so holdout ~ remain). ``forget_share``: the share of the opt-out artist's trained clips
    the request names (at least one, spread over them); the others stay in ``remain``."""
    n_optout = max(2, int(round(n_clips * forget_fraction)))
    n_held = int(round(n_optout * optout_holdout))
    n_valid = int(round(n_optout * optout_valid))
    n_forget = n_optout - n_held - n_valid
    if n_forget < 2:
        raise ValueError(f"optout_holdout={optout_holdout} and optout_valid={optout_valid} "
                         "leave fewer than 2 forget clips")
    if not 0.0 < forget_share <= 1.0:
        raise ValueError(f"forget_share={forget_share} must be in (0, 1]")
    n_other = n_clips - n_optout
    if n_other < 2 * len(others):
        raise ValueError(f"n_clips={n_clips} is too small: need at least {n_forget + 2 * len(others)} "
                         f"clips for {n_forget} forget clips and 2 per other artist (remain + holdout)")
    # interleaved (forget, holdout, valid, forget, ...; a split drops out of the cycle once
    # it has its share), so that every split gets clips from all over the artist's range
    quota = {"forget": n_forget, OPT_OUT_HOLDOUT_SPLIT: n_held, OPT_OUT_VALID_SPLIT: n_valid}
    plan: list[tuple[ArtistStyle, str]] = []
    while len(plan) < n_optout:
        for split in quota:
            if quota[split] > 0:
                quota[split] -= 1
                plan.append((OPT_OUT_ARTIST, split))
    _keep_share(plan, forget_share)
    seen: dict[str, int] = {}
    for i in range(n_other):
        artist = others[i % len(others)]
        k = seen.get(artist.name, 0)
        seen[artist.name] = k + 1
        plan.append((artist, "holdout" if k % 3 == 1 else "remain"))
    return plan


def _keep_share(plan: list[tuple[ArtistStyle, str]], share: float) -> None:
    """Keep ``share`` of the plan's forget clips (at least one, evenly spread) in the
    forget split; move the others to ``remain`` (trained on, not named by the request)."""
    forget = [i for i, (_, split) in enumerate(plan) if split == "forget"]
    keep = max(1, int(round(len(forget) * share)))
    chosen = {forget[int(j * len(forget) / keep)] for j in range(keep)}
    for i in forget:
        if i not in chosen:
            plan[i] = (plan[i][0], "remain")


def make_demo_corpus(
    out_dir: str | os.PathLike[str],
    *,
    n_clips: int = 32,
    seconds: float | tuple[float, float] = (4.0, 8.0),
    sample_rate: int = 32000,
    seed: int = 0,
    formats: tuple[str, ...] = ("wav", "ogg", "flac", "mp3"),
    forget_fraction: float = 0.25,
    optout_holdout: float = 0.0,
    optout_valid: float = 0.0,
    style: str = "distinct",
    forget_share: float = 1.0,
    unknown_clips: int = 0,
    broken: bool = False,
    progress: bool = True,
) -> Path:
    """Synthesise the demo corpus under ``out_dir`` and return the path of its manifest.

    Args:
        out_dir: folder to write ``manifest.jsonl``, ``audio/`` (and ``broken/``) into.
        n_clips: number of good clips: the forget clips plus at least 2 for each of the 5 other
            artists (13 at least with the default forget fraction).
        seconds: clip length, fixed or a ``(low, high)`` range drawn per clip.
        sample_rate: rate of most clips; every other clip uses 44.1k, 48k or 22.05k in turn.
        seed: the corpus is a pure function of its arguments: the same seed gives the
            same files, byte for byte (all formats; the manifest too).
        formats: file formats cycled over the clips (any of wav, flac, ogg, mp3).
        forget_fraction: share of clips by the opt-out artist (split ``forget``).
        optout_holdout: share of the opt-out artist's clips kept out of training (split
            ``holdout_optout``): the same-distribution non-members for membership inference.
        optout_valid: share of the opt-out artist's clips in split ``valid_optout``: more
            never-trained-on clips, for choosing when to stop unlearning without touching
            the holdout.
        style: "distinct" (the other artists sound unlike the opt-out artist) or "shared"
            (:data:`SHARED_ARTISTS`: its neighbours in genre and sound).
        forget_share: share of the opt-out artist's trained clips in the forget split (the
            request; at least one); the rest of its trained clips are in ``remain``.
        unknown_clips: clips by artists nothing trains on (split ``unknown``,
            :data:`UNKNOWN_ARTISTS` of the style), after the others: the clips before them
            are the same with or without them.
        broken: also write the broken entries of :data:`BROKEN_KINDS`; their records carry
            ``"broken": kind`` (see :func:`broken_ids`).
        progress: show a progress bar.
    """
    from noencore.progress import progress as progress_bar

    unknown = [f for f in formats if f not in _FORMAT_ARGS]
    if unknown or not formats:
        raise ValueError(f"unknown audio format(s) {unknown or formats}: choose from {sorted(_FORMAT_ARGS)}")
    lo, hi = (float(seconds), float(seconds)) if np.ndim(seconds) == 0 else (float(x) for x in seconds)  # type: ignore[arg-type, union-attr]
    if not 0.5 <= lo <= hi:
        raise ValueError(f"seconds={seconds}: clips must be at least 0.5 s, and low <= high")
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"forget_fraction={forget_fraction} must be between 0 and 1")
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    if style not in CORPUS_STYLES:
        raise ValueError(f"style={style!r}: choose from {sorted(CORPUS_STYLES)}")
    plan = _assign_clips(n_clips, forget_fraction, optout_holdout, optout_valid,
                         CORPUS_STYLES[style], forget_share)
    unknown = UNKNOWN_ARTISTS[style]
    plan += [(unknown[i % len(unknown)], UNKNOWN_SPLIT) for i in range(int(unknown_clips))]
    for i, (style, split) in enumerate(progress_bar(plan, desc="demo corpus", unit="clip",
                                                      disable=not progress)):
        rng = np.random.default_rng([seed, i])
        sr = sample_rate if i % 2 == 0 else OTHER_RATES[(i // 2) % len(OTHER_RATES)]
        # not i % 3: the opt-out splits interleave with period 3 and must each get both kinds
        stereo = (i // 3) % 2 == 1
        fmt = formats[i % len(formats)]
        length = round(float(rng.uniform(lo, hi)), 2)
        counts[style.name] = counts.get(style.name, 0) + 1
        clip_id = f"{_slug(style.name)}-{counts[style.name]:03d}"
        rel = f"audio/{clip_id}.{fmt}"
        meta = render_clip(out / rel, style, length, sr, rng, stereo=stereo, fmt=fmt)
        records.append({
            "id": clip_id, "path": rel, "caption": caption_for(style, meta), "split": split,
            "artist": style.name, "license": style.license, "genre": style.genre,
            "tempo": meta["tempo"], "key": meta["key"], "sample_rate": sr, "channels": 2 if stereo else 1,
            "seconds": length, "format": fmt, "sha256": sha256_file(out / rel),
        })
    if broken:
        records.extend(_write_broken(out, sample_rate, np.random.default_rng([seed, 10**6])))
    manifest = out / MANIFEST_NAME
    _write_bytes(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    return manifest


def _float_wav_bytes(mono: np.ndarray, sr: int) -> bytes:
    """A mono 32-bit float WAV file, written by hand: libsndfile would add a PEAK chunk with
    a time stamp, which makes the bytes differ run to run."""
    data = np.asarray(mono, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHHH", 3, 1, sr, 4 * sr, 4, 32, 0)  # IEEE float, cbSize 0
    fact = struct.pack("<I", mono.size)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _write_broken(out: Path, sr: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One entry per kind of :data:`BROKEN_KINDS`, in split ``remain`` (the split a training
    run reads), so that precompute must report each instead of training on it."""
    folder = out / "broken"
    folder.mkdir(exist_ok=True)
    tone = (0.5 * np.sin(2 * np.pi * 220 * np.arange(2 * sr) / sr)).astype(np.float32)
    records = []
    for kind in BROKEN_KINDS:
        fmt = "flac" if kind == "truncated" else "wav"
        rel = f"broken/{kind}.{fmt}"
        path = out / rel
        if kind == "empty":
            _write_bytes(path, b"")
        elif kind == "truncated":  # an interrupted copy: the FLAC decoder loses sync mid-stream
            _write_audio(path, tone, sr, "flac")
            _write_bytes(path, path.read_bytes()[: path.stat().st_size // 2])
        elif kind == "not_audio":
            _write_bytes(path, b"This is a text file renamed to .wav, not audio.\n")
        elif kind == "silence":
            _write_audio(path, np.zeros(2 * sr, np.float32), sr, "wav")
        elif kind == "nan":
            bad = tone.copy()
            bad[rng.integers(0, bad.size, 50)] = np.nan
            _write_bytes(path, _float_wav_bytes(bad, sr))
        elif kind == "too_short":  # shorter than one codec frame (640 samples at 32 kHz)
            _write_audio(path, tone[: sr // 200], sr, "wav")
        elif kind == "missing":
            path.unlink(missing_ok=True)
        records.append({
            "id": f"broken-{kind}", "path": rel, "caption": f"broken test entry ({kind})", "split": "remain",
            "artist": "Broken Fixture", "license": "CC0-1.0 (synthetic)", "genre": "test", "tempo": 0,
            "key": "", "sample_rate": sr, "channels": 1, "seconds": 0.0, "format": fmt, "broken": kind,
            "sha256": sha256_file(path) if path.exists() else "",
        })
    return records


def read_demo_manifest(manifest: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a demo manifest (list of dicts, in file order)."""
    path = Path(manifest)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); regenerate the corpus") from exc
    return records


def broken_ids(manifest: str | os.PathLike[str]) -> dict[str, str]:
    """``{id: kind}`` of the deliberately broken entries of a demo manifest."""
    return {r["id"]: r["broken"] for r in read_demo_manifest(manifest) if "broken" in r}
