"""Known answers from the published formulas.

Each published metric is written out here from its definition (MUSE's privleak on
Min-K%, Min-K% and Min-K%++ as the papers and open-unlearning compute them, the KS test
of forget quality), in plain per-item Python loops over hand-made per-token inputs, and
compared with the evaluation's vectorised functions and with its report blocks. The
inputs hold the edge cases: k * n not a whole number, peaked next-token distributions
whose target is not the argmax, ties, an empty item, an item of one token, and a
retrained AUC of exactly 1. Every edge case has a defined result (no exception, no
item dropped); docs/metrics.md writes them down.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from noencore.evaluation import mia

# ---------------------------------------------------------------- published formulas
# Sign convention of the reference implementation (open-unlearning): an attack's score
# is higher for a NON-member (e.g. -mean of the lowest log-probs), forget items are
# labelled 0 and holdout items 1, and that AUC is the usual one (1 = forget items far
# more likely than holdout items). The evaluation scores members higher and labels
# them 1: the same AUC.


def ref_mink(logps: list[float], k: float) -> float:
    """Min-K% of one item as open-unlearning computes it for MUSE: the item's token
    log-probs without its last position (the end-of-sequence prediction in text), the
    max(1, int(n * k)) lowest, negated mean; 0 for an item with no token left."""
    lp = logps[:-1]
    if len(lp) == 0:
        return 0.0
    num_k = max(1, int(len(lp) * k))
    return -float(np.mean(sorted(lp)[:num_k]))


def ref_minkpp(logps: list[float], logits: list[np.ndarray], k: float) -> float:
    """Min-K%++ of one item (Zhang et al. 2024; open-unlearning's variance floor 1e-6):
    z = (log p(x) - mu) / sqrt(max(sigma^2, 1e-6)), mu and sigma^2 the mean and variance of
    log p(z) under the model's own next-token distribution; max(1, int(n * k)) lowest z,
    negated mean; 0 for an empty item. (Here every position is scored: audio tokens have
    no end-of-sequence prediction to leave out.)"""
    if len(logps) == 0:
        return 0.0
    z = []
    for lp, lg in zip(logps, logits):
        logp = lg - np.log(np.exp(lg - lg.max()).sum()) - lg.max()
        p = np.exp(logp)
        mu = (p * logp).sum()
        var = (p * logp ** 2).sum() - mu ** 2
        z.append((lp - mu) / math.sqrt(max(var, 1e-6)))
    num_k = max(1, int(len(z) * k))
    return -float(np.mean(sorted(z)[:num_k]))


def ref_auc(forget_scores: list[float], holdout_scores: list[float]) -> float:
    """The reference's AUC (labels forget 0, holdout 1, non-member scores higher), by its
    pairwise definition: P(holdout score > forget score) + 1/2 P(tie)."""
    pairs = [(h > f) + 0.5 * (h == f) for f in forget_scores for h in holdout_scores]
    return float(np.mean(pairs))


def ref_privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE's privleak on MUSE's AUC (1 - the usual one): (score - ref) / ref * 100; at
    ref = 0 (a retrained usual AUC of 1) open-unlearning's guard, ref + 1e-10."""
    score, ref = 1 - auc_unlearned, 1 - auc_retrained
    return (score - ref) / (ref if ref > 0 else ref + 1e-10) * 100


def open_unlearning_privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """open-unlearning's privleak: 1e-10 added to the denominator everywhere."""
    score, ref = 1 - auc_unlearned, 1 - auc_retrained
    return (score - ref) / (ref + 1e-10) * 100


# ---------------------------------------------------------------- hand-made items
V = 7  # vocabulary of the hand-made next-token distributions


def _item_logits(rng: np.random.Generator, n: int, peaked: int = 0) -> tuple[list, list]:
    """n tokens of one item: (their targets' log-probs, their logits [V]); the first
    ``peaked`` tokens have a distribution peaked 30 logits on a code that is not the
    target (the z-score the variance floor bounds)."""
    logps, logits = [], []
    for i in range(n):
        lg = rng.normal(0, 1.5, size=V)
        target = int(rng.integers(V))
        if i < peaked:
            other = (target + 1) % V
            lg = np.zeros(V)
            lg[other] = 30.0
        logp = lg - np.log(np.exp(lg - lg.max()).sum()) - lg.max()
        logps.append(float(logp[target]))
        logits.append(lg)
    return logps, logits


def _set(rng: np.random.Generator, lengths: list[int], shift: float = 0.0,
         peaked: dict[int, int] | None = None, tie_value: float | None = None):
    """A set of items of the given lengths: per item (log-probs, logits), and the
    evaluation's ItemTokens of the same numbers (statistics from the token_stats op)."""
    from noencore.ops import token_stats

    items = []
    for i, n in enumerate(lengths):
        logps, logits = _item_logits(rng, n, (peaked or {}).get(i, 0))
        items.append((logps, logits))
    if tie_value is not None:  # every token of item 0 the same log-prob: ties inside
        items[0] = ([tie_value] * len(items[0][0]), items[0][1])
    nll, mean, var, item, book = [], [], [], [], []
    for i, (logps, logits) in enumerate(items):
        for j, (lp, lg) in enumerate(zip(logps, logits)):
            # the op's moments of this row (hidden = logits, weight = identity; they do not
            # depend on the target); the target's log-prob is the hand-made one (shifted:
            # members more likely)
            st = token_stats(torch.tensor(lg[None], dtype=torch.float32), torch.eye(V),
                             torch.tensor([int(np.argmin(lg))]), backend="torch")
            nll.append(-(lp + shift))
            mean.append(float(st.logp_mean[0]))
            var.append(float(st.logp_var[0]))
            item.append(i)
            book.append(j % CODEBOOKS)  # an item's tokens cycle through the codebooks
    shifted = [([lp + shift for lp in logps], logits) for logps, logits in items]
    return shifted, mia.ItemTokens(nll=np.array(nll), item=np.array(item, np.int64),
                                   n_items=len(lengths), logp_mean=np.array(mean),
                                   logp_var=np.array(var), codebook=np.array(book))


# lengths where k * n is not whole (7 * 0.2 = 1.4; (7 - 1) * 0.4 = 2.4), under 1 (3 * 0.2),
# an empty item (0) and an item of one token (nothing left once its last is left out)
FORGET_LENGTHS = [7, 3, 0, 1, 12, 9, 5, 16]
CODEBOOKS = 3  # the codebook of token j of an item: j % 3 (item of one token: codebook 0 only)
HOLDOUT_LENGTHS = [6, 11, 4, 8, 0, 13, 2]


def test_min_k_and_min_k_plus_plus_per_item_as_published():
    rng = np.random.default_rng(0)
    items, tokens = _set(rng, FORGET_LENGTHS, peaked={1: 1, 4: 2}, tie_value=-2.5)
    ours_muse = mia.mink_muse_score(tokens)
    ours_pp = mia.minkpp_score(tokens, 0.2)
    ours_mink = mia.mink_score(tokens, 0.2)
    for i, (logps, logits) in enumerate(items):
        # members score higher in the evaluation: the negation of the reference's score
        assert ours_muse[i] == pytest.approx(-ref_mink(logps, 0.4), abs=1e-12), i
        assert ours_pp[i] == pytest.approx(-ref_minkpp(logps, logits, 0.2), rel=1e-4), i
        # the project's Min-K% (k = 0.2): the published k rule on every token
        lp = logps
        want = 0.0 if not lp else float(np.mean(sorted(lp)[:max(1, int(len(lp) * 0.2))]))
        assert ours_mink[i] == pytest.approx(want, abs=1e-12), i
    # the edge cases by hand: 7 tokens at k = 0.2 keep 1 (not ceil(1.4) = 2); the empty
    # item and the one-token item (nothing left without its last token) score 0
    assert ours_mink[0] == pytest.approx(min(items[0][0]))
    assert ours_mink[2] == 0.0 and ours_muse[2] == 0.0 and ours_pp[2] == 0.0
    assert ours_muse[3] == 0.0 and ours_mink[3] == pytest.approx(items[3][0][0])
    assert np.all(np.isfinite(ours_muse)) and np.all(np.isfinite(ours_pp))
    assert ours_muse[0] == pytest.approx(-2.5)  # all tied: any 2 of them, the same mean


def test_k_rule_on_the_issue_example():
    # logp = -1..-7 at k = 0.2: the published rule keeps max(1, floor(1.4)) = 1 token
    t = mia.ItemTokens(nll=np.arange(1, 8, dtype=float), item=np.zeros(7, int), n_items=1)
    assert mia.mink_score(t, 0.2)[0] == pytest.approx(-7.0)
    # MUSE's: the last token (-7) left out, then floor(0.4 * 6) = 2 of -1..-6
    assert mia.mink_muse_score(t)[0] == pytest.approx(-5.5)
    # the last token is the item's last in the order given, wherever its value ranks:
    # logp -4, -1, -7, -2, -6, -3, -5 leave out -5, keep the lowest two of the rest
    shuffled = mia.ItemTokens(nll=np.array([4.0, 1, 7, 2, 6, 3, 5]), item=np.zeros(7, int),
                              n_items=1)
    assert mia.mink_muse_score(shuffled)[0] == pytest.approx(-6.5)


def test_peaked_token_stays_within_the_reference_magnitude():
    """One token on which the model is peaked 30 logits on another code: its z-score is
    the reference's (variance floored at 1e-6, about -3e4), not the unfloored one."""
    from noencore.ops import token_stats

    for vocab in (7, 2048):
        logits = torch.zeros(1, vocab)
        logits[0, 0] = 30.0
        target = torch.tensor([1])
        for backend in ("torch", "auto"):  # the plain op and the C++ one where built
            st = token_stats(logits, torch.eye(vocab), target, backend=backend)
            t = mia.ItemTokens(nll=st.nll.double().numpy(), item=np.zeros(1, int), n_items=1,
                               logp_mean=st.logp_mean.double().numpy(),
                               logp_var=st.logp_var.double().numpy())
            lg = logits[0].double().numpy()
            logp = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
            want = -ref_minkpp([float(logp[1])], [lg], 0.2)
            got = mia.minkpp_score(t)[0]
            assert got == pytest.approx(want, rel=1e-4), (vocab, backend)
            assert -3.1e4 < got < -2.9e4, (vocab, backend)
            # the model's own variance is far below the floor: unfloored, one token of
            # an item would weigh several times more
            assert st.logp_var[0] < 1e-6
            assert abs(mia.minkpp_score(t, var_floor=1e-12)[0]) > 2 * abs(got)


def _reference_scores(items, attack):
    return [attack(logps, logits) for logps, logits in items]


def test_aucs_and_privleak_from_the_published_formulas():
    """MUSE's privleak end to end: Min-K% (k = 0.4, last token out) AUCs of the unlearned
    and of the retrained model, forget vs holdout, and the ratio, against the report's
    blocks; the retrained AUC of exactly 1 included."""
    privleak_blocks = mia.privleak_blocks
    rng = np.random.default_rng(1)
    # unlearned: forget items somewhat more likely than holdout items; retrained: less
    forget_u, tf_u = _set(rng, FORGET_LENGTHS, shift=0.4, peaked={0: 1})
    hold_u, th_u = _set(rng, HOLDOUT_LENGTHS, peaked={3: 2})
    forget_r, tf_r = _set(rng, FORGET_LENGTHS, shift=-0.2)
    hold_r, th_r = _set(rng, HOLDOUT_LENGTHS)

    def aucs(forget, hold, tf, th):
        want = ref_auc(_reference_scores(forget, lambda lp, lg: ref_mink(lp, 0.4)),
                       _reference_scores(hold, lambda lp, lg: ref_mink(lp, 0.4)))
        got = mia.roc_auc(mia.mink_muse_score(tf), mia.mink_muse_score(th), min_items=1)
        assert got == pytest.approx(want, abs=1e-12)
        want_pp = ref_auc(_reference_scores(forget, lambda lp, lg: ref_minkpp(lp, lg, 0.2)),
                          _reference_scores(hold, lambda lp, lg: ref_minkpp(lp, lg, 0.2)))
        got_pp = mia.roc_auc(mia.minkpp_score(tf), mia.minkpp_score(th), min_items=1)
        assert got_pp == pytest.approx(want_pp, abs=1e-12)
        return got, got_pp

    (a_u, pp_u), (a_r, pp_r) = aucs(forget_u, hold_u, tf_u, th_u), aucs(forget_r, hold_r, tf_r,
                                                                       th_r)
    # the reference AUCs above count every item, the empty ones at score 0: so do ours
    blocks = privleak_blocks({"after": {"forget": {"mink_muse": a_u, "minkpp": pp_u}}},
                             ["after"], {"forget": {"mink_muse": a_r, "minkpp": pp_r}})
    assert blocks["privleak"]["attack"] == "mink_muse"
    assert blocks["privleak"]["reference_auc"] == a_r
    assert blocks["privleak"]["after"] == pytest.approx(ref_privleak(a_u, a_r), rel=1e-12)
    assert blocks["privleak_variants"]["after"]["minkpp"] == pytest.approx(
        ref_privleak(pp_u, pp_r), rel=1e-12)
    # without a retrained model: relative to chance
    alone = privleak_blocks({"after": {"forget": {"mink_muse": a_u}}}, ["after"], None)
    assert alone["privleak"]["after"] == pytest.approx(ref_privleak(a_u, 0.5), rel=1e-12)
    assert alone["privleak"]["reference_auc"] == 0.5
    # a retrained model that separates perfectly: a defined number and a note, no error
    for a, want in ((1.0, 0.0), (0.75, ref_privleak(0.75, 1.0))):
        b = privleak_blocks({"after": {"forget": {"mink_muse": a}}}, ["after"],
                            {"forget": {"mink_muse": 1.0}})
        assert b["privleak"]["after"] == pytest.approx(want, rel=1e-12)
        assert "only its sign" in b["privleak"]["note"]
    assert ref_privleak(0.75, 1.0) == open_unlearning_privleak(0.75, 1.0) > 1e11
    assert mia.privleak(1.0, 1.0) == 0.0


def test_privleak_formula_values():
    # MUSE's sign: the memorised model leaks (negative), over-unlearning is positive
    for a_u, a_r in ((0.5, 0.5), (1.0, 0.5), (0.0, 0.5), (0.8, 0.6), (0.443, 0.443),
                     (0.9, 0.0), (0.2, 0.97)):
        assert mia.privleak(a_u, a_r) == pytest.approx(ref_privleak(a_u, a_r), rel=1e-12)
        # the reference implementation's guard moves it by under 1e-8 relative
        assert mia.privleak(a_u, a_r) == pytest.approx(open_unlearning_privleak(a_u, a_r),
                                                       rel=1e-8, abs=1e-12)
    assert mia.privleak(1.0) == pytest.approx(-100.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mia.privleak(1.2, 0.5)


def test_forget_quality_on_per_item_mean_nll_with_ties_and_an_empty_item():
    """Forget quality: scipy's two-sample KS test (the reference's call) on each forget
    item's mean token NLL, computed here item by item; ties between the two models'
    values, and an item without a token (no mean NLL: left out and counted)."""
    from scipy.stats import ks_2samp

    def item_nll(per_item: list[list[float]]) -> np.ndarray:
        """The evaluation's per-item mean NLL of hand-made per-token NLLs."""
        nll = np.array([v for vals in per_item for v in vals])
        item = np.array([i for i, vals in enumerate(per_item) for _ in vals], np.int64)
        return mia.mean_nll(mia.ItemTokens(nll=nll, item=item, n_items=len(per_item)))

    after = [[1.0, 2.0], [3.0], [], [2.0, 4.0, 3.0], [1.5, 1.5], [5.0], [0.5, 1.5]]
    retrained = [[1.5], [3.0], [6.0, 2.0], [3.0], [2.0, 2.0], [4.0, 6.0], [1.0]]
    want_u = [float(np.mean(v)) for v in after if v]        # the empty item has no mean
    want_r = [float(np.mean(v)) for v in retrained]
    assert set(want_u) & set(want_r)                         # ties across the models
    block = mia.forget_quality_block({"after": item_nll(after)}, item_nll(retrained))
    assert block["after"] == pytest.approx(ks_2samp(want_u, want_r).pvalue, rel=1e-12)
    assert block["n"] == {"after": 6, "retrained": 7}
    assert "1 forget item(s) have no token" in block["note"]
    assert "mean token NLL" in block["statistic"]
    # too few items for the test: a note, not an error
    few = mia.forget_quality_block({"after": item_nll([[1.0], []])}, item_nll([[1.0], [2.0]]))
    assert few["after"] is None and "needs >= 2 items" in few["note"]


def test_loss_zlib_and_reference_attacks_as_published():
    rng = np.random.default_rng(2)
    items, tokens = _set(rng, FORGET_LENGTHS)
    _, before = _set(rng, FORGET_LENGTHS)
    codes = [rng.integers(0, 16, size=(2, max(n, 1))).astype(np.int16) for n in FORGET_LENGTHS]
    sizes = np.array([len(zlib.compress(c.tobytes(), 9)) for c in codes])
    scores = mia.attack_scores(tokens, sizes, {"retrained": before})
    assert "ref_before" not in scores  # no model before unlearning given
    for i, (logps, _) in enumerate(items):
        loss = -float(np.mean(logps)) if logps else 0.0      # the reference's avg_loss
        assert scores["loss"][i] == pytest.approx(-loss, abs=1e-12)
        assert scores["zlib"][i] == pytest.approx(-loss / sizes[i], abs=1e-12)
        coarse = logps[::CODEBOOKS]  # the item's codebook-0 tokens
        assert scores["loss_coarse"][i] == pytest.approx(
            float(np.mean(coarse)) if coarse else 0.0, abs=1e-12)
        sel = before.item == i
        ref_loss = float(before.nll[sel].mean()) if sel.any() else 0.0
        # the reference attack's score: target loss - reference loss (non-members higher)
        assert scores["ref_retrained"][i] == pytest.approx(-(loss - ref_loss), abs=1e-12)


def test_auc_with_ties_and_infinite_scores():
    members = np.array([1.0, 1.0, 2.0, -np.inf, np.inf, 0.5])
    non = np.array([1.0, 0.0, -np.inf, 3.0, 0.5])
    pairs = [(m > n) + 0.5 * (m == n) for m in members for n in non]
    want = float(np.mean(pairs))
    assert mia.roc_auc(members, non, min_items=1) == pytest.approx(want, abs=1e-12)
    # a NaN score (NaN token statistics) is counted, then left out
    assert mia.unscored(np.array([np.nan, 1.0, np.nan])) == 2
    assert mia.roc_auc(np.append(members, np.nan), non, min_items=1) == pytest.approx(want)


def test_every_attack_registered_with_its_definition():
    assert set(mia.ATTACKS) >= {"loss", "mink", "mink_muse", "minkpp", "zlib", "ref_before",
                                "ref_retrained"}
    assert mia.MUSE_PRIVLEAK_ATTACK == "mink_muse"
    for a in mia.ATTACKS.values():
        assert a.label and a.statistic and a.reference in (None, "before", "retrained")
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for name in [*mia.ATTACKS, "privleak", "privleak_minkpp", "forget quality"]:
        assert f"`{name}`" in doc or name in doc, name
