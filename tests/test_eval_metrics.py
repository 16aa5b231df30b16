"""Metrics with known answers: MIA scores and AUCs, privleak, forget quality, FAD."""
from __future__ import annotations

import numpy as np
import pytest

from noencore.evaluation import fad as fadm
from noencore.evaluation import mia


def _ragged(rng, n_items, lo=3, hi=41):
    lens = rng.integers(lo, hi, size=n_items)
    item = np.repeat(np.arange(n_items), lens)
    perm = rng.permutation(item.size)  # tokens of an item need not be contiguous
    return item[perm], lens


def _tokens(rng, n_items, with_pp=True):
    item, lens = _ragged(rng, n_items)
    n = item.size
    return mia.ItemTokens(
        nll=rng.gamma(2.0, 1.5, size=n), item=item, n_items=n_items,
        logp_mean=-rng.gamma(2.0, 2.0, size=n) if with_pp else None,
        logp_var=rng.gamma(1.5, 1.0, size=n) if with_pp else None)


def _per_item(tokens, fn):
    out = np.zeros(tokens.n_items)  # an item without a token scores 0
    for i in range(tokens.n_items):
        sel = tokens.item == i
        if sel.any():
            out[i] = fn(sel)
    return out


def _lowest_mean(v, k):
    n = max(int(v.size * k), 1)
    return np.sort(v)[:n].mean()


@pytest.mark.parametrize("k", [0.2, 0.05, 0.5, 1.0])
def test_scores_match_per_item_reference(k):
    rng = np.random.default_rng(int(k * 100) + 7)
    t = _tokens(rng, 37)
    np.testing.assert_allclose(mia.loss_score(t), _per_item(t, lambda s: -t.nll[s].mean()))
    np.testing.assert_allclose(mia.mink_score(t, k),
                               _per_item(t, lambda s: _lowest_mean(-t.nll[s], k)))
    z = (-t.nll - t.logp_mean) / np.sqrt(np.maximum(t.logp_var, 1e-6))
    np.testing.assert_allclose(mia.minkpp_score(t, k), _per_item(t, lambda s: _lowest_mean(z[s], k)))


def test_mink_known_values_and_empty_item():
    # item 0: 10 tokens, logp = -1..-10 -> lowest 20% = {-10, -9}; item 1: no tokens
    t = mia.ItemTokens(nll=np.arange(1, 11, dtype=float), item=np.zeros(10, int), n_items=2)
    s = mia.mink_score(t, 0.2)
    assert s[0] == pytest.approx(-9.5)
    assert s[1] == 0.0  # scored 0, as open-unlearning scores an empty item
    assert mia.loss_score(t)[0] == pytest.approx(-5.5) and mia.loss_score(t)[1] == 0.0
    assert np.isnan(mia.mean_nll(t)[1])  # no mean NLL: forget quality leaves it out


def test_minkpp_needs_distribution_stats():
    t = _tokens(np.random.default_rng(1), 5, with_pp=False)
    with pytest.raises(ValueError, match="token_stats"):
        mia.minkpp_score(t)


def test_item_ids_validated():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mia.ItemTokens(nll=np.ones(4), item=np.array([0, 1, 2, 3]), n_items=3)


def test_auc_perfect_separation_and_chance():
    rng = np.random.default_rng(3)
    members = rng.uniform(1, 2, size=23)
    non = rng.uniform(-2, -1, size=17)
    assert mia.roc_auc(members, non) == 1.0
    assert mia.roc_auc(non, members) == 0.0
    same = rng.normal(size=40)
    assert mia.roc_auc(same, same) == pytest.approx(0.5)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(4)
    m = np.round(rng.normal(0.3, 1, size=31), 1)  # rounding makes ties
    n = np.round(rng.normal(0, 1, size=29), 1)
    pairs = (m[:, None] > n[None, :]).mean() + 0.5 * (m[:, None] == n[None, :]).mean()
    assert mia.roc_auc(m, n) == pytest.approx(pairs)


def test_auc_refuses_tiny_sets():
    with pytest.raises(mia.TooFewItems, match="too small"):
        mia.roc_auc(np.ones(3), np.zeros(10))
    assert mia.check_auc_sizes(10, 10) is None
    fpr, tpr = mia.roc_curve(np.array([1.0, 2.0]), np.array([0.0]))
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_reference_and_compression_scores():
    rng = np.random.default_rng(5)
    t, r = _tokens(rng, 11), _tokens(rng, 11)
    np.testing.assert_allclose(mia.reference_score(t, r), mia.mean_nll(r) - mia.mean_nll(t))
    with pytest.raises(ValueError, match="same sets"):
        mia.reference_score(t, _tokens(rng, 12))
    flat = np.zeros((4, 500), np.int16)
    noisy = rng.integers(0, 2048, size=(4, 500)).astype(np.int16)
    s_flat, s_noisy = mia.compressed_size(flat), mia.compressed_size(noisy)
    assert s_flat < s_noisy <= 4 * 500 * 2 + 64
    sizes = rng.integers(50, 500, size=11)
    np.testing.assert_allclose(mia.compression_score(t, sizes), -mia.mean_nll(t) / sizes)


def test_privleak_muse_convention():
    assert mia.privleak(0.5) == 0.0
    assert mia.privleak(1.0) == pytest.approx(-100.0)  # fully memorised forget set
    assert mia.privleak(0.0) == pytest.approx(100.0)
    # with a retrained model (usual AUC 0.6 -> MUSE AUC 0.4): (0.2 - 0.4) / 0.4
    assert mia.privleak(0.8, 0.6) == pytest.approx(-50.0)
    assert mia.privleak(0.6, 0.6) == pytest.approx(0.0)


def test_forget_quality_ks():
    rng = np.random.default_rng(6)
    a = rng.normal(size=200)
    assert mia.forget_quality(a, a) == pytest.approx(1.0)
    assert mia.forget_quality(a, a + 5.0) < 1e-20
    from scipy.stats import ks_2samp
    b = rng.normal(0.2, 1, size=150)
    assert mia.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    with pytest.raises(mia.TooFewItems):
        mia.forget_quality(a[:1], b)
    # NaN (an item without a token) is left out
    assert mia.forget_quality(np.append(a, np.nan), b) == pytest.approx(ks_2samp(a, b).pvalue)


def _rand_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_closed_forms():
    rng = np.random.default_rng(7)
    d = 13
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    va, vb = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expect = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert fadm.frechet_distance(mu_a, np.diag(va), mu_b, np.diag(vb)) == pytest.approx(expect)
    # commuting (same eigenbasis) full covariances: same formula on the eigenvalues
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = fadm.frechet_distance(mu_a, q @ np.diag(va) @ q.T, mu_b, q @ np.diag(vb) @ q.T)
    assert got == pytest.approx(expect, rel=1e-9)
    # general case against scipy's matrix square root
    from scipy.linalg import sqrtm
    sa, sb = _rand_spd(rng, d), _rand_spd(rng, d)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert fadm.frechet_distance(mu_a, sa, mu_b, sb) == pytest.approx(ref, rel=1e-7)


def test_fad_identical_sets_zero_and_shift():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(57, 19))
    assert fadm.fad(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = rng.normal(size=19)
    assert fadm.fad(x, x + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    with pytest.raises(mia.TooFewItems):
        fadm.fad(x[:1], x)
    with pytest.raises(ValueError, match="same D"):
        fadm.fad(x, x[:, :5])


def test_similarity_helpers_known_answers():
    from noencore.evaluation.generation import cosine_rows, nearest_similarity

    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 0.0, -1.0], atol=1e-12)
    pool = np.array([[0.0, 1.0], [1.0, 1.0], [5.0, 0.0]])
    sim, idx = nearest_similarity(a, pool)
    np.testing.assert_allclose(sim, [1.0, 1.0, 1.0], atol=1e-12)
    assert idx.tolist() == [2, 0, 1]


def test_forget_quality_exact_small_case_and_privleak_from_constructed_nlls():
    # five forget items all below five retrained ones: D = 1, and the exact two-sided
    # p-value is 2 / C(10, 5) (two of the 252 orderings are this extreme)
    assert mia.forget_quality(np.arange(5.0), np.arange(5.0) + 10) == pytest.approx(2 / 252)
    # the same NLLs under both models: indistinguishable
    assert mia.forget_quality(np.arange(7.0), np.arange(7.0)[::-1]) == pytest.approx(1.0)
    # privleak from NLL sets: a LOSS attack scores members by low NLL
    holdout = np.array([7.0, 7.5, 8.0, 8.5])
    memorised = np.array([1.0, 1.5, 2.0, 2.5])          # every forget item below: AUC 1
    retrained = np.array([6.9, 7.6, 7.9, 8.6])          # interleaved: AUC 0.5
    over = np.array([15.0, 15.5, 16.0, 16.5])           # pushed past the holdout: AUC 0
    auc = {k: mia.roc_auc(-v, -holdout, min_items=1)
           for k, v in (("mem", memorised), ("retr", retrained), ("over", over))}
    assert auc == {"mem": 1.0, "retr": 0.5, "over": 0.0}
    assert mia.privleak(auc["mem"], auc["retr"]) == pytest.approx(-100.0)   # leaks fully
    assert mia.privleak(auc["retr"], auc["retr"]) == pytest.approx(0.0)     # as retrained
    assert mia.privleak(auc["over"], auc["retr"]) == pytest.approx(100.0)   # over-unlearned


def test_verbatim_replay_known_answers():
    import torch

    from noencore.evaluation.generation import ngram_overlap, token_match

    rng = np.random.default_rng(3)
    truth = torch.from_numpy(rng.integers(0, 50, size=(3, 4, 13)))
    # a model that copies the track reproduces every token; one that never does, none
    assert token_match(truth.clone(), truth).tolist() == [1.0] * 3
    assert token_match((truth + 1) % 50, truth).tolist() == [0.0] * 3
    half = truth.clone()
    half[:, :2] = (half[:, :2] + 1) % 50       # two of four codebooks wrong: 0.5
    np.testing.assert_allclose(token_match(half, truth), 0.5)
    with pytest.raises(ValueError, match="one shape"):
        token_match(truth[..., :5], truth)

    track = np.arange(100, 130)                  # 30 distinct codes: 27 distinct 4-grams
    assert ngram_overlap([track], [track], n=4).tolist() == [1.0]
    assert ngram_overlap([np.arange(30)], [track], n=4).tolist() == [0.0]    # disjoint
    # the first 10 codes copied, then 10 new ones: of the 17 4-grams, the 7 inside the copy
    copied = np.concatenate([track[:10], np.arange(10)])
    assert ngram_overlap([copied], [track], n=4)[0] == pytest.approx(7 / 17)
    # copied from anywhere in the track, in any order of segments: still found
    shuffled = np.concatenate([track[20:], track[:10]])
    assert ngram_overlap([shuffled], [track], n=4)[0] == pytest.approx(14 / 17)
    # too short to hold one n-gram: NaN, not 0
    assert np.isnan(ngram_overlap([track[:3]], [track], n=4)[0])
    with pytest.raises(ValueError, match="n >= 1"):
        ngram_overlap([track], [track], n=0)
