"""Progress in the unit of the work: precompute's bar moves in seconds of audio within a
long file; where stderr is not a terminal, bars print plain lines a log keeps."""
from __future__ import annotations

import io
import json
import re

import pytest
import soundfile as sf
from test_data_corpus import music, one_torch_thread  # noqa: F401 (autouse fixture)

LINE = re.compile(r"precompute: +\d+%.*?([\d.]+k?)/([\d.]+k?|\?) s of audio .*items (\d+)/(\d+), "
                  r"failed (\d+)\]")


def _seconds(text: str) -> float:
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


def test_precompute_moves_within_one_long_file(tmp_path, monkeypatch, capsys):
    from noencore.data.precompute import precompute

    sf.write(tmp_path / "long.wav", music(32000, 1, 60.0, 3), 32000)
    sf.write(tmp_path / "short.wav", music(32000, 1, 5.0, 4), 32000)
    (tmp_path / "broken.wav").write_bytes(b"not audio" * 20)
    rows = [{"id": "long", "path": "long.wav", "caption": "a long piece"},
            {"id": "gone", "path": "broken.wav", "caption": "broken"},
            {"id": "short", "path": "short.wav", "caption": "a short piece"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("NOENCORE_PROGRESS_SECONDS", "1e-6")  # a line per refresh
    capsys.readouterr()
    report = precompute(tmp_path / "m.jsonl", tmp_path / "out", codec="tiny",
                        segment_seconds=10.0, batch_size=1, workers=0, progress=True)
    assert report.encoded == 2 and len(report.failures) == 1
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: plain lines
    seen = [(_seconds(m[0]), m[1], int(m[2]), int(m[4])) for m in LINE.findall(err)]
    assert seen, err
    # inside the 60 s file, before it is done: one line per 10 s segment encoded
    inside = sorted({s for s, _, done, _ in seen if done == 0 and 0 < s < 60})
    assert len(inside) >= 4, err
    # at the end the total is the audio decoded: 60 s + 5 s (the failed item leaves it)
    done_s, total, items, failed = seen[-1]
    assert items == 2 and failed == 1 and done_s == pytest.approx(65, abs=0.1)
    assert _seconds(total) == pytest.approx(65, abs=0.1)
    # inside the first file the total is an estimate: the 60 s decoded, and the mean
    # decoded length for each of the two items not decoded yet
    assert all(_seconds(t) == pytest.approx(180, abs=0.1) for s, t, done, _ in seen
               if done == 0 and s > 0)


def test_bars_print_lines_where_stderr_is_not_a_terminal(monkeypatch):
    from noencore.progress import _Lines, progress

    monkeypatch.setenv("NOENCORE_PROGRESS_SECONDS", "1e-6")
    log = io.StringIO()
    bar = progress(total=4, desc="steps", unit="step", file=log)
    assert isinstance(bar, _Lines)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = log.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in log.getvalue()
    assert [ln.split("|")[-1].split()[0] for ln in lines if "|" in ln][-1] == "4/4"
    assert len([ln for ln in lines if ln.startswith("steps:")]) >= 5  # start, 4 steps (+ end)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = progress(total=2, desc="x", file=Terminal())
    assert not isinstance(tty, _Lines)
    tty.close()
    quiet = io.StringIO()
    off = progress(total=2, desc="x", file=quiet, disable=True)
    off.update(2)
    off.close()
    assert quiet.getvalue() == ""
    monkeypatch.setenv("NOENCORE_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="NOENCORE_PROGRESS_SECONDS='soon'"):
        progress(total=1, file=io.StringIO())


def test_plain_lines_are_spaced_in_time(monkeypatch):
    from noencore.progress import progress

    monkeypatch.setenv("NOENCORE_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    bar = progress(total=1000, desc="many", file=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = [ln for ln in log.getvalue().split("\n") if ln]
    assert len(lines) <= 3 and lines[-1].startswith("many: 100%"), lines  # start, end
