"""precompute: failures report, strict mode, idempotence, adding items, SIGKILL + resume."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data_corpus import (
    BROKEN,
    GOOD,
    make_corpus,
    one_torch_thread,  # noqa: F401 (autouse fixture)
)

from noencore.cli import main as cli_main
from noencore.data import layout
from noencore.data.precompute import precompute
from noencore.data.shards import TokenShards
from noencore.errors import NoencoreError

OPTS = dict(codec="tiny", segment_seconds=0.5, batch_size=2, progress=False)




def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a shard directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pc")
    manifest = make_corpus(folder)
    ref = folder / "ref"
    report = precompute(manifest, ref, workers=0, **OPTS)
    return folder, manifest, ref, report


def test_failures_report_names_exactly_the_broken_items(corpus):
    folder, manifest, ref, report = corpus
    assert report.encoded == len(GOOD) and report.changed
    recs = [json.loads(x) for x in (ref / layout.FAILURES).read_text().splitlines()]
    assert recs == report.failures
    n = len(GOOD) + len(BROKEN)
    assert {r["id"] for r in recs if r["id"] in BROKEN} == set(BROKEN)
    by_line = {r["line"]: r for r in recs}
    assert set(by_line) == set(range(len(GOOD) + 1, n + 4))
    assert "duplicate id" in by_line[n + 1]["reason"] and by_line[n + 1]["id"] == "song0"
    assert "not valid JSON" in by_line[n + 2]["reason"]
    shards = TokenShards(ref, verify=True)
    assert sorted(set(shards.ids)) == [f"song{i}" for i in range(len(GOOD))]
    assert snapshot(ref).keys() == {layout.HEADER, layout.INDEX, layout.FAILURES,
                                    layout.CHECKSUMS, layout.shard_name(0)}


def test_rerun_on_a_finished_directory_changes_nothing(corpus, tmp_path):
    _, manifest, ref, _ = corpus
    out = tmp_path / "again"
    shutil.copytree(ref, out)
    before = snapshot(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    report = precompute(manifest, out, workers=0, **OPTS)
    assert not report.changed and report.encoded == 0 and report.skipped == len(GOOD)
    assert snapshot(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_workers_give_the_same_bytes(corpus, tmp_path):
    _, manifest, ref, _ = corpus
    precompute(manifest, tmp_path / "w", workers=2, **OPTS)
    assert snapshot(tmp_path / "w") == snapshot(ref)


def test_strict_fails_with_exit_code_1(corpus, tmp_path, capsys):
    _, manifest, _, _ = corpus
    args = ["precompute", str(manifest), str(tmp_path / "s"), "--codec", "tiny",
            "--segment-seconds", "0.5", "--workers", "0", "--strict", "--quiet"]
    assert cli_main(args) == 1
    assert "(--strict)" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line for line in manifest.read_text().splitlines(True)
                            if '"song' in line and "dup" not in line).replace(
        '"path": "', f'"path": "{manifest.parent}/'))
    assert cli_main(args[:1] + [str(good)] + args[2:]) == 0


def test_other_options_on_an_existing_directory_are_refused(corpus, tmp_path):
    _, manifest, ref, _ = corpus
    with pytest.raises(NoencoreError, match="--codec tiny --segment-seconds 0.5"):
        precompute(manifest, ref, **{**OPTS, "segment_seconds": 1.0})


def test_adding_items_encodes_only_the_new_ones(corpus, tmp_path):
    folder, _, ref, _ = corpus
    grown = make_corpus(tmp_path / "grown", extra=3)  # same files, 3 items appended
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    old = (ref / layout.shard_name(0)).read_bytes()
    report = precompute(grown, out, workers=0, **OPTS)
    assert report.encoded == 3 and report.skipped == len(GOOD)
    shards = TokenShards(out, verify=True)
    assert set(shards.ids) == {f"song{i}" for i in range(len(GOOD))} | {"extra0", "extra1",
                                                                        "extra2"}
    assert (out / layout.shard_name(0)).read_bytes()[:len(old)] == old  # old codes untouched
    assert len(shards.select(split="holdout").ids) == 2 + 2 + 3  # 0.7/1.0/1.3 s in 0.5 s parts


def _killed_run(manifest, out, fault, workers=0):
    """Run precompute in a child process that SIGKILLs itself at ``fault``."""
    def child():
        # The parent's OpenMP thread pool does not survive fork: stay on one thread.
        torch.set_num_threads(1)
        os.environ["NOENCORE_FAULT"] = fault
        precompute(manifest, out, workers=workers, **OPTS)
    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL, f"fault {fault} was not reached"


@pytest.mark.parametrize("fault", ["data-written:1", "committed:1", "data-written:2",
                                   "index-written:1"])
def test_sigkill_then_resume_gives_identical_bytes(corpus, tmp_path, fault):
    _, manifest, ref, _ = corpus
    out = tmp_path / "k"
    _killed_run(manifest, out, fault, workers=1 if fault == "committed:1" else 0)
    with pytest.raises(NoencoreError, match="unfinished"):
        TokenShards(out)  # an interrupted directory is never read as valid
    report = precompute(manifest, out, workers=0, **OPTS)
    assert report.changed and report.encoded < len(GOOD) or fault == "data-written:1"
    assert snapshot(out) == snapshot(ref)


def test_sigkill_while_adding_items_then_resume(corpus, tmp_path):
    _, _, ref, _ = corpus
    grown = make_corpus(tmp_path / "grown", extra=3)
    want = tmp_path / "want"
    shutil.copytree(ref, want)
    precompute(grown, want, workers=0, **OPTS)
    for fault in ("unfinished:1", "committed:1"):
        out = tmp_path / fault.replace(":", "")
        shutil.copytree(ref, out)
        _killed_run(grown, out, fault)
        precompute(grown, out, workers=0, **OPTS)
        assert snapshot(out) == snapshot(want), fault


@pytest.mark.slow
def test_cli_killed_at_random_moments_resumes_to_identical_bytes(corpus, tmp_path):
    """The real command in a subprocess, SIGKILLed after a few delays (timing-dependent)."""
    _, manifest, ref, _ = corpus
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "noencore", "precompute", str(manifest), str(out), "--codec",
           "tiny", "--segment-seconds", "0.5", "--batch-size", "2", "--workers", "1", "--quiet"]
    # the reference was encoded with one torch thread (``one_torch_thread``); with another
    # count the convolutions' sums run in another order, and on some CPUs (AVX2 without
    # AVX-512) a code at a near-tie flips: the resumed run must match the same settings
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for delay in (6.0, 8.0, 9.0):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert snapshot(out) == snapshot(ref)
