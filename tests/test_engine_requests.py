"""Sequential opt-outs: a second artist opts out of an already unlearned, saved model.

A tiny model memorises two opt-out artists (A, B) and a remain set; A is unlearned and
saved, the saved folder is loaded and B is unlearned from it. Both artists must stay
forgotten (forget-vs-unseen LOSS AUC near the stop rule's target) and the remain NLL
within 10 % of the memorised model's after both requests; the folder records both
requests. A request that contradicts an earlier one is refused before training.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
FRAMES = 16
N = 5  # tracks per group
REMAIN = [f"r{i}" for i in range(8)]
COMMON = dict(frames=FRAMES, batch_size=8, progress=False, backend="torch", device="cpu")


def corpus_items(seed: int = 5) -> list:
    """Each artist: N tracks to forget and N never-trained tracks; a remain set."""
    rng = np.random.default_rng(seed)
    items = []
    for artist in ("a", "b"):
        for i in range(N):
            items.append((f"{artist}{i}", rng.integers(0, 2048, (FRAMES, 4)),
                          f"artist {artist} song {i}", f"artist_{artist}"))
            items.append((f"u{artist}{i}", rng.integers(0, 2048, (FRAMES, 4)),
                          f"artist {artist} song {N + i}", f"unseen_{artist}"))
    for i, ident in enumerate(REMAIN):
        items.append((ident, rng.integers(0, 2048, (FRAMES, 4)), f"remain piece {i}",
                      "remain"))
    return items


def tiny(with_codec: bool = False):
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=with_codec, overrides=OVERRIDES)


def opt_out(model, shards, artist: str, out: Path, remain="remain"):
    """Unlearn one artist with the membership stop rule against its unseen tracks (an
    anchored remain set: its rows are held at the starting model's NLL). The learning rate
    lets the request take a dozen steps or more, as real runs do: at 1e-3 one Adam step
    moves this one-layer model's NLLs by up to a nat per token, the second request is over
    in three steps, and no anchor has a step to act in."""
    from noencore import unlearn
    from noencore.methods import get_method

    method = get_method("bounded_ga", loss_cap=None, row_target=5.0, remain_anchor=True,
                        remain_weight=3.0)
    return unlearn(model, shards, forget=f"artist_{artist}", remain=remain, method=method,
                   lr=3e-4, steps=100, stop_nonmembers=f"unseen_{artist}", out=out, **COMMON)


def measure(model, shards) -> dict:
    """LOSS AUC of each artist's forgotten tracks vs its unseen ones, and the remain NLL."""
    from noencore.evaluation.evaluate import evaluate

    out = {}
    for artist in ("a", "b"):
        sets = {"forget": shards.select(split=f"artist_{artist}"),
                "remain": shards.select(split="remain"),
                "holdout": shards.select(split=f"unseen_{artist}")}
        r = evaluate(model, sets, metrics=["token", "mia"], precision="fp32", frames=FRAMES,
                     batch_size=8, min_auc_items=N, progress=False)
        out[artist] = r["mia"]["after"]["forget"]["loss"]
        out["remain_nll"] = r["token"]["after"]["remain"]["nll"]
    return out


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """Shards and a model that memorised both artists and the remain set (saved folder)."""
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore import unlearn

    root = tmp_path_factory.mktemp("requests")
    shards = conditioned_shards(root / "shards", corpus_items(), OVERRIDES)
    model = tiny()
    trained = [f"{a}{i}" for a in "ab" for i in range(N)]
    res = unlearn(model, shards, forget=trained, remain=REMAIN, method="finetune", steps=60,
                  lr=3e-3, seed=0, out=root / "memorised", **COMMON)
    return shards, res.model_dir


@pytest.mark.slow
def test_second_opt_out_from_the_saved_model_keeps_both_forgotten(memorised, tmp_path):
    from noencore.engine.requests import read_requests
    from noencore.models import load_musicgen

    shards, start = memorised
    assert read_requests(start) == []  # fine-tuning is not an opt-out
    m0 = measure(load_musicgen(str(start), with_codec=False), shards)
    assert m0["a"] > 0.95 and m0["b"] > 0.95  # both artists memorised
    first = opt_out(load_musicgen(str(start), with_codec=False), shards, "a", tmp_path / "a")
    assert first.stopped == "nonmember_auc"
    m1 = measure(first.model, shards)

    model = load_musicgen(str(first.model_dir), with_codec=False)
    assert [r["forget_ids"] for r in model.requests] == [[f"a{i}" for i in range(N)]]
    # B's request holds A's forgotten tracks in its anchored remain set
    held = REMAIN + [f"a{i}" for i in range(N)]
    second = opt_out(model, shards, "b", tmp_path / "b", remain=held)
    m2 = measure(second.model, shards)
    # the same request without A's tracks held: B's ascent spills over onto A
    loose = measure(opt_out(load_musicgen(str(first.model_dir), with_codec=False), shards,
                            "b", tmp_path / "b_loose").model, shards)
    print(f"AUC A {m0['a']:.2f} -> {m1['a']:.2f} -> {m2['a']:.2f} (not held: "
          f"{loose['a']:.2f}), B {m0['b']:.2f} -> {m1['b']:.2f} -> {m2['b']:.2f} (not held: "
          f"{loose['b']:.2f}), remain NLL {m0['remain_nll']:.3f} -> {m1['remain_nll']:.3f} -> "
          f"{m2['remain_nll']:.3f} (not held: {loose['remain_nll']:.3f})")
    assert second.stopped == "nonmember_auc"
    assert abs(m2["a"] - 0.5) < abs(loose["a"] - 0.5) - 0.2  # holding A keeps it near 0.5
    # N vs N tracks: an AUC moves in steps of 1/N^2 = 0.04; the stop rule aims at 0.5
    for artist in ("a", "b"):
        assert abs(m2[artist] - 0.5) <= 0.25, (artist, m2)
    assert abs(m1["a"] - 0.5) <= 0.25 and m1["b"] > 0.9  # the first request forgot A only
    for m in (m1, m2):
        assert abs(m["remain_nll"] - m0["remain_nll"]) <= 0.10 * m0["remain_nll"], m

    history = read_requests(second.model_dir)
    assert [r["forget"] for r in history] == ["artist_a", "artist_b"]
    assert history[1]["forget_ids"] == [f"b{i}" for i in range(N)]
    assert history[1]["remain"] == held and history[1]["method"]["name"] == "bounded_ga"
    assert history[0]["held"] == [] and history[1]["held"] == [f"a{i}" for i in range(N)]
    assert history[1]["stopped"] == "nonmember_auc" and history[1]["steps"] == second.steps
    assert all(r["forget_digest"].startswith("sha256:") and r["date"] and r["noencore"]
               for r in history)


def _with_history(forget_ids: list[str], with_codec: bool = False):
    from noencore.engine.requests import make_request

    model = tiny(with_codec)
    model.requests = [make_request(forget="artist_a", forget_ids=forget_ids, remain="remain",
                                   method={"name": "ga"}, shards="s", steps=3,
                                   stopped="max_steps")]
    return model


def test_a_request_overlapping_an_earlier_forget_set_is_refused(memorised, monkeypatch):
    import noencore.engine.loop as loop
    from noencore import unlearn
    from noencore.errors import RequestConflict

    shards, _ = memorised
    monkeypatch.setattr(loop, "UnlearnObjective", None)  # nothing may be built
    model = _with_history([f"a{i}" for i in range(N)])
    with pytest.raises(RequestConflict, match=r"2 forget item\(s\) were already forgotten by "
                       r"request 1 \(forget 'artist_a', .*\): a1, a3; leave them out"):
        unlearn(model, shards, forget=["a1", "a3", "b0"], remain="remain", method="ga",
                steps=1, **COMMON)
    # the default remain set (every other non-held-out item) holds A's tracks
    with pytest.raises(RequestConflict, match=r"the remain set holds 5 item\(s\) forgotten by "
                       r"request 1 .*: a0, a1, a2, a3, a4; training on them would relearn "
                       r"them. Exclude them from the remain set"):
        unlearn(model, shards, forget="artist_b", method="ga", steps=1, **COMMON)
    assert len(model.requests) == 1  # nothing recorded


def test_an_anchored_remain_set_may_hold_earlier_forget_items():
    from noencore.engine.requests import check_request
    from noencore.errors import RequestConflict

    history = _with_history(["a0", "a1"]).requests
    check_request(history, ["b0"], ["r0", "a1"], anchored=True)  # held, not relearned
    with pytest.raises(RequestConflict, match="remain_anchor=true"):
        check_request(history, ["b0"], ["r0", "a1"])
    with pytest.raises(RequestConflict, match="already forgotten"):
        check_request(history, ["a0"], ["r0"], anchored=True)


def test_earlier_items_left_out_of_the_remain_set_are_warned_about(memorised):
    import noencore.engine.loop as loop
    from noencore.engine.requests import unheld_warning

    history = _with_history(["a0", "a1"]).requests
    assert unheld_warning(history, ["r0", "a0", "a1"]) is None
    assert "2 item(s) forgotten by earlier requests are not in this request's remain set " \
           "(a0, a1)" in unheld_warning(history, ["r0"])
    shards, _ = memorised
    model = _with_history([f"a{i}" for i in range(N)])
    # the warning comes before any work: stop the run at the first thing built after it
    with pytest.warns(UserWarning, match=r"5 item\(s\) forgotten by earlier requests"), \
            pytest.raises(RuntimeError, match="stopped after the checks"):
        with pytest.MonkeyPatch.context() as mp:
            def stop(*a, **k):
                raise RuntimeError("stopped after the checks")
            mp.setattr("noencore.models.ConditionCache", stop)
            loop.unlearn(model, shards, forget="artist_b", remain="remain", method="ga",
                         steps=1, **COMMON)


def test_history_survives_save_and_load_and_bad_files_are_named(tmp_path):
    from noencore.engine.requests import REQUESTS_FILE, read_requests
    from noencore.errors import NoencoreError
    from noencore.models import load_musicgen, save_musicgen

    model = _with_history(["a0", "a1"])
    folder = save_musicgen(model, tmp_path / "m")
    loaded = load_musicgen(str(folder), with_codec=False)
    assert loaded.requests == model.requests
    assert not list(folder.glob(".*.tmp"))  # written through a temporary name
    path = folder / REQUESTS_FILE
    data = json.loads(path.read_text())
    data["requests"][0]["forget_ids"].append("a2")  # the digest no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(NoencoreError, match="forget_ids do not match its forget_digest"):
        read_requests(folder)
    path.write_text("{not json")
    with pytest.raises(NoencoreError, match=f"{path}: unreadable request history"):
        load_musicgen(str(folder), with_codec=False)
    path.write_text(json.dumps({"requests": "x"}))
    with pytest.raises(NoencoreError, match="not a noencore request history"):
        read_requests(folder)


@pytest.mark.distributed
def test_two_ranks_refuse_a_conflict_and_record_a_request(memorised, tmp_path):
    """``torchrun --nproc_per_node 2 -m noencore unlearn --zero-stage 1`` from a saved model
    with one request: a forget set that overlaps it is refused on both ranks before any
    training (no run folder written); a disjoint one trains and the saved folder holds
    both requests."""
    import subprocess

    from test_engine_shards import free_port

    from noencore.engine.requests import read_requests
    from noencore.models import save_musicgen

    shards, _ = memorised
    start = save_musicgen(_with_history([f"a{i}" for i in range(N)], True), tmp_path / "start")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def launch(forget: str, out: Path, *method: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(free_port()), "-m", "noencore", "unlearn", "--model",
             str(start), "--shards", str(shards.path), "--forget", forget,
             *(method or ("--remain", "remain", "--method", "ga")), "--steps", "2",
             "--batch-size", "4", "--frames", str(FRAMES), "--zero-stage", "1", "--device",
             "cpu", "--out", str(out), "--no-progress"], capture_output=True, text=True,
            env=env, timeout=540, cwd=tmp_path)

    refused = launch("b0,a2", tmp_path / "refused")
    assert refused.returncode != 0
    said = [ln for ln in refused.stderr.splitlines() if "already forgotten by request 1" in ln]
    assert len(said) == 2 and all("a2" in ln for ln in said), refused.stderr[-3000:]
    assert not (tmp_path / "refused").exists()  # refused before any work

    # A's tracks held in an anchored remain set: their rows reach the objective on both ranks
    a_ids = [f"a{i}" for i in range(N)]
    done = launch("artist_b", tmp_path / "run", "--remain", ",".join(REMAIN + a_ids),
                  "--method", "bounded_ga", "--method-option", "remain_anchor=true")
    history = read_requests(tmp_path / "run" / "model")
    assert [r["forget"] for r in history] == ["artist_a", "artist_b"], done.stderr[-3000:]
    assert history[1]["forget_ids"] == [f"b{i}" for i in range(N)] and history[1]["steps"] == 2
    assert history[1]["held"] == a_ids
