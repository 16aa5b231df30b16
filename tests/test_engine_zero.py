"""DeepSpeed ZeRO 1/2/3 (bf16) on CPU with gloo: 2 ranks give the parameters of one process
with the same global batch; the model ``unlearn`` returns is whole and fp32 on every rank;
a run folder the ranks do not share is refused. Ranks write their results to files; a
rank that aborts at exit after writing them (a known DeepSpeed-on-CPU issue) does not
fail the test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import random_items, write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)

_DRIVER = """
import os, sys
import torch.multiprocessing as mp
WORLD, PORT, SHARDS, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def work(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    import torch
    from safetensors.torch import load_file
    from noencore import unlearn
    from noencore.errors import UsageError
    from noencore.models import load_musicgen
    kw = dict(forget="forget", method="npo", steps=3, lr=1e-3, batch_size=4, forget_ratio=0.5,
              frames=12, seed=1, progress=False, zero_stage=None, backend="torch", device="cpu")
    for stage in {stages}:
        model = load_musicgen("tiny", with_codec=False,
                              overrides={{"transformer_lm": {{"num_layers": 1}}}})
        shapes = {{k: v.shape for k, v in model.lm.state_dict().items()}}
        out = f"{{OUT}}/w{{WORLD}}_z{{stage}}"
        res = unlearn(model, SHARDS, **{{**kw, "zero_stage": stage}}, out=out)
        # the returned model is whole and fp32 on every rank: the saved master weights
        saved = load_file(f"{{out}}/model/model.safetensors")
        got = res.model.lm.state_dict()
        same = (got.keys() == saved.keys() and all(
            got[k].shape == shapes[k] and got[k].dtype == torch.float32
            and torch.equal(got[k], saved[k]) for k in saved))
        open(f"{{out}}/returned_model_rank{{rank}}", "w").write("ok" if same else "differs")
        if rank == 0:
            open(f"{{out}}/DONE", "w").write("ok")
    if WORLD > 1:  # a run folder the ranks do not share is refused on every rank
        try:
            unlearn(load_musicgen("tiny", with_codec=False), SHARDS, **{{**kw, "zero_stage": 1}},
                    out=f"{{OUT}}/private_{{rank}}")
            msg = "trained"
        except UsageError as exc:
            msg = str(exc)
        open(f"{{OUT}}/private_rank{{rank}}.txt", "w").write(msg)

if __name__ == "__main__":
    if WORLD == 1:
        work(0)
    else:
        mp.spawn(work, nprocs=WORLD, join=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, shards: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    script = out.parent / "zero_driver.py"  # a file: spawned ranks re-import it
    script.write_text(_DRIVER.format(stages=list(STAGES)))
    return subprocess.run([sys.executable, str(script), str(world), str(_free_port()),
                           str(shards), str(out)], capture_output=True, text=True, env=env,
                          timeout=540, cwd=ROOT)


def _state(out: Path, world: int, stage: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    run = out / f"w{world}_z{stage}"
    assert (run / "DONE").exists(), f"{run}: the run did not finish"
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.distributed
def test_zero_stages_two_ranks_match_one_process(tmp_path):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    shards = TokenShards(write_shards(tmp_path / "shards", random_items(2, 6, 20)))
    model = load_musicgen("tiny", with_codec=False,
                          overrides={"transformer_lm": {"num_layers": 1}})
    build_condition_cache(tmp_path / "shards" / "conditions", shards.captions,
                          model.text_encoder, progress=False)
    start = {k: v.float() for k, v in model.lm.state_dict().items()}

    for world in (1, 2):
        proc = _launch(world, shards.path, tmp_path / "out")
        done = all((tmp_path / "out" / f"w{world}_z{s}" / "DONE").exists() for s in STAGES)
        if not done:  # only a rank abort *after* the results were written is tolerated
            errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "rank" in ln]
            pytest.fail(f"world {world} failed (rc {proc.returncode}):\n" + "\n".join(errors[-30:]))

    for world in (1, 2):
        for stage in STAGES:
            for rank in range(world):
                flag = tmp_path / "out" / f"w{world}_z{stage}" / f"returned_model_rank{rank}"
                assert flag.read_text() == "ok", (world, stage, rank)
    for rank in (0, 1):
        msg = (tmp_path / "out" / f"private_rank{rank}.txt").read_text()
        assert "1 of 2 ranks cannot see the run folder" in msg and "shares" in msg, msg

    for stage in STAGES:
        one, two = _state(tmp_path / "out", 1, stage), _state(tmp_path / "out", 2, stage)
        assert one.keys() == two.keys() == start.keys()
        moved = torch.cat([(one[k] - start[k]).flatten() for k in start])
        diff = torch.cat([(two[k] - one[k]).flatten() for k in start])
        assert moved.norm() > 0  # training happened
        # bf16 forward/backward: ranks reduce in another order, so allow bf16-level error
        # relative to how far the parameters moved
        assert diff.norm() <= 0.05 * moved.norm(), (stage, float(diff.norm()),
                                                     float(moved.norm()))
        print(f"stage {stage}: |diff| / |moved| = {float(diff.norm() / moved.norm()):.2e}, "
              f"elements off by > lr/10: {float((diff.abs() > 1e-4).float().mean()):.2e}")
        # Adam moves every element by about lr per step: few may differ by a tenth of it
        assert (diff.abs() > 1e-4).float().mean() < 0.01, stage
