"""Membership-inference attacks on per-token statistics, and the unlearning scores built on them.

Every attack turns an item's per-token statistics into one *membership score*:
higher means "more likely trained on". A ROC AUC of the scores of a member set
(forget or remain) against non-members (holdout) then says how well the attack
tells them apart: 1.0 = perfectly, 0.5 = not at all (the goal after unlearning).

Per-token statistics come flattened over all items of a set, with ``item`` giving
the item of each token, so that every score is a few vectorised numpy passes,
whatever the number and lengths of the items. Only MUSE's Min-K% reads the order of
an item's tokens (it leaves out the item's last one); ``SetStats.tokens()`` gives them
in the canonical (codebook, frame) order, the last being the final step of the delay
pattern.

:data:`ATTACKS` registers every attack by name, with its label and its definition
(docs/metrics.md writes each out with its relation to the published one). All work
on teacher-forced next-token log-probabilities ``logp = -nll``:

- ``loss``: mean token log-probability of the item (Yeom et al. 2018).
- ``mink``: Min-K% (Shi et al. 2024, arXiv 2310.16789), mean of the item's
  ``max(1, floor(k n))`` lowest token log-probabilities, k = 0.2.
- ``mink_muse``: Min-K% as MUSE's privleak computes it (k = 0.4, the item's last token
  left out, as open-unlearning leaves out each text's end-of-sequence prediction).
- ``minkpp``: Min-K%++ (Zhang et al. 2024, arXiv 2404.02936): each token's
  log-probability standardised by the mean and standard deviation of log p(z) under the
  model's own next-token distribution z ~ p(. | prefix), the variance floored at
  :data:`MINKPP_VAR_FLOOR`; then Min-K% (k = 0.2) over those z-scores.
- ``zlib``: compression (Carlini et al. 2021, for audio tokens): the item's mean NLL over
  the zlib-compressed size in bytes of its int16 codes, negated.
- ``loss_coarse``: LOSS on the item's codebook-0 tokens alone (the first level of the
  residual quantiser, the coarse content every other codebook refines). An attack for
  audio tokens: a method that moves an item's mean over all codebooks can leave its
  coarse codebook familiar (``docs/metrics.md``, "the coarse codebook").
- ``ref_before`` / ``ref_retrained``: reference ratio ``log p_model(x) - log p_ref(x)``
  (per-token means), against the model before unlearning / against the model retrained
  without the forget set (MUSE's reference model).

An item with no token scores 0 in every attack (open-unlearning scores it so in Min-K%
and Min-K%++), so that every item of a set enters its AUC; its per-item mean NLL
(:func:`mean_nll`, the statistic of forget quality) is NaN and the report counts it.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from noencore.errors import NoencoreError

#: fewest items per side for which a ROC AUC is reported; below it the AUC of a
#: handful of points says nothing and the report prints why instead of a number.
MIN_AUC_ITEMS = 5

#: Min-K% and Min-K%++ fraction (both papers' default)
MINK_K = 0.2
#: MUSE's privleak runs Min-K% at k = 0.4 (open-unlearning configs/eval/muse_metrics)
MUSE_K = 0.4
#: Min-K%++ variance floor, open-unlearning's: a token on which the model is sharply
#: peaked elsewhere (top logit 30 above the rest) has a z-score near -3e4, not -1e6+
MINKPP_VAR_FLOOR = 1e-6
#: privleak's denominator at a retrained AUC of exactly 1 (open-unlearning adds it to
#: the denominator): a defined (huge) number instead of a division by zero
PRIVLEAK_EPS = 1e-10


class TooFewItems(NoencoreError):
    """A set is too small for the statistic asked of it."""


@dataclass
class ItemTokens:
    """Per-token statistics of one set, flattened over its items.

    Attributes:
        nll: float64 [N] next-token negative log-likelihood (nats) of every token.
        item: int64 [N] item of each token, in ``0 .. n_items - 1``; an item's tokens in
            the order it was read (only MUSE's Min-K% uses the order: the last is left out).
        n_items: number of items (an item may have no token: it scores 0 in every attack).
        logp_mean: optional float64 [N], E_{z~p}[log p(z)] for Min-K%++.
        logp_var: optional float64 [N], Var_{z~p}[log p(z)] for Min-K%++.
        codebook: optional int64 [N], the codebook of each token (for ``loss_coarse``).
    """

    nll: np.ndarray
    item: np.ndarray
    n_items: int
    logp_mean: np.ndarray | None = None
    logp_var: np.ndarray | None = None
    codebook: np.ndarray | None = None

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
        if self.codebook is not None:
            self.codebook = np.asarray(self.codebook, dtype=np.int64).reshape(-1)
            if self.codebook.shape != self.nll.shape:
                raise ValueError(f"codebook {self.codebook.shape} must match nll {self.nll.shape}")

    def counts(self) -> np.ndarray:
        """int64 [n_items]: tokens per item."""
        return np.bincount(self.item, minlength=self.n_items)


def _item_mean(values: np.ndarray, item: np.ndarray, n_items: int,
               empty: float = 0.0) -> np.ndarray:
    """Per item, the mean of its values; ``empty`` for an item without any."""
    counts = np.bincount(item, minlength=n_items)
    sums = np.bincount(item, weights=values, minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), empty)


def _without_last(values: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``item`` without each item's last token (in array order)."""
    order = np.argsort(item, kind="stable")  # an item's tokens stay in their order
    ends = np.flatnonzero(np.diff(item[order], append=-1))  # last position of each run
    keep = np.ones(values.size, bool)
    keep[order[ends]] = False
    return values[keep], item[keep]


def lowest_fraction_mean(values: np.ndarray, item: np.ndarray, n_items: int, k: float,
                         drop_last: bool = False) -> np.ndarray:
    """float64 [n_items]: per item, the mean of its ``max(1, floor(k * n_i))`` lowest
    values, n_i its number of values (less its last one with ``drop_last``); 0 for an item
    with no value. ``floor(k * n_i)`` is taken of the float64 product, as the published
    code (``int(len(x) * k)``) takes it."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1]; got {k}")
    if drop_last and values.size:
        values, item = _without_last(values, item)
    counts = np.bincount(item, minlength=n_items)
    # sort by item, then by value inside the item: each item is one contiguous run
    order = np.lexsort((values, item))
    sorted_item = item[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(values.size) - starts[sorted_item]
    keep_n = np.maximum(np.floor(counts * k).astype(np.int64), 1)
    keep = rank < keep_n[sorted_item]
    sums = np.bincount(sorted_item[keep], weights=values[order][keep], minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.minimum(keep_n, np.maximum(counts, 1)), 0.0)


def mean_nll(tokens: ItemTokens) -> np.ndarray:
    """float64 [n_items]: each item's mean token NLL (nats); NaN for an item with no token
    (it has no NLL: forget quality and the histograms leave it out and say how many)."""
    return _item_mean(tokens.nll, tokens.item, tokens.n_items, empty=np.nan)


def loss_score(tokens: ItemTokens) -> np.ndarray:
    """LOSS attack: float64 [n_items] mean token log-probability (higher = member)."""
    return _item_mean(-tokens.nll, tokens.item, tokens.n_items)


def coarse_loss_score(tokens: ItemTokens, codebook: int = 0) -> np.ndarray:
    """LOSS on one codebook: float64 [n_items] mean log-probability of the item's tokens
    of ``codebook`` (0: the coarse one); 0 for an item with none. Needs
    ``tokens.codebook``."""
    if tokens.codebook is None:
        raise ValueError("the coarse-codebook LOSS attack needs each token's codebook "
                         "(SetStats.tokens() gives it)")
    sel = tokens.codebook == codebook
    return _item_mean(-tokens.nll[sel], tokens.item[sel], tokens.n_items)


def mink_score(tokens: ItemTokens, k: float = MINK_K, drop_last: bool = False) -> np.ndarray:
    """Min-K% attack: float64 [n_items] mean of the ``max(1, floor(k n))`` lowest token
    log-probabilities (``drop_last``: of all but the item's last token, as MUSE)."""
    return lowest_fraction_mean(-tokens.nll, tokens.item, tokens.n_items, k, drop_last)


def mink_muse_score(tokens: ItemTokens) -> np.ndarray:
    """Min-K% as MUSE's privleak computes it: k = 0.4, the item's last token left out."""
    return mink_score(tokens, MUSE_K, drop_last=True)


def minkpp_z(tokens: ItemTokens, var_floor: float = MINKPP_VAR_FLOOR) -> np.ndarray:
    """float64 [N]: each token's Min-K%++ z-score ``(log p(x) - mu) / sqrt(max(var, floor))``."""
    if tokens.logp_mean is None or tokens.logp_var is None:
        raise ValueError("Min-K%++ needs logp_mean and logp_var per token "
                         "(compute the statistics with noencore.ops.token_stats)")
    return (-tokens.nll - tokens.logp_mean) / np.sqrt(np.maximum(tokens.logp_var, var_floor))


def minkpp_score(tokens: ItemTokens, k: float = MINK_K,
                 var_floor: float = MINKPP_VAR_FLOOR) -> np.ndarray:
    """Min-K%++ attack: float64 [n_items] Min-K% over the tokens' :func:`minkpp_z`.

    Needs ``tokens.logp_mean`` and ``tokens.logp_var`` (from ``noencore.ops.token_stats``).
    """
    return lowest_fraction_mean(minkpp_z(tokens, var_floor), tokens.item, tokens.n_items, k)


def reference_score(tokens: ItemTokens, reference: ItemTokens) -> np.ndarray:
    """Reference-ratio attack: float64 [n_items] log p_model(x) - log p_reference(x).

    Per-token means; both must cover the same items (same ``n_items``).
    """
    if reference.n_items != tokens.n_items:
        raise ValueError(f"reference statistics cover {reference.n_items} items, the model's "
                         f"{tokens.n_items}: evaluate both models on the same sets")
    return loss_score(tokens) - loss_score(reference)


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
    return loss_score(tokens) / sizes


@dataclass(frozen=True)
class Attack:
    """One membership-inference attack of :data:`ATTACKS`.

    name: its key in report.json; label: how reports name it; statistic: the per-item
    score as a formula (higher = member, for every attack); reference: the model whose
    statistics it compares with ("before", "retrained") or None; score(tokens, sizes,
    references) -> float64 [n_items], with ``references`` mapping "before" /
    "retrained" to that model's :class:`ItemTokens` of the same set.
    """

    name: str
    label: str
    statistic: str
    score: Callable[[ItemTokens, np.ndarray, Mapping[str, ItemTokens]], np.ndarray]
    reference: str | None = None


def _ref_attack(role: str) -> Callable[[ItemTokens, np.ndarray, Mapping[str, ItemTokens]],
                                       np.ndarray]:
    return lambda t, sizes, refs: reference_score(t, refs[role])


#: every attack the evaluation runs, by name (in report order)
ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("loss", "LOSS", "mean_i log p(x_i)", lambda t, sizes, refs: loss_score(t)),
    Attack("mink", "Min-K% (k=20%)", "mean of the max(1, floor(0.2 n)) lowest log p(x_i)",
           lambda t, sizes, refs: mink_score(t)),
    Attack("mink_muse", "Min-K% (MUSE: k=40%, last token out)",
           "mean of the max(1, floor(0.4 (n-1))) lowest log p(x_i), i < n",
           lambda t, sizes, refs: mink_muse_score(t)),
    Attack("minkpp", "Min-K%++ (k=20%)",
           "Min-K% (k=0.2) of (log p(x_i) - mu_i) / sqrt(max(var_i, 1e-6))",
           lambda t, sizes, refs: minkpp_score(t)),
    Attack("zlib", "compression (zlib)", "mean_i log p(x_i) / zlib bytes of the int16 codes",
           lambda t, sizes, refs: compression_score(t, sizes)),
    Attack("loss_coarse", "LOSS on codebook 0 (coarse)",
           "mean_i log p(x_i) over the item's codebook-0 tokens",
           lambda t, sizes, refs: coarse_loss_score(t)),
    Attack("ref_before", "reference ratio vs the model before unlearning",
           "mean_i log p(x_i) - mean_i log p_before(x_i)", _ref_attack("before"), "before"),
    Attack("ref_retrained", "reference ratio vs the retrained model (MUSE's)",
           "mean_i log p(x_i) - mean_i log p_retrained(x_i)", _ref_attack("retrained"),
           "retrained"),
)}

#: MUSE's privleak is the privleak of this attack; the same formula on another attack
#: ``a`` of :data:`PRIVLEAK_VARIANTS` is the project's ``privleak_<a>``
MUSE_PRIVLEAK_ATTACK = "mink_muse"
PRIVLEAK_VARIANTS = ("loss", "mink", "minkpp", "zlib")


def attack_scores(tokens: ItemTokens, sizes: np.ndarray,
                  references: Mapping[str, ItemTokens] | None = None) -> dict[str, np.ndarray]:
    """Every attack of :data:`ATTACKS` whose reference model is among ``references``:
    ``{name: float64 [n_items] scores}``."""
    refs = dict(references or {})
    return {a.name: a.score(tokens, sizes, refs) for a in ATTACKS.values()
            if a.reference is None or a.reference in refs}


def unscored(scores: np.ndarray) -> int:
    """Items whose score is NaN (their token statistics hold NaN: a model returning NaN);
    :func:`roc_auc` leaves them out and the report says how many."""
    return int(np.isnan(np.asarray(scores, dtype=np.float64)).sum())


def _rankable(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides without NaN, +-inf replaced by finite values beyond every finite score
    (the order and the ties of the scores, all an AUC reads, are kept)."""
    m = np.asarray(members, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmembers, dtype=np.float64).reshape(-1)
    m, n = m[~np.isnan(m)], n[~np.isnan(n)]
    both = np.concatenate([m, n])
    finite = both[np.isfinite(both)]
    top = float(np.abs(finite).max()) + 1.0 if finite.size else 1.0
    return np.clip(m, -top, top), np.clip(n, -top, top)


def check_auc_sizes(n_members: int, n_nonmembers: int, min_items: int = MIN_AUC_ITEMS) -> str | None:
    """None when both sides are big enough for an AUC, else a sentence that says why not."""
    if n_members < min_items or n_nonmembers < min_items:
        return (f"set too small for an AUC ({n_members} members vs {n_nonmembers} "
                f"non-members; need at least {min_items} each)")
    return None


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray,
            min_items: int = MIN_AUC_ITEMS) -> float:
    """ROC AUC (scikit-learn) of members (label 1) against non-members (label 0).

    Scores: higher = member; +-inf rank above / below every finite score; NaN scores
    (:func:`unscored`) are left out. Raises :class:`TooFewItems` when either side has fewer than ``min_items`` items.
    """
    from sklearn.metrics import roc_auc_score

    m, n = _rankable(member_scores, nonmember_scores)
    why = check_auc_sizes(m.size, n.size, min_items)
    if why:
        raise TooFewItems(why)
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(y, np.concatenate([m, n])))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) float64 arrays of the ROC curve."""
    from sklearn.metrics import roc_curve as _roc_curve

    m, n = _rankable(member_scores, nonmember_scores)
    if m.size == 0 or n.size == 0:
        raise TooFewItems("a ROC curve needs at least one member and one non-member")
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    fpr, tpr, _ = _roc_curve(y, np.concatenate([m, n]))
    return fpr, tpr


def privleak(auc_unlearned: float, auc_retrained: float | None = None) -> float:
    """MUSE privacy leakage, in percent, of one attack's forget-vs-holdout AUCs.

    MUSE (Shi et al. 2024, arXiv 2407.06460) defines
    ``PrivLeak = (AUC(f_unlearn) - AUC(f_retrain)) / AUC(f_retrain)`` with its AUC taken
    the other way round from the usual one (a model that memorised the forget set
    scores near 0, not 1). In our convention (``a`` = usual AUC, members scored higher)
    MUSE's AUC is ``1 - a``, so ``privleak = ((1 - a_u) - (1 - a_r)) / (1 - a_r) * 100``.
    At a retrained AUC of exactly 1 the denominator is open-unlearning's ``1e-10``: 0 for
    an unlearned AUC of 1, ``(1 - a_u) * 1e12`` otherwise (only the sign means anything
    there; open-unlearning adds the 1e-10 everywhere, which moves other values by under
    1e-8 relative). Without a retrained model, ``a_r = 0.5`` (a perfect unlearner
    is indistinguishable from chance). 0 = ideal; strongly negative = the forget set still
    leaks (a fully memorised set gives -100 against chance); positive = over-unlearned
    (forget items now look *less* member-like than never-seen music, itself a signal).
    MUSE's own privleak is this on the ``mink_muse`` attack (docs/metrics.md).
    """
    ref = 0.5 if auc_retrained is None else float(auc_retrained)
    if not 0.0 <= auc_unlearned <= 1.0 or not 0.0 <= ref <= 1.0:
        raise ValueError(f"AUCs must lie in [0, 1]; got {auc_unlearned}, {ref}")
    denominator = (1.0 - ref) if ref < 1.0 else PRIVLEAK_EPS
    return ((1.0 - auc_unlearned) - (1.0 - ref)) / denominator * 100.0


def forget_quality(unlearned_stats: np.ndarray, retrained_stats: np.ndarray) -> float:
    """Forget quality: p-value of the two-sample Kolmogorov-Smirnov test (scipy's
    ``ks_2samp``, two-sided) of a per-item statistic of the forget set under the unlearned
    and under the retrained model.

    TOFU runs it on the truth ratio, which needs paraphrased and perturbed answers that
    audio does not have; the evaluation runs it on each item's mean token NLL
    (:func:`mean_nll`). High p (close to 1) = indistinguishable from a model that never
    saw the forget set; the p-value shrinks with the number of items for one and the same
    difference, so report the counts beside it. NaN values (items without a token) are
    left out.
    """
    from scipy.stats import ks_2samp

    a = np.asarray(unlearned_stats, dtype=np.float64).reshape(-1)
    b = np.asarray(retrained_stats, dtype=np.float64).reshape(-1)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size < 2 or b.size < 2:
        raise TooFewItems(f"forget quality needs >= 2 items per model; got {a.size} and {b.size}")
    return float(ks_2samp(a, b).pvalue)


def privleak_blocks(mia_results: Mapping[str, Any], roles: Sequence[str],
                    retr_mia: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The report's "privleak" block (MUSE's: the :data:`MUSE_PRIVLEAK_ATTACK` attack) and
    "privleak_variants" (the same formula on :data:`PRIVLEAK_VARIANTS`, named
    ``privleak_<attack>``), from the forget-vs-holdout AUCs of each role in
    ``mia_results`` (``{role: {"forget": {attack: auc}}}``) and of the retrained model
    (``retr_mia``, the same shape; None: reference AUC 0.5)."""
    ref = (retr_mia or {}).get("forget", {})
    rel = ("the retrained model's AUC of the same attack" if retr_mia is not None
           else "AUC 0.5 (no retrained model)")

    def one(attack: str) -> tuple[float | None, dict[str, float | None]]:
        ref_auc = ref.get(attack) if retr_mia is not None else 0.5
        values = {}
        for role in roles:
            auc = mia_results[role].get("forget", {}).get(attack)
            values[role] = None if auc is None or ref_auc is None else privleak(auc, ref_auc)
        return ref_auc, values

    muse = ATTACKS[MUSE_PRIVLEAK_ATTACK]
    ref_auc, values = one(muse.name)
    out: dict[str, dict[str, Any]] = {"privleak": {
        "definition": f"MUSE's: {muse.label}, forget vs holdout AUC a; "
                      "((1 - a) - (1 - a_ref)) / (1 - a_ref) * 100",
        "attack": muse.name, "relative_to": rel, "reference_auc": ref_auc, **values}}
    variants: dict[str, Any] = {
        "definition": "MUSE's formula on the project's attacks (privleak_<attack>)",
        "relative_to": rel, "reference_auc": {}, **{role: {} for role in roles}}
    for attack in PRIVLEAK_VARIANTS:
        variants["reference_auc"][attack], values = one(attack)
        for role, v in values.items():
            variants[role][attack] = v
    out["privleak_variants"] = variants
    if ref_auc == 1.0 or 1.0 in variants["reference_auc"].values():
        out["privleak"]["note"] = (
            "a retrained AUC of exactly 1 leaves the ratio undefined: with open-unlearning's "
            "1e-10 as its denominator it is 0 for an unlearned AUC of 1 and huge otherwise; "
            "only its sign means anything then")
    return out


def vs_retrained_block(unlearned: Mapping[str, Any],
                       retrained: Mapping[str, Any]) -> dict[str, Any]:
    """The report's "mia.vs_retrained" block: for each attack both models' MIA blocks hold
    (``{"forget": {attack: auc}}``; the retrained model's holds the attacks that read no
    other model), the forget-vs-holdout AUC gap ``|AUC_unlearned - AUC_retrained|``, and
    the strongest attack: the one with the largest gap (the first in :data:`ATTACKS`'
    order on a tie). A note instead where no attack has both AUCs."""
    u, r = unlearned.get("forget", {}), retrained.get("forget", {})
    gaps = {a: abs(u[a] - r[a]) for a in ATTACKS
            if u.get(a) is not None and r.get(a) is not None}
    if not gaps:
        return {"note": u.get("note") or r.get("note") or "no attack has both AUCs"}
    worst = max(gaps, key=lambda a: gaps[a])
    return {"set": "forget vs holdout", "worst_attack": worst, "gap": gaps[worst],
            "auc": u[worst], "auc_retrained": r[worst], "per_attack": gaps}


def forget_quality_block(item_nll: Mapping[str, np.ndarray],
                         retrained_nll: np.ndarray | None) -> dict[str, Any]:
    """The report's "forget_quality" block: for each role of ``item_nll`` (its forget
    items' mean token NLLs, :func:`mean_nll`), the KS p-value against the retrained
    model's (``retrained_nll``), with the statistic, the test and the item counts it ran
    on (``n``); a note instead where it cannot be computed."""
    if retrained_nll is None:
        return {"note": "needs a model retrained without the forget set (retrained=...)"}
    counts = {"retrained": int(np.count_nonzero(~np.isnan(retrained_nll)))}
    block: dict[str, Any] = {
        "statistic": "per-item mean token NLL on the forget set",
        "test": "two-sample Kolmogorov-Smirnov (scipy ks_2samp, two-sided), against the "
                "retrained model",
        "n": counts}
    notes = []
    for role, nll in item_nll.items():
        counts[role] = int(np.count_nonzero(~np.isnan(nll)))
        try:
            block[role] = forget_quality(nll, retrained_nll)
        except TooFewItems as exc:
            block[role] = None
            notes.append(f"{role}: {exc}")
    missing = len(retrained_nll) - min(counts.values())
    if missing:
        notes.append(f"{missing} forget item(s) have no token, hence no mean NLL, and are "
                     "left out")
    if notes:
        block["note"] = "; ".join(notes)
    return block
