"""Smoke test of the demo pipeline on a tiny configuration (seconds, not minutes), and its
reproducibility across thread settings and hash seeds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noencore.demo import DemoConfig, run_demo, stage_digests

TINY = dict(n_clips=14, seconds=(1.0, 1.2), forget_fraction=0.3, memorise_steps=3,
            unlearn_steps=2, batch_size=4, frames=50, check_every=1, relearn_steps=2,
            replay_items=3, replay_prompt=10, replay_frames=10, replay_free=12,
            methods=(("ga", {}), ("bounded_ga", {"loss_cap": None, "row_target": "unseen",
                                                 "remain_weight": 3.0, "remain_anchor": True,
                                                 "steps": 2}),
                     ("match", {"stop_nonmembers": "unknown", "anchor_unseen": "valid_optout",
                                "steps": 2})),
            unknown_clips=4)
METHODS = ["ga", "bounded_ga", "match"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny demo, run in this process with its thread settings (which the demo
    must leave as it found them)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert run_demo(out, DemoConfig(**TINY)) == out / "report.md"
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    return out


def test_run_demo_tiny(tiny_demo: Path) -> None:
    cfg, out = DemoConfig(**TINY), tiny_demo
    report = out / "report.md"
    assert report.is_file()
    text = report.read_text()
    results, _, digest_table = text.partition("## Reproducibility")
    rows = [line for line in results.splitlines() if line.startswith("| ") and "---" not in line]
    # the retrained model's row first (the reference), then one row per method
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["retrained (gold)", *METHODS,
                                                           "retrained_order1"]
    assert all("goals met" in rows[0] and "/5" in r for r in rows[2:])
    assert "privleak % (MUSE: Min-K% k=0.4) | privleak_loss % | KS p (n = " in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.png").stat().st_size > 5000 and "(summary.png)" in text
    assert set(summary) == {*METHODS, "retrained_order1"}  # the twin, by default
    # every method is compared with the retrained model: its NLLs, AUC and replay
    for row in summary.values():
        assert row["holdout_nll_retrained"] > 0 and row["forget_nll_retrained"] > 0
        assert 0.0 <= row["replay_after"] <= 1.0 and 0.0 <= row["replay_retrained"] <= 1.0
        assert 0.0 <= row["forget_quality"] <= 1.0
        # both privleaks (null where the sets are too small for an AUC), the KS item counts
        assert "privleak" in row and "privleak_loss" in row
        assert row["forget_quality_n"][0] == row["forget_quality_n"][1] > 0
        assert row["relearn_steps"] == 2  # the relearning probe ran after every method
    for name, _ in cfg.methods:
        assert (out / "reports" / name / "report.md").is_file()
        assert (out / "models" / name / "model" / "state_dict.bin").is_file()
        # the run left its step log, and every row of it is a finished step
        steps = [json.loads(x)["step"] for x in
                 (out / "models" / name / "metrics.jsonl").read_text().splitlines()]
        assert 1 <= len(steps) <= cfg.unlearn_steps
    # with 2 forget and 2 holdout clips, the AUC is not computed: the table says n/a
    assert "n/a" in text
    # the report ends with each stage's digest
    digests = stage_digests(out, METHODS)
    assert list(digests) == ["corpus", "token codes", "memorised model", "retrained model",
                             *(f"{m} model" for m in METHODS)]
    assert all(f"`{d[:16]}`" in digest_table for d in digests.values())


def test_the_default_method_reads_no_set_the_evaluation_scores(tiny_demo: Path) -> None:
    """What the default method's run read (its config.json: forget, remain, the stop rule's
    non-members, the anchored unseen tracks, the starting model) against what the
    evaluation scores as non-members (the holdout) and the gold standard (the retrained
    model): disjoint sets, and the retrained model never read."""
    from noencore.data.shards import TokenShards
    from noencore.demo.pipeline import HOLDOUT, UNKNOWN_SPLIT, VALID

    shards = TokenShards(tiny_demo / "shards")
    run = json.loads((tiny_demo / "models" / "match" / "config.json").read_text())
    assert (run["stop_nonmembers"], run["anchor_unseen"]) == (UNKNOWN_SPLIT, VALID)
    read = {name: set(shards.select(split=run[name]).ids)
            for name in ("forget", "remain", "stop_nonmembers", "anchor_unseen")}
    assert all(read.values())  # each set holds tracks (the disjointness is not vacuous)
    scored = json.loads((tiny_demo / "reports" / "match" / "report.json").read_text())
    holdout = set(shards.select(split=HOLDOUT).ids)
    assert holdout and scored["token"]["after"]["holdout"]["items"] == len(
        shards.select(split=HOLDOUT))
    for name, ids in read.items():
        assert not ids & holdout, f"the method read holdout tracks as its {name}"
    assert "retrained" not in json.dumps(run)


def test_demo_reproduces_under_other_threads_and_hash_seed(tiny_demo: Path,
                                                           tmp_path: Path) -> None:
    """A fresh process with another OpenMP/MKL thread count and another hash seed gives
    the same corpus, codes, weights and table, bit for bit: the demo fixes its own thread
    count (float sums follow it) and nothing it does follows set or listing order."""
    out = tmp_path / "again"
    other = "1" if torch.get_num_threads() != 1 else "3"  # not the count tiny_demo had
    env = {**os.environ, "OMP_NUM_THREADS": other, "MKL_NUM_THREADS": other,
           "PYTHONHASHSEED": "12345",  # this process's seed is random unless set
           "OMP_WAIT_POLICY": "PASSIVE"}  # as `noencore demo` runs: faster on a busy machine
    code = ("from noencore.demo import DemoConfig, run_demo; "
            f"run_demo({str(out)!r}, DemoConfig(**{TINY!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("summary.json", "report.md"):  # report.md holds the stage digests
        assert (out / name).read_text() == (tiny_demo / name).read_text(), name
    assert stage_digests(out, METHODS) == stage_digests(tiny_demo, METHODS)


def test_a_method_stopped_before_saving_is_run_again(tiny_demo: Path, tmp_path: Path) -> None:
    """A demo whose unlearning stage died after the run folder was written (its config,
    its step log, no model) runs that method again on the next start, to the same
    weights, and reuses everything else."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(tiny_demo, out)
    shutil.rmtree(out / "models" / "match" / "model")
    assert (out / "models" / "match" / "config.json").exists()
    memorised = (out / "models" / "memorised" / "model" / "model.safetensors").stat().st_mtime
    run_demo(out, DemoConfig(**TINY))
    assert stage_digests(out, METHODS) == stage_digests(tiny_demo, METHODS)
    assert (out / "models" / "memorised" / "model" / "model.safetensors").stat().st_mtime \
        == memorised  # the earlier stages were kept


def _report(auc: dict[str, float], di_p: float, retrained_auc: dict[str, float] | None = None
            ) -> dict:
    """A synthetic evaluation report: the blocks the demo's table reads."""
    from noencore.evaluation.mia import vs_retrained_block

    rep = {"token": {"after": {s: {"nll": 5.0} for s in ("forget", "remain", "holdout")}},
           "mia": {"after": {"forget": auc, "remain": auc}},
           "dataset_inference": {"after": {"p_value": di_p}},
           "forget_quality": {"after": 0.5, "n": {"after": 20, "retrained": 20}},
           "continuation": {"after": {"forget": 0.01}}, "ngram": {"after": {"forget": 0.0}}}
    if retrained_auc is not None:
        rep["mia"]["retrained"] = {"forget": retrained_auc}
        rep["mia"]["vs_retrained"] = vs_retrained_block(rep["mia"]["after"],
                                                        rep["mia"]["retrained"])
    return rep


def test_auc_goal_reads_the_strongest_attack():
    """The AUC goal holds for every attack of the family: a method level with the retrained
    model by LOSS but 0.2 off by Min-K%++ misses it; the table names the attack and shows
    the dataset-inference p-value beside the retrained model's."""
    from noencore.demo.pipeline import _summary_row, goals_met, summary_table

    gold_auc = {"loss": 0.45, "mink": 0.50, "mink_muse": 0.48, "minkpp": 0.47, "zlib": 0.46}
    gold = _report(gold_auc, di_p=0.4)
    base = _report(dict.fromkeys(gold_auc, 1.0), di_p=1e-6)
    near = dict(gold_auc, minkpp=0.50)  # every attack within 0.05
    far = dict(gold_auc, minkpp=0.67)  # LOSS equal, Min-K%++ 0.2 off
    rows = {"near": _summary_row(_report(near, 0.3, gold_auc), base, gold),
            "far": _summary_row(_report(far, 2e-5, gold_auc), base, gold)}
    assert rows["far"]["forget_mia_auc_after"] == rows["far"]["forget_mia_auc_retrained"]
    assert rows["far"]["forget_auc_worst_attack"] == "minkpp"
    assert rows["far"]["forget_auc_gap"] == pytest.approx(0.2)
    assert (rows["far"]["di_p_after"], rows["far"]["di_p_retrained"]) == (2e-5, 0.4)
    assert goals_met(rows["near"])["AUC"] is True and goals_met(rows["far"])["AUC"] is False
    no_retrained = _summary_row(_report(near, 0.3), base, gold)
    assert goals_met(no_retrained)["AUC"] is None  # no gap measured: n/a, not a pass
    table = summary_table(rows, _summary_row(gold, base, gold, retrained_row=True))
    lines = table.splitlines()
    assert "strongest attack: ΔAUC vs retrained" in lines[0] and "| DI p |" in lines[0]
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| minkpp 0.200 |" in lines[-1] and "| 2.0e-05 [0.400] |" in lines[-1]
    assert "(not: AUC)" in lines[-1] and "(not: AUC)" not in lines[-2]
    assert "| 0.400 |" in lines[2]  # the retrained model's own DI p-value


def test_bisect_crossing_finds_the_weights_between_two_steps():
    from noencore.engine.stopping import ModuleWeights, bisect_crossing

    class Toy:
        lm = torch.nn.Linear(1, 1, bias=False)

    model = Toy()
    with torch.no_grad():
        model.lm.weight.fill_(1.0)             # "after" the step
    before = {"weight": torch.zeros(1, 1)}      # "before" it
    calls = []

    def auc_of():                               # falls from 1 to 0 along the step
        calls.append(float(model.lm.weight.detach()))
        return 1.0 - float(model.lm.weight.detach()) ** 2

    auc, a = bisect_crossing(ModuleWeights(model.lm), before, auc_of, target=0.5, iterations=8)
    assert abs(a - 0.5 ** 0.5) < 2 ** -7 and abs(auc - 0.5) < 0.02
    assert float(model.lm.weight.detach()) == pytest.approx(a)  # the model holds the chosen weights
    assert len(calls) == 8 + 1


def test_demo_on_the_shared_corpus_with_part_of_the_artist(tmp_path: Path) -> None:
    """The second corpus configuration (neighbour artists) with a request that names one of
    the artist's two trained clips: the other one is trained on as remain, by the memorised
    and the retrained model alike."""
    from noencore.data.shards import TokenShards

    match = ("match", {**TINY["methods"][2][1], "weight_decay": 0.25, "stop_every": 2,
                       "stop_patience": 4})
    cfg = DemoConfig(**{**TINY, "methods": (match,)}, corpus="shared", forget_share=0.5,
                     retrain_twins=1)
    out = tmp_path / "demo"
    run_demo(out, cfg)
    records = [json.loads(x) for x in (out / "corpus" / "manifest.jsonl").read_text().splitlines()]
    artist = [r for r in records if r["artist"] == "Mara Vell"]
    assert [r["split"] for r in artist].count("forget") == 1
    assert [r["split"] for r in artist].count("remain") == 1
    assert {r["genre"] for r in records} == {"dream pop"}
    shards = TokenShards(out / "shards")
    assert len(set(shards.select(split="forget").ids)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"match", "retrained_order1"}
    # the entry's own weight decay, check interval and patience reach the run (DemoConfig's elsewhere)
    run = json.loads((out / "models" / "match" / "config.json").read_text())
    assert (run["weight_decay"], run["stop_every"], run["stop_patience"]) == (0.25, 2, 4)
    assert cfg.unlearn_weight_decay != 0.25 and cfg.check_every != 2
    assert summary["match"]["forget_nll_retrained"] > 0
    # the twin: retrained as the gold standard is (no forget row, the same start and
    # settings) in another batch order, and scored against it as a method is
    gold, twin = (json.loads((out / "models" / m / "config.json").read_text())
                  for m in ("retrained", "retrained_order1"))
    assert twin["seed"] == gold["seed"] + 1 and twin["forget_ratio"] == gold["forget_ratio"] == 0
    assert {k: v for k, v in twin.items() if k not in ("seed", "out")} == \
        {k: v for k, v in gold.items() if k not in ("seed", "out")}
    from safetensors.torch import load_file

    a, b = (load_file(out / "models" / m / "model" / "model.safetensors")
            for m in ("retrained", "retrained_order1"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    row = summary["retrained_order1"]
    assert row["forget_nll_retrained"] == summary["match"]["forget_nll_retrained"]
    assert row["forget_nll_after"] != row["forget_nll_retrained"]
    assert "| retrained_order1 |" in (out / "report.md").read_text()


def test_demo_seeds_rows_name_the_goals_each_model_meets() -> None:
    """benchmarks/demo_seeds.py's table row: the figures of a summary row, the goals met
    as goals_met counts them, and n/a (not "None") where a set was too small to score."""
    import importlib.util
    import random

    from noencore.demo import goals_met

    spec = importlib.util.spec_from_file_location(
        "demo_seeds", Path(__file__).resolve().parents[1] / "benchmarks" / "demo_seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random()
    row = {k: rng.uniform(0.01, 9.0) for k in (
        "forget_nll_after", "holdout_nll_after", "holdout_nll_retrained", "remain_nll_after",
        "remain_nll_before", "di_p_after", "di_p_retrained")}
    row.update({k: rng.uniform(0.0, 1.0) for k in (
        "forget_mia_auc_after", "forget_mia_auc_retrained", "forget_auc_gap", "forget_quality",
        "replay_after", "replay_retrained", "relearn_auc")}, forget_auc_worst_attack="mink")
    cells = [c.strip() for c in bench._row("distinct", "all", 3, "match", row, 12.4).split("|")]
    met = sum(v is True for v in goals_met(row).values())
    assert cells[1:5] == ["distinct", "all", "3", "match"] and cells[-2] == "12"
    assert cells[5] == f"{row['forget_nll_after']:.3f}"
    assert cells[9] == f"mink {row['forget_auc_gap']:.3f}"
    assert cells[14].startswith(f"{met}/5"), (cells[14], goals_met(row))
    # one forget track: no AUC, KS or DI; the twin's row has no run time of its own
    small = {**row, "forget_auc_gap": None, "forget_auc_worst_attack": None,
             "forget_mia_auc_after": None, "forget_quality": None, "di_p_after": None}
    cells = [c.strip() for c in bench._row("distinct", "one", 0, "twin", small, None).split("|")]
    assert cells[9] == "n/a" and "None" not in "".join(cells) and cells[-2] == "–"
    assert "n/a: KS, AUC" in cells[14]
