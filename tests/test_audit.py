"""``unlearn(..., audit=SPLIT)`` / ``noencore unlearn --audit``: the run ends with the report
a rights holder reads (every attack's AUC against tracks the run never read, dataset
inference, replay, remain change, the relearning probe, one verdict line, plots), with
the default method; the audit tracks are refused before training when the run reads them;
two ranks give the report one process gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, free_port  # noqa: E402

from noencore.errors import UsageError  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
FRAMES = 16
SIZES = (("forget", 10), ("remain", 8), ("valid", 4), ("unknown", 6), ("holdout", 10))
# the default method (match) with the request's data: tracks by unknown artists for its
# targets and the artist's validation tracks held
RUN = dict(forget="forget", remain="remain", stop_nonmembers="unknown", anchor_unseen="valid",
           steps=2, lr=1e-3, batch_size=4, frames=FRAMES, seed=0, backend="torch",
           device="cpu")


def _items(seed: int = 5) -> list:
    rng = np.random.default_rng(seed)
    return [(f"{split[0]}{i}", rng.integers(0, 2048, (FRAMES, 4)), f"{split} piece {i}", split)
            for split, n in SIZES for i in range(n)]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Shards and the folder of a tiny random-weight model (the starting model's spec)."""
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore.models import load_musicgen, save_musicgen

    root = tmp_path_factory.mktemp("audit")
    shards = conditioned_shards(root / "shards", _items(), OVERRIDES)
    folder = save_musicgen(load_musicgen("tiny", overrides=OVERRIDES), root / "start")
    return shards, folder


def test_the_run_ends_with_the_report_and_its_verdict(start, tmp_path):
    from noencore import unlearn

    shards, folder = start
    res = unlearn(str(folder), shards, audit="holdout", out=tmp_path / "run", progress=False,
                  **RUN)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == "match"
    rep = res.report
    assert rep["verdict"].startswith("verdict: ")
    assert res.to_dict()["verdict"] == rep["verdict"]
    # every attack's AUC, forget vs the audit tracks, and the dataset-inference p-value
    aucs = rep["mia"]["after"]["forget"]
    assert {"loss", "mink", "minkpp", "zlib"} <= set(aucs)
    assert all(0.0 <= aucs[a] <= 1.0 for a in ("loss", "mink", "minkpp", "zlib"))
    assert 0.0 <= rep["dataset_inference"]["after"]["p_value"] <= 1.0
    # the sets it scored: the audit tracks as non-members, the remain set without the held
    # validation tracks, the starting model as "before"
    assert rep["token"]["after"]["holdout"]["items"] == 10
    assert rep["token"]["after"]["remain"]["items"] == 8
    assert rep["token"]["before"]["forget"]["nll"] != rep["token"]["after"]["forget"]["nll"]
    assert [c["steps"] for c in rep["relearn"]["checkpoints"]] == [0, 10]
    assert set(rep["continuation"]["after"]) == {"forget", "remain", "holdout"}  # replay
    # the remain criterion is the goal's 2 %, not the evaluation's default 10 %; the
    # relearning probe has its verdict; the report shows the verdict line
    assert "within 2% of reference" in json.dumps(rep["verdicts"])
    assert any("relearning" in v["criterion"] for v in rep["verdicts"])
    report = tmp_path / "run" / "report"
    text = (report / "report.md").read_text()
    assert "Relearning probe" in text and "dataset inference" in text.lower()
    assert f"**{rep['verdict']}**" in text
    assert (report / "roc.png").stat().st_size > 0 and (report / "nll_hist.png").exists()


@pytest.mark.parametrize("audit,named", [("unknown", "stop rule's non-members"),
                                         ("valid", "anchored unseen tracks"),
                                         (["r0", "h1"], "remain set"),
                                         (["f3"], "forget set")])
def test_audit_tracks_the_run_reads_are_refused_before_training(start, tmp_path, audit, named):
    from noencore import unlearn

    shards, folder = start
    with pytest.raises(UsageError, match=f"audit track\\(s\\) are also the run's {named}"):
        unlearn(str(folder), shards, audit=audit, out=tmp_path / "run", progress=False, **RUN)
    assert not (tmp_path / "run" / "model").exists()


def test_audit_needs_a_run_folder_and_a_model_spec(start, tmp_path):
    from noencore import unlearn
    from noencore.models import load_musicgen

    shards, folder = start
    with pytest.raises(UsageError, match="audit writes its report into the run folder"):
        unlearn(str(folder), shards, audit="holdout", progress=False, **RUN)
    with pytest.raises(UsageError, match="the model as a spec"):
        unlearn(load_musicgen(str(folder)), shards, audit="holdout", out=tmp_path / "r",
                progress=False, **RUN)


def test_the_default_method_says_what_a_request_needs(start, tmp_path):
    from noencore import unlearn

    shards, folder = start
    with pytest.raises(UsageError, match="--stop-nonmembers SPLIT\\|IDS.*tracks by artists "
                                         "absent from training"):
        unlearn(str(folder), shards, forget="forget", remain="remain", steps=1, frames=FRAMES,
                batch_size=4, device="cpu", progress=False)


V_PASS = {"criterion": "a", "value": 0.5, "threshold": "t", "pass": True}


@pytest.mark.parametrize("verdicts,want", [
    ([V_PASS, {"criterion": "b", "value": 0.55, "threshold": "t", "pass": True}],
     "verdict: forgotten (2 of 2 criteria pass)"),
    ([V_PASS, {"criterion": "b", "value": None, "threshold": "t", "pass": None},
      {"criterion": "forgetting lasts (relearning probe)", "value": 0.9,
       "threshold": "|AUC - 0.5| <= 0.1", "pass": False}],
     "verdict: NOT forgotten (1 of 2 criteria pass): forgetting lasts (relearning probe): "
     "0.900 (needs |AUC - 0.5| <= 0.1)"),
    ([{"criterion": "remain NLL kept", "value": 3.25, "threshold": "within 2%", "pass": False}],
     "verdict: NOT forgotten (0 of 1 criteria pass): remain NLL kept: 3.250 (needs within 2%)"),
    ([], "verdict: undecided (no criterion could be measured; see the report's notes)"),
])
def test_the_verdict_line(verdicts, want):
    from noencore.evaluation.report import verdict_line

    assert verdict_line({"verdicts": verdicts}) == want


@pytest.mark.parametrize("auc,passes", [(0.5, True), (0.59, True), (0.41, True), (0.61, False),
                                        (0.38, False), (None, None)])
def test_the_relearning_probe_has_a_verdict(auc, passes):
    from noencore.evaluation.report import Criteria, verdicts

    results = {"relearn": {"checkpoints": [{"steps": 0, "forget_auc_loss": 0.5},
                                           {"steps": 10, "forget_auc_loss": auc}]}}
    got = [v for v in verdicts(results, Criteria()) if "relearning" in v["criterion"]]
    if passes is None:  # no AUC measured: no verdict
        assert got == []
    else:
        assert [v["pass"] for v in got] == [passes] and "after 10 steps" in got[0]["detail"]
    assert not [v for v in verdicts({}, Criteria()) if "relearning" in v["criterion"]]


def test_two_ranks_give_the_report_one_process_gives(start, tmp_path):
    """``torchrun --nproc_per_node 2 -m noencore unlearn --zero-stage 1 --audit holdout``
    prints the verdict once (rank 0) and writes the report whose AUCs and dataset-inference
    p-value are those of the same run in one process under ZeRO-1 (bf16 training: the
    NLLs to 2 %)."""
    shards, folder = start
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    flags = ["--model", str(folder), "--shards", str(shards.path), "--forget", "forget",
             "--remain", "remain", "--stop-nonmembers", "unknown", "--anchor-unseen", "valid",
             "--audit", "holdout", "--steps", "2", "--lr", "1e-3", "--batch-size", "4",
             "--frames", str(FRAMES), "--zero-stage", "1", "--device", "cpu", "--quiet"]

    def launch(n: int, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
             "--master_port", str(free_port()), "-m", "noencore", "unlearn", *flags,
             "--out", str(out)], capture_output=True, text=True, env=env, timeout=540,
            cwd=tmp_path)

    two, one = launch(2, tmp_path / "two"), launch(1, tmp_path / "one")
    for done in (two, one):
        assert done.returncode == 0, done.stderr[-3000:]
    said = [ln for ln in two.stdout.splitlines() if ln.startswith("verdict: ")]
    assert len(said) == 1, two.stdout[-2000:]
    reps = [json.loads((tmp_path / w / "report" / "report.json").read_text())
            for w in ("two", "one")]
    for a in ("loss", "mink", "minkpp", "zlib"):
        assert reps[0]["mia"]["after"]["forget"][a] == pytest.approx(
            reps[1]["mia"]["after"]["forget"][a], abs=0.05)
    for s in ("forget", "remain", "holdout"):
        assert reps[0]["token"]["after"][s]["nll"] == pytest.approx(
            reps[1]["token"]["after"][s]["nll"], rel=0.02)
