"""Shards changed after precompute are named before a run trains on them: every segment is
checked the first time it is read (its bytes against the index's digest, its codes
against the codebook size), and a run on such shards records no request."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from test_data_corpus import music, one_torch_thread  # noqa: F401 (autouse fixture)

from noencore.errors import NoencoreError

N_ITEMS, SECONDS = 4, 1.0


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Four 1 s items, 0.5 s segments (25 frames each), two segments per shard file: four
    shard files of one size."""
    from noencore.data.precompute import precompute

    root = tmp_path_factory.mktemp("trust_shards")
    rows = []
    for i in range(N_ITEMS):
        sf.write(root / f"t{i}.wav", music(32000, 1, SECONDS, 20 + i), 32000)
        rows.append({"id": f"t{i}", "path": f"t{i}.wav", "caption": f"piece {i}",
                     "split": "forget" if i < 2 else "remain"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    precompute(root / "m.jsonl", root / "clean", codec="tiny", segment_seconds=0.5,
               batch_size=2, workers=0, progress=False, shard_frames=50)
    return root / "clean"


def _copy(shard_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    return out


def _read_all(path):
    from noencore.data.shards import TokenShards

    shards = TokenShards(path)
    return [shards.codes(i).clone() for i in range(len(shards))]


def _segment(path, row):
    """(shard file, byte offset, byte length) of index row ``row``."""
    from noencore.data import layout

    rec = layout.read_jsonl(path / layout.INDEX)[row]
    n_q = json.loads((path / layout.HEADER).read_text())["n_q"]
    return (path / layout.shard_name(rec["shard"]), rec["offset"] * n_q * 2,
            rec["frames"] * n_q * 2, rec)


def test_clean_shards_read_and_every_segment_has_a_digest(shard_dir):
    from noencore.data import layout

    records = layout.read_jsonl(shard_dir / layout.INDEX)
    sizes = {p.stat().st_size for p in shard_dir.glob("shard-*.codes")}
    assert len(records) == 2 * N_ITEMS and len(sizes) == 1  # equal-size shard files
    assert all(len(r["codes_sha256"]) == 64 for r in records)
    codes = _read_all(shard_dir)
    assert all(c.shape[1] == 25 for c in codes)


def test_a_segment_changed_in_place_is_named(shard_dir, tmp_path):
    path = _copy(shard_dir, tmp_path)
    file, off, n, rec = _segment(path, 3)
    data = bytearray(file.read_bytes())
    codes = np.frombuffer(bytes(data[off:off + n]), dtype=np.int16).copy()
    codes[5] = (codes[5] + 1) % 2048  # still a valid code
    data[off:off + n] = codes.tobytes()
    file.write_bytes(bytes(data))  # same size: only the digest can tell
    with pytest.raises(NoencoreError, match=rf"{file}: segment {rec['segment']} of item "
                       rf"'{rec['id']}': its bytes do not match the index's digest; the shard "
                       "was changed after precompute"):
        _read_all(path)


def test_swapped_shard_files_are_named(shard_dir, tmp_path):
    path = _copy(shard_dir, tmp_path)
    a, b = path / "shard-00000.codes", path / "shard-00001.codes"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(NoencoreError, match=rf"{a}: segment 0 of item 't0': its bytes do not "
                       "match"):
        _read_all(path)


def test_codes_out_of_range_are_named(shard_dir, tmp_path):
    path = _copy(shard_dir, tmp_path)
    file, off, n, rec = _segment(path, 6)
    data = bytearray(file.read_bytes())
    data[off:off + 2] = np.int16(5000).tobytes()
    file.write_bytes(bytes(data))
    with pytest.raises(NoencoreError, match=rf"{file}: segment {rec['segment']} of item "
                       rf"'{rec['id']}': codes outside \[0, 2048\) \(min \d+, max 5000\)"):
        _read_all(path)


def test_a_run_on_changed_shards_trains_nothing_and_records_no_request(shard_dir, tmp_path):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore import unlearn
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    path = _copy(shard_dir, tmp_path)
    model = load_musicgen("tiny", with_codec=False,
                          overrides={"transformer_lm": {"num_layers": 1}})
    build_condition_cache(path / "conditions", TokenShards(path).captions,
                          model.text_encoder, progress=False)
    file, off, n, _ = _segment(path, 1)  # a forget segment
    data = bytearray(file.read_bytes())
    data[off + 2:off + 4] = np.int16((np.frombuffer(data[off + 2:off + 4], np.int16)[0] + 7)
                                     % 2048).tobytes()
    file.write_bytes(bytes(data))
    with pytest.raises(NoencoreError, match="bytes do not match the index's digest"):
        unlearn(model, path, forget="forget", remain="remain", method="ga", steps=2,
                frames=25, batch_size=4, progress=False, device="cpu", backend="torch",
                out=tmp_path / "run")
    assert model.requests == [] and not (tmp_path / "run" / "model").exists()


def test_precompute_writes_only_into_a_directory_of_its_own(shard_dir, tmp_path):
    from noencore.data.precompute import precompute

    manifest = shard_dir.parent / "m.jsonl"
    opts = dict(codec="tiny", segment_seconds=0.5, batch_size=2, workers=0, progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    with pytest.raises(NoencoreError, match=f"{a_file}: exists and is not a directory"):
        precompute(manifest, a_file, **opts)
    assert a_file.read_text() == "keep"
    # shard files some other tool (or an older layout) wrote, with no header: left alone
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-00000.codes").write_bytes(b"\x01\x02" * 64)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NoencoreError, match=rf"{foreign}: holds shard-00000.codes but no "
                       r"header.json: not shards this tool wrote"):
        precompute(manifest, foreign, **opts)
    assert (foreign / "shard-00000.codes").read_bytes() == b"\x01\x02" * 64
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "shard-00000.codes"]
    # an index whose lines are not segment records: one line naming it, nothing written
    path = _copy(shard_dir, tmp_path)
    (path / "index.jsonl").write_text('{"name": "x"}\n')
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    with pytest.raises(NoencoreError, match=rf"{path / 'index.jsonl'}: line 1 is not a segment "
                       "record"):
        precompute(manifest, path, **opts)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    # a directory of its own: resumes (nothing to do)
    assert not precompute(manifest, _copy(shard_dir, tmp_path / "again"), **opts).changed


def test_an_id_list_holds_one_id_per_line_and_no_comment_syntax(shard_dir, tmp_path):
    from noencore.data.shards import TokenShards, read_ids

    ids = tmp_path / "ids.txt"
    ids.write_text("t0\n#t1\n\n  t2  \n")
    assert read_ids(ids) == ["t0", "#t1", "t2"]  # "#t1" is an id, not a comment
    with pytest.raises(NoencoreError, match=r"1 forget id\(s\) not in the shards: #t1"):
        from noencore.engine.sets import UnlearningSets

        UnlearningSets(TokenShards(shard_dir), read_ids(ids), None, frames=10)
    ids.write_text("\n \n")
    with pytest.raises(NoencoreError, match=f"{ids}: the id list is empty"):
        read_ids(ids)
    ids.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(NoencoreError, match=f"{ids}: unreadable id list"):
        read_ids(ids)
    with pytest.raises(NoencoreError, match="no such id list"):
        read_ids(tmp_path / "gone.txt")


def test_evaluate_refuses_a_track_in_the_forget_and_another_set(shard_dir):
    from noencore import evaluate
    from noencore.data.shards import TokenShards
    from noencore.errors import UsageError

    shards = TokenShards(shard_dir)
    for other in ("remain", "holdout"):
        sets = {"forget": shards.select(split="forget"), other: shards.select(ids=["t1", "t2"])}
        with pytest.raises(UsageError, match=rf"1 track\(s\) are in both the forget and the "
                           rf"{other} set \(e.g. 't1'\); make the sets disjoint"):
            evaluate("tiny", sets, metrics=["token"], progress=False)
