"""Whatever a user feeds in (manifest rows, id files, config values), the tool answers with
its own one-line error or does the work: never a traceback of another kind, and nothing is
written outside the output folder (property tests; profiles in conftest.py)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from noencore.errors import NoencoreError  # noqa: E402

SLOW = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _snapshot(root: Path, skip: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` outside ``skip``: its bytes (None for a folder/link)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            out[str(p)] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "Traceback" not in text, text


# -- manifests ---------------------------------------------------------------------------------
_ids = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.none(), st.just("../x"),
                 st.just("a/b"), st.just("."), st.just("nul\x00"), st.floats(allow_nan=True))
_paths = st.one_of(st.sampled_from(["good.wav", "../outside.wav", "/dev/null", "missing.wav",
                                    "", "sub", "link.wav", "fifo", "good.wav/..", "~/x.wav",
                                    "/etc/hostname"]),
                   st.text(max_size=12), st.integers(), st.none())
_captions = st.one_of(st.text(max_size=30), st.none(), st.integers(), st.lists(st.text(),
                                                                               max_size=2))
_row = st.fixed_dictionaries({"id": _ids, "path": _paths}, optional={
    "caption": _captions, "split": st.one_of(st.sampled_from(["forget", "remain", "holdout"]),
                                             st.text(max_size=5), st.integers(), st.none()),
    "meta": st.one_of(st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                      st.text(max_size=4))})
_line = st.one_of(_row.map(lambda r: json.dumps(r)), st.text(max_size=40),
                  st.just("[1, 2]"), st.just("{"), st.just(""))


@pytest.fixture(scope="module")
def good_wav(tmp_path_factory):
    import soundfile as sf

    path = tmp_path_factory.mktemp("wav") / "good.wav"
    t = np.arange(16000) / 32000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 32000)
    return path


@SLOW
@given(lines=st.lists(_line, min_size=1, max_size=5))
def test_any_manifest_gives_shards_or_one_line_and_writes_only_into_out(lines, good_wav):
    from noencore.data.precompute import precompute

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        box = root / "box"
        (box / "sub").mkdir(parents=True)
        (box / "good.wav").write_bytes(good_wav.read_bytes())
        (box / "link.wav").symlink_to(good_wav)
        os.mkfifo(box / "fifo")
        (root / "outside.wav").write_bytes(good_wav.read_bytes())
        (box / "m.jsonl").write_text("\n".join(lines) + "\n")
        out = box / "out"
        before = _snapshot(root, out)
        try:
            report = precompute(box / "m.jsonl", out, codec="tiny", segment_seconds=0.5,
                                batch_size=2, workers=0, progress=False, decode_timeout=20)
        except NoencoreError as exc:
            event("refused")
            _one_line(exc)
        else:
            event(f"encoded {min(report.encoded, 2)}+, failed {min(len(report.failures), 2)}+")
            assert report.encoded + len(report.failures) >= 0
            from noencore.data.shards import TokenShards

            shards = TokenShards(out)  # what was written reads back, every segment checked
            for i in range(len(shards)):
                shards.codes(i)
        assert _snapshot(root, out) == before


def test_a_named_pipe_in_a_manifest_is_a_failure_not_a_hang(good_wav, tmp_path):
    """Inline decoding (workers=0) has no time limit: a path that is not a regular file is
    refused before it is opened (opening a named pipe waits for a writer forever)."""
    from noencore.data.precompute import precompute

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "good.wav").write_bytes(good_wav.read_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "p", "path": "fifo"}) + "\n"
                                      + json.dumps({"id": "g", "path": "good.wav"}) + "\n")
    report = precompute(tmp_path / "m.jsonl", tmp_path / "out", codec="tiny",
                        segment_seconds=0.5, batch_size=2, workers=0, progress=False)
    assert report.encoded == 1
    assert [f["id"] for f in report.failures] == ["p"]
    assert "not a regular file (a named pipe" in report.failures[0]["reason"]


# -- id files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def code_shards(tmp_path_factory):
    from noencore.evaluation.synthetic import write_code_shards

    rng = np.random.default_rng(0)
    return write_code_shards(tmp_path_factory.mktemp("ids") / "shards",
                             [rng.integers(0, 2048, (4, 12)) for _ in range(4)],
                             ["a", "b", "c", "d"], ["forget", "forget", "remain", "holdout"],
                             ids=["t0", "t1", "#t2", "t 3"])


@SLOW
@given(data=st.one_of(st.binary(max_size=60),
                      st.lists(st.sampled_from(["t0", "t1", "#t2", "t 3", "", " ", "# c",
                                                "t9", "\ufeff"]), max_size=5).map(
                          lambda xs: "\n".join(xs).encode())))
def test_any_id_file_gives_ids_or_one_line(data, code_shards, tmp_path):
    from noencore.data.shards import TokenShards, read_ids
    from noencore.engine.sets import UnlearningSets

    path = tmp_path / "ids.txt"
    path.write_bytes(data)
    try:
        ids = read_ids(path)
        assert ids and all(isinstance(i, str) and i == i.strip() and i for i in ids)
        sets = UnlearningSets(TokenShards(code_shards), ids, None, frames=10)
        assert sets.n_forget > 0
        event("a forget set")
    except NoencoreError as exc:
        event("refused")
        _one_line(exc)


# -- config values -----------------------------------------------------------------------------
_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _unlearn_keys() -> list[str]:
    from noencore.commands.unlearn import FLAGS, OPTIONS

    return sorted(set(OPTIONS) | set(FLAGS) | {"method_options"})


@SLOW
@given(config=st.dictionaries(st.sampled_from(_unlearn_keys()), _values, max_size=4),
       as_json=st.booleans())
# cases the property found (each was a traceback of another kind)
@example(config={"remain": False}, as_json=False)
@example(config={"out": False}, as_json=True)
@example(config={"lora_rank": False, "lora_targets": False}, as_json=False)
@example(config={"method_options": [1]}, as_json=True)
def test_any_unlearn_config_is_taken_or_refused_in_one_line(config, as_json, code_shards,
                                                            tmp_path):
    """The CLI's path up to training: the config file read, flags merged, every option
    checked (``UnlearnConfig.check`` and the trainer's ``check_options``)."""
    import yaml

    from noencore.cli import build_parser
    from noencore.commands.unlearn import resolve_options
    from noencore.engine.config import UnlearnConfig
    from noencore.engine.loop import Trainer

    path = tmp_path / ("c.json" if as_json else "c.yaml")
    path.write_text(json.dumps(config) if as_json else yaml.safe_dump(config))
    args = build_parser().parse_args(["unlearn", "--model", "tiny", "--shards",
                                      str(code_shards), "--forget", "forget", "--config",
                                      str(path)])
    before = _snapshot(tmp_path, tmp_path / "none")
    try:
        opts = resolve_options(args)
        opts.pop("model"), opts.pop("shards")
        cfg = UnlearnConfig().replace(**opts)
        Trainer("tiny", str(code_shards), cfg, progress=False).check_options()
        event("taken")
    except NoencoreError as exc:
        event("refused")
        _one_line(exc)
    assert _snapshot(tmp_path, tmp_path / "none") == before


def _eval_keys() -> list[str]:
    import dataclasses

    from noencore.evaluation.config import EvalConfig

    return [f.name for f in dataclasses.fields(EvalConfig)
            if f.name in ("batch_size", "frames", "min_auc_items", "relearn_lr",
                          "relearn_batch_size", "precision", "metrics", "relearn_steps",
                          "report_to", "overwrite", "allow_codec_mismatch")]


@SLOW
@given(options=st.dictionaries(st.sampled_from(_eval_keys()), _values, max_size=3))
@example(options={"report_to": False})
@example(options={"relearn_steps": 0.0})
@example(options={"metrics": False})
def test_any_evaluate_options_are_taken_or_refused_in_one_line(options):
    from noencore.evaluation import relearn
    from noencore.evaluation.config import EvalConfig

    try:
        cfg = EvalConfig().replace(**options)
        cfg.check()
        relearn.parse_steps(cfg.relearn_steps)
        cfg.tracker_names()
        event("taken")
    except NoencoreError as exc:
        event("refused")
        _one_line(exc)
