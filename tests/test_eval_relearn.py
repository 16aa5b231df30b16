"""The relearning probe of ``noencore evaluate``: fine-tune a copy of the unlearned model on
the remain set for N steps and measure the forget-vs-holdout AUC again.

A tiny model memorises a forget and a remain set; plain gradient ascent, stopped when
membership inference cannot tell the forget set from never-trained tracks, brings the
forget-vs-holdout AUC near 0.5; a few steps of fine-tuning on the remain set alone
bring the forget set back (the AUC rises towards 1, the forget NLL falls), and the
report holds the block.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
FRAMES = 16
N = 6
ENGINE = dict(frames=FRAMES, batch_size=8, progress=False, backend="torch", device="cpu")
PROBE = dict(relearn_lr=1e-3, relearn_batch_size=4)
EVAL = dict(metrics=["token", "mia"], precision="fp32", frames=FRAMES, batch_size=8,
            min_auc_items=N, progress=False)


def corpus_items(seed: int = 11) -> list:
    rng = np.random.default_rng(seed)
    items = []
    for prefix, split, n in (("f", "forget", N), ("r", "remain", 8), ("h", "holdout", N),
                             ("v", "valid", N)):
        for i in range(n):
            items.append((f"{prefix}{i}", rng.integers(0, 2048, (FRAMES, 4)),
                          f"{split} song {i}", split))
    return items


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    """Shards and the folder of a model that memorised forget + remain, then had the forget
    set ascended on until it looked like never-trained tracks (the "valid" split)."""
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore import unlearn
    from noencore.models import load_musicgen

    root = tmp_path_factory.mktemp("relearn")
    shards = conditioned_shards(root / "shards", corpus_items(), OVERRIDES)
    model = load_musicgen("tiny", overrides=OVERRIDES)  # the codec is saved: the CLI loads it
    unlearn(model, shards, forget="forget", remain="remain", method="finetune", steps=60,
            lr=3e-3, **ENGINE)
    res = unlearn(model, shards, forget="forget", remain="remain", method="ga", steps=20,
                  lr=1e-3, stop_nonmembers="valid", out=root / "ga", **ENGINE)
    assert res.stopped == "nonmember_auc"
    return shards, res.model_dir


def sets_of(shards, *names):
    return {s: shards.select(split=s) for s in names}


@pytest.mark.slow
def test_relearning_on_the_remain_set_brings_the_forget_set_back(unlearned, tmp_path):
    from noencore.evaluation.evaluate import evaluate
    from noencore.models import load_musicgen

    shards, folder = unlearned
    model = load_musicgen(str(folder), with_codec=False)
    state = {k: v.clone() for k, v in model.lm.state_dict().items()}
    r = evaluate(model, sets_of(shards, "forget", "remain", "holdout"), out=tmp_path / "rep",
                 relearn_steps=[4, 12], **PROBE, **EVAL)
    block = r["relearn"]
    rows = block["checkpoints"]
    print("relearn:", [(c["steps"], round(c["forget_auc_loss"], 3), round(c["forget_nll"], 3),
                        round(c["remain_nll"], 3)) for c in rows])
    assert [c["steps"] for c in rows] == [0, 4, 12]
    assert rows[0]["forget_auc_loss"] == r["mia"]["after"]["forget"]["loss"]
    assert rows[0]["forget_nll"] == r["token"]["after"]["forget"]["nll"]
    assert abs(rows[0]["forget_auc_loss"] - 0.5) < 0.2  # looks unlearned
    assert rows[2]["forget_auc_loss"] > rows[0]["forget_auc_loss"] + 0.3  # relearned
    assert rows[2]["forget_nll"] < rows[1]["forget_nll"] < rows[0]["forget_nll"]
    assert rows[2]["remain_nll"] < rows[0]["remain_nll"]  # it trained on the remain set
    assert block["lr"] == 1e-3 and block["batch_size"] == 4
    # the model evaluated is untouched; the probe's training curve is kept, its
    # checkpoints are not
    assert all((v == state[k]).all() for k, v in model.lm.state_dict().items())
    recs = (tmp_path / "rep" / "relearn" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in recs] == list(range(1, 13))
    assert not (tmp_path / "rep" / "relearn" / "checkpoints").exists()
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["relearn"] == block
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Relearning probe" in md and f"| 12 | {rows[2]['forget_auc_loss']:.3f} |" in md


def test_one_count_in_one_call_equals_the_continued_run(unlearned):
    """Steps 12 in one run equal steps 4 then 8 more, resumed from the checkpoint."""
    from noencore.evaluation import relearn
    from noencore.models import load_musicgen

    shards, folder = unlearned
    sets = sets_of(shards, "forget", "remain")
    model = load_musicgen(str(folder), with_codec=False)
    (_, one), = relearn.relearned_models(model, sets, [12], lr=1e-3, batch_size=4,
                                         frames=FRAMES)
    one = {k: v.clone() for k, v in one.lm.state_dict().items()}
    last = None
    for _, m in relearn.relearned_models(model, sets, [4, 12], lr=1e-3, batch_size=4,
                                         frames=FRAMES):
        last = m
    for k, v in last.lm.state_dict().items():
        assert (v - one[k]).abs().max() <= 1e-6, k


def test_cli_flags_and_bad_input(unlearned, tmp_path, capsys):
    from noencore.cli import main
    from noencore.errors import UsageError
    from noencore.evaluation import relearn
    from noencore.evaluation.evaluate import evaluate

    shards, folder = unlearned
    assert relearn.parse_steps("10, 5,5") == [5, 10]
    assert relearn.parse_steps(7) == [7] and relearn.parse_steps(None) == []
    assert relearn.parse_steps([]) == [] and relearn.parse_steps("") == []
    for bad in ("0", "-3", "five", ","):
        with pytest.raises(UsageError, match="relearn"):
            relearn.parse_steps(bad)
    with pytest.raises(UsageError, match="fine-tunes on the remain set: give one"):
        evaluate(str(folder), sets_of(shards, "forget", "holdout"), relearn_steps=3, **EVAL)
    other = conditioned_shards(tmp_path / "other", corpus_items(seed=2), OVERRIDES)
    with pytest.raises(UsageError, match="from one shard folder"):
        evaluate(str(folder), {"forget": shards.select(split="forget"),
                               "remain": other.select(split="remain")},
                 relearn_steps=3, **EVAL)
    assert main(["evaluate", str(shards.path), "--model", "tiny", "--out",
                 str(tmp_path / "bad"), "--relearn-steps", "x", "--quiet"]) == 2

    out = tmp_path / "cli"
    rc = main(["evaluate", str(shards.path), "--model", str(folder), "--out", str(out),
               "--relearn-steps", "3", "--relearn-lr", "2e-3", "--relearn-batch-size", "4",
               "--frames", str(FRAMES), "--batch-size", "8", "--precision", "fp32",
               "--metrics", "token,mia", "--min-auc-items", str(N), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    block = json.loads((out / "report.json").read_text())["relearn"]
    assert [c["steps"] for c in block["checkpoints"]] == [0, 3]
    assert block["lr"] == 2e-3 and block["batch_size"] == 4
    assert not (out / "relearn").exists()  # one count: no checkpoint, no run folder


_DRIVER = """
import json, os, sys
from pathlib import Path
import noencore
from noencore.data.shards import TokenShards

root, rank = Path(sys.argv[1]), int(os.environ["RANK"])
args = json.loads((root / "args.json").read_text())
sh = TokenShards(args["shards"])
sets = {s: sh.select(split=s) for s in ("forget", "remain", "holdout")}
r = noencore.evaluate(args["model"], sets, out=root / "two", **args["evaluate"])
(root / f"result_rank{rank}.json").write_text(json.dumps(r["relearn"]))
"""


@pytest.mark.distributed
def test_two_ranks_probe_equals_one_process(unlearned, tmp_path):
    """``torchrun --nproc_per_node 2`` running ``noencore.evaluate(..., relearn_steps=[3,
    6])``: the fine-tuning runs under DeepSpeed ZeRO-2 in fp32 and the block equals one
    process's (plain AdamW) to 1e-6 in every AUC and relative 1e-5 in every NLL (the
    same fp32 training, summed in another order; measured: 2e-8)."""
    from test_engine_shards import free_port, two_ranks_beside

    from noencore.evaluation.evaluate import evaluate

    shards, folder = unlearned
    kw = {**EVAL, **PROBE, "relearn_steps": [3, 6]}
    work = tmp_path / "run"
    work.mkdir()
    (work / "args.json").write_text(json.dumps({"shards": str(shards.path),
                                                "model": str(folder), "evaluate": kw}))
    (tmp_path / "driver.py").write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(tmp_path / "driver.py"), str(work)]
    one, two, _, _ = two_ranks_beside(
        cmd, work, lambda: evaluate(str(folder), sets_of(shards, "forget", "remain", "holdout"),
                                    out=tmp_path / "one", **kw)["relearn"],
        env=env, cwd=tmp_path)
    assert two[0] == two[1]  # every rank returns the same block
    one = json.loads(json.dumps(one))
    assert [c["steps"] for c in two[0]["checkpoints"]] == [0, 3, 6]
    worst = 0.0
    for got, want in zip(two[0]["checkpoints"], one["checkpoints"]):
        assert got["forget_auc_loss"] == pytest.approx(want["forget_auc_loss"], abs=1e-6)
        for key in ("forget_nll", "remain_nll", "holdout_nll"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got, want)
            worst = max(worst, abs(got[key] / want[key] - 1))
    assert one["checkpoints"][2]["forget_nll"] < one["checkpoints"][0]["forget_nll"]
    print(f"largest relative NLL difference, 2 ranks (ZeRO-2 fp32) vs 1 process: {worst:.1e}")
    recs = (work / "two" / "relearn" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in recs] == list(range(1, 7))
