"""Membership-inference attacks on per-token statistics, and the unlearning scores built on them.

Every attack turns an item's per-token statistics into one *membership score*:
higher means "more likely trained on". A ROC AUC of the scores of a member set
(forget or remain) against non-members (holdout) then says how well the attack
tells them apart: 1.0 = perfectly, 0.5 = not at all (the goal after unlearning).

Per-token statistics come flattened over all items of a set, with ``item`` giving
the item of each token (any order), so that every score is a few vectorised numpy
passes, whatever the number and lengths of the items.

Attacks (all on teacher-forced next-token log-probabilities ``logp = -nll``):

- LOSS: mean token log-probability of the item.
- Min-K% (Shi et al. 2024, arXiv 2310.16789): mean of the item's lowest k% token
  log-probabilities (k = 20% by default).
- Min-K%++ (Zhang et al. 2024, arXiv 2404.02936): each token's log-probability is
  standardised by the mean and standard deviation of log p(z) under the model's own
  next-token distribution z ~ p(. | prefix); then Min-K% over those z-scores.
- reference ratio: log p_model(x) - log p_reference(x) (per-token means): a model that
  forgot x has it less likely than its reference (the model before unlearning).
- compression (the zlib attack of Carlini et al. 2021 for audio tokens): the item's mean
  NLL over the zlib-compressed size in bytes of its int16 codes; negated so that
  higher = member.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from noencore.errors import NoencoreError

#: fewest items per side for which a ROC AUC is reported; below it the AUC of a
#: handful of points says nothing and the report prints why instead of a number.
MIN_AUC_ITEMS = 5


class TooFewItems(NoencoreError):
    """A set is too small for the statistic asked of it."""


@dataclass
class ItemTokens:
    """Per-token statistics of one set, flattened over its items.

    Attributes:
        nll: float64 [N] next-token negative log-likelihood (nats) of every token.
        item: int64 [N] item of each token, in ``0 .. n_items - 1``.
        n_items: number of items (items may have no token: their scores are NaN).
        logp_mean: optional float64 [N], E_{z~p}[log p(z)] for Min-K%++.
        logp_var: optional float64 [N], Var_{z~p}[log p(z)] for Min-K%++.
    """

    nll: np.ndarray
    item: np.ndarray
    n_items: int
    logp_mean: np.ndarray | None = None
    logp_var: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.nll = np.asarray(self.nll, dtype=np.float64).reshape(-1)
        self.item = np.asarray(self.item, dtype=np.int64).reshape(-1)
        if self.nll.shape != self.item.shape:
            raise ValueError(f"nll {self.nll.shape} and item {self.item.shape} must have one "
                             "entry per token")
        if self.item.size and (self.item.min() < 0 or self.item.max() >= self.n_items):
            raise ValueError(f"item ids must lie in [0, {self.n_items}); got "
                             f"[{self.item.min()}, {self.item.max()}]")
        for name in ("logp_mean", "logp_var"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float64).reshape(-1)
                if v.shape != self.nll.shape:
                    raise ValueError(f"{name} {v.shape} must match nll {self.nll.shape}")
                setattr(self, name, v)

    def counts(self) -> np.ndarray:
        """int64 [n_items]: tokens per item."""
        return np.bincount(self.item, minlength=self.n_items)


def _item_mean(values: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    counts = np.bincount(item, minlength=n_items)
    sums = np.bincount(item, weights=values, minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _lowest_fraction_mean(values: np.ndarray, item: np.ndarray, n_items: int,
                          k: float) -> np.ndarray:
    """Per item, the mean of its ceil(k * n_i) lowest values (at least one)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1]; got {k}")
    counts = np.bincount(item, minlength=n_items)
    # sort by item, then by value inside the item: each item is one contiguous run
    order = np.lexsort((values, item))
    sorted_item = item[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(values.size) - starts[sorted_item]
    keep_n = np.maximum(np.ceil(k * counts - 1e-9).astype(np.int64), 1)
    keep = rank < keep_n[sorted_item]
    sums = np.bincount(sorted_item[keep], weights=values[order][keep], minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.minimum(keep_n, np.maximum(counts, 1)), np.nan)


def mean_nll(tokens: ItemTokens) -> np.ndarray:
    """float64 [n_items]: each item's mean token NLL (nats); NaN for an empty item."""
    return _item_mean(tokens.nll, tokens.item, tokens.n_items)


def loss_score(tokens: ItemTokens) -> np.ndarray:
    """LOSS attack: float64 [n_items] mean token log-probability (higher = member)."""
    return -mean_nll(tokens)


def mink_score(tokens: ItemTokens, k: float = 0.2) -> np.ndarray:
    """Min-K% attack: float64 [n_items] mean of the lowest k% token log-probabilities."""
    return _lowest_fraction_mean(-tokens.nll, tokens.item, tokens.n_items, k)


def minkpp_score(tokens: ItemTokens, k: float = 0.2, eps: float = 1e-12) -> np.ndarray:
    """Min-K%++ attack: float64 [n_items] Min-K% over (log p(x) - mu) / sigma per token.

    Needs ``tokens.logp_mean`` and ``tokens.logp_var`` (from ``noencore.ops.token_stats``).
    """
    if tokens.logp_mean is None or tokens.logp_var is None:
        raise ValueError("Min-K%++ needs logp_mean and logp_var per token "
                         "(compute the statistics with noencore.ops.token_stats)")
    z = (-tokens.nll - tokens.logp_mean) / np.sqrt(np.maximum(tokens.logp_var, 0.0) + eps)
    return _lowest_fraction_mean(z, tokens.item, tokens.n_items, k)


def reference_score(tokens: ItemTokens, reference: ItemTokens) -> np.ndarray:
    """Reference-ratio attack: float64 [n_items] log p_model(x) - log p_reference(x).

    Per-token means; both must cover the same items (same ``n_items``).
    """
    if reference.n_items != tokens.n_items:
        raise ValueError(f"reference statistics cover {reference.n_items} items, the model's "
                         f"{tokens.n_items}: evaluate both models on the same sets")
    return mean_nll(reference) - mean_nll(tokens)


def compressed_size(codes: np.ndarray) -> int:
    """Bytes of the zlib-compressed (level 9) int16 codes of one item (any shape)."""
    raw = np.ascontiguousarray(np.asarray(codes).astype(np.int16, copy=False)).tobytes()
    return len(zlib.compress(raw, 9))


def compression_score(tokens: ItemTokens, sizes: np.ndarray) -> np.ndarray:
    """Compression attack: float64 [n_items] -(mean NLL / compressed size in bytes).

    ``sizes`` [n_items]: :func:`compressed_size` of each item's codes. Codes that
    compress well are easy for any model; dividing by their size discounts that, so
    only what the model learnt beyond generic regularity makes an item look like a member.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if sizes.shape != (tokens.n_items,):
        raise ValueError(f"sizes has {sizes.shape[0]} entries for {tokens.n_items} items")
    if np.any(sizes <= 0):
        raise ValueError("compressed sizes must be positive")
    return -mean_nll(tokens) / sizes


def _clean(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return s[np.isfinite(s)]


def check_auc_sizes(n_members: int, n_nonmembers: int, min_items: int = MIN_AUC_ITEMS) -> str | None:
    """None when both sides are big enough for an AUC, else a sentence that says why not."""
    if n_members < min_items or n_nonmembers < min_items:
        return (f"set too small for an AUC ({n_members} members vs {n_nonmembers} "
                f"non-members; need at least {min_items} each)")
    return None


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray,
            min_items: int = MIN_AUC_ITEMS) -> float:
    """ROC AUC (scikit-learn) of members (label 1) against non-members (label 0).

    Scores: higher = member. Items with a non-finite score (no token) are left out.
    Raises :class:`TooFewItems` when either side has fewer than ``min_items`` items.
    """
    from sklearn.metrics import roc_auc_score

    m, n = _clean(member_scores), _clean(nonmember_scores)
    why = check_auc_sizes(m.size, n.size, min_items)
    if why:
        raise TooFewItems(why)
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(y, np.concatenate([m, n])))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) float64 arrays of the ROC curve."""
    from sklearn.metrics import roc_curve as _roc_curve

    m, n = _clean(member_scores), _clean(nonmember_scores)
    if m.size == 0 or n.size == 0:
        raise TooFewItems("a ROC curve needs at least one member and one non-member")
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    fpr, tpr, _ = _roc_curve(y, np.concatenate([m, n]))
    return fpr, tpr


def privleak(auc_unlearned: float, auc_retrained: float | None = None) -> float:
    """MUSE privacy leakage, in percent.

    MUSE (Shi et al. 2024, arXiv 2407.06460) defines
    ``PrivLeak = (AUC(f_unlearn) - AUC(f_retrain)) / AUC(f_retrain)`` with its AUC taken
    the other way round from the usual one (a model that memorised the forget set
    scores near 0, not 1). In our convention (``a`` = usual AUC, members scored higher)
    MUSE's AUC is ``1 - a``, so ``privleak = ((1 - a_u) - (1 - a_r)) / (1 - a_r) * 100``.
    Without a retrained model, ``a_r = 0.5`` (a perfect unlearner is indistinguishable
    from chance). 0 = ideal; strongly negative = the forget set still leaks (a fully
    memorised set gives -100); positive = over-unlearned (forget items now look *less*
    member-like than never-seen music, which is itself a signal).
    """
    ref = 0.5 if auc_retrained is None else float(auc_retrained)
    if not 0.0 <= auc_unlearned <= 1.0 or not 0.0 <= ref < 1.0:
        raise ValueError(f"AUCs must lie in [0, 1] (retrained < 1); got {auc_unlearned}, {ref}")
    return ((1.0 - auc_unlearned) - (1.0 - ref)) / (1.0 - ref) * 100.0


def forget_quality(unlearned_stats: np.ndarray, retrained_stats: np.ndarray) -> float:
    """TOFU forget quality: p-value of the two-sample Kolmogorov-Smirnov test.

    Compares a per-item statistic of the forget set (TOFU uses the truth ratio; here the
    item NLL or any MIA score) under the unlearned and the retrained model. High p-value
    (close to 1) = indistinguishable from a model that never saw the forget set.
    """
    from scipy.stats import ks_2samp

    a = _clean(unlearned_stats)
    b = _clean(retrained_stats)
    if a.size < 2 or b.size < 2:
        raise TooFewItems(f"forget quality needs >= 2 items per model; got {a.size} and {b.size}")
    return float(ks_2samp(a, b).pvalue)

