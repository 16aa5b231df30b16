"""Artist-level dataset inference: is the forget set, taken as a whole, a member set?

Per-track membership attacks are weak where a model learnt a collection rather than any
one track; aggregating the tracks' scores into one test of "this set was trained on"
succeeds where they fail (Maini et al. 2024, "LLM Dataset Inference", arXiv 2406.06443,
``linear_di.py``; for music, arXiv 2512.09654). The test here follows Maini et al.:

1. Per item, a feature vector: the scores of the membership attacks (``mia.ATTACKS``),
   one column per attack.
2. The suspect set (the forget tracks) and the validation set (known non-members: the
   holdout) are each split at random into two halves.
3. On the first halves (suspect = 1, validation = 0) the features are clipped at their
   5 % and 95 % quantiles and standardised, both with the first halves' statistics, and
   a logistic regression (scikit-learn, L2, C = 1) is fitted.
4. The classifier scores the second halves; a one-sided Welch t-test (scipy
   ``ttest_ind``, ``alternative="greater"``) of suspect scores above validation scores
   gives the p-value of one split.

Steps 2-4 run on :data:`SPLITS` seeded splits. Their p-values are dependent (they reuse
the same items), so Fisher's or Stouffer's combination, which assume independence, do
not apply; they are aggregated as Meinshausen, Meier and Buehlmann (2009, "P-values for
high-dimensional regression", JASA 104:1671) aggregate the p-values of repeated sample
splits: ``p = min(1, 2 * median(p_1 .. p_S))``, a valid p-value whatever the dependence
between the splits (their quantile rule at gamma = 1/2). It is conservative: under the
null its false-positive rate stays below the level.

A small p says the forget set is still told apart from never-seen music of the same
kind; the classifier learns the direction, so a set pushed *beyond* the non-members
(over-unlearned) is detected as well. A model retrained without the forget set is the
level to compare with: both of its sets are non-members to it. The result depends only
on the scores and the seed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: seeded splits whose p-values are aggregated
SPLITS = 10
#: fewest items in each half of each set; below it the result is a note, not a number
MIN_HALF_ITEMS = 5
#: the quantiles at which each feature is clipped (Maini et al. clip outliers at 5 %)
CLIP_QUANTILES = (0.05, 0.95)
AGGREGATION = ("min(1, 2 * median) of the splits' p-values (Meinshausen, Meier and "
               "Buehlmann 2009): valid under any dependence between the splits")
TEST = ("logistic regression on the first halves (suspect = 1, validation = 0), its scores "
        "of the second halves compared by a one-sided Welch t-test (suspect > validation)")


def feature_matrix(scores: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """float64 [n_items, len(names)]: the attack scores ``scores[name]`` as columns."""
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"attack scores {missing} are missing; have {sorted(scores)}")
    columns = [np.asarray(scores[n], dtype=np.float64).reshape(-1) for n in names]
    if len({c.size for c in columns}) > 1:
        sizes = ", ".join(f"{n} {c.size}" for n, c in zip(names, columns))
        raise ValueError(f"the attack scores of one set differ in length ({sizes})")
    return np.stack(columns, axis=1)


def check_sizes(n_suspect: int, n_validation: int,
                min_half: int = MIN_HALF_ITEMS) -> str | None:
    """None when both sets split into halves of at least ``min_half`` items, else a
    sentence that says why not."""
    if min(n_suspect, n_validation) < 2 * min_half:
        return (f"set too small for dataset inference ({n_suspect} suspect vs {n_validation} "
                f"validation items; need at least {2 * min_half} each, {min_half} per half)")
    return None


def one_split(suspect: np.ndarray, validation: np.ndarray,
              rng: np.random.Generator) -> tuple[float, float]:
    """One random split of both sets into halves: the classifier fitted on the first
    halves, its scores of the second halves tested. Returns (p-value, mean score of the
    suspect half minus that of the validation half)."""
    from scipy.stats import ttest_ind
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sus, val = rng.permutation(len(suspect)), rng.permutation(len(validation))
    s_fit, s_test = suspect[sus[:len(sus) // 2]], suspect[sus[len(sus) // 2:]]
    v_fit, v_test = validation[val[:len(val) // 2]], validation[val[len(val) // 2:]]
    fit = np.concatenate([s_fit, v_fit])
    low, high = np.quantile(fit, CLIP_QUANTILES, axis=0)  # outliers, as the fit half sees them
    clf = make_pipeline(StandardScaler(), LogisticRegression()).fit(
        np.clip(fit, low, high), np.r_[np.ones(len(s_fit)), np.zeros(len(v_fit))])
    a = clf.decision_function(np.clip(s_test, low, high))
    b = clf.decision_function(np.clip(v_test, low, high))
    p = float(ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    # NaN only where neither half has any spread and their means agree: no evidence
    return (1.0 if np.isnan(p) else p), float(a.mean() - b.mean())


def dataset_inference(suspect: Mapping[str, np.ndarray], validation: Mapping[str, np.ndarray],
                      features: Sequence[str] | None = None, splits: int = SPLITS,
                      seed: int = 0, min_half: int = MIN_HALF_ITEMS) -> dict[str, Any]:
    """Is the suspect set a member set, against the validation set of non-members?

    suspect, validation: ``{attack: float [n_items] scores}`` (``mia.attack_scores``), one
    entry per item of each set; features: the attacks to use (default: those of the
    suspect set, in its order). Items with a non-finite score are left out and counted.
    Returns ``{"p_value", "score_gap", "n_suspect", "n_validation"}`` (p_value: the
    aggregate of ``splits`` seeded splits, see the module's doc; score_gap: the mean over
    the splits of the suspect half's mean classifier score minus the validation half's),
    plus ``"unscored"`` where items were left out; p_value and score_gap are None, with a
    ``"note"``, where a half would hold fewer than ``min_half`` items.
    """
    if splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    names = list(features if features is not None else suspect)
    if not names:
        raise ValueError("dataset inference needs at least one attack's scores")
    x_s, x_v = feature_matrix(suspect, names), feature_matrix(validation, names)
    keep_s, keep_v = np.isfinite(x_s).all(axis=1), np.isfinite(x_v).all(axis=1)
    x_s, x_v = x_s[keep_s], x_v[keep_v]
    out: dict[str, Any] = {"p_value": None, "score_gap": None, "n_suspect": len(x_s),
                           "n_validation": len(x_v)}
    dropped = int((~keep_s).sum() + (~keep_v).sum())
    if dropped:
        out["unscored"] = dropped
    why = check_sizes(len(x_s), len(x_v), min_half)
    if why:
        out["note"] = why
        return out
    rng = np.random.default_rng(seed)
    p, gap = np.array([one_split(x_s, x_v, rng) for _ in range(splits)]).T
    out["p_value"] = float(min(1.0, 2.0 * np.median(p)))
    out["score_gap"] = float(gap.mean())
    return out
