"""Artist-level dataset inference (``noencore.evaluation.dataset_inference``) on synthetic
per-item attack scores, fresh each run: a shifted suspect set is found, two sets of one
distribution are not (false-positive rate), the result follows the seed alone, and
small sets get a note; the report's verdicts against the retrained model."""
from __future__ import annotations

import numpy as np
import pytest

from noencore.evaluation.dataset_inference import (
    MIN_HALF_ITEMS,
    dataset_inference,
    one_split,
)

ATTACKS = ("loss", "mink", "mink_muse", "minkpp", "zlib")


def _scores(rng: np.random.Generator, n_suspect: int, n_validation: int,
            shift: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-item scores of correlated attacks (a shared per-item level, as the attacks of
    one model share the item's likelihood), the suspect set's ``shift`` higher."""
    n = n_suspect + n_validation
    x = rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, len(ATTACKS)))
    x *= rng.uniform(0.01, 100.0, size=len(ATTACKS))  # attacks on unlike scales
    x[:n_suspect] += shift * x[n_suspect:].std(axis=0)
    return ({a: x[:n_suspect, i] for i, a in enumerate(ATTACKS)},
            {a: x[n_suspect:, i] for i, a in enumerate(ATTACKS)})


@pytest.mark.parametrize("shift", [2.5, -2.5])
def test_a_shifted_suspect_set_is_found(shift):
    """Members (scores up) and over-unlearned tracks (scores down) both stand apart from
    the non-members: the classifier learns the direction."""
    rng = np.random.default_rng()
    suspect, validation = _scores(rng, 30, 34, shift)
    r = dataset_inference(suspect, validation, seed=int(rng.integers(1 << 31)))
    print(f"shift {shift:+}: p {r['p_value']:.2e}, score gap {r['score_gap']:.2f}")
    assert r["p_value"] < 0.01, r
    assert r["score_gap"] > 0 and (r["n_suspect"], r["n_validation"]) == (30, 34)


def test_one_distribution_false_positive_rate():
    """Both sets drawn alike: over 30 fresh draws the aggregated p-value falls below 0.05
    in at most 15 % of them; a single split's p-value (the test before aggregation) is
    roughly uniform: over 150 draws, below 0.05 in at most 15 % and median near 0.5."""
    rng = np.random.default_rng()
    agg = np.array([dataset_inference(*_scores(rng, 24, 24, 0.0),
                                      seed=int(rng.integers(1 << 31)))["p_value"]
                    for _ in range(30)])
    single = []
    for _ in range(150):
        suspect, validation = _scores(rng, 24, 24, 0.0)
        single.append(one_split(np.stack([suspect[a] for a in ATTACKS], axis=1),
                                np.stack([validation[a] for a in ATTACKS], axis=1), rng)[0])
    single = np.array(single)
    print(f"false-positive rate at 0.05: aggregated {np.mean(agg < 0.05):.3f} (median p "
          f"{np.median(agg):.3f}), single split {np.mean(single < 0.05):.3f} (median p "
          f"{np.median(single):.3f})")
    assert np.all((agg >= 0) & (agg <= 1))
    assert np.mean(agg < 0.05) <= 0.15 and np.mean(single < 0.05) <= 0.15
    assert 0.3 < np.median(single) < 0.7


def test_deterministic_for_a_seed():
    rng = np.random.default_rng()
    suspect, validation = _scores(rng, 20, 20, 0.8)
    seed = int(rng.integers(1 << 31))
    first = dataset_inference(suspect, validation, seed=seed)
    assert dataset_inference(suspect, validation, seed=seed) == first
    # the features are named, so their order in the mappings does not matter
    reordered = {a: validation[a] for a in reversed(ATTACKS)}
    assert dataset_inference(suspect, reordered, seed=seed) == first
    others = {dataset_inference(suspect, validation, seed=seed + k)["score_gap"]
              for k in range(1, 4)}
    assert first["score_gap"] not in others  # another seed splits the sets otherwise


def test_small_sets_give_a_note():
    rng = np.random.default_rng()
    suspect, validation = _scores(rng, 2 * MIN_HALF_ITEMS - 1, 30, 3.0)
    r = dataset_inference(suspect, validation)
    assert r["p_value"] is None and r["score_gap"] is None
    assert "too small for dataset inference" in r["note"] and "need at least 10" in r["note"]
    assert r["n_suspect"] == 2 * MIN_HALF_ITEMS - 1
    # an item with a NaN score is left out and counted, before the size rule
    suspect, validation = _scores(rng, 2 * MIN_HALF_ITEMS, 30, 3.0)
    assert dataset_inference(suspect, validation)["p_value"] is not None
    suspect["minkpp"][0] = np.nan
    r = dataset_inference(suspect, validation)
    assert r["unscored"] == 1 and r["n_suspect"] == 2 * MIN_HALF_ITEMS - 1 and "note" in r
    assert dataset_inference(suspect, validation, min_half=3)["p_value"] is not None


def test_bad_input_is_named():
    rng = np.random.default_rng()
    suspect, validation = _scores(rng, 12, 12, 0.0)
    with pytest.raises(ValueError, match=r"attack scores \['zlib'\] are missing"):
        dataset_inference(suspect, {a: v for a, v in validation.items() if a != "zlib"})
    suspect["loss"] = suspect["loss"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        dataset_inference(suspect, validation)
    with pytest.raises(ValueError, match="splits"):
        dataset_inference(validation, validation, splits=0)


def test_verdicts_against_the_retrained_model():
    """The strongest attack's gap decides the AUC verdict; the dataset-inference verdict
    asks p_after >= min(0.05, p_retrained)."""
    from noencore.evaluation.mia import vs_retrained_block
    from noencore.evaluation.report import Criteria, verdicts

    after = {"forget": {"loss": 0.52, "mink": 0.61, "minkpp": 0.70, "ref_before": 0.1}}
    retr = {"forget": {"loss": 0.50, "mink": 0.55, "minkpp": 0.52}}
    vs = vs_retrained_block(after, retr)
    assert vs["worst_attack"] == "minkpp" and vs["gap"] == pytest.approx(0.18)
    assert set(vs["per_attack"]) == {"loss", "mink", "minkpp"}  # attacks both models have
    assert "note" in vs_retrained_block({"forget": {"note": "too small"}}, retr)

    def di(p_after, p_retr):
        out = {"after": {"p_value": p_after, "n_suspect": 20, "n_validation": 20}}
        if p_retr is not None:
            out["retrained"] = {"p_value": p_retr}
        return {"mia": {"after": after, "vs_retrained": vs}, "dataset_inference": out}

    def verdict(results, crit=None):
        return {v["criterion"].split(" (")[0].split(",")[0]: v["pass"]
                for v in verdicts(results, crit or Criteria())}

    v = verdict(di(0.5, 0.3))
    assert v["forget MIA AUC near the retrained model's"] is False
    assert v["dataset inference"] is True
    assert verdict(di(0.5, 0.3), Criteria(retrained_auc_tol=0.2))[
        "forget MIA AUC near the retrained model's"] is True
    assert verdict(di(0.01, 0.3))["dataset inference"] is False
    assert verdict(di(0.01, 0.005))["dataset inference"] is True  # retrained as detectable
    assert verdict(di(0.01, None))["dataset inference"] is False
    assert verdict(di(0.01, None), Criteria(dataset_inference_min=0.01))[
        "dataset inference"] is True
    assert "dataset inference" not in verdict(di(None, 0.3))
