"""Gradient accumulation and activation checkpointing give the plain step; the ranks'
rows are disjoint and keep the global forget/remain mix; bad splits are refused (one
process, fp32; the same under DeepSpeed is in test_engine_zero.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from noencore.errors import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, random_items  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 2}}
RUN = dict(forget="forget", remain=["r0", "r1", "r2", "r3", "r4"], steps=2, lr=1e-3,
           batch_size=8, forget_ratio=0.5, frames=12, seed=3, progress=False, backend="torch",
           save=False)
METHODS = [("graddiff", {}), ("npo", {"beta": 0.5}), ("rl", {"remain_weight": 0.5}),
           ("rl", {"labels": "remain_clip", "remain_weight": 0.5}),
           ("bounded_ga", {"loss_cap": None, "row_target": 9.0, "remain_anchor": True})]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    root = tmp_path_factory.mktemp("accumulation")
    return conditioned_shards(root / "shards", random_items(3, 6, 20), OVERRIDES)


def _trained(shards, name, opts, **kw) -> dict[str, torch.Tensor]:
    from noencore import unlearn
    from noencore.models import load_musicgen

    model = load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)
    res = unlearn(model, shards, **{**RUN, "method": name, "method_options": opts, **kw})
    assert model.lm.transformer.checkpointing == "none"  # a training-time switch only
    return {k: v.clone() for k, v in res.model.lm.state_dict().items()}


@pytest.mark.parametrize("name,opts", METHODS,
                         ids=["graddiff", "npo", "rl", "rl-remain_clip", "bounded_ga-anchored"])
def test_accumulated_and_checkpointed_steps_equal_the_plain_step(data, name, opts):
    """Token means are over the whole optimizer step (all micro-batches), NPO's weights
    and the anchor use the step's row counts, random labels follow the global row: the
    parameters after two AdamW steps agree to fp32 rounding.

    Checkpointing alone recomputes the same operations: bit for bit. Accumulation adds
    the micro-batches' gradients in another order (fp32 rounding, ~1e-7 relative); AdamW's
    first steps move each weight by about lr * g / |g|, so for the few weights whose
    gradient is near zero that rounding can move the update by a fraction of lr: 99.9 %
    of the weights agree within 1e-7 (lr is 1e-3), none by more than 5 % of lr."""
    from noencore.models import load_musicgen

    plain = _trained(data, name, opts)
    start = {k: v.clone() for k, v in load_musicgen(  # the named config's seeded weights
        "tiny", with_codec=False, overrides=OVERRIDES).lm.state_dict().items()}
    moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
    assert moved > 1e-4  # the steps changed the weights
    same = _trained(data, name, opts, checkpointing=True)
    assert all(torch.equal(same[k], plain[k]) for k in plain)
    for kw in ({"accumulation": 4}, {"accumulation": 2, "checkpointing": True}):
        other = _trained(data, name, opts, **kw)
        diff = torch.cat([(other[k] - plain[k]).abs().flatten() for k in plain])
        assert float(diff.quantile(0.999)) <= 1e-7, (kw, float(diff.quantile(0.999)))
        assert float(diff.max()) <= 0.05 * RUN["lr"], (kw, float(diff.max()), moved)


def test_accumulation_that_does_not_split_the_batch_is_refused(data):
    from noencore import unlearn
    from noencore.models import load_musicgen

    model = load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)
    with pytest.raises(UsageError, match=r"batch_size 8 does not split into 3 micro-batches on "
                                         r"1 rank\(s\): it must be a multiple of 3; use "
                                         r"--batch-size 6 or 9"):
        unlearn(model, data, **{**RUN, "method": "ga"}, accumulation=3)
    with pytest.raises(UsageError, match="accumulation must be >= 1"):
        unlearn(model, data, **{**RUN, "method": "ga"}, accumulation=0)


@pytest.mark.parametrize("swap", [False, True])
def test_ranks_read_disjoint_rows_with_the_global_mix(data, swap):
    """Every rank reads its own rows of each step's global batch: together they are the
    global batch, row for row (codes, caption, forget flag), whatever the world size, and
    a forget row borrows the same remain clip on any number of ranks."""
    from noencore.engine.sets import UnlearningSets

    sets = UnlearningSets(data, "forget", RUN["remain"], RUN["frames"])
    n_f, n_r = sets.split_counts(7, 3 / 7)
    for step in range(4):
        whole = sets.step_batch(step, 11, n_f, n_r, swap_codes=swap)
        assert whole.forget.tolist() == [True] * 3 + [False] * 4 and whole.row.tolist() == \
            list(range(7))
        for world in (2, 3, 4):
            parts = [sets.step_batch(step, 11, n_f, n_r, rank=r, world_size=world,
                                     swap_codes=swap) for r in range(world)]
            rows = torch.cat([p.row for p in parts])
            real = rows[rows >= 0]
            assert sorted(real.tolist()) == list(range(7))  # disjoint, and all of them
            for p in parts:
                keep = p.row >= 0
                idx = p.row[keep]
                assert torch.equal(p.codes[keep], whole.codes[idx])
                assert torch.equal(p.mask[keep], whole.mask[idx])
                assert torch.equal(p.forget[keep], whole.forget[idx])
                assert [c for c, k in zip(p.captions, keep.tolist()) if k] == \
                    [whole.captions[i] for i in idx.tolist()]
                assert not p.mask[~keep].any() and not p.forget[~keep].any()
        if swap:  # forget rows read a remain row's codes of the same batch, own captions
            for r in range(3):
                assert any(torch.equal(whole.codes[r], whole.codes[j]) for j in range(3, 7))
                assert whole.captions[r].startswith("forget")
