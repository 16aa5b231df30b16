"""End to end on a tiny model that memorised its training set: the report must show the
forget set as members before unlearning (MIA AUC ~1) and not after (AUC near 0.5).

"Before" is trained on forget + remain; "after" stands for ideal unlearning: the same
recipe on remain only (a model retrained without the forget set). Slow: two trainings.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


def _train(shards, cache, split, steps=200, seed=0):
    from noencore.data.batches import iter_batches
    from noencore.models.musicgen import load_musicgen

    model = load_musicgen("tiny", seed=seed)
    model.lm.train()
    data = shards.select(split=split)
    batch = next(iter_batches(data, len(data), int(data.frames.max()), seed=0, shuffle=False))
    cond = cache.batch(batch.captions)
    opt = torch.optim.Adam(model.lm.parameters(), lr=5e-3)
    for _ in range(steps):
        rows = model.codebook_rows(batch, cond)
        loss = sum(torch.nn.functional.cross_entropy(r.hidden @ r.weight.T, r.targets)
                   for r in rows) / len(rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.lm.eval()
    return model, float(loss)


@pytest.mark.slow
def test_memorised_then_forgotten(tmp_path):
    from noencore.data.shards import TokenShards
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen
    from noencore.models.text import build_condition_cache

    rng = np.random.default_rng(0)
    n, frames = 12, 16
    # a 16-symbol alphabet: members and non-members share one distribution, so only
    # memorisation (not a distribution shift) can separate them
    codes = [rng.integers(0, 16, size=(4, frames)) for _ in range(3 * n)]
    caps = ["a song"] * (3 * n)
    splits = ["forget"] * n + ["remain"] * n + ["holdout"] * n
    path = write_code_shards(tmp_path / "shards", codes, caps, splits)
    shards = TokenShards(path)
    cache = build_condition_cache(path / "conditions", caps,
                                  load_musicgen("tiny", with_codec=False).text_encoder,
                                  progress=False)
    before, loss_b = _train(shards, cache, ["forget", "remain"])
    after, loss_a = _train(shards, cache, "remain")
    assert loss_b < 1.5 and loss_a < 1.5  # both memorised their training set
    sets = {s: shards.select(split=s) for s in ("forget", "remain", "holdout")}
    r = evaluate(after, sets, reference=before, retrained=None, out=tmp_path / "report",
                 progress=False)
    mia_b, mia_a = r["mia"]["before"]["forget"], r["mia"]["after"]["forget"]
    for a in ("loss", "mink", "mink_muse", "minkpp", "zlib"):
        assert mia_b[a] > 0.95, (a, mia_b[a])
        # 12 vs 12 items: chance AUCs spread by ~0.12
        assert abs(mia_a[a] - 0.5) < 0.3, (a, mia_a[a])
    assert r["mia"]["after"]["remain"]["loss"] > 0.95  # remain still memorised
    assert r["privleak_variants"]["before"]["loss"] == pytest.approx(-100.0)
    assert r["privleak"]["before"] == pytest.approx(-100.0)  # MUSE's: Min-K% at k = 0.4
    tok = r["token"]
    assert tok["after"]["forget"]["nll"] > 5 * tok["before"]["forget"]["nll"]
    assert tok["after"]["remain"]["nll"] < 1.0 and tok["before"]["remain"]["nll"] < 1.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| MIA AUC vs holdout: LOSS | forget →0.5 | 1.000 |" in md
