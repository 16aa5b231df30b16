"""``--report-to tensorboard,wandb,csv``: each tracker's files, read back with its own
reader, hold the run's numbers (unlearn: every step's metrics as metrics.jsonl has them,
the stop rule's checks, the loss plot; evaluate: the report's numbers, the goal table);
on 2 gloo ranks only rank 0 writes; a missing library names the extra to install; and the
progress bars: none with --quiet, plain lines where stderr is not a terminal."""
from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, free_port, random_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REMAIN, NONMEMBERS = ["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]
# a small step: the stop rule (AUC <= 0) checks after steps 1 and 2 and never stops the run
RUN = dict(forget="forget", remain=REMAIN, method="ga", steps=3, lr=1e-6, batch_size=4,
           frames=12, seed=0, backend="torch", device="cpu", log_every=1)


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


@pytest.fixture
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    return conditioned_shards(tmp_path / "shards", random_items(4, 8, 16))


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(folder.glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: one event file
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _wandb_history(out: Path) -> dict[str, dict[int, float]]:
    """name -> {step: value} of the one offline wandb run under ``out``, read from its
    ``.wandb`` file (a LevelDB-style log of wandb's protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    (path,) = runs[0].glob("run-*.wandb")
    data, pos, part, history = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a block's last 6 bytes
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last fragment
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item}
                for key, value in items.items():
                    history.setdefault(key, {})[int(items["_step"])] = value
    return history


def _csv_rows(path: Path) -> dict[str, dict[int, float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["name"], {})[int(r["step"])] = float(r["value"])
    return out


def _f32(x: float) -> float:
    return float(np.float32(x))


def test_unlearn_reports_to_tensorboard_wandb_and_csv(shards, tmp_path, wandb_offline):
    from noencore import unlearn

    out = tmp_path / "run"
    res = unlearn("tiny", shards, **RUN, stop_nonmembers=NONMEMBERS, stop_auc=0.0,
                  out=out, progress=False, report_to="tensorboard,wandb,csv")
    assert res.steps == 3 and res.stopped == "max_steps"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("forget_nll", "remain_nll", "objective", "grad_norm", "tokens_per_s")
    want = {f"train/{k}": {r["step"]: r[k] for r in recs} for k in keys}
    assert all(len(v) == 3 for v in want.values())

    acc = _tensorboard(out / "trackers" / "tensorboard")
    for tag, values in want.items():
        assert {e.step: e.value for e in acc.Scalars(tag)} == \
            {s: _f32(v) for s, v in values.items()}, tag
    auc = {e.step: e.value for e in acc.Scalars("stop/auc")}
    assert sorted(auc) == [1, 2] and all(0 <= a <= 1 for a in auc.values())
    assert "train/losses" in acc.Tags()["images"]  # the loss plot
    assert any(t.startswith("unlearn/summary") for t in acc.Tags()["tensors"])  # its table

    history = _wandb_history(out / "trackers")
    for tag, values in want.items():
        assert history[tag] == values, tag  # exact: wandb keeps the float64
    assert sorted(history["stop/auc"]) == [1, 2]
    assert {s: _f32(v) for s, v in history["stop/auc"].items()} == auc
    assert {"train/losses/_type", "unlearn/summary/_type"} <= set(history)  # image, table

    rows = _csv_rows(out / "trackers" / "metrics.csv")
    for tag, values in want.items():
        assert rows[tag] == values, tag
    assert rows["stop/auc"].keys() == auc.keys()
    with open(out / "trackers" / "unlearn_summary.csv", newline="") as fh:
        (summary,) = list(csv.DictReader(fh))
    assert summary["steps"] == "3" and summary["stopped"] == "max_steps"
    config = json.loads((out / "config.json").read_text())
    assert config["report_to"] == ["tensorboard", "wandb", "csv"]
    assert "trackers" in json.loads((out / ".noencore-run.json").read_text())["files"]

    # the trackers' files are the run's: --overwrite replaces them with the new run's
    unlearn("tiny", shards, **{**RUN, "steps": 1}, out=out, overwrite=True, progress=False,
            report_to="tensorboard,wandb,csv")
    assert [e.step for e in _tensorboard(out / "trackers" / "tensorboard")
            .Scalars("train/forget_nll")] == [1]
    assert sorted(_wandb_history(out / "trackers")["train/forget_nll"]) == [1]
    assert sorted(_csv_rows(out / "trackers" / "metrics.csv")["train/forget_nll"]) == [1]


def test_evaluate_reports_its_numbers_goals_and_plots(shards, tmp_path, wandb_offline):
    from noencore import evaluate

    out = tmp_path / "eval"
    sets = {"forget": shards.select(split="forget"),
            "holdout": shards.select(ids=NONMEMBERS)}
    rep = evaluate("tiny", sets, out=out, metrics=["token", "mia"], batch_size=4,
                   min_auc_items=2, progress=False, report_to=["tensorboard", "csv", "wandb"])
    nll = rep["token"]["after"]["forget"]["nll"]
    acc = _tensorboard(out / "trackers" / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("eval/token/after/forget/nll")] == \
        [(0, _f32(nll))]
    assert {"eval/nll_hist", "eval/roc"} <= set(acc.Tags()["images"])
    rows = _csv_rows(out / "trackers" / "metrics.csv")
    assert rows["eval/token/after/forget/nll"] == {0: nll}
    assert rows["eval/mia/after/forget/loss"] == {0: rep["mia"]["after"]["forget"]["loss"]}
    with open(out / "trackers" / "eval_goals.csv", newline="") as fh:
        goals = list(csv.DictReader(fh))
    assert [g["criterion"] for g in goals] == [v["criterion"] for v in rep["verdicts"]]
    history = _wandb_history(out / "trackers")
    assert history["eval/token/after/forget/nll"] == {0: nll}
    assert {"eval/goals/_type", "eval/roc/_type"} <= set(history)


def test_a_missing_library_names_the_extra_before_any_work(shards, tmp_path, monkeypatch):
    from noencore import evaluate, unlearn
    from noencore.errors import UsageError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as uninstalled
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"--report-to wandb needs the wandb package, which "
                                         r"is not installed: pip install 'noencore\[trackers\]'"):
        unlearn("tiny", shards, **RUN, out=out, progress=False, report_to="csv,wandb")
    assert not out.exists()  # refused before the run folder was made
    with pytest.raises(UsageError, match=r"noencore\[trackers\]"):
        evaluate("tiny", {"forget": shards.select(split="forget")}, out=tmp_path / "eval",
                 report_to="wandb")
    assert not (tmp_path / "eval").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UsageError, match="--report-to tensorboard needs the tensorboard"):
        unlearn("tiny", shards, **RUN, out=out, progress=False, report_to="tensorboard")
    with pytest.raises(UsageError, match=r"unknown tracker\(s\) \['mlflow'\]"):
        unlearn("tiny", shards, **RUN, out=out, progress=False, report_to="csv,mlflow")
    with pytest.raises(UsageError, match="--report-to csv writes into the output folder"):
        unlearn("tiny", shards, **RUN, progress=False, report_to="csv")


def test_quiet_draws_no_bar_and_a_log_gets_plain_lines(shards, tmp_path, capsys,
                                                       monkeypatch):
    from noencore.cli import main

    monkeypatch.setenv("NOENCORE_PROGRESS_SECONDS", "1e-6")  # a line per refresh
    flags = ["unlearn", "--model", "tiny", "--shards", str(shards.path), "--forget", "forget",
             "--method", "ga", "--remain", ",".join(REMAIN), "--stop-nonmembers", ",".join(NONMEMBERS),
             "--stop-auc", "0", "--steps", "3", "--lr", "1e-6", "--batch-size", "4",
             "--frames", "12",
             "--log-every", "1", "--backend", "torch", "--device", "cpu"]
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here
    lines = [ln for ln in err.splitlines() if ln.startswith("unlearn (ga):")]
    assert lines and "3/3" in lines[-1], err
    last = lines[-1]
    for shown in ("forget=", "remain=", "tok_s=", "auc="):  # the step's numbers, the AUC
        assert shown in last, last
    assert any("1/3" in ln for ln in lines) and any("2/3" in ln for ln in lines), lines

    assert main([*flags, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "unlearn (ga)" not in err and "%|" not in err, err
    assert (tmp_path / "b" / "metrics.jsonl").exists()


_DRIVER = """
import json, os, sys
import torch.multiprocessing as mp
PORT, SHARDS, OUT = sys.argv[1], sys.argv[2], sys.argv[3]

def work(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    from noencore import unlearn
    res = unlearn("tiny", SHARDS, forget="forget", remain={remain}, method="ga", steps=2,
                  lr=1e-3, batch_size=4, frames=12, seed=0, backend="torch", device="cpu",
                  log_every=1, zero_stage=1, save=False, out=OUT + "/run", progress=False,
                  report_to="tensorboard,wandb,csv")
    with open(f"{{OUT}}/rank{{rank}}.json", "w") as fh:
        json.dump(res.steps, fh)

if __name__ == "__main__":
    mp.spawn(work, nprocs=2, join=True)
"""


@pytest.mark.distributed
def test_two_gloo_ranks_report_once(shards, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    script = work / "driver.py"  # a file: spawned ranks re-import it
    script.write_text(_DRIVER.format(remain=REMAIN))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true",
           "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run([sys.executable, str(script), str(free_port()), str(shards.path),
                           str(work)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=work)
    if not all((work / f"rank{r}.json").exists() for r in (0, 1)):  # an abort after is fine
        pytest.fail(f"2 ranks failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    run = work / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = _tensorboard(run / "trackers" / "tensorboard")  # exactly one event file
    assert {e.step: e.value for e in acc.Scalars("train/forget_nll")} == \
        {r["step"]: _f32(r["forget_nll"]) for r in recs}
    history = _wandb_history(run / "trackers")  # exactly one run
    assert history["train/forget_nll"] == {r["step"]: r["forget_nll"] for r in recs}
    assert sorted(history["train/forget_nll"]) == [1, 2]
    rows = _csv_rows(run / "trackers" / "metrics.csv")  # one writer: each step once
    assert rows["train/remain_nll"] == {r["step"]: r["remain_nll"] for r in recs}
    with open(run / "trackers" / "metrics.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert names.count("train/forget_nll") == 2
    assert not list(work.glob("wandb")) and not list(ROOT.glob("wandb"))  # no other run
