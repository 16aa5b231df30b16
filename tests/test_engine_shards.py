"""Token shards written directly from codes (for engine tests), and the run's sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from noencore.data import layout
from noencore.errors import NoencoreError


def write_shards(folder: Path, items: list[tuple[str, np.ndarray, str, str]],
                 codec: str = "tiny", n_q: int = 4, card: int = 2048,
                 frame_rate: int = 50) -> Path:
    """A finished token-shard folder holding ``items`` = (id, codes int [frames, n_q],
    caption, split), one segment each, in the format ``noencore.data.layout`` documents."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(folder / layout.HEADER, layout.jsonl_bytes(
        [layout.make_header(codec, 32000, frame_rate, n_q, card, 10.0)]).rstrip(b"\n"))
    records, offset, chunks = [], 0, []
    for ident, codes, caption, split in items:
        codes = np.ascontiguousarray(codes, dtype=np.int16)
        chunks.append(codes.tobytes())
        records.append({"id": ident, "segment": 0, "start_s": 0.0, "frames": codes.shape[0],
                        "shard": 0, "offset": offset, "caption": caption, "split": split,
                        "sha256": "", "source": f"{ident}.wav", "meta": {}})
        offset += codes.shape[0]
    layout.atomic_write(folder / layout.shard_name(0), b"".join(chunks))
    layout.atomic_write(folder / layout.INDEX, layout.jsonl_bytes(records))
    layout.atomic_write(folder / layout.FAILURES, b"")
    names = [layout.HEADER, layout.INDEX, layout.FAILURES, layout.shard_name(0)]
    files = {n: {"sha256": layout.sha256_file(folder / n), "size": (folder / n).stat().st_size}
             for n in names}
    layout.atomic_write(folder / layout.CHECKSUMS, layout.jsonl_bytes([{"files": files}]))
    return folder


def random_items(n_forget: int, n_remain: int, frames: int, seed: int = 0, card: int = 2048):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_forget):
        items.append((f"f{i}", rng.integers(0, card, (frames + i, 4)), f"forget song {i}",
                      "forget"))
    for i in range(n_remain):
        items.append((f"r{i}", rng.integers(0, card, (frames + 3 * i, 4)), f"remain piece {i}",
                      "remain"))
    return items


@pytest.fixture
def small_shards(tmp_path):
    from noencore.data.shards import TokenShards

    return TokenShards(write_shards(tmp_path / "shards", random_items(3, 7, 23)))


def test_sets_windows_cover_forget_and_respect_splits(small_shards):
    from noencore.engine.sets import UnlearningSets

    sets = UnlearningSets(small_shards, "forget", None, frames=10)
    # forget items have 23, 24, 25 frames -> 3 windows each
    assert sets.n_forget == 9
    assert set(sets.forget_item.tolist()) == {0, 1, 2}
    assert set(sets.remain_item.tolist()) == set(range(3, 10))
    n_f, n_r = sets.split_counts(5, 0.4)
    assert (n_f, n_r) == (2, 3)
    # a forget epoch visits every forget window once
    seen = []
    for step in range(9 // 2 + 1):
        f, u = sets.global_units(step, seed=3, n_f=n_f, n_r=n_r)
        assert f.tolist() == [True, True, False, False, False]
        seen += u[:2].tolist()
    assert sorted(seen[:9]) == list(range(9))
    # ranks split the same global batch, padded with empty rows
    full = sets.step_batch(4, 3, n_f, n_r)
    r0 = sets.step_batch(4, 3, n_f, n_r, rank=0, world_size=2)
    r1 = sets.step_batch(4, 3, n_f, n_r, rank=1, world_size=2)
    assert torch.equal(r0.codes[:3], full.codes[0::2]) and torch.equal(r1.codes[:2], full.codes[1::2])
    assert r1.unit[2] == -1 and not r1.mask[2].any()
    # the window codes are the shard's codes
    it, st = sets.forget_item[full.unit[0]], sets.forget_start[full.unit[0]]
    ref = small_shards.codes(int(it))[:, st:st + 10].long()
    assert torch.equal(full.codes[0, :, :ref.shape[1]], ref)
    assert full.mask[0, :, :ref.shape[1]].all() and not full.mask[0, :, ref.shape[1]:].any()


def test_held_remain_windows_are_flagged_on_every_rank(small_shards):
    """``hold(ids)`` flags the remain rows of those items (never a forget or an empty row),
    and each rank's share carries the flags of the one-process batch's rows."""
    from noencore.engine.sets import UnlearningSets

    sets = UnlearningSets(small_shards, "forget", None, frames=10)
    ids = small_shards.ids
    n_held = sets.hold(["r1", "r4"])
    assert n_held == sum(ids[i] in ("r1", "r4") for i in sets.remain_item.tolist()) > 0
    n_f, n_r = sets.split_counts(7, 0.3)
    seen = 0
    for step in range(12):
        full = sets.step_batch(step, 5, n_f, n_r)
        want = [not f and ids[int(sets.remain_item[u])] in ("r1", "r4")
                for f, u in zip(full.forget.tolist(), full.unit.tolist())]
        assert full.held.tolist() == want
        seen += sum(want)
        for rank in range(2):
            share = sets.step_batch(step, 5, n_f, n_r, rank=rank, world_size=2)
            real = share.row >= 0
            assert torch.equal(share.held[real], full.held[share.row[real]])
            assert not share.held[~real].any()
            assert torch.equal(share.select(slice(1, 3)).held, share.held[1:3])
    assert seen > 0  # the draw reached held rows
    sets.hold([])
    assert not sets.step_batch(3, 5, n_f, n_r).held.any()


def test_sets_bad_input(small_shards):
    from noencore.engine.sets import UnlearningSets

    with pytest.raises(NoencoreError, match="not in the shards.*nope"):
        UnlearningSets(small_shards, ["f0", "nope"], None, frames=10)
    with pytest.raises(NoencoreError, match="empty"):
        UnlearningSets(small_shards, [], None, frames=10)
    with pytest.raises(NoencoreError, match="split 'gone'"):
        UnlearningSets(small_shards, "gone", None, frames=10)
    with pytest.raises(NoencoreError, match="both"):
        UnlearningSets(small_shards, ["f0"], ["f0", "r1"], frames=10)


def test_one_forget_clip_and_thousands_of_remain_clips(tmp_path):
    from noencore.data.shards import TokenShards
    from noencore.engine.sets import UnlearningSets

    rng = np.random.default_rng(0)
    items = [("f0", rng.integers(0, 2048, (6, 4)), "forget song 0", "forget")]
    items += [(f"r{i}", rng.integers(0, 2048, (6, 4)), f"remain {i}", "remain")
              for i in range(3000)]
    shards = TokenShards(write_shards(tmp_path / "s", items))
    sets = UnlearningSets(shards, ["f0"], "remain", frames=8)
    assert sets.n_forget == 1 and sets.n_remain == 3000
    n_f, n_r = sets.split_counts(8, 0.25)
    b = sets.step_batch(7, 0, n_f, n_r)
    assert b.forget.tolist() == [True, True] + [False] * 6
    assert (b.unit[:2] == 0).all() and b.captions[0] == "forget song 0"
    assert len(set(b.unit[2:].tolist())) > 1  # remain rows drawn from the large pool


def conditioned_shards(folder: Path, items: list, overrides: dict | None = None):
    """``write_shards`` plus the text-condition cache of the tiny model's encoder: what
    ``noencore.unlearn`` needs. Returns the ``TokenShards``."""
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    shards = TokenShards(write_shards(folder, items))
    encoder = load_musicgen("tiny", with_codec=False, overrides=overrides).text_encoder
    build_condition_cache(Path(folder) / "conditions", shards.captions, encoder, progress=False)
    return shards


def prepared_trainer(model, shards, **options):
    """A trainer of ``options`` (``UnlearnConfig``'s) run through ``compute_references``:
    the phases before the first step."""
    from noencore.engine.config import UnlearnConfig
    from noencore.engine.loop import Trainer

    run = Trainer(model, shards, UnlearnConfig().replace(**options), progress=False)
    run.check_options()
    run.resolve_devices()
    run.build_sets()
    run.setup_optimizer()
    run.compute_references()
    return run


def two_ranks_beside(cmd: list[str], work: Path, one_process, *, env: dict, cwd: Path,
                     timeout: float = 540) -> tuple:
    """Start ``cmd`` (a 2-rank launch whose driver writes ``work/result_rank{r}.json``),
    run ``one_process()`` meanwhile, and return ``(one_process's result, [rank 0's, rank
    1's result], launcher stdout, stderr)``; the test fails with the launcher's stderr
    when a rank wrote no result."""
    import json
    import subprocess

    launch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=cwd)
    try:
        one = one_process()
        out, err = launch.communicate(timeout=timeout)
    finally:
        launch.kill()
    results = [work / f"result_rank{r}.json" for r in (0, 1)]
    if not all(p.exists() for p in results):
        pytest.fail(f"2-rank run failed (rc {launch.returncode}):\n{err[-4000:]}")
    return one, [json.loads(p.read_text()) for p in results], out, err


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(driver: str, args: list[str], out: Path, *, timeout: float = 900,
                  env: dict[str, str] | None = None) -> None:
    """Run ``driver`` (a script that spawns 2 gloo ranks and writes ``out/DONE`` once they
    finished) as ``out/driver.py PORT *args`` from the repository root, on the CPU with one
    OpenMP thread per rank (and ``env`` on top); fails the test with the end of its stderr
    unless DONE was written (an abort *after* the results is tolerated)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = out / "driver.py"  # a file: spawned ranks re-import it
    script.write_text(driver)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "TORCH_EXTENSIONS_DIR": os.environ.get(
                    "TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions")),
                **(env or {})}
    proc = subprocess.run([sys.executable, str(script), str(free_port()), *args],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=root)
    if not (out / "DONE").exists():
        pytest.fail(f"2 ranks failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
