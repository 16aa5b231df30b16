"""The unlearning loop: a run end to end, stop criteria, divergence guard, bad input,
and a SIGKILLed run resumed bitwise (fp32, CPU, one process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noencore.errors import NoencoreError, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import (  # noqa: E402
    conditioned_shards,
    prepared_trainer,
    random_items,
    write_shards,
)

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
RUN = dict(forget="forget", method="graddiff", steps=6, lr=1e-3, batch_size=4,
           forget_ratio=0.5, frames=12, seed=5, progress=False, backend="torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    root = tmp_path_factory.mktemp("engine")
    return root, conditioned_shards(root / "shards", random_items(2, 6, 20), OVERRIDES)


def _fresh():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)


def test_run_writes_metrics_plot_checkpoint_and_model(data, tmp_path):
    from noencore import unlearn
    from noencore.engine.checkpoint import list_checkpoints, verify
    from noencore.models import load_musicgen

    _, shards = data
    model = _fresh()
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    res = unlearn(model, shards, **{**RUN, "method": "ga", "lr": 3e-3}, out=tmp_path / "run",
                  checkpoint_every=4)
    assert res.steps == 6 and res.stopped == "max_steps"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and r["forget_nll"] > 0 and r["remain_nll"] > 0
               for r in recs)
    assert recs[-1]["forget_nll"] > recs[0]["forget_nll"]  # ascent raises the forget NLL
    assert (tmp_path / "run" / "losses.png").stat().st_size > 1000
    cks = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in cks] == ["step_0000004", "step_0000006"]
    assert verify(cks[-1])["step"] == 6
    saved = load_musicgen(str(res.model_dir), with_codec=False)
    after = saved.lm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in model.lm.state_dict().items())
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_target_forget_nll_stops_early(data):
    from noencore import unlearn

    _, shards = data
    res = unlearn(_fresh(), shards, **{**RUN, "method": "ga"}, target_forget_nll=0.0,
                  precision="bf16")  # bf16 autocast on fp32 weights
    assert res.stopped == "target_forget_nll" and res.steps == 1
    assert res.metrics[0]["forget_nll"] > 0 and res.metrics[0]["grad_norm"] > 0


def test_divergence_guard_keeps_last_good_checkpoint(data, tmp_path):
    from noencore import unlearn
    from noencore.engine import DivergenceError
    from noencore.engine.checkpoint import latest_checkpoint

    _, shards = data
    with pytest.raises(DivergenceError, match=r"step \d+: (loss|gradient norm) is (nan|inf)"):
        unlearn(_fresh(), shards, **{**RUN, "method": "ga", "lr": 1e30, "steps": 20},
                out=tmp_path / "run", checkpoint_every=1)
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None
    state = torch.load(last / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_bad_input_is_refused_before_training(data, tmp_path):
    from noencore import unlearn
    from noencore.data.shards import TokenShards

    root, shards = data
    with pytest.raises(NoencoreError, match="empty"):
        unlearn(_fresh(), shards, **{**RUN, "forget": []})
    with pytest.raises(NoencoreError, match="not in the shards: nobody"):
        unlearn(_fresh(), shards, **{**RUN, "forget": ["f0", "nobody"]})
    other = TokenShards(write_shards(tmp_path / "s2", random_items(1, 1, 20, card=1024),
                                     card=1024))
    with pytest.raises(NoencoreError, match="card 1024 vs model 2048"):
        unlearn(_fresh(), other, **RUN)
    nocond = TokenShards(write_shards(tmp_path / "s3", random_items(1, 2, 20)))
    with pytest.raises(NoencoreError, match="no text-condition cache"):
        unlearn(_fresh(), nocond, **RUN)
    with pytest.raises(UsageError, match="precision"):
        unlearn(_fresh(), shards, **RUN, precision="fp16")
    with pytest.raises(UsageError, match="resume needs"):
        unlearn(_fresh(), shards, **RUN, resume=True)
    with pytest.raises(UsageError, match="stage 3 but --zero-stage is 2"):
        unlearn(_fresh(), shards, **RUN, zero_stage=2,
                deepspeed={"zero_optimization": {"stage": 3}})


def test_deepspeed_config_contradictions():
    from noencore.engine.zero import build_config

    cfg = build_config(None, zero_stage=3, micro_batch=2, world_size=2, grad_clip=1.0,
                       offload_optimizer=True)
    assert cfg["train_batch_size"] == 4 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert cfg["bf16"]["enabled"] and cfg["zero_force_ds_cpu_optimizer"] is False
    for user, pattern in [({"train_micro_batch_size_per_gpu": 3}, "micro_batch"),
                          ({"train_batch_size": 7}, "train_batch_size=7"),
                          ({"optimizer": {"type": "Adam"}}, "optimizer"),
                          ({"fp16": {"enabled": True}}, "fp16"),
                          ({"gradient_accumulation_steps": 2}, "gradient_accumulation")]:
        with pytest.raises(UsageError, match=pattern):
            build_config(user, zero_stage=None, micro_batch=2, world_size=2, grad_clip=None,
                         offload_optimizer=False)
    cfg = build_config({"gradient_accumulation_steps": 3}, zero_stage=2, micro_batch=2,
                       world_size=2, grad_clip=None, offload_optimizer=False, accumulation=3)
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["train_batch_size"] == 12


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from noencore import unlearn
from noencore.models import load_musicgen
model = load_musicgen("tiny", with_codec=False, overrides={overrides!r})
def die(step, rec):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
unlearn(model, {shards!r}, **{run!r}, out={out!r}, checkpoint_every=2, save=False, on_step=die)
"""


def test_sigkill_then_resume_is_bitwise(data, tmp_path):
    from noencore import unlearn

    root, shards = data
    run = {**RUN, "method": "npo", "steps": 8}
    ref = _fresh()
    unlearn(ref, shards, **run, out=tmp_path / "straight", checkpoint_every=2, save=False)

    code = _KILLED_RUN.format(tests=str(Path(__file__).parent), overrides=OVERRIDES,
                              shards=str(shards.path), run=run, out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckdir = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*")) == ["step_0000002", "step_0000004"]

    resumed = _fresh()
    res = unlearn(resumed, shards, **run, out=tmp_path / "killed", checkpoint_every=2,
                  save=False, resume=True)
    assert res.steps == 8
    want = ref.lm.state_dict()
    for k, v in resumed.lm.state_dict().items():
        assert torch.equal(v, want[k]), k
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    with pytest.raises(UsageError, match=r"made with lr=0.001 \(this run: 0.005\)"):
        unlearn(_fresh(), shards, **{**run, "lr": 5e-3}, out=tmp_path / "killed", resume=True)


def test_remain_anchor_caches_remain_reference_in_checkpoints(data, tmp_path):
    """Anchored methods: the engine measures every remain window under the starting
    weights once, keeps it in each checkpoint, and resumes with it."""
    from noencore import unlearn
    from noencore.engine.loop import _reference_nll
    from noencore.engine.sets import UnlearningSets
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    sets = UnlearningSets(shards, "forget", None, RUN["frames"])
    want = _reference_nll(model, sets, ConditionCache(root / "shards" / "conditions"), 3,
                          torch.device("cpu"), forget=False)
    assert want.shape == (sets.n_remain,) and bool((want > 0).all())
    opts = {"method_options": {"remain_anchor": True, "remain_weight": 2.0}}
    unlearn(model, shards, **{**RUN, **opts, "steps": 2}, out=tmp_path / "run",
            checkpoint_every=1)
    state = torch.load(next((tmp_path / "run" / "checkpoints").glob("step_0000002")) / "state.pt",
                       weights_only=True)
    torch.testing.assert_close(state["ref_nll_remain"], want)
    assert state["ref_nll"] is None  # GradDiff needs no forget reference
    res = unlearn(_fresh(), shards, **{**RUN, **opts, "steps": 3}, out=tmp_path / "run",
                  resume=True)
    assert res.steps == 3 and res.metrics[-1]["step"] == 3
    # the resumed run kept the starting model's reference (not one of the step-2 weights)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000003" / "state.pt",
                       weights_only=True)
    torch.testing.assert_close(state["ref_nll_remain"], want)


def test_nonmember_stop_rule_in_the_loop(data):
    from noencore import unlearn

    _, shards = data
    kw = {**RUN, "method": "ga", "remain": ["r0", "r1", "r2", "r3"],
          "stop_nonmembers": ["r4", "r5"]}
    res = unlearn(_fresh(), shards, **kw, stop_auc=1.0)  # every AUC is <= 1: first check
    assert res.stopped == "nonmember_auc" and res.steps == 1
    assert res.stop_info["step"] == 1 and res.stop_info["fraction"] == 1.0  # nothing to bisect
    assert 0.0 <= res.stop_info["auc"] <= 1.0 and res.stop_info["forget_nll"] > 0
    res = unlearn(_fresh(), shards, **{**kw, "steps": 3}, stop_rule="nll", stop_every=5)
    assert res.stopped == "max_steps" and res.stop_info is None  # no check before step 5
    with pytest.raises(UsageError, match="both forget and non-member"):
        unlearn(_fresh(), shards, **{**kw, "stop_nonmembers": ["f0", "r5"]})
    with pytest.raises(UsageError, match="in the remain set"):
        unlearn(_fresh(), shards, **{**kw, "remain": None})
    with pytest.raises(UsageError, match="stop rule must be"):
        unlearn(_fresh(), shards, **kw, stop_rule="median")


def test_nonmember_stop_bisects_the_last_step_and_moves_row_target(data):
    from noencore.engine.sets import UnlearningSets
    from noencore.engine.stopping import NonmemberStop
    from noencore.methods import get_method
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    sets = UnlearningSets(shards, "forget", ["r0", "r1", "r2", "r3"], RUN["frames"])
    stop = NonmemberStop(model, sets, "forget", ["r4", "r5"],
                         ConditionCache(root / "shards" / "conditions"), bisect=10)
    p = next(model.lm.parameters())
    start = p.detach().clone()
    state = {}

    def scripted():  # the AUC falls linearly along the last step: 0.9 -> 0.2
        if "end" not in state:
            return 0.9, 1.0, 2.0
        a = float((p.detach() - start).sum() / (state["end"] - start).sum())
        return 0.9 - 0.7 * a, 3.0, 4.0

    stop.measure = scripted
    method = get_method("bounded_ga", loss_cap=None, row_target=1.0)
    assert stop.check(1, method) is None and method.row_target == 2.0
    with torch.no_grad():
        p.add_(torch.randn_like(p))  # "one optimizer step"
    state["end"] = p.detach().clone()
    info = stop.check(2, method)
    assert info is not None and method.row_target == 4.0
    assert abs(info["fraction"] - 4 / 7) < 2 ** -9 and abs(info["auc"] - 0.5) < 1e-2
    torch.testing.assert_close(p.detach(), start + info["fraction"] * (state["end"] - start))


def test_nonmember_stop_patience_needs_checks_in_a_row(data):
    """patience N: the rule must hold at N checks in a row (a check where it does not
    starts the count again); the stop is the last of them, not bisected."""
    from noencore.engine.sets import UnlearningSets
    from noencore.engine.stopping import NonmemberStop
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    sets = UnlearningSets(shards, "forget", ["r0", "r1", "r2", "r3"], RUN["frames"])
    cache = ConditionCache(root / "shards" / "conditions")
    with pytest.raises(UsageError, match="stop patience must be >= 1"):
        NonmemberStop(model, sets, "forget", ["r4", "r5"], cache, patience=0)
    stop = NonmemberStop(model, sets, "forget", ["r4", "r5"], cache, rule="original",
                         target_auc=0.0, patience=3)
    aucs = iter([0.0, 0.0, 0.4, 0.0, 0.0, 0.0])  # held, held, not, then three in a row
    stop.measure = lambda: (next(aucs), 8.0, 7.0)
    p = next(model.lm.parameters())
    before = p.detach().clone()
    got = [stop.check(step) for step in range(1, 7)]
    assert got[:5] == [None] * 5 and stop.hits == 3
    assert got[5]["step"] == 6 and got[5]["checks_in_a_row"] == 3
    assert got[5]["fraction"] == 1.0  # the weights of the last check, not bisected
    torch.testing.assert_close(p.detach(), before)


def test_match_guard_waits_three_checks_and_a_resumed_run_counts_on(data, tmp_path):
    """The default method's guard (rule "original" at AUC 0) gets patience 3, other
    rules 1; the count of checks in a row travels in the checkpoint."""
    from noencore.engine.loop import _load_resume_state, _save_checkpoint

    _, shards = data
    kw = {**RUN, "remain": ["r0", "r1", "r2", "r3"], "stop_nonmembers": ["r4", "r5"],
          "steps": 2}
    del kw["progress"]

    def ready(method, out):
        return prepared_trainer(_fresh(), shards, **{**kw, "method": method, "out": out})

    run = ready("match", tmp_path / "run")
    assert (run.stop_rule, run.stop_auc, run.stop_patience) == ("original", 0.0, 3)
    assert run.stopper.patience == 3
    other = ready("graddiff", tmp_path / "other")
    assert (other.stop_rule, other.stop_patience, other.stopper.patience) == ("auc", 1, 1)
    run.stopper.hits = 2
    _save_checkpoint(run, 1, run.stopper.original)
    run.stopper.hits = 0
    _load_resume_state(run, tmp_path / "run" / "checkpoints" / "step_0000001")
    assert run.stopper.hits == 2


def test_codebook_profile_reads_the_held_tracks_codebooks(data, tmp_path):
    """match with codebook_profile: the engine measures the anchored tracks' mean NLL per
    codebook (the same numbers as scoring them alone) under the starting weights; without
    anchored tracks the run is refused before any work."""
    from noencore import unlearn
    from noencore.evaluation.token_metrics import collect_set_stats
    from noencore.methods import get_method
    from noencore.models.text import ConditionCache

    root, shards = data
    kw = {**RUN, "remain": ["r0", "r1"], "stop_nonmembers": ["r4", "r5"], "steps": 1,
          "save": False}
    del kw["method"]
    with pytest.raises(UsageError, match="--anchor-unseen"):
        unlearn(_fresh(), shards, **kw, method="match",
                method_options={"codebook_profile": True})
    model = _fresh()
    st = collect_set_stats(model, shards.select(ids=["r2", "r3"]),
                           ConditionCache(root / "shards" / "conditions"), batch_size=4,
                           frames=RUN["frames"], precision="fp32", progress=False)
    want = [float(st.nll[st.codebook == k].mean()) for k in range(model.n_q)]
    method = get_method("match", codebook_profile=True)
    seen = []
    keep = method.set_held_codebooks
    method.set_held_codebooks = lambda m: (seen.append(m.tolist()), keep(m))[1]
    unlearn(model, shards, **kw, method=method, anchor_unseen=["r2", "r3"])
    assert seen[0] == pytest.approx(want, rel=1e-5)
