"""DeepSpeed ZeRO 1/2/3 (bf16) on 2 CPU ranks with gloo, against one process.

One driver script runs every scenario in each world (1 and 2 ranks, spawned), and the
tests read what the ranks wrote:

* NPO for 3 steps at each stage (2 ranks: with 2 micro-batches per step and activation
  checkpointing): the parameters equal one process's; the model ``unlearn`` returns is
  whole and fp32 on every rank; under ZeRO-3 the fused op sees whole head weights.
* the membership-inference stop rule with a moving row target, from a memorised model:
  the same decision (stop step, a crossing bisected to the target) as one process (fp32,
  no DeepSpeed), and two ranks the same run (NLLs, AUC, bisected fraction) as one rank;
* target matching (targets fitted once on the non-members) with the "original" stop rule
  under ZeRO-2: the same targets and decision as one process, the same run on two ranks;
* the head gradients of the first step under ZeRO-3 equal one process's;
* a run folder the ranks do not share is refused on every rank.

A rank that aborts at exit after writing its results (a known DeepSpeed-on-CPU issue)
does not fail the tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import free_port, random_items, write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)
REMAIN, NONMEMBERS = ["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]
# memory-efficient attention, as in every released MusicGen: its self-attention needs query,
# key and value to be one tensor, which ZeRO-3's per-module hooks used to break
OVERRIDES = {"transformer_lm": {"num_layers": 1, "memory_efficient": True}}
# the stop rule's model (memorised in one process) keeps the plain attention: its runs compare
# bf16 DeepSpeed against an fp32 process over up to 8 steps of ascent, and with the
# memory-efficient path the two trajectories drift apart by one step's share before the stop
MEMORISED_OVERRIDES = {"transformer_lm": {"num_layers": 1}}

_DRIVER = """
import json, os, sys
import torch.multiprocessing as mp
WORLD, PORT, SHARDS, MEMORISED, OUT = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                       sys.argv[4], sys.argv[5])
STAGES, REMAIN, NONMEMBERS, OVERRIDES = {stages}, {remain}, {nonmembers}, {overrides}


def record_heads(box):
    # every weight the fused op is handed, to check ZeRO-3 gives it whole heads
    import noencore.ops as ops
    real = ops.linear_ce_ascent
    def spy(hidden, weight, *a, **k):
        box.append(tuple(weight.shape))
        return real(hidden, weight, *a, **k)
    ops.linear_ce_ascent = spy


def record_head_grads(box, model):
    # the head gradients of the first optimizer step, before the update
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad
    real_ds, real_adam = DeepSpeedEngine.step, torch.optim.AdamW.step
    def ds_step(self, *a, **k):
        if not box and self.is_gradient_accumulation_boundary():
            box.extend(safe_get_full_grad(lin.weight).float().cpu() for lin in model.lm.linears)
        return real_ds(self, *a, **k)
    def adam_step(self, *a, **k):
        if not box:
            box.extend(lin.weight.grad.float().cpu() for lin in model.lm.linears)
        return real_adam(self, *a, **k)
    DeepSpeedEngine.step, torch.optim.AdamW.step = ds_step, adam_step


def work(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    import torch
    from safetensors.torch import load_file
    from noencore import unlearn
    from noencore.errors import UsageError
    from noencore.methods import get_method
    from noencore.models import load_musicgen

    def tiny():
        return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)

    def result(name, value):
        if rank == 0:
            with open(f"{{OUT}}/{{name}}.json", "w") as fh:
                json.dump(value, fh)

    kw = dict(forget="forget", lr=1e-3, batch_size=4, forget_ratio=0.5, frames=12, seed=1,
              progress=False, backend="torch", device="cpu")
    split = dict(accumulation=2, checkpointing=True) if WORLD > 1 else {{}}
    heads = []
    record_heads(heads)
    for stage in STAGES:  # NPO: parameters, the returned model, whole heads under ZeRO-3
        model = tiny()
        shapes = {{k: v.shape for k, v in model.lm.state_dict().items()}}
        out = f"{{OUT}}/npo_w{{WORLD}}_z{{stage}}"
        del heads[:]
        res = unlearn(model, SHARDS, **kw, method="npo", steps=3, zero_stage=stage, out=out,
                      **split)
        saved = load_file(f"{{out}}/model/model.safetensors")
        got = res.model.lm.state_dict()
        whole = (got.keys() == saved.keys() and all(
            got[k].shape == shapes[k] and got[k].dtype == torch.float32
            and torch.equal(got[k], saved[k]) for k in saved))
        open(f"{{out}}/returned_model_rank{{rank}}", "w").write("ok" if whole else "differs")
        open(f"{{out}}/head_shapes_rank{{rank}}.json", "w").write(json.dumps(sorted(set(heads))))
    for stage in [None] + list(STAGES):  # the stop rule (None: one process, fp32)
        if stage is None and WORLD > 1:
            continue
        method = get_method("bounded_ga", loss_cap=None, row_target=5.0, remain_anchor=True)
        res = unlearn(load_musicgen(MEMORISED, with_codec=False), SHARDS, **{{**kw,
                      "method": method, "lr": 3e-3, "remain": REMAIN, "steps": 8,
                      "zero_stage": stage, "stop_nonmembers": NONMEMBERS, "save": False}})
        result(f"stop_w{{WORLD}}_z{{stage}}", {{"steps": res.steps, "stopped": res.stopped,
               "info": res.stop_info, "row_target": method.row_target,
               "forget_nll": [m["forget_nll"] for m in res.metrics]}})
    # target matching with the "original" stop rule; two of the remain tracks anchored at
    # the non-members' level (anchor_unseen). Each rank lays its rows out by codebook:
    # codebook 0 weighted 2:1 in each row's pull, or each codebook sent to the held
    # tracks' profile (measured on every rank's share of them)
    for name, option in (("match", {{"coarse_weight": 2.0}}),
                         ("match_profile", {{"codebook_profile": True}})):
        for stage in [None, 2]:
            if stage is None and WORLD > 1:
                continue
            method = get_method("match", width=1.0, remain_weight=1.0, remain_anchor=True,
                                **option)
            seen = []  # every measurement of the held tracks' codebooks handed to it
            keep = method.set_held_codebooks
            method.set_held_codebooks = lambda m, keep=keep, seen=seen: (
                seen.append(m.tolist()), keep(m))[1]
            res = unlearn(load_musicgen(MEMORISED, with_codec=False), SHARDS, **{{**kw,
                          "method": method, "lr": 3e-3, "remain": REMAIN[:2], "steps": 8,
                          "anchor_unseen": REMAIN[2:],
                          "zero_stage": stage, "stop_nonmembers": NONMEMBERS,
                          "stop_rule": "original", "stop_auc": 0.5, "save": False}})
            result(f"{{name}}_w{{WORLD}}_z{{stage}}", {{
                "steps": res.steps, "stopped": res.stopped, "info": res.stop_info,
                "targets": method.target_map[1].tolist(), "held": seen,
                "forget_nll": [m["forget_nll"] for m in res.metrics]}})
    for stage in ([None, 3] if WORLD == 1 else [3]):  # head gradients of the first step
        model = tiny()
        grads = []
        record_head_grads(grads, model)
        unlearn(model, SHARDS, **kw, method="graddiff", steps=1, grad_clip=None,
                zero_stage=stage, save=False)
        if rank == 0:
            torch.save(grads, f"{{OUT}}/head_grads_w{{WORLD}}_z{{stage}}.pt")
    if WORLD > 1:  # a run folder the ranks do not share is refused on every rank
        try:
            unlearn(tiny(), SHARDS, **kw, method="ga", steps=1, zero_stage=1,
                    out=f"{{OUT}}/private_{{rank}}")
            msg = "trained"
        except UsageError as exc:
            msg = str(exc)
        open(f"{{OUT}}/private_rank{{rank}}.txt", "w").write(msg)
    if rank == 0:
        open(f"{{OUT}}/DONE_w{{WORLD}}", "w").write("ok")

if __name__ == "__main__":
    if WORLD == 1:
        work(0)
    else:
        mp.spawn(work, nprocs=WORLD, join=True)
"""



def _launch(world: int, shards: Path, memorised: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    script = out / "zero_driver.py"  # a file: spawned ranks re-import it
    script.write_text(_DRIVER.format(stages=list(STAGES), remain=REMAIN, nonmembers=NONMEMBERS,
                                     overrides=OVERRIDES))
    proc = subprocess.run([sys.executable, str(script), str(world), str(free_port()),
                           str(shards), str(memorised), str(out)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    if not (out / f"DONE_w{world}").exists():  # only an abort *after* the results is tolerated
        lines = [ln for ln in proc.stderr.splitlines() if "Loading weights" not in ln]
        pytest.fail(f"world {world} failed (rc {proc.returncode}):\n" + "\n".join(lines[-40:]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shards, a model memorised on forget + remain (one process), then both worlds."""
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore import unlearn
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    root = tmp_path_factory.mktemp("zero")
    shards = TokenShards(write_shards(root / "shards", random_items(4, 8, 20)))
    model = load_musicgen("tiny", with_codec=False, overrides=MEMORISED_OVERRIDES)
    build_condition_cache(root / "shards" / "conditions", shards.captions, model.text_encoder,
                          progress=False)
    # the NPO and head-gradient runs' starting weights (a named config has fixed-seed weights)
    start = {k: v.float().clone() for k, v in
             load_musicgen("tiny", with_codec=False, overrides=OVERRIDES).lm.state_dict().items()}
    mem = unlearn(model, shards, forget="forget", remain=REMAIN, method="finetune", steps=25,
                  lr=3e-3, batch_size=8, frames=12, seed=0, progress=False, backend="torch",
                  out=root / "memorised")
    out = root / "out"
    out.mkdir()
    for world in (1, 2):
        _launch(world, shards.path, mem.model_dir, out)
    return out, start


def _state(out: Path, world: int, stage: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / f"npo_w{world}_z{stage}" / "model" / "model.safetensors")


@pytest.mark.distributed
def test_two_ranks_with_accumulation_and_checkpointing_match_one_process(runs):
    out, start = runs
    for stage in STAGES:
        one, two = _state(out, 1, stage), _state(out, 2, stage)
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


@pytest.mark.distributed
def test_returned_model_is_whole_and_zero3_op_sees_whole_heads(runs):
    out, start = runs
    head = list(start["linears.0.weight"].shape)
    for world in (1, 2):
        for stage in STAGES:
            run = out / f"npo_w{world}_z{stage}"
            for rank in range(world):
                assert (run / f"returned_model_rank{rank}").read_text() == "ok", (world, stage)
                seen = json.loads((run / f"head_shapes_rank{rank}.json").read_text())
                assert seen == [head], (world, stage, rank, seen)  # never an empty partition


def _decides_as(got: dict, plain: dict, where: object) -> None:
    """A DeepSpeed run (bf16 compute weights) against one fp32 process: the same decision.

    Their first step's forget NLL agrees to bf16 rounding; after it the two trajectories
    part: Adam's first step moves every weight by about lr whatever its gradient's size,
    so bf16 noise in the small gradients becomes full-size moves (measured: the forget NLL
    of step 2 between 3.77 and 4.29 nats over AVX2 and AVX-512 arithmetic and 1 to 3
    threads, the DeepSpeed runs of one machine within 0.1 % of each other). So the
    trajectories are compared across world sizes (``_same_run``), and here the decision:
    the same stop step, each run's crossing bisected to within two of the attack's AUC
    steps of the target (4 x 4 tracks: steps of 1/16)."""
    assert got["stopped"] == plain["stopped"] and got["steps"] == plain["steps"], (where, got)
    assert got["forget_nll"][0] == pytest.approx(plain["forget_nll"][0], rel=2e-3), where
    for run in (got, plain):
        if run["info"] is not None:
            assert abs(run["info"]["auc"] - 0.5) <= 2 / 16 + 1e-9, (where, run["info"])


def _same_run(two: dict, one: dict, where: object) -> None:
    """Two ranks under ZeRO against one rank: the same run to bf16 reduction order."""
    assert two["stopped"] == one["stopped"] and two["steps"] == one["steps"], where
    assert two["forget_nll"] == pytest.approx(one["forget_nll"], rel=2e-3), where
    if one["info"] is not None:
        assert two["info"]["fraction"] == pytest.approx(one["info"]["fraction"], abs=0.07)
        assert two["info"]["auc"] == pytest.approx(one["info"]["auc"], abs=1 / 16 + 1e-9)


@pytest.mark.distributed
def test_stop_rule_under_zero_decides_as_one_process(runs):
    out, _ = runs
    plain = json.loads((out / "stop_w1_zNone.json").read_text())
    assert plain["stopped"] == "nonmember_auc" and 1 < plain["steps"] < 8
    assert 0 < plain["info"]["fraction"] < 1  # the crossing was bisected
    assert plain["row_target"] == pytest.approx(plain["info"]["nonmember_nll"])
    for world in (1, 2):
        for stage in STAGES:
            got = json.loads((out / f"stop_w{world}_z{stage}.json").read_text())
            _decides_as(got, plain, (world, stage))
            assert got["row_target"] == pytest.approx(plain["row_target"], rel=0.02)
    for stage in STAGES:  # two ranks decide as one rank, to bf16 reduction order
        one = json.loads((out / f"stop_w1_z{stage}.json").read_text())
        two = json.loads((out / f"stop_w2_z{stage}.json").read_text())
        _same_run(two, one, stage)
        assert two["row_target"] == pytest.approx(one["row_target"], rel=2e-3)


@pytest.mark.distributed
def test_match_targets_and_original_stop_rule_on_two_ranks_as_one_process(runs):
    """Targets fitted once from the non-members under the starting weights, and the stop
    rule against those NLLs, with two tracks anchored at their level (``anchor_unseen``):
    every rank's shares summed give one process's figures."""
    out, _ = runs
    plain = json.loads((out / "match_w1_zNone.json").read_text())
    assert len(plain["targets"]) > 1 and plain["targets"] == sorted(plain["targets"])
    for world in (1, 2):
        got = json.loads((out / f"match_w{world}_z2.json").read_text())
        _decides_as(got, plain, world)
        # the non-members scored with DeepSpeed's bf16 compute weights against fp32 in one
        # process (measured: within 2.4e-4 relative)
        assert got["targets"] == pytest.approx(plain["targets"], rel=1e-3)
    one, two = (json.loads((out / f"match_w{w}_z2.json").read_text()) for w in (1, 2))
    _same_run(two, one, "match")
    assert two["targets"] == pytest.approx(one["targets"], rel=1e-3)
    # codebook_profile: the held tracks' codebook NLLs, summed over the ranks' shares
    # under the starting weights, then at every check (one per step here)
    plain = json.loads((out / "match_profile_w1_zNone.json").read_text())
    assert len(plain["held"]) >= 2 and {len(m) for m in plain["held"]} == {4}
    assert all(0 < m < 20 for m in plain["held"][0])
    for world in (1, 2):
        got = json.loads((out / f"match_profile_w{world}_z2.json").read_text())
        _decides_as(got, plain, world)
        # the starting weights' measurement: bf16 compute weights against fp32
        assert got["held"][0] == pytest.approx(plain["held"][0], rel=2e-3)
    one, two = (json.loads((out / f"match_profile_w{w}_z2.json").read_text()) for w in (1, 2))
    _same_run(two, one, "match")
    for a, b in zip(two["held"], one["held"]):  # every check: the ranks' shares summed
        assert a == pytest.approx(b, rel=2e-3)


@pytest.mark.distributed
def test_zero3_head_gradients_equal_one_process(runs):
    out, _ = runs
    plain = torch.load(out / "head_grads_w1_zNone.pt")
    assert len(plain) == 4 and all(g.abs().sum() > 0 for g in plain)
    for world in (1, 2):
        got = torch.load(out / f"head_grads_w{world}_z3.pt")
        for k, (g, p) in enumerate(zip(got, plain)):
            assert g.shape == p.shape, (world, k)
            rel = float((g - p).norm() / p.norm())
            assert rel < 0.02, (world, k, rel)  # bf16 forward and backward under DeepSpeed


@pytest.mark.distributed
def test_run_folder_the_ranks_do_not_share_is_refused(runs):
    out, _ = runs
    for rank in (0, 1):
        msg = (out / f"private_rank{rank}.txt").read_text()
        assert "1 of 2 ranks cannot see the run folder" in msg and "shares" in msg, msg
