"""Evaluation under a launcher: the ranks split every set's items, rank 0 gathers them
and alone writes the report, and the numbers equal a one-process run's.

In one process: the ranks' shares of the token statistics assemble into the
one-process arrays; what an item generates follows the item, not its batch or rank;
each rank picks its own GPU; under NCCL (simulated) every tensor handed to a
collective is on the backend's device. Then two gloo ranks on the CPU: the Python API
under ``torchrun`` (token, membership and generation metrics with a random-weight
CLAP), and the CLI under ``deepspeed``. A rank that aborts at exit after writing its
results (a known gloo-on-CPU issue) does not fail the tests: they read what the ranks
wrote.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import free_port, two_ranks_beside  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_PER_SET = 6
FRAMES = 16  # shorter than most items: an item's windows land on both ranks
#: the arguments both the one-process and the 2-rank runs use
PLAIN = {"batch_size": 3, "frames": FRAMES, "min_auc_items": 3, "progress": False}
GENERATION = {"frames": 10, "batch_size": 2, "max_items": 3, "prompt_frames": 6,
              "continuation_frames": 4, "seed": 3}
# "Equal to one process", (rtol, atol): the ranks' batches hold other windows and other
# items than one process's batches, so results can round differently. Measured on this
# CPU: token statistics, AUCs, privleak and forget quality identical; CLAP-based numbers
# within 9e-8 (float32 embeddings decoded and embedded in other batches; the random
# CLAP's FAD is ~2e-6, so only an absolute bound means anything there).
TOKEN_TOL = (1e-6, 1e-9)
GENERATION_TOL = (1e-4, 1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore.data.shards import TokenShards
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen, save_musicgen
    from noencore.models.text import build_condition_cache

    root = tmp_path_factory.mktemp("evaldist")
    rng = np.random.default_rng(7)
    n = 3 * N_PER_SET
    codes = [rng.integers(0, 2048, size=(4, int(rng.integers(9, 47)))) for _ in range(n)]
    # captions of different lengths: batches pad their text conditions
    caps = [f"caption {'la ' * (i % 3)}{i % 4}" for i in range(n)]
    splits = ["forget"] * N_PER_SET + ["remain"] * N_PER_SET + ["holdout"] * N_PER_SET
    path = write_code_shards(root / "shards", codes, caps, splits)
    model = load_musicgen("tiny")
    build_condition_cache(path / "conditions", caps, model.text_encoder, progress=False)
    save_musicgen(model, root / "after")
    save_musicgen(load_musicgen("tiny", seed=1), root / "before")
    shards = TokenShards(path)
    return {"root": root, "shards": shards, "model": model,
            "sets": {s: shards.select(split=s) for s in ("forget", "remain", "holdout")}}


def test_rank_shares_assemble_into_the_one_process_statistics(data):
    from noencore.evaluation.token_metrics import _FIELDS, SetStats, collect_set_stats
    from noencore.models.text import ConditionCache

    sh = data["sets"]["remain"]
    cache = ConditionCache(data["shards"].path / "conditions")
    kw = dict(batch_size=3, frames=FRAMES, precision="fp32", progress=False)
    whole = collect_set_stats(data["model"], sh, cache, **kw)
    shares = [collect_set_stats(data["model"], sh, cache, **kw, rank=r, world=2) for r in (0, 1)]
    assert all(s.nll.size for s in shares) and sum(s.nll.size for s in shares) == whole.nll.size
    merged = SetStats.merge(shares)
    other_batch = collect_set_stats(data["model"], sh, cache, **{**kw, "batch_size": 5})
    rtol, atol = TOKEN_TOL
    for f in _FIELDS:  # one canonical token order, whatever the split or the batch size
        for got in (merged, other_batch):
            np.testing.assert_allclose(getattr(got, f), getattr(whole, f), rtol=rtol, atol=atol,
                                       err_msg=f)
    assert np.array_equal(whole.item, np.sort(whole.item))


def test_generation_follows_the_item_not_its_batch(data):
    """A rank's share of the captions, in other batches, generates what the same items
    generate in one process (each item has its own generator, captions a fixed padding);
    the global RNG plays no part."""
    from noencore.evaluation.generation import GenerationConfig, caption_tokens, generate_codes

    model = data["model"]
    caps = ["x", "calm piano", "loud drums over a very long and winding caption", "bass"]
    cfg = GenerationConfig(frames=8, batch_size=2, seed=5)
    whole = generate_codes(model, caps, cfg, progress=False)
    torch.manual_seed(123)
    # the short captions alone, one per batch, padded as in the whole set
    share = generate_codes(model, caps[0::3], dataclasses.replace(cfg, batch_size=1),
                           progress=False, items=[0, 3], text_tokens=caption_tokens(model, caps))
    assert torch.equal(share, whole[0::3])
    assert not torch.equal(whole[0], whole[1])  # items differ: not one shared stream
    # padding matters: padded to the longest of its own batch only, an item hears
    # another condition
    own = generate_codes(model, caps[:2], cfg, progress=False)
    assert not torch.equal(own, whole[:2])


def test_each_rank_runs_on_its_own_gpu(data, monkeypatch):
    """Under a launcher on a GPU node rank 1 joins NCCL on cuda:1 and loads onto cuda:1,
    not GPU 0; an explicit device wins; one process takes the current GPU."""
    import torch.distributed as dist

    import noencore.models.musicgen as musicgen
    from noencore import distributed
    from noencore.evaluation.evaluate import evaluate

    class Seen(Exception):
        pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device() == torch.device("cuda", 1)
    assert distributed.rank_device("cuda") == torch.device("cuda", 1)
    assert distributed.rank_device("cpu") == torch.device("cpu")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))

    def init(backend, *a, **k):
        calls.append(("init", backend))
        raise Seen

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(Seen):
        evaluate(str(data["root"] / "after"), data["sets"], progress=False)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]

    def load(spec, device="cpu", **kwargs):
        calls.append(("load", device))
        raise Seen

    monkeypatch.setattr(distributed, "join", lambda device: (1, 2))
    monkeypatch.setattr(musicgen, "load_musicgen", load)
    with pytest.raises(Seen):
        evaluate(str(data["root"] / "after"), data["sets"], progress=False)
    assert calls[-1] == ("load", torch.device("cuda", 1))
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.rank_device() == torch.device("cuda", 0)


def test_collectives_get_tensors_on_the_backend_device(data, tmp_path, monkeypatch):
    """NCCL moves only tensors on the rank's GPU (gloo forgives CPU tensors, so a CPU
    run cannot show a mistake). Here torch.distributed looks like an NCCL group (of one
    rank, so that data still flows) whose current GPU is cuda:1; tensors sent to the
    collective device are CPU tensors that say they are on it. Every tensor any
    collective receives during a whole evaluation (token statistics, cached reference,
    continuation, the shared result) must be on ``comm_device()``."""
    import torch.distributed as dist

    from noencore import distributed
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.generation import GenerationConfig

    gpu = torch.device("cuda", 1)

    class OnGpu(torch.Tensor):
        @property
        def device(self):
            return gpu

    seen: list[tuple[str, torch.device]] = []

    def check(name: str, *args) -> None:
        for a in args:
            for t in a if isinstance(a, list) else [a]:
                seen.append((name, t.device))
                assert t.device == distributed.comm_device() == gpu, (name, t.device)

    def all_gather(outs, t, *a, **k):
        check("all_gather", outs, t)
        outs[0].copy_(t)

    def gather(t, parts=None, dst=0, *a, **k):
        check("gather", t, parts)
        parts[0].copy_(t)

    def unexpected(name):
        def fail(*a, **k):
            raise AssertionError(f"evaluation called {name}, which this test does not check")
        return fail

    for name in ("all_reduce", "reduce", "all_gather_object", "gather_object",
                 "broadcast_object_list", "scatter", "all_to_all", "reduce_scatter",
                 "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv"):
        monkeypatch.setattr(dist, name, unexpected(name))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: gpu.index)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "gather", gather)
    monkeypatch.setattr(dist, "broadcast", lambda t, src=0, *a, **k: check("broadcast", t))
    # the one way tensors reach the collective device: a copy that says it is there
    monkeypatch.setattr(distributed, "_to_comm", lambda x: torch.from_numpy(
        np.array(x, copy=True)).as_subclass(OnGpu))

    sets = {s: data["sets"][s] for s in ("forget", "holdout")}
    evaluate(data["model"], sets, metrics=["token"], out=tmp_path / "cached", **PLAIN)
    r = evaluate(data["model"], sets, reference=tmp_path / "cached",
                 metrics=["token", "mia", "continuation"],
                 generation=GenerationConfig(**GENERATION), out=tmp_path / "out", **PLAIN)
    assert {name for name, _ in seen} == {"all_gather", "gather", "broadcast"}
    assert r["continuation"]["after"]["forget"] is not None
    assert (tmp_path / "out" / "report.json").is_file()



def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


#: the launchers' own modules, run by this interpreter: a console script's shebang may
#: name another environment's Python (a copied virtualenv), whose ranks would then
#: import another copy of noencore
LAUNCHERS = {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}


def _launcher(name: str) -> list[str]:
    return [sys.executable, "-m", LAUNCHERS[name]]


def _assert_close(got, want, tol: tuple[float, float], path: str = "") -> float:
    """Recursively compare two report dicts, numbers within ``tol`` = (rtol, atol), all
    else equal (the run's own "seconds", "ranks" and file checksum aside); returns the
    largest absolute difference."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (path, got, want)
        return max([_assert_close(got[k], want[k], tol, f"{path}/{k}") for k in want
                    if k not in ("seconds", "ranks", "token_stats_sha256")], default=0.0)
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        return max([_assert_close(g, w, tol, f"{path}[{i}]") for i, (g, w) in
                    enumerate(zip(got, want))], default=0.0)
    if isinstance(want, float) and not isinstance(got, bool):
        assert got is not None and math.isclose(got, want, rel_tol=tol[0], abs_tol=tol[1]), (
            path, got, want)
        return abs(got - want)
    assert got == want, (path, got, want)
    return 0.0


def _assert_equal_to_one_process(two: dict, one: dict) -> None:
    one = json.loads(json.dumps(one))
    token = [b for b in ("token", "mia", "privleak", "privleak_variants", "forget_quality",
                         "dataset_inference") if b in one]
    worst = {b: _assert_close(two[b], one[b], TOKEN_TOL) for b in token}
    worst["all"] = _assert_close(two, one, GENERATION_TOL)
    print("largest absolute differences, 2 ranks vs 1 process:",
          ", ".join(f"{b} {v:.1e}" for b, v in worst.items()))


_API_DRIVER = """
import json, os, sys
from pathlib import Path
import noencore
import noencore.evaluation.evaluate as ev
from noencore.data.shards import TokenShards
from noencore.evaluation.generation import GenerationConfig

root, rank = Path(sys.argv[1]), int(os.environ["RANK"])
args = json.loads((root / "args.json").read_text())
sh = TokenShards(args["shards"])
sets = {s: sh.select(split=s) for s in ("forget", "remain", "holdout")}
for name in ("write_report", "save_stats"):  # who writes the report files
    real = getattr(ev, name)
    def logged(*a, _real=real, _name=name, **k):
        with open(root / "writes.log", "a") as fh:
            fh.write(f"{_name} {rank}\\n")
        return _real(*a, **k)
    setattr(ev, name, logged)
r = noencore.evaluate(args["after"], sets, reference=args["before"], retrained=root / "cached",
                      out=root / "two", generation=GenerationConfig(**args["generation"]),
                      **args["evaluate"])
(root / f"result_rank{rank}.json").write_text(json.dumps(r))
try:  # rank 0 cannot write its report (out is a file): every rank hears of it
    noencore.evaluate(args["after"], {"forget": sets["forget"]}, metrics=["token"],
                      out=root / "args.json", **args["plain"])
    msg = "no error"
except Exception as exc:
    msg = f"{type(exc).__name__}: {exc}"
(root / f"error_rank{rank}.txt").write_text(msg)
"""


@pytest.mark.distributed
def test_torchrun_api_two_ranks_equal_one_process(data, tmp_path):
    """``torchrun --nproc_per_node 2`` running ``noencore.evaluate``: token statistics,
    membership inference, privleak, forget quality and generation metrics (random-weight
    CLAP) equal one process's; every rank returns the same dict; rank 0 alone writes."""
    from noencore.evaluation.clap import build_random_clap
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.generation import GenerationConfig

    root = data["root"]
    ckpt, tok = build_random_clap(tmp_path / "clap")
    args = {"plain": PLAIN, "generation": GENERATION, "shards": str(data["shards"].path),
            "after": str(root / "after"), "before": str(root / "before"),
            "evaluate": {**PLAIN, "clap": str(ckpt), "clap_tokenizer": str(tok),
                         "clap_model": "HTSAT-tiny"}}
    work = tmp_path / "run"
    work.mkdir()
    (work / "args.json").write_text(json.dumps(args))
    # the retrained model's statistics, cached by an earlier one-process evaluation
    evaluate(args["before"], data["sets"], metrics=["token"], out=work / "cached", **PLAIN)
    script = tmp_path / "api_driver.py"
    script.write_text(_API_DRIVER)
    cmd = [*_launcher("torchrun"), "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(work)]
    one, two, _, _ = two_ranks_beside(  # the one-process run, meanwhile
        cmd, work, lambda: evaluate(args["after"], data["sets"], reference=args["before"],
                                    retrained=work / "cached", out=tmp_path / "one",
                                    generation=GenerationConfig(**GENERATION),
                                    **args["evaluate"]),
        env=_env(), cwd=tmp_path)
    assert two[0] == two[1]  # every rank returns the same report
    assert two[0]["ranks"] == 2 and one["ranks"] == 1
    assert (work / "writes.log").read_text().split("\n")[:-1] == ["save_stats 0",
                                                                   "write_report 0"]
    for name in ("report.json", "report.md", "token_stats.npz", "roc.png"):
        assert (work / "two" / name).is_file(), name
    # no temporary file or lock left behind; the tool's list of what it wrote stays
    assert [p.name for p in (work / "two").glob(".*")] == [".noencore-run.json"]
    assert two[0]["generation"]["random_clap"] is True
    assert 0.0 <= two[0]["continuation"]["before"]["remain"] <= 1.0
    # blocks computed from the gathered statistics alone: dataset inference (seeded
    # splits), the strongest attack against the retrained model
    assert one["dataset_inference"]["after"]["n_suspect"] == N_PER_SET
    assert "worst_attack" in one["mia"]["vs_retrained"]
    _assert_equal_to_one_process(two[0], one)
    errors = [(work / f"error_rank{r}.txt").read_text() for r in (0, 1)]
    # refused when rank 0 claims the folder, before any work; every rank gets its answer
    assert errors[0] == errors[1] and errors[0].startswith(
        f"UsageError: {work / 'args.json'}: exists and is not a folder"), errors


@pytest.mark.distributed
def test_deepspeed_cli_two_ranks_equal_one_process(data, tmp_path, capsys):
    """``deepspeed --num_gpus 2 --module noencore evaluate ...`` (the launcher appends
    ``--local_rank=N``): rank 0 alone prints; the report equals the one-process CLI's."""
    from noencore.cli import main

    root = data["root"]
    flags = ["evaluate", str(data["shards"].path), "--model", str(root / "after"),
             "--reference", str(root / "before"), "--batch-size", "3", "--frames", str(FRAMES),
             "--min-auc-items", "3", "--quiet"]
    launch = subprocess.Popen([*_launcher("deepspeed"), "--num_gpus", "2", "--master_port",
                               str(free_port()), "--module", "noencore", *flags,
                               "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=tmp_path)
    try:  # the one-process run, meanwhile
        assert main([*flags, "--out", str(tmp_path / "one")]) == 0
        out, err = launch.communicate(timeout=540)
    finally:
        launch.kill()
    capsys.readouterr()
    report = tmp_path / "two" / "report.json"
    assert report.is_file(), err[-4000:]
    assert "--local_rank" not in err  # the launcher's argument was accepted
    printed = [ln for ln in out.splitlines() if "report: " in ln]
    assert len(printed) == 1, out[-2000:]  # rank 0 alone speaks
    two = json.loads(report.read_text())
    assert two["ranks"] == 2
    _assert_equal_to_one_process(two, json.loads((tmp_path / "one" / "report.json").read_text()))
