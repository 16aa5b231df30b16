"""The synthetic demo corpus: determinism, splits, readable files, a memorable opt-out style."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from noencore.demo.corpus import (
    BROKEN_KINDS,
    OPT_OUT_ARTIST,
    _ogg_set_serial,
    broken_ids,
    make_demo_corpus,
    read_demo_manifest,
    render_clip,
)

SMALL = dict(n_clips=16, seconds=(1.5, 2.5), progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("demo"), seed=3, broken=True, **SMALL)


def _good(manifest: Path) -> list[dict]:
    return [r for r in read_demo_manifest(manifest) if "broken" not in r]


def test_same_seed_same_bytes_other_seed_other_audio(tmp_path: Path, corpus: Path) -> None:
    again = make_demo_corpus(tmp_path / "a", seed=3, broken=True, **SMALL)
    other = make_demo_corpus(tmp_path / "b", seed=4, **SMALL)
    assert broken_ids(other) == {}
    # Every file, lossy ones included (the Ogg serial is derived, not random), and the manifest.
    assert again.read_bytes() == corpus.read_bytes()
    for rec in read_demo_manifest(corpus):
        if rec.get("broken") != "missing":
            first = (corpus.parent / rec["path"]).read_bytes()
            assert first == (again.parent / rec["path"]).read_bytes(), rec["id"]
            if "broken" not in rec:
                assert first != (other.parent / rec["path"]).read_bytes(), rec["id"]


def test_ogg_serial_rewrite_keeps_valid_pages(tmp_path: Path) -> None:
    """Rewriting a stream with its own serial must reproduce libsndfile's bytes exactly
    (so the page CRCs are computed as libogg does), and another serial must still decode."""
    tone = np.sin(np.arange(30000) * 0.05).astype(np.float32) * 0.5
    sf.write(tmp_path / "a.ogg", tone, 24000, format="OGG", subtype="VORBIS")
    data = (tmp_path / "a.ogg").read_bytes()
    serial = int.from_bytes(data[14:18], "little")
    assert _ogg_set_serial(data, serial) == data
    (tmp_path / "b.ogg").write_bytes(_ogg_set_serial(data, 12345))
    assert int.from_bytes((tmp_path / "b.ogg").read_bytes()[14:18], "little") == 12345
    np.testing.assert_array_equal(sf.read(tmp_path / "b.ogg")[0], sf.read(tmp_path / "a.ogg")[0])
    with pytest.raises(ValueError, match="not an Ogg page"):
        _ogg_set_serial(b"RIFF" + data[4:], 1)


def test_splits_artists_and_fields(corpus: Path) -> None:
    records = _good(corpus)
    assert len(records) == SMALL["n_clips"]
    assert len({r["id"] for r in read_demo_manifest(corpus)}) == len(read_demo_manifest(corpus))
    by_split = {s: [r for r in records if r["split"] == s] for s in ("forget", "remain", "holdout")}
    assert all(by_split.values()), {s: len(v) for s, v in by_split.items()}
    assert {r["artist"] for r in by_split["forget"]} == {OPT_OUT_ARTIST.name}
    assert OPT_OUT_ARTIST.name not in {r["artist"] for r in by_split["remain"] + by_split["holdout"]}
    # The holdout is drawn from the same artists as the remain set.
    assert {r["artist"] for r in by_split["holdout"]} <= {r["artist"] for r in by_split["remain"]}
    for rec in records:
        assert not Path(rec["path"]).is_absolute()
        assert rec["caption"].endswith(f"{rec['tempo']} bpm, {rec['key']}")
        assert rec["license"] and rec["genre"]
    others = by_split["remain"] + by_split["holdout"]
    assert min(len({r[k] for r in others}) for k in ("genre", "key", "tempo", "artist")) >= 5
    assert len({r["caption"] for r in records}) > len(records) // 2
    assert {r["format"] for r in records} == {"wav", "ogg", "flac", "mp3"}
    assert {r["sample_rate"] for r in records} >= {32000, 44100, 48000, 22050}
    assert {r["channels"] for r in records} == {1, 2}
    assert not list(corpus.parent.rglob("*.tmp")), "a temporary file was left behind"


def test_files_read_back_as_declared(corpus: Path) -> None:
    for rec in _good(corpus):
        path = corpus.parent / rec["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"], rec["id"]
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        assert sr == rec["sample_rate"], rec["id"]
        assert audio.shape[1] == rec["channels"], rec["id"]
        expected = round(rec["seconds"] * sr)
        if rec["format"] in ("wav", "flac"):
            assert audio.shape[0] == expected, rec["id"]
        else:  # lossy codecs pad by an encoder delay of a few ms
            assert abs(audio.shape[0] - expected) < 0.1 * sr, rec["id"]
        assert np.isfinite(audio).all() and 0.3 < np.abs(audio).max() <= 1.0, rec["id"]
        if rec["channels"] == 2:
            assert not np.allclose(audio[:, 0], audio[:, 1], atol=1e-3), rec["id"]


def _style_feature(path: Path) -> np.ndarray:
    """Long-term average spectrum in 24 log-spaced bands + pitch-class profile (12), each
    normalised: a rate-independent fingerprint of timbre and key."""
    audio, sr = sf.read(path, dtype="float64", always_2d=True)
    mono = audio.mean(1)
    n_fft = 4096
    frames = np.lib.stride_tricks.sliding_window_view(mono, n_fft)[:: n_fft // 2] * np.hanning(n_fft)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(0)
    freqs = np.fft.rfftfreq(n_fft, 1 / sr)
    edges = np.geomspace(60, 10000, 25)
    bands = np.log(np.array([power[(freqs >= a) & (freqs < b)].sum() for a, b in itertools.pairwise(edges)]) + 1e-9)
    keep = (freqs > 80) & (freqs < 4000)
    pitch_class = np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) % 12
    chroma = np.bincount(pitch_class, weights=power[keep], minlength=12)
    bands = bands - bands.mean()
    return np.concatenate([bands / np.linalg.norm(bands), chroma / np.linalg.norm(chroma)])


def test_opt_out_artist_is_consistent(corpus: Path) -> None:
    """Forget clips resemble each other more than they resemble any remain clip: the style a
    model could memorise (and must forget)."""
    records = [r for r in _good(corpus) if r["split"] in ("forget", "remain")]
    feats = np.stack([_style_feature(corpus.parent / r["path"]) for r in records])
    sim = feats @ feats.T / 2.0
    forget = np.array([r["split"] == "forget" for r in records])
    within = sim[np.ix_(forget, forget)][~np.eye(forget.sum(), dtype=bool)]
    across = sim[np.ix_(forget, ~forget)]
    assert within.min() > across.mean(), (within.min(), across.mean())
    assert within.mean() > across.max(), (within.mean(), across.max())
    # Every forget clip's nearest neighbour is another forget clip.
    np.fill_diagonal(sim, -np.inf)
    assert forget[sim[forget].argmax(1)].all()


def test_broken_entries_are_broken_as_declared(corpus: Path) -> None:
    declared = broken_ids(corpus)
    assert sorted(declared.values()) == sorted(BROKEN_KINDS)
    records = {r["id"]: r for r in read_demo_manifest(corpus)}
    for clip_id, kind in declared.items():
        path = corpus.parent / records[clip_id]["path"]
        if kind == "missing":
            assert not path.exists()
            continue
        if kind == "empty":
            assert path.stat().st_size == 0
        if kind in ("empty", "truncated", "not_audio"):
            with pytest.raises(sf.LibsndfileError):
                sf.read(path)
            continue
        audio, sr = sf.read(path, dtype="float32")
        if kind == "silence":
            assert audio.size > sr and not audio.any()
        elif kind == "nan":
            assert np.isnan(audio).any()
        elif kind == "too_short":
            assert 0 < audio.shape[0] < sr * 640 // 32000


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audio format"):
        make_demo_corpus(tmp_path, formats=("wav", "aiff"), progress=False)
    with pytest.raises(ValueError, match="too small"):
        make_demo_corpus(tmp_path, n_clips=5, progress=False)
    with pytest.raises(ValueError, match="seconds"):
        make_demo_corpus(tmp_path, seconds=(3.0, 2.0), progress=False)
    assert not (tmp_path / "manifest.jsonl").exists()


def test_fixed_length_single_format(tmp_path: Path) -> None:
    manifest = make_demo_corpus(tmp_path, n_clips=13, seconds=1.0, formats=("flac",), progress=False)
    records = read_demo_manifest(manifest)
    assert len(records) == 13 and sum(r["split"] == "forget" for r in records) == 3
    for rec in records:
        info = sf.info(tmp_path / rec["path"])
        assert rec["path"].endswith(".flac") and info.format == "FLAC"
        assert rec["seconds"] == 1.0 and info.frames == info.samplerate


def test_opt_out_clips_split_three_ways_interleaved() -> None:
    from noencore.demo.corpus import OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT, _assign_clips

    plan = _assign_clips(60, 0.5, optout_holdout=1 / 3, optout_valid=1 / 3)
    opt = [split for artist, split in plan if artist is OPT_OUT_ARTIST]
    assert len(opt) == 30 and [opt.count(s) for s in
                               ("forget", OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT)] == [10, 10, 10]
    assert opt[:6] == ["forget", OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT] * 2
    # no opt-out clip outside the three splits, no other artist's clip inside them
    assert all(split in ("remain", "holdout") for artist, split in plan if artist is not OPT_OUT_ARTIST)
    # uneven shares: a split leaves the cycle once it has its share
    opt = [s for a, s in _assign_clips(40, 0.4, optout_holdout=0.25) if a is OPT_OUT_ARTIST]
    assert opt == ["forget", OPT_OUT_HOLDOUT_SPLIT] * 4 + ["forget"] * 8
    with pytest.raises(ValueError, match="fewer than 2 forget clips"):
        _assign_clips(40, 0.4, optout_holdout=0.5, optout_valid=0.45)


def test_a_request_names_a_share_of_the_artists_trained_clips() -> None:
    from noencore.demo.corpus import OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT, _assign_clips

    def splits(share):
        plan = _assign_clips(60, 0.5, 1 / 3, 1 / 3, forget_share=share)
        return [(i, s) for i, (a, s) in enumerate(plan) if a is OPT_OUT_ARTIST]

    full = splits(1.0)
    trained = [i for i, s in full if s == "forget"]
    assert len(trained) == 10
    for share, want in ((1e-9, 1), (1 / 3, 3), (0.5, 5), (1.0, 10)):
        got = splits(share)
        forget = [i for i, s in got if s == "forget"]
        assert len(forget) == want and set(forget) <= set(trained)
        # the others of the artist's trained clips stay in training, in the remain split
        assert sorted(forget + [i for i, s in got if s == "remain"]) == trained
        # never-trained-on clips of the artist are untouched
        assert [x for x in got if x[1] in (OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT)] == \
            [x for x in full if x[1] in (OPT_OUT_HOLDOUT_SPLIT, OPT_OUT_VALID_SPLIT)]
    assert [i for i, s in splits(1 / 3) if s == "forget"] == [trained[0], trained[3], trained[6]]
    with pytest.raises(ValueError, match="forget_share=0"):
        _assign_clips(60, 0.5, forget_share=0)


def test_the_shared_corpus_surrounds_the_artist_with_its_neighbours(tmp_path: Path) -> None:
    from noencore.demo.corpus import OTHER_ARTISTS, SHARED_ARTISTS

    manifest = make_demo_corpus(tmp_path, seed=1, style="shared", **SMALL)
    records = _good(manifest)
    others = [r for r in records if r["artist"] != OPT_OUT_ARTIST.name]
    assert {r["artist"] for r in others} == {a.name for a in SHARED_ARTISTS}
    assert {r["genre"] for r in records} == {OPT_OUT_ARTIST.genre}  # one genre throughout
    # every neighbour shares most traits with the artist, unlike the distinct corpus
    def shared_traits(a):
        return sum(bool(set(getattr(a, k)) & set(getattr(OPT_OUT_ARTIST, k)))
                   for k in ("keys", "modes", "leads", "grooves")) + \
            (a.tempo[0] <= OPT_OUT_ARTIST.tempo[1] and OPT_OUT_ARTIST.tempo[0] <= a.tempo[1])
    assert min(shared_traits(a) for a in SHARED_ARTISTS) >= 3
    assert max(shared_traits(a) for a in OTHER_ARTISTS) <= 2
    assert all(a.motif is None for a in SHARED_ARTISTS)  # the artist's melody stays its own
    with pytest.raises(ValueError, match="style='alike'"):
        make_demo_corpus(tmp_path / "x", style="alike", **SMALL)


@pytest.mark.parametrize("fmt", ["ogg", "mp3"])
def test_real_length_clips_are_written_whole(tmp_path: Path, fmt: str) -> None:
    # 60 s of OGG in one write call overflowed libvorbis's stack and killed the process
    path = tmp_path / f"long.{fmt}"
    meta = render_clip(path, OPT_OUT_ARTIST, 60.0, 48000, np.random.default_rng(0), stereo=True, fmt=fmt)
    info = sf.info(str(path))
    assert info.channels == 2 and info.samplerate == 48000 and meta["lead"] == "fm_bell"
    assert abs(info.duration - 60.0) < 0.1


def test_unknown_artists_come_after_and_change_nothing_before(tmp_path: Path) -> None:
    from noencore.demo.corpus import UNKNOWN_ARTISTS, UNKNOWN_SPLIT

    plain = make_demo_corpus(tmp_path / "a", seed=2, **SMALL)
    more = make_demo_corpus(tmp_path / "b", seed=2, unknown_clips=5, **SMALL)
    a, b = _good(plain), _good(more)
    assert b[:len(a)] == a  # the same clips, byte for byte (their sha256), in the same order
    extra = b[len(a):]
    assert [r["split"] for r in extra] == [UNKNOWN_SPLIT] * 5
    assert {r["artist"] for r in extra} == {x.name for x in UNKNOWN_ARTISTS["distinct"]}
    trained = {r["artist"] for r in b if r["split"] in ("forget", "remain")}
    assert not trained & {r["artist"] for r in extra}  # nothing trains on them
