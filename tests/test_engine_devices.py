"""Where the engine puts things on a GPU node, tested by mechanism on a CPU machine.

A CPU/gloo run cannot show a tensor on the wrong GPU or a CPU tensor in an NCCL
collective (everything is on the CPU there), so these tests look at the mechanism:
the device the engine picks for each rank before loading anything, the device a
collective runs on under NCCL, the device reference tables follow, what a rank whose
rows are all padding contributes, and what the launchers append to the command line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from noencore.errors import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, random_items  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
RUN = dict(forget="forget", method="graddiff", steps=2, lr=1e-3, batch_size=4,
           forget_ratio=0.5, frames=12, seed=5, progress=False, backend="torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    root = tmp_path_factory.mktemp("devices")
    return root, conditioned_shards(root / "shards", random_items(2, 6, 20), OVERRIDES)


def _fresh():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)


class _Seen(Exception):
    """Raised by a stand-in collective to report the device it was handed."""

    def __init__(self, device: torch.device):
        super().__init__(str(device))
        self.device = device


def _fake_group(monkeypatch, backend: str, cuda_device: int = 1) -> None:
    """Make torch.distributed look like a 2-rank group on ``backend`` whose collectives
    report the device of their tensor (and do nothing else)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda_device)

    def collective(t, *a, **k):
        raise _Seen(t.device)

    monkeypatch.setattr(dist, "all_reduce", collective)


def test_collectives_run_on_the_backend_device(monkeypatch):
    """NCCL reduces only CUDA tensors: a CPU tensor handed to ``all_reduce_sum`` under
    NCCL must reach the collective on this rank's GPU; under gloo on the CPU."""
    from noencore import distributed

    _fake_group(monkeypatch, "nccl", cuda_device=1)
    assert distributed.comm_device() == torch.device("cuda", 1)
    # this machine has no GPU: stand in for cuda:1 with the meta device, which any CPU
    # tensor can be copied to
    monkeypatch.setattr(distributed, "comm_device", lambda: torch.device("meta"))
    with pytest.raises(_Seen) as seen:
        distributed.all_reduce_sum(torch.ones(6, dtype=torch.float64))
    assert seen.value.device.type == "meta"

    monkeypatch.undo()
    _fake_group(monkeypatch, "gloo")
    assert distributed.comm_device() == torch.device("cpu")
    with pytest.raises(_Seen) as seen:
        distributed.all_reduce_sum(torch.ones(6))
    assert seen.value.device.type == "cpu"


def test_each_rank_loads_onto_its_own_gpu_before_anything_else(data, monkeypatch):
    """Under a launcher, rank 1 of a GPU node loads the model onto cuda:1, not onto the
    default GPU 0 (which would put every rank's copy and CUDA context on GPU 0)."""
    import noencore.models as models

    _, shards = data
    seen = {}

    def fake_load(spec, device="cpu", **kw):
        seen["device"] = torch.device(device)
        raise _Seen(torch.device(device))

    monkeypatch.setattr(models, "load_musicgen", fake_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from noencore import unlearn

    with pytest.raises(_Seen):
        unlearn("tiny", shards, **RUN, zero_stage=2)
    assert seen["device"] == torch.device("cuda", 1)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(_Seen):  # one process, no launcher: the current GPU
        unlearn("tiny", shards, **RUN)
    assert seen["device"] == torch.device("cuda", 0)


def test_row_reference_follows_the_tables_device():
    """Reference tables live on the rank's device (after a resume, too); a batch's rows
    are looked up there, without writing device values into a CPU tensor."""
    from noencore.engine.loop import _row_reference

    forget = torch.tensor([True, False, True, False])
    unit = torch.tensor([1, 4, 0, -1])  # the last row is padding
    ref_f, ref_r = torch.tensor([10.0, 11.0]), torch.arange(5, dtype=torch.float32) + 20
    out = _row_reference(ref_f, ref_r, forget, unit)
    assert out.tolist() == [11.0, 24.0, 10.0, 0.0]
    assert _row_reference(None, ref_r, forget, unit).tolist() == [0.0, 24.0, 0.0, 0.0]
    # tables on another device than the batch (meta stands in for the GPU here)
    meta = _row_reference(ref_f.to("meta"), ref_r.to("meta"), forget, unit)
    assert meta.device.type == "meta" and meta.shape == (4,)


def test_reference_nll_is_shared_between_ranks(data):
    """Each rank scores every world-th batch of windows; summed over ranks the tables
    equal the one-process table."""
    from noencore.engine.loop import _reference_nll
    from noencore.engine.sets import UnlearningSets
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    sets = UnlearningSets(shards, "forget", None, RUN["frames"])
    cache = ConditionCache(root / "shards" / "conditions")
    cpu = torch.device("cpu")
    whole = _reference_nll(model, sets, cache, 2, cpu, forget=False)
    parts = [_reference_nll(model, sets, cache, 2, cpu, forget=False, rank=r, world=3)
             for r in range(3)]  # world > 1 without a process group: no reduction
    scored = [set(torch.nonzero(p).flatten().tolist()) for p in parts]
    assert all(scored) and sum(len(s) for s in scored) == sets.n_remain
    assert set.union(*scored) == set(range(sets.n_remain))
    torch.testing.assert_close(sum(parts), whole)


@pytest.mark.parametrize("layout", ["dense", "counted"])
@pytest.mark.parametrize("frames", [0, 2], ids=["padding-only", "two-frame-row"])
def test_every_parameter_gets_a_gradient_on_every_rank(data, frames, layout):
    """DeepSpeed ZeRO-2/3 reduce gradients in buckets filled by hooks that fire during
    backward: every rank must give every parameter a gradient in every micro-batch, also
    a rank whose rows are all padding (frames=0) and one whose only row is too short to
    reach the delayed codebooks (frames=2: no token for codebooks 2 and 3); with every
    position a head row (dense) and as the training step lays it out (counted: the batch
    cut after its last counted frame, the heads given the counted positions only)."""
    from noencore.engine.objective import UnlearnObjective, counted_layout, token_counts
    from noencore.methods import get_method
    from noencore.models.adapter import token_mask
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    B, K, T = 1, model.n_q, 12
    codes = torch.randint(0, model.card, (B, K, T))
    mask = torch.zeros(B, K, T, dtype=torch.bool)
    mask[:, :, :frames] = True
    forget = torch.tensor([frames > 0])
    emb, emask = ConditionCache(root / "shards" / "conditions").batch(
        shards.captions[:1], present=[frames > 0])  # padding rows: no condition
    counts = token_counts(model.lm, mask, forget) + torch.tensor([5.0, 5.0, 1.0],
                                                                 dtype=torch.float64)
    obj = UnlearnObjective(model, get_method("graddiff"), backend="torch")
    keep, extra = token_mask(model.lm, mask), ()
    if layout == "counted":
        codes, keep, positions, window = counted_layout(model.lm, codes, keep)
        assert codes.shape[-1] == max(frames, 1)
        assert positions[1] == tuple(max(1, int(n)) for n in keep.sum(dim=(0, 2)))
        extra = (None, positions, window)
    loss, stats = obj(codes, keep, forget, emb, emask, None, counts, 7,
                      torch.tensor([0 if frames else -1]), *extra)
    assert loss.requires_grad
    loss.backward()
    missing = [n for n, p in model.lm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    heads = [lin.weight.grad for lin in model.lm.linears]
    assert not heads[3].any() and (heads[0].any() if frames else not heads[0].any())
    assert stats.device == codes.device and stats[1] == (3 if frames else 0)


def test_batch_smaller_than_the_world_is_refused(data, monkeypatch):
    from noencore import unlearn

    _, shards = data
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(UsageError, match=r"batch_size \(4\) is smaller than the number of "
                                         r"ranks \(8\).*--batch-size 8"):
        unlearn(_fresh(), shards, **RUN, zero_stage=3)


def test_resume_hashes_each_checkpoint_file_once(data, tmp_path, monkeypatch):
    from noencore import unlearn
    from noencore.engine import checkpoint

    _, shards = data
    unlearn(_fresh(), shards, **RUN, out=tmp_path / "run", checkpoint_every=1)
    folder = checkpoint.latest_checkpoint(tmp_path / "run" / "checkpoints")
    files = json.loads((folder / "manifest.json").read_text())["files"]
    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    res = unlearn(_fresh(), shards, **{**RUN, "steps": 3}, out=tmp_path / "run", resume=True,
                  save=False)
    assert res.steps == 3
    resumed = [p for p in hashed if Path(p).parent == folder]
    assert len(resumed) == len(files), resumed


def test_metrics_record_which_backend_ran(data, tmp_path):
    from noencore import unlearn
    from noencore.ops import cpp_available

    _, shards = data
    res = unlearn(_fresh(), shards, **RUN, out=tmp_path / "run", save=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in recs] == ["torch", "torch"]
    res = unlearn(_fresh(), shards, **{**RUN, "backend": "auto", "steps": 1}, save=False)
    assert res.metrics[0]["backend"] == ("cpp" if cpp_available() else "torch")


def test_launcher_local_rank_argument_is_accepted(monkeypatch):
    """``deepspeed`` appends ``--local_rank=N`` to the command (after the subcommand's own
    flags); the CLI takes it out and hands N to the engine through LOCAL_RANK."""
    from noencore.cli import build_parser, take_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["unlearn", "--model", "tiny", "--shards", "s", "--forget", "f", "--local_rank=1"]
    rest = take_local_rank(argv)
    assert rest == argv[:-1] and os.environ["LOCAL_RANK"] == "1"
    args = build_parser().parse_args(rest)
    assert args.command == "unlearn" and args.forget == "f"
    assert take_local_rank(["info", "--local-rank", "1", "x"]) == ["info", "x"]
    with pytest.raises(SystemExit, match="disagrees with LOCAL_RANK=1"):
        take_local_rank(["info", "--local_rank=3"])


def test_resume_names_the_damaged_checkpoint_it_passes_over(data, tmp_path):
    from noencore import unlearn

    _, shards = data
    unlearn(_fresh(), shards, **{**RUN, "steps": 2}, out=tmp_path / "run", checkpoint_every=1,
            save=False)
    newest = tmp_path / "run" / "checkpoints" / "step_0000002"
    state = newest / "state.pt"
    data_bytes = bytearray(state.read_bytes())
    data_bytes[-100] ^= 0xFF
    state.write_bytes(bytes(data_bytes))
    with pytest.warns(UserWarning, match=rf"resume passes over a damaged checkpoint: {state}: "
                      r"missing or corrupt \(checksum mismatch\)"):
        res = unlearn(_fresh(), shards, **{**RUN, "steps": 3}, out=tmp_path / "run",
                      resume=True, save=False)
    assert res.steps == 3
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [2, 3]  # step 2 again, from step 1's checkpoint


def test_bf16_on_a_cpu_without_bf16_instructions_is_named(tmp_path, monkeypatch):
    """A bf16 run on a CPU whose flags lack avx512_bf16 and amx_bf16 gets one warning that
    says why it is slow and what to use; with either flag, or on a GPU, or in fp32, none."""
    import torch

    from noencore.engine import loop

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert loop.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "fma"}
    assert loop.cpu_flags(str(tmp_path / "absent")) is None
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx2", "fma"})
    msg = loop._slow_bf16(cpu, "bf16", False)
    assert "precision bf16" in msg and "--precision fp32" in msg
    assert "DeepSpeed" in loop._slow_bf16(cpu, "fp32", True)
    assert loop._slow_bf16(cpu, "fp32", False) is None
    assert loop._slow_bf16(torch.device("cuda", 0), "bf16", False) is None
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(loop, "cpu_flags", lambda f=flag: {"avx2", f})
        assert loop._slow_bf16(cpu, "bf16", False) is None
    monkeypatch.setattr(loop, "cpu_flags", lambda: None)
    assert loop._slow_bf16(cpu, "bf16", False) is None
