"""Smoke test of the demo pipeline on a tiny configuration (seconds, not minutes)."""
from __future__ import annotations

import json

import pytest

from noencore.demo import DemoConfig, run_demo


def test_run_demo_tiny(tmp_path):
    methods = (("ga", {}), ("bounded_ga", {"loss_cap": None, "row_target": "unseen",
                                          "remain_weight": 3.0, "remain_anchor": True,
                                          "steps": 2}))
    cfg = DemoConfig(n_clips=14, seconds=(1.0, 1.2), forget_fraction=0.3, memorise_steps=3,
                     unlearn_steps=2, batch_size=4, frames=50, check_every=1, methods=methods)
    report = run_demo(tmp_path / "demo", cfg)
    out = tmp_path / "demo"
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ga", "bounded_ga"]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.png").stat().st_size > 5000 and "(summary.png)" in text
    assert set(summary) == {"ga", "bounded_ga"}
    for name, _ in methods:
        assert (out / "reports" / name / "report.md").is_file()
        assert (out / "models" / name / "model" / "state_dict.bin").is_file()
        # the run left its step log, and every row of it is a finished step
        steps = [json.loads(x)["step"] for x in
                 (out / "models" / name / "metrics.jsonl").read_text().splitlines()]
        assert 1 <= len(steps) <= cfg.unlearn_steps
    # with 2 forget and 2 holdout clips, the AUC is not computed: the table says n/a
    assert "n/a" in text


def test_bisect_crossing_finds_the_weights_between_two_steps():
    import torch

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
