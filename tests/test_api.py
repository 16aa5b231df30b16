"""The public API as a caller from another project uses it: ``import noencore`` and the
README's Python example, run end to end on freshly precomputed shards."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import noencore

README = Path(__file__).resolve().parents[1] / "README.md"

# what a real run names, and this test's tiny stand-ins (a hub model and its codec ->
# the tiny random ones; the demo corpus's split of unseen opt-out tracks; fewer steps)
STAND_INS = {'"facebook/musicgen-small"': '"tiny"', '"validation"': '"valid_optout"',
             '"unknown_artists"': '"unknown"', '"artist_unreleased_a"': '"valid_optout"',
             '"artist_unreleased_b"': '"holdout_optout"', "steps=150": "steps=2",
             "steps=500": "steps=2", "batch_size=16": "batch_size=4"}


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_api_names_resolve() -> None:
    for name in noencore.__all__:
        assert getattr(noencore, name) is not None, name
    assert callable(noencore.evaluate) and callable(noencore.condition)
    assert issubclass(noencore.UsageError, noencore.NoencoreError)
    assert issubclass(noencore.DivergenceError, noencore.NoencoreError)
    assert issubclass(noencore.RequestConflict, noencore.NoencoreError)


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    from noencore.demo.corpus import make_demo_corpus, read_demo_manifest

    code = readme_example()
    for real, tiny in STAND_INS.items():
        assert real in code, f"the README example no longer has {real}"
        code = code.replace(real, tiny)
    manifest = make_demo_corpus(tmp_path / "corpus", n_clips=18, seconds=1.0,
                                formats=("wav",), forget_fraction=0.35, optout_valid=0.35,
                                optout_holdout=0.3, unknown_clips=3, progress=False)
    (tmp_path / "manifest.jsonl").write_text(Path(manifest).read_text().replace(
        '"path": "', f'"path": "{Path(manifest).parent}/'))
    forget = [r["id"] for r in read_demo_manifest(manifest) if r["split"] == "forget"]
    (tmp_path / "optout.txt").write_text("\n".join(forget) + "\n")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)

    # the default method's run ended with its report and the verdict, printed
    assert (tmp_path / "runs" / "optout" / "report" / "report.md").is_file()
    first = json.loads((tmp_path / "runs" / "optout" / "config.json").read_text())
    assert first["method"] == "match" and first["audit"] == "holdout_optout"
    printed = capsys.readouterr().out
    assert re.search(r"^verdict: (forgotten|NOT forgotten|undecided)", printed, re.M), printed
    result, report = scope["result"], scope["report"]
    assert isinstance(result, noencore.UnlearnResult) and 1 <= result.steps <= 2
    assert result.to_dict()["model_dir"] == str(Path("runs/npo/model"))
    assert isinstance(report, noencore.EvalResult)
    assert report.to_dict()["verdicts"] == report.verdicts
    assert (tmp_path / "shards" / "conditions" / "index.json").is_file()
    assert (tmp_path / "reports" / "npo" / "report.json").is_file()
    saved = json.loads((tmp_path / "runs" / "npo" / "config.json").read_text())
    assert saved["method"] == "npo" and saved["steps"] == 2  # the run's options, all of them
    assert str(report.verdicts) in printed


def test_sets_are_named_alike_for_unlearn_and_evaluate(tmp_path: Path) -> None:
    """A split name, a list of ids and a selection name the same items."""
    import numpy as np
    from test_engine_shards import write_shards

    from noencore.data.shards import TokenShards, select_set, set_ids

    items = [(f"s{i}", np.zeros((60, 4)), f"clip {i}", "forget" if i < 3 else "remain")
             for i in range(6)]
    shards = TokenShards(write_shards(tmp_path / "shards", items))
    ids = ["s0", "s1", "s2"]
    by_split, by_ids = select_set(shards, "forget"), select_set(shards, ids)
    by_selection = select_set(shards, shards.select(split="forget"))
    assert by_split.ids == by_ids.ids == by_selection.ids
    assert set_ids(by_selection) == ids and set_ids("forget") == "forget"


def test_one_declaration_of_the_options() -> None:
    """The CLI's flags and the resume check derive from the configs: every option of
    ``unlearn`` is an ``UnlearnConfig`` field, and the CLI resolves to those fields."""
    import argparse
    import dataclasses
    import inspect

    from noencore.commands import unlearn as command
    from noencore.engine.config import UnlearnConfig, fields_for_run

    fields = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    assert all(f.metadata["help"] for f in fields.values())
    assert set(fields_for_run()) == {"lr", "weight_decay", "batch_size", "forget_ratio",
                                     "frames", "seed", "train_layers", "anchor_unseen"}
    assert set(inspect.signature(noencore.unlearn).parameters) == {
        "model", "shards", "config", "progress", "on_step", "overrides"}
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["unlearn", "--model", "tiny", "--shards", "s", "--forget",
                              "a,b", "--steps", "3", "--resume", "--out", "o"])
    opts = command.resolve_options(args)
    assert set(opts) - {"model", "shards"} <= set(fields)
    assert opts["forget"] == ["a", "b"] and opts["steps"] == 3 and opts["resume"] is True
    assert UnlearnConfig().replace(**{k: v for k, v in opts.items()
                                      if k not in ("model", "shards")}).steps == 3
    with pytest.raises(noencore.UsageError, match="unknown unlearn option"):
        UnlearnConfig().replace(step=3)
    with pytest.raises(noencore.UsageError, match="unknown evaluate option"):
        noencore.EvalConfig().replace(metric=["token"])
