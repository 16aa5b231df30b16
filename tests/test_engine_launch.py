"""The README's multi-GPU commands, on 2 CPU ranks: ``deepspeed --num_gpus 2 --module
noencore unlearn ...`` (the launcher appends ``--local_rank=N``) trains and checkpoints,
then ``torchrun --nproc_per_node 2 -m noencore unlearn ... --resume`` continues it.

A rank may abort at exit after its work is done (a known DeepSpeed-on-CPU issue): the
test reads what the run wrote, and accepts a non-zero exit only with complete results.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import free_port, random_items, write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}


def _launcher(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed next to {sys.executable}")
        return found
    return str(exe)


@pytest.mark.distributed
def test_readme_deepspeed_then_torchrun_resume(tmp_path):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    shards = TokenShards(write_shards(tmp_path / "shards", random_items(2, 6, 20)))
    build_condition_cache(tmp_path / "shards" / "conditions", shards.captions,
                          load_musicgen("tiny", with_codec=False).text_encoder, progress=False)
    (tmp_path / "optout.txt").write_text("f0\nf1\n")
    out = tmp_path / "run"
    flags = ["unlearn", "--model", "tiny", "--shards", str(shards.path), "--forget-ids",
             str(tmp_path / "optout.txt"), "--method", "npo", "--batch-size", "4",
             "--frames", "12", "--lr", "1e-3", "--zero-stage", "2", "--checkpoint-every", "1",
             "--out", str(out), "--no-progress", "--device", "cpu"]
    ds = subprocess.run([_launcher("deepspeed"), "--num_gpus", "2", "--master_port",
                         str(free_port()), "--module", "noencore", *flags, "--steps", "2"],
                        capture_output=True, text=True, env=_env(), timeout=540, cwd=tmp_path)
    assert (out / "checkpoints" / "step_0000002" / "manifest.json").exists(), ds.stderr[-3000:]
    assert "--local_rank" not in ds.stderr  # the launcher's argument was accepted

    tr = subprocess.run([_launcher("torchrun"), "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "-m", "noencore", *flags, "--steps", "3",
                         "--resume"],
                        capture_output=True, text=True, env=_env(), timeout=540, cwd=tmp_path)
    summaries = [json.loads(line) for line in tr.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, tr.stdout[-2000:] + tr.stderr[-3000:]  # rank 0 alone reports
    assert summaries[0]["steps"] == 3 and summaries[0]["model_dir"] == str(out / "model")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert (out / "model" / "state_dict.bin").exists()
    manifest = json.loads((out / "checkpoints" / "step_0000003" / "manifest.json").read_text())
    assert manifest["run"]["world"] == 2 and manifest["run"]["zero"] == 2
