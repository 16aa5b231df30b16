"""``noencore condition`` and ``noencore unlearn`` (flags + a YAML config), in process."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import random_items, write_shards  # noqa: E402


def test_condition_then_unlearn_from_config(tmp_path, capsys):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore.cli import main

    shards = write_shards(tmp_path / "shards", random_items(2, 4, 16))
    assert main(["condition", str(shards), "--model", "tiny"]) == 0
    assert (shards / "conditions" / "index.json").exists()
    (tmp_path / "ids.txt").write_text("f0\n")  # one id per line; "#" is no comment
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\nmethod: npo\nsteps: 5\nlr: 0.001\nbatch_size: 3\n"
                   "frames: 10\nmethod_options: {beta: 0.2}\n")
    capsys.readouterr()
    rc = main(["unlearn", "--config", str(cfg), "--shards", str(shards), "--forget-ids",
               str(tmp_path / "ids.txt"), "--steps", "2", "--out", str(tmp_path / "run"),
               "--method-option", "remain_weight=0.5", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["stopped"] == "max_steps"  # the flag won
    assert Path(summary["model_dir"], "state_dict.bin").exists()
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/manifest.json"))
                          .read_text())
    assert manifest["run"]["method"] == {"name": "npo", "forget_weight": 1.0,
                                         "remain_weight": 0.5, "remain_anchor": False,
                                         "loss_cap": None, "beta": 0.2}
    # contradictory or missing options: one clear line, exit 2
    assert main(["unlearn", "--config", str(cfg), "--shards", str(shards), "--forget", "forget",
                 "--forget-ids", str(tmp_path / "ids.txt")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["unlearn", "--model", "tiny", "--shards", str(shards)]) == 2
    assert "--forget" in capsys.readouterr().err
    assert main(["unlearn", "--model", "tiny", "--shards", str(shards), "--forget", "f0,zz",
                 "--steps", "1"]) == 1
    assert "not in the shards: zz" in capsys.readouterr().err


def test_unlearn_help_lists_every_method(capsys):
    from noencore.cli import build_parser
    from noencore.methods import METHODS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("--method METHOD ")[-1].split("(default")[0]
    assert {m.strip() for m in listed.split("(noencore")[0].split("|")} == set(METHODS)
