"""Smoke test of the demo pipeline on a tiny configuration (seconds, not minutes)."""
from __future__ import annotations

import json

from noencore.demo import DemoConfig, run_demo


def test_run_demo_tiny(tmp_path):
    methods = (("ga", {}), ("simnpo", {"beta": 0.5}))
    cfg = DemoConfig(n_clips=14, seconds=(1.0, 1.2), forget_fraction=0.3, memorise_steps=3,
                     unlearn_steps=2, batch_size=4, frames=50, check_every=1, methods=methods)
    report = run_demo(tmp_path / "demo", cfg)
    out = tmp_path / "demo"
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ga", "simnpo"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ga", "simnpo"}
    for name, _ in methods:
        assert (out / "reports" / name / "report.md").is_file()
        assert (out / "models" / name / "model" / "state_dict.bin").is_file()
        # the run left its step log, and every row of it is a finished step
        steps = [json.loads(x)["step"] for x in
                 (out / "models" / name / "metrics.jsonl").read_text().splitlines()]
        assert 1 <= len(steps) <= cfg.unlearn_steps
    # with 2 forget and 2 holdout clips, the AUC is not computed: the table says n/a
    assert "n/a" in text
