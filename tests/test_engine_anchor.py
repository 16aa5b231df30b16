"""``anchor_unseen``: the artist's unseen tracks trained as remain rows held, both ways, at
the level the forget rows are sent to (the stop rule's non-members' mean NLL under the
starting weights), so that unlearning the forget set does not push the artist's other
music past it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_shards import conditioned_shards, prepared_trainer

from noencore.errors import UsageError

OVERRIDES = {"transformer_lm": {"num_layers": 1}}
RUN = dict(forget="forget", remain="remain", method="match", steps=2, lr=1e-3, batch_size=4,
           frames=10, seed=1, progress=False, backend="torch", device="cpu",
           stop_nonmembers="unknown", stop_rule="nll", stop_every=1,
           method_options={"remain_anchor": True, "remain_weight": 2.0})


def _items(seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for split, n in (("forget", 3), ("remain", 4), ("valid", 3), ("unknown", 5)):
        for i in range(n):
            items.append((f"{split[0]}{i}", rng.integers(0, 2048, (12 + 2 * i, 4)),
                          f"{split} piece {i}", split))
    return items


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return conditioned_shards(tmp_path_factory.mktemp("anchor") / "shards", _items(), OVERRIDES)


def _model():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)


def _prepared(shards, **kw):
    """A trainer through ``compute_references`` (the phases before training)."""
    return prepared_trainer(_model(), shards,
                            **{k: v for k, v in {**RUN, **kw}.items() if k != "progress"})


def test_the_unseen_tracks_are_held_at_the_nonmembers_level(shards):
    from noencore.engine.loop import _window_tokens

    plain = _prepared(shards)
    run = _prepared(shards, anchor_unseen="valid")
    assert plain.unseen_mask is None and not plain.sets.remain_held.any()
    mask = torch.from_numpy(run.unseen_mask)
    ids = [shards.ids[i] for i in run.sets.remain_item.tolist()]
    assert list(dict.fromkeys(i for i, m in zip(ids, mask.tolist()) if m)) == ["v0", "v1", "v2"]
    assert not any(m for i, m in zip(ids, mask.tolist()) if not i.startswith("v"))
    assert torch.equal(torch.from_numpy(run.sets.remain_held), mask)
    # the other remain windows keep their own starting NLL; the held ones get the level
    keep = ~mask
    torch.testing.assert_close(run.ref_remain[keep], plain.ref_remain)
    nonmember = torch.as_tensor(run.stopper.original, dtype=torch.float64)
    level = float(nonmember.mean())
    assert 5.0 < level < 12.0  # a mean token NLL of random codes, near log(2048) = 7.6
    tokens = _window_tokens(run.model.lm, run.sets, forget=False)
    torch.testing.assert_close(run.ref_remain[mask], (level * tokens[mask]).float())


def test_a_run_with_anchored_unseen_tracks_trains_and_resumes(shards, tmp_path):
    from noencore import unlearn

    res = unlearn(_model(), shards, **RUN, anchor_unseen="valid", out=tmp_path / "run",
                  checkpoint_every=1, save=False)
    assert res.steps >= 1 and all(np.isfinite(r["objective"]) for r in res.metrics)
    with pytest.raises(UsageError, match=r"anchor_unseen=\['v0'\] \(this run: 'valid'\)|"
                       r"made with anchor_unseen"):
        unlearn(_model(), shards, **RUN, anchor_unseen=["v0"], out=tmp_path / "run",
                resume=True, save=False)


def test_anchor_unseen_is_refused_where_it_cannot_work(shards):
    with pytest.raises(UsageError, match="needs an anchored method that fits its targets"):
        _prepared(shards, anchor_unseen="valid", method="ga", method_options=None)
    with pytest.raises(UsageError, match=r"both anchored unseen tracks and the stop rule's "
                       r"non-members \(e.g. 'u0'\)"):
        _prepared(shards, anchor_unseen=["v0", "u0"])
    with pytest.raises(Exception, match="forget and the remain set"):
        _prepared(shards, anchor_unseen=["f0"])
