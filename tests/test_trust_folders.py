"""Output folders: one writer at a time (a second job is refused at once, a crashed job's
lock is recovered), and the tool removes only files it listed as its own."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from noencore.errors import NoencoreError
from noencore.outputs import LISTING, LOCK, claim


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_job_at_a_time_and_a_crashed_jobs_lock_is_recovered(tmp_path):
    out = tmp_path / "run"
    with claim(out, "unlearn"):
        assert json.loads((out / LOCK).read_text())["kind"] == "unlearn"
        with pytest.raises(NoencoreError, match=rf"{out}: another noencore unlearn is writing "
                           rf"here \(pid {os.getpid()} on {socket.gethostname()}"):
            claim(out, "unlearn", resume=True).__enter__()
        assert (out / LOCK).exists()  # the refused claim left the holder's lock alone
    assert not (out / LOCK).exists()
    (out / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                        "kind": "unlearn", "started": "then"}))
    with claim(out, "unlearn", resume=True):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "kind": "evaluate",
                                        "started": "then"}))
    with pytest.raises(NoencoreError, match=rf"pid 1 on elsewhere.*remove {out / LOCK} once"):
        claim(out, "unlearn", resume=True).__enter__()


def test_only_listed_files_are_ever_removed(tmp_path):
    out = tmp_path / "run"
    with claim(out, "unlearn") as run:
        (out / "model").mkdir()
        (out / "model" / "weights.bin").write_bytes(b"w")
        (out / "metrics.jsonl").write_text("{}\n")
        run.wrote(out / "model", out / "metrics.jsonl")
    assert json.loads((out / LISTING).read_text())["files"] == ["metrics.jsonl",
                                                                "model/weights.bin"]
    with pytest.raises(NoencoreError, match="holds an earlier unlearn run; continue it with "
                       "--resume, replace it with --overwrite"):
        claim(out, "unlearn").__enter__()
    with pytest.raises(NoencoreError, match="holds a noencore unlearn job's files, not a "
                       "evaluate's"):
        claim(out, "evaluate", overwrite=True).__enter__()
    with claim(out, "unlearn", resume=True) as run:
        assert (out / "model" / "weights.bin").exists() and len(run.files) == 2
    # a file someone else put there: refused whatever the flags, nothing removed
    (out / "notes.txt").write_text("mine")
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(NoencoreError, match=r"holds files this tool did not write "
                           r"\(notes.txt\)"):
            claim(out, "unlearn", **flags).__enter__()
    assert (out / "model" / "weights.bin").exists() and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    with claim(out, "unlearn", overwrite=True) as run:
        assert sorted(p.name for p in out.iterdir()) == [LISTING, LOCK]
        assert run.files == []
    # a listing that names a file outside the folder is refused, and the file kept
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    (out / "x").write_text("")  # something in the folder, so the listing is read
    (out / LISTING).write_text(json.dumps({"kind": "unlearn", "files": ["../keep.txt", "x"]}))
    with pytest.raises(NoencoreError, match="lists '../keep.txt', outside the folder"):
        claim(out, "unlearn", overwrite=True).__enter__()
    assert outside.read_text() == "keep"


def test_a_folder_of_someone_elses_files_or_a_file_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"x")
    with pytest.raises(NoencoreError, match=r"holds files this tool did not write "
                       r"\(model.safetensors\)"):
        claim(theirs, "unlearn", overwrite=True).__enter__()
    assert sorted(p.name for p in theirs.iterdir()) == ["model.safetensors"]  # no lock left
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NoencoreError, match="exists and is not a folder"):
        claim(a_file, "demo").__enter__()
    with claim(tmp_path / "empty_then_used", "demo"):
        pass
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LISTING).write_text("[1, 2]")
    (tmp_path / "bad" / "y").write_text("")
    with pytest.raises(NoencoreError, match="not a list of this tool's files"):
        claim(tmp_path / "bad", "demo").__enter__()


def test_a_job_killed_midway_leaves_a_folder_its_resume_recognises(tmp_path):
    out = tmp_path / "run"
    folder = claim(out, "unlearn").__enter__()
    folder.own(["checkpoints", "config.json"])
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "state.pt").write_bytes(b"s")
    (out / "config.json").write_text("{}")
    (out / LOCK).unlink()  # killed: no release, no final listing, and its pid is gone
    with claim(out, "unlearn", resume=True):
        assert (out / "checkpoints" / "step-1" / "state.pt").exists()
    with claim(out, "unlearn", overwrite=True):  # the declared folder goes as a whole
        assert sorted(p.name for p in out.iterdir()) == [LISTING, LOCK]


def test_unlearn_claims_its_run_folder(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine_shards import conditioned_shards, random_items

    from noencore import unlearn
    from noencore.errors import UsageError
    from noencore.models import load_musicgen

    overrides = {"transformer_lm": {"num_layers": 1}}
    shards = conditioned_shards(tmp_path / "shards", random_items(2, 3, 12), overrides)

    def run(out, **kw):
        return unlearn(load_musicgen("tiny", with_codec=False, overrides=overrides), shards,
                       **{"forget": "forget", "method": "ga", "steps": 1, "batch_size": 2,
                          "frames": 8, "progress": False, "device": "cpu", "backend": "torch",
                          "out": out, **kw})

    out = tmp_path / "run"
    first = run(out)
    assert (first.model_dir / "model.safetensors").exists() and not (out / LOCK).exists()
    listed = set(json.loads((out / LISTING).read_text())["files"])
    assert {"config.json", "metrics.jsonl", "model/model.safetensors"} <= listed
    with pytest.raises(UsageError, match="holds an earlier unlearn run; continue it with "
                       "--resume, replace it with --overwrite"):
        run(out)
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "kind": "unlearn", "started": "now"}))
    with pytest.raises(UsageError, match="another noencore unlearn is writing here"):
        run(out, overwrite=True)
    (out / LOCK).unlink()
    assert run(out, overwrite=True).steps == 1
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"w")
    with pytest.raises(UsageError, match=r"holds files this tool did not write \(weights.bin\)"):
        run(theirs, overwrite=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["weights.bin"]
    with pytest.raises(UsageError, match="give one of them"):
        run(out, resume=True, overwrite=True)
    # a request is recorded only once training changed the model
    with pytest.raises(UsageError, match="steps 0 trains nothing.*--steps 1 or more"):
        run(tmp_path / "zero", steps=0)
    assert not (tmp_path / "zero").exists()


def test_the_demo_takes_only_a_new_or_empty_folder_or_its_own(tmp_path):
    from noencore.demo.pipeline import run_demo

    theirs = tmp_path / "theirs"
    (theirs / "corpus").mkdir(parents=True)
    (theirs / "corpus" / "my_song.wav").write_bytes(b"RIFF")
    with pytest.raises(NoencoreError, match=r"holds files this tool did not write \(corpus\)"):
        run_demo(theirs)
    assert (theirs / "corpus" / "my_song.wav").read_bytes() == b"RIFF"  # left intact
    # the demo's own folder: everything in it is its own on the next claim
    out = tmp_path / "demo"
    with claim(out, "demo", resume=True, whole=True):
        (out / "corpus").mkdir()
        (out / "corpus" / "a.wav").write_bytes(b"x")
    with claim(out, "demo", resume=True, whole=True):
        assert (out / "corpus" / "a.wav").exists()
    with pytest.raises(NoencoreError, match="holds a noencore demo job's files"):
        claim(out, "unlearn", overwrite=True).__enter__()


def test_options_are_checked_for_type_and_range_from_the_one_table():
    from noencore.engine.config import UnlearnConfig
    from noencore.errors import UsageError

    UnlearnConfig().check()  # the defaults pass
    bad = {"steps": ("5", r"option steps \(--steps\): '5' is not a whole number"),
           "lr": (float("inf"), r"option lr \(--lr\): inf is not a finite number"),
           "target_forget_nll": (float("nan"), r"\(--target-forget-nll\): nan is not a finite"),
           "checkpoint_every": (-1, r"\(--checkpoint-every\): -1; it must be >= 0"),
           "stop_auc": (1.5, r"\(--stop-auc\): 1.5; it must be in \[0, 1\]"),
           "resume": ("yes", r"\(--resume\): 'yes' is not true or false"),
           "batch_size": (True, r"\(--batch-size\): True is not a whole number")}
    for name, (value, message) in bad.items():
        with pytest.raises(UsageError, match=message):
            UnlearnConfig().replace(**{name: value}).check()
    UnlearnConfig().replace(lr=1, grad_clip=None, zero_stage=2).check()  # an int is a number


def _tiny_run_setup(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_engine_shards import conditioned_shards, random_items

    overrides = {"transformer_lm": {"num_layers": 1}}
    return overrides, conditioned_shards(tmp_path / "shards", random_items(2, 3, 12), overrides)


def test_an_output_is_never_an_input_nor_inside_or_around_one(tmp_path):
    from noencore import unlearn
    from noencore.errors import UsageError
    from noencore.models import load_musicgen, save_musicgen

    overrides, shards = _tiny_run_setup(tmp_path)
    model_dir = tmp_path / "base" / "model"
    save_musicgen(load_musicgen("tiny", overrides=overrides), model_dir)
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    kw = dict(forget="forget", method="ga", steps=1, batch_size=2, frames=8, progress=False,
              device="cpu", backend="torch")
    cases = {model_dir: "is the model", model_dir / "run": "lies inside the model",
             tmp_path / "base": "holds the model", shards.path: "is the token shards",
             shards.path / "conditions" / "run": "lies inside the token shards"}
    for out, how in cases.items():
        with pytest.raises(UsageError, match=rf"{out}: the output folder {how} \("):
            unlearn(str(model_dir), shards, out=out, **kw)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    assert not (model_dir / "run").exists() and not (shards.path / "conditions" / "run").exists()
    from noencore import evaluate

    with pytest.raises(UsageError, match=rf"{tmp_path / 'base'}: the output folder holds the "
                       "model"):
        evaluate(str(model_dir), {"forget": shards.select(split="forget")}, metrics=["token"],
                 progress=False, out=tmp_path / "base")


def test_evaluate_claims_its_folder(tmp_path):
    from noencore import evaluate
    from noencore.errors import UsageError
    from noencore.models import load_musicgen

    overrides, shards = _tiny_run_setup(tmp_path)
    model = load_musicgen("tiny", with_codec=False, overrides=overrides)
    sets = {"forget": shards.select(split="forget")}
    out = tmp_path / "eval"

    def run(**kw):
        return evaluate(model, sets, metrics=["token"], progress=False, out=out, **kw)

    run()
    listed = set(json.loads((out / LISTING).read_text())["files"])
    assert {"report.json", "report.md", "token_stats.npz"} <= listed
    assert not (out / LOCK).exists()
    with pytest.raises(UsageError, match="holds an earlier evaluate run; .* replace it with "
                       "--overwrite"):
        run()
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "kind": "evaluate", "started": "now"}))
    with pytest.raises(UsageError, match="another noencore evaluate is writing here"):
        run(overwrite=True)
    (out / LOCK).unlink()
    (out / "report.json").write_text("old")
    run(overwrite=True)
    assert json.loads((out / "report.json").read_text())["metrics"] == ["token"]
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match=r"holds files this tool did not write \(mine.txt\)"):
        run(overwrite=True)
    assert (out / "mine.txt").read_text() == "keep"


def test_evaluate_options_are_checked():
    from noencore.errors import UsageError
    from noencore.evaluation.config import EvalConfig

    EvalConfig().check()
    bad = {"batch_size": (0, r"option batch_size \(--batch-size\): 0; it must be a whole "
                             "number >= 1"),
           "frames": ("8", r"option frames \(--frames\): '8'"),
           "relearn_lr": (float("nan"), r"option relearn_lr \(--relearn-lr\): nan"),
           "min_auc_items": (2.5, r"option min_auc_items \(--min-auc-items\): 2.5"),
           "precision": ("fp16", r"option precision \(--precision\): 'fp16'; it must be bf16"),
           "metrics": ("token", r"option metrics \(--metrics\): 'token'; it must be a list")}
    for name, (value, message) in bad.items():
        with pytest.raises(UsageError, match=message):
            EvalConfig().replace(**{name: value}).check()


def test_the_condition_cache_is_locked_while_written(tmp_path):
    from noencore.models import build_condition_cache
    from noencore.models.text import tiny_t5_folder

    enc = str(tiny_t5_folder())
    folder = tmp_path / "conditions"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "kind": "condition", "started": "now"}))
    with pytest.raises(NoencoreError, match=rf"{folder}: another noencore condition is "
                       "writing here"):
        build_condition_cache(folder, ["a tune"], enc, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK]
    (folder / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                           "kind": "condition", "started": "then"}))
    cache = build_condition_cache(folder, ["a tune"], enc, progress=False)
    assert cache.get("a tune") is not None and not (folder / LOCK).exists()
    (folder / "index.json").write_text('{"not": "ours"}')
    with pytest.raises(NoencoreError, match=rf"{folder / 'index.json'}: not a noencore "
                       "text-condition cache index"):
        build_condition_cache(folder, ["b"], enc, progress=False)
