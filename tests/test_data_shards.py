"""TokenShards and iter_batches, checked against a plain re-encoding of the corpus."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_data_corpus import (
    GOOD,
    make_corpus,
    one_torch_thread,  # noqa: F401 (autouse fixture)
)

from noencore.cli import main as cli_main
from noencore.data import layout
from noencore.data.audio import decode_file
from noencore.data.batches import iter_batches, windows
from noencore.data.codec import load_codec
from noencore.data.precompute import precompute
from noencore.data.shards import TokenShards
from noencore.errors import NoencoreError

SEG = 0.5  # seconds: several segments per file, and a short tail for most


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    manifest = make_corpus(folder)
    out = folder / "out"
    precompute(manifest, out, codec="tiny", segment_seconds=SEG, batch_size=3, workers=0,
               progress=False)
    return folder, out


@pytest.fixture(scope="module")
def shards(built):
    return TokenShards(built[1], verify=True)


def test_codes_equal_a_plain_reencoding(built, shards):
    folder, _ = built
    codec = load_codec("tiny")
    seg = int(SEG * 32000)
    row = total = total_same = 0
    for i, (name, *_rest) in enumerate(GOOD):
        wav = decode_file(folder / name, 32000, 640).wav
        starts = [s for s in range(0, len(wav), seg) if s == 0 or len(wav) - s >= 640]
        for k, s in enumerate(starts):
            piece = torch.from_numpy(wav[s:s + seg].copy())
            # precompute pads a short segment to whole seconds, capped at a full segment
            frames = min(-(-piece.numel() // 32000) * 50, int(SEG * 50))
            padded = torch.nn.functional.pad(piece, (0, frames * 640 - piece.numel()))
            want = codec.encode(padded.view(1, 1, -1))[0][:, :-(-piece.numel() // 640)]
            item = shards.item(row)
            assert (item.id, item.segment, item.start_s) == (f"song{i}", k, pytest.approx(k * SEG))
            assert item.caption == f"song number {i}" and item.meta == {"artist": f"artist{i % 2}"}
            got = shards.codes(row)
            assert got.dtype == torch.int16 and got.shape == want.shape == (4, item.frames)
            # Batched vs alone differ only in float rounding: a rare near-tie code may flip.
            agree = (got.long() == want).float().mean().item()
            assert agree >= 0.95, (name, k, agree)
            total_same += int((got.long() == want).sum())
            total += want.numel()
            row += 1
    assert row == len(shards)
    assert total_same / total > 0.99


def test_codes_are_a_zero_copy_view_of_the_memory_map(shards):
    store = shards._store
    for i in (0, len(shards) - 1):
        c = shards.codes(i)
        base = store.maps[int(store.shard[i])]
        expect = base.ctypes.data + int(store.offsets[i]) * 4 * 2
        assert c.data_ptr() == expect and c.stride() == (1, 4)


def test_lists_select_and_header(shards):
    h = shards.header
    assert (h.codec, h.sample_rate, h.frame_rate, h.n_q, h.card, h.segment_seconds) == (
        "tiny", 32000, 50, 4, 2048, SEG)
    assert len(shards.ids) == len(shards.captions) == len(shards.splits) == len(shards)
    forget = shards.select(split="forget")
    assert set(forget.ids) == {"song0", "song1"} and set(forget.splits) == {"forget"}
    both = shards.select(split=["forget", "remain"])
    assert len(both) == len(shards)
    opt_out = shards.select(ids=["song3", "song1"])
    assert set(opt_out.ids) == {"song1", "song3"}
    assert opt_out.ids.count("song3") == shards.ids.count("song3")
    # a view of a view keeps pointing at the same bytes
    sub = opt_out.select(ids=["song3"])
    j = shards.ids.index("song3")
    assert torch.equal(sub.codes(0), shards.codes(j))
    with pytest.raises(NoencoreError, match="not in the shards .*nobody"):
        shards.select(ids=["song1", "nobody"])
    assert len(shards.select(ids=["nobody"], missing="ignore")) == 0
    assert shards.hours == pytest.approx(shards.frames.sum() / 50 / 3600)
    with pytest.raises(IndexError):
        shards.codes(len(shards))


def _damaged(built, tmp_path, how):
    out = tmp_path / "copy"
    shutil.copytree(built[1], out)
    how(out)
    return out


def test_refuses_truncated_corrupted_unfinished_and_other_versions(built, tmp_path):
    shard = layout.shard_name(0)

    def truncate(out):
        f = out / shard
        f.write_bytes(f.read_bytes()[:-8])
    out = _damaged(built, tmp_path / "t", truncate)
    with pytest.raises(NoencoreError, match=f"{shard}.*truncated or modified.*re-run"):
        TokenShards(out)

    def flip(out):
        f = out / shard
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    out = _damaged(built, tmp_path / "f", flip)
    TokenShards(out)  # sizes still match: only the full check can see it
    with pytest.raises(NoencoreError, match=f"{shard}: wrong sha256"):
        TokenShards(out, verify=True)
    assert cli_main(["verify", str(out)]) == 1

    out = _damaged(built, tmp_path / "u", lambda o: (o / layout.CHECKSUMS).unlink())
    with pytest.raises(NoencoreError, match="unfinished.*re-run the same"):
        TokenShards(out)

    def index(out):
        f = out / layout.INDEX
        f.write_text(f.read_text().replace('"frames": 25', '"frames": 26', 1))
    out = _damaged(built, tmp_path / "i", index)
    with pytest.raises(NoencoreError, match="index.jsonl"):
        TokenShards(out)

    def version(out):  # a consistent directory of another format version
        head = json.loads((out / layout.HEADER).read_text())
        head["format_version"] = 99
        (out / layout.HEADER).write_text(json.dumps(head))
        sums = json.loads((out / layout.CHECKSUMS).read_text())
        sums["files"][layout.HEADER] = {"sha256": layout.sha256_file(out / layout.HEADER),
                                        "size": (out / layout.HEADER).stat().st_size}
        (out / layout.CHECKSUMS).write_text(json.dumps(sums))
    out = _damaged(built, tmp_path / "v", version)
    with pytest.raises(NoencoreError, match="format version 99.*re-run `noencore precompute`"):
        TokenShards(out)


def test_info_and_verify_commands(built, capsys):
    assert cli_main(["verify", str(built[1])]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["info", str(built[1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 5 and info["splits"]["forget"]["items"] == 2
    assert info["failures"] == 12 and {f["id"] for f in info["failed"]} >= {"b_garbage", "b_nan"}
    assert cli_main(["info", str(built[1])]) == 0
    text = capsys.readouterr().out
    assert "split remain: 3 items" in text and "b_empty: empty file" in text


def _reference_windows(shards, frames):
    """Plain loop: every (item, start) window and its codes, item-major."""
    out = []
    for i in range(len(shards)):
        c = shards.codes(i)
        for s in range(0, max(1, c.shape[1]), frames):
            out.append((i, s, c[:, s:s + frames].long()))
    return out


@pytest.mark.parametrize("frames,batch,world", [(7, 4, 1), (25, 3, 3), (40, 5, 2)])
def test_batches_match_a_plain_reference(shards, frames, batch, world):
    ref = {(i, s): c for i, s, c in _reference_windows(shards, frames)}
    item, start = windows(shards, frames)
    assert sorted(zip(item.tolist(), start.tolist())) == sorted(ref)
    seen = []
    counts = []
    for rank in range(world):
        n = 0
        for b in iter_batches(shards, batch, frames, seed=3, rank=rank, world_size=world):
            n += 1
            assert b.codes.dtype == torch.long and b.mask.dtype == torch.bool
            assert b.codes.shape == b.mask.shape == (len(b), 4, frames)
            for r in range(len(b)):
                i, s = int(b.index[r]), int(b.start[r])
                if i < 0:  # an empty row that evens out the ranks
                    assert not b.mask[r].any() and b.captions[r] == ""
                    continue
                want = ref[(i, s)]
                m = want.shape[1]
                assert torch.equal(b.codes[r, :, :m], want)
                assert b.mask[r, :, :m].all() and not b.mask[r, :, m:].any()
                assert not b.codes[r, :, m:].any()
                assert b.captions[r] == shards.captions[i]
                seen.append((i, s))
        counts.append(n)
    assert len(set(counts)) == 1  # ranks take the same number of steps
    assert sorted(seen) == sorted(ref)  # disjoint ranks, every window once


def test_batch_order_is_seeded_and_drop_last(shards):
    def order(seed, **kw):
        return [(int(i), int(s)) for b in iter_batches(shards, 4, 20, seed=seed, **kw)
                for i, s in zip(b.index, b.start)]
    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))
    plain = order(0, shuffle=False)
    assert plain == sorted(plain)
    n = len(windows(shards, 20)[0])
    kept = [order(0, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert all(len(k) == (n // 3) // 4 * 4 for k in kept)
    assert all(i >= 0 for k in kept for i, _ in k)
    assert len({w for k in kept for w in k}) == sum(len(k) for k in kept)


def test_batch_to_device_keeps_fields(shards):
    b = next(iter_batches(shards, 2, 10, seed=0))
    c = b.to("cpu")
    assert torch.equal(c.codes, b.codes) and torch.equal(c.mask, b.mask)
    assert c.captions == b.captions and torch.equal(c.index, b.index)
    assert isinstance(np.asarray(c.start), np.ndarray)
