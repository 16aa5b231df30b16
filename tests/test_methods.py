"""Methods: the engine's objective (adapter + method weights + fused op) against a plain
torch version of each method's formula on audiocraft's full logits."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from noencore.methods import get_method
from noencore.ops import RANDOM_LABEL, random_label

CAPTIONS = ["forget me", "forget me too", "keep this one", "and this", "also keep"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore.models import build_condition_cache, load_musicgen

    model = load_musicgen("tiny", with_codec=False,
                          overrides={"transformer_lm": {"num_layers": 1}})
    cache = build_condition_cache(tmp_path_factory.mktemp("cond"), CAPTIONS, model.text_encoder,
                                  progress=False)
    return model, cache


def _reference(model, codes, mask, forget, emb, emask, method, ref_nll, label_seed):
    """Plain torch: full logits from compute_predictions, per-token CE, the method's loss."""
    out = model.lm.compute_predictions(codes, [], model.condition_tensors(emb, emask))
    # a padded row is scored as audiocraft scores it alone: the delay pattern of its own
    # length (the delayed codebooks' last codes would otherwise be predicted from padding)
    own = torch.zeros_like(mask)
    for b in range(codes.shape[0]):
        length = int(mask[b, 0].sum())
        own[b, :, :length] = model.lm.compute_predictions(
            codes[b:b + 1, :, :length], [],
            model.condition_tensors(emb[b:b + 1], emask[b:b + 1])).mask[0]
    valid = out.mask & mask & own                             # [B, K, T]
    K = codes.shape[1]
    targets = codes.clone()
    if method.name == "rl":  # forget tokens -> the documented hash of (codebook, row, frame)
        T = codes.shape[-1]
        for k in range(K):
            item, time = valid[:, k].nonzero(as_tuple=True)
            seed_k = (label_seed * 64 + k) & 0x7FFFFFFF
            lab = random_label(seed_k, item * T + time, model.card)
            sel = forget[item]
            targets[item[sel], k, time[sel]] = lab[sel]
    ce = F.cross_entropy(out.logits.reshape(-1, model.card).float(),
                         torch.where(valid, targets, 0).reshape(-1),
                         reduction="none").reshape(codes.shape)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    fmask = valid & forget[:, None, None]
    rmask = valid & ~forget[:, None, None]
    nf, nr = fmask.sum().clamp_min(1), rmask.sum().clamp_min(1)
    f_mean, r_mean = (ce * fmask).sum() / nf, (ce * rmask).sum() / nr
    fw, rw = method.forget_weight, method.remain_weight
    seq = (ce * valid).sum(dim=(1, 2))
    if method.remain_anchor:  # hinge: descend only rows above the reference's summed NLL
        r_mean = (F.relu(seq - ref_nll) * ~forget).sum() / nr
    if method.name in ("ga", "graddiff"):
        return -fw * f_mean + rw * r_mean
    if method.name == "bounded_ga":
        capped = torch.where(ce > method.loss_cap, ce.detach(), ce)
        return -fw * (capped * fmask).sum() / nf + rw * r_mean
    if method.name == "rl":
        return fw * f_mean + rw * r_mean
    n_rows = forget.sum()
    if method.name == "npo":
        npo = (2 / method.beta) * F.softplus(method.beta * (ref_nll - seq))
        return fw * (npo * forget).sum() / n_rows + rw * r_mean
    length = valid.sum(dim=(1, 2)).clamp_min(1)
    if method.name == "match":  # Huber of (row mean NLL - target), width delta, / delta
        gap = seq / length - method.target
        huber = F.huber_loss(gap, torch.zeros_like(gap), reduction="none", delta=method.width)
        value = fw * (huber / method.width * forget).sum() / n_rows + rw * r_mean
        if method.codebook_profile:  # each codebook to the row target + the held profile
            held = method.held_means[None, :, None]                      # [1, K, 1]
            n_k = valid.sum(dim=2, keepdim=True).float()                 # [B, K, 1]
            share = n_k / length[:, None, None]
            tau_k = method.target + held - (share * held).sum(dim=1, keepdim=True)
            s_k = (ce * valid).sum(dim=2, keepdim=True) / n_k.clamp_min(1)
            gap_k = torch.where(n_k > 0, s_k - tau_k, 0.0)
            h = F.huber_loss(gap_k, torch.zeros_like(gap_k), reduction="none",
                             delta=method.width)
            per_row = (share * h).sum(dim=(1, 2)) / method.width
            return fw * (per_row * forget).sum() / n_rows + rw * r_mean
        if method.coarse_weight == 1.0:
            return value
        # coarse_weight c: the row's pull (the Huber's slope) spread over its tokens c : 1
        # (codebook 0 : the others); the value stays the Huber's
        c = torch.ones(1, K, 1)
        c[0, 0] = method.coarse_weight
        share = c * valid
        slope = (gap / method.width).clamp(-1, 1).detach()
        spread = (ce * share).sum(dim=(1, 2)) / share.sum(dim=(1, 2))
        step = fw * (slope * spread * forget).sum() / n_rows + rw * r_mean
        return value.detach() + step - step.detach()
    sim = (2 / method.beta) * F.softplus(method.gamma - method.beta * seq / length)
    return fw * (sim * forget).sum() / n_rows + rw * r_mean


CASES = [("ga", {}), ("graddiff", {"remain_weight": 0.7}),
         ("bounded_ga", {"loss_cap": 8.0, "remain_weight": 0.5}), ("rl", {"remain_weight": 0.3}),
         ("npo", {"beta": 0.5}), ("simnpo", {"beta": 2.5, "gamma": 1.0}),
         ("graddiff", {"remain_weight": 0.7, "remain_anchor": True}),
         ("rl", {"remain_weight": 0.3, "remain_anchor": True}),
         ("npo", {"beta": 0.5, "remain_anchor": True}),
         ("simnpo", {"beta": 2.5, "remain_anchor": True}),
         # the random model's rows sit near log(card) nats: a target 7 nats away from it
         # with a narrow width is the linear (GA-strength) branch, a wide one the quadratic
         ("match", {"target": 0.5, "width": 0.3, "remain_weight": 0.7, "remain_anchor": False}),
         ("match", {"target": 7.0, "width": 50.0, "remain_weight": 0.7, "remain_anchor": False}),
         ("match", {"target": 7.0, "width": 50.0, "remain_anchor": True}),
         # rows on both sides of a target within the quadratic zone, codebook 0 weighted 3:1
         ("match", {"target": 7.6, "width": 1.0, "remain_anchor": True, "coarse_weight": 3.0}),
         # each codebook to the target plus a held profile (set below), on both sides
         ("match", {"target": 7.6, "width": 0.5, "remain_anchor": True,
                    "codebook_profile": True})]


@pytest.mark.parametrize("name,opts", CASES,
                         ids=[c[0] + ("-anchored" if c[1].get("remain_anchor") else "")
                              + (f"-w{c[1]['width']:g}" if "width" in c[1] else "")
                              + (f"-coarse{c[1]['coarse_weight']:g}"
                                 if "coarse_weight" in c[1] else "")
                              + ("-profile" if c[1].get("codebook_profile") else "")
                              for c in CASES])
@pytest.mark.parametrize("layout", ["dense", "counted"])
def test_objective_gradient_matches_plain_formula(env, name, opts, layout):
    """``dense``: every position a head row, the ones that do not count marked; ``counted``:
    the training step's layout (frames after the last counted one cut, the heads given only
    the counted positions), on a batch whose every row is padded."""
    from noencore.engine.objective import (
        UnlearnObjective,
        counted_layout,
        sequence_nll,
        token_counts,
    )
    from noencore.models.adapter import token_mask

    model, cache = env
    method = get_method(name, **opts)
    B, K, T = 5, model.n_q, 11
    if opts.get("codebook_profile"):  # held tracks' codebook NLLs around the rows' levels
        method.set_held_codebooks(torch.tensor([7.0, 7.9, 7.5, 8.2])[:K])
    codes = torch.randint(0, model.card, (B, K, T))
    mask = torch.ones(B, K, T, dtype=torch.bool)
    mask[1, :, 8:] = False
    mask[4, :, 5:] = False
    if layout == "counted":
        mask[:, :, 9:] = False
    forget = torch.tensor([True, True, False, False, False])
    emb, emask = cache.batch(CAPTIONS)
    ref_nll = None
    if method.needs_reference or method.needs_remain_reference:
        # a reference a little away from the current model, on both sides of it
        ref_nll = sequence_nll(model, codes, mask, emb, emask) + torch.randn(B) * 3
    counts = token_counts(model.lm, mask, forget)
    obj = UnlearnObjective(model, method, backend="torch")
    params = [p for p in model.lm.parameters() if p.requires_grad]

    model.lm.zero_grad(set_to_none=True)
    keep = token_mask(model.lm, mask)
    if layout == "dense":
        loss, stats = obj(codes, keep, forget, emb, emask, ref_nll, counts, 12345,
                          torch.arange(B))
    else:
        cut, keep_cut, positions, window = counted_layout(model.lm, codes, keep)
        assert cut.shape[-1] == 9 and window == T
        assert positions[1] == tuple(int(n) for n in keep.sum(dim=(0, 2)))
        loss, stats = obj(cut, keep_cut, forget, emb, emask, ref_nll, counts, 12345,
                          torch.arange(B), None, positions, window)
    loss.backward()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    model.lm.zero_grad(set_to_none=True)
    ref = _reference(model, codes, mask, forget, emb, emask, method, ref_nll, 12345)
    ref.backward()
    want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.lm.zero_grad(set_to_none=True)
    assert any(w.abs().sum() > 0 for w in want)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):  # fp32 sums over ~10^2 tokens: tolerance scaled to the gradient
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4 * scale)
    if name in ("ga", "graddiff", "bounded_ga", "rl") and not method.remain_anchor:
        # linear: the op's value is the loss
        torch.testing.assert_close(loss.detach(), ref.detach().float(), rtol=1e-5, atol=1e-5)
    elif name != "rl":  # the method's own loss value (RL's comes from the op's random targets)
        r = float(ref.detach())
        assert abs(float(stats[4]) - r) < 1e-3 * max(1.0, abs(r))
    # the measured NLLs are the true-target token means of each set
    assert stats[1] == counts[0] and stats[3] == counts[1]


def test_rl_marks_only_forget_rows():
    from noencore.methods import Rows

    rows = Rows(targets=torch.arange(6), item=torch.tensor([0, 0, 1, 1, 2, 2]),
                nll=torch.rand(6), forget=torch.tensor([True, False, True]), ref_nll=None,
                forget_tokens=4, remain_tokens=2)
    plan = get_method("rl").plan(rows)
    assert plan.targets.tolist() == [RANDOM_LABEL, RANDOM_LABEL, 2, 3, RANDOM_LABEL, RANDOM_LABEL]
    assert (plan.row_weight[[0, 1, 4, 5]] > 0).all() and (plan.row_weight[[2, 3]] == 0).all()
    assert get_method("rl", labels="remain_clip").plan(rows).targets.tolist() == list(range(6))



def test_get_method_errors():
    with pytest.raises(ValueError, match="unknown method 'xx'"):
        get_method("xx")
    with pytest.raises(ValueError, match="bad options"):
        get_method("ga", beta=1.0)
    with pytest.raises(ValueError, match="loss_cap"):
        get_method("bounded_ga", loss_cap=-1)
    with pytest.raises(ValueError, match="labels"):
        get_method("rl", labels="nope")


def test_remain_anchor_descends_only_rows_above_the_reference():
    from noencore.methods import Rows

    # rows: 0 forget, 1 remain above its reference, 2 remain below it
    rows = Rows(targets=torch.arange(6), item=torch.tensor([0, 0, 1, 1, 2, 2]),
                nll=torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5]),
                forget=torch.tensor([True, False, False]),
                ref_nll=torch.tensor([0.0, 5.0, 2.0]), forget_tokens=2, remain_tokens=4)
    m = get_method("graddiff", remain_weight=2.0, remain_anchor=True)
    assert m.needs_remain_reference and not m.needs_reference
    plan = m.plan(rows)
    assert plan.row_weight.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.0, 0.0]
    # loss: -mean forget CE + 2 * (relu(7 - 5) + relu(1 - 2)) / 4
    assert plan.loss == pytest.approx(-1.5 + 1.0)
    plain = get_method("graddiff", remain_weight=2.0).plan(rows)
    assert plain.row_weight[4:].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="ref_nll"):
        m.plan(Rows(**{**rows.__dict__, "ref_nll": None}))
    with pytest.raises(ValueError, match="remain_anchor needs a remain term"):
        get_method("graddiff", remain_weight=0.0, remain_anchor=True)
    with pytest.raises(ValueError, match="remain_anchor needs a remain term"):
        get_method("npo", remain_weight=0.0, remain_anchor=True)


def test_held_rows_are_pulled_back_from_both_sides(env):
    """Held remain rows (an earlier request's forget items): the fused objective's gradient
    is the plain formula's, a Huber term of (row NLL - reference) whose quadratic zone is
    ``hold_tolerance`` nats per token wide; the other remain rows keep the hinge."""
    from noencore.engine.objective import UnlearnObjective, sequence_nll, token_counts
    from noencore.models.adapter import token_mask

    model, cache = env
    method = get_method("bounded_ga", loss_cap=None, row_target=50.0, remain_weight=0.7,
                        remain_anchor=True)
    B, K, T = 5, model.n_q, 11
    codes = torch.randint(0, model.card, (B, K, T))
    mask = torch.ones(B, K, T, dtype=torch.bool)
    mask[3, :, 6:] = False
    forget = torch.tensor([True, False, False, False, False])
    held = torch.tensor([False, True, True, True, False])
    emb, emask = cache.batch(CAPTIONS)
    seq0 = sequence_nll(model, codes, mask, emb, emask)
    valid_tokens = token_mask(model.lm, mask).sum(dim=(1, 2)).float()
    zone = valid_tokens * method.hold_tolerance
    # held row 1 far below its reference, 2 inside the quadratic zone, 3 far above; the
    # plain remain row 4 below its reference (the hinge: no gradient)
    ref_nll = seq0 + torch.stack([torch.tensor(0.0), 3 * zone[1], 0.4 * zone[2], -3 * zone[3],
                                  torch.tensor(2.0)])
    counts = token_counts(model.lm, mask, forget)
    obj = UnlearnObjective(model, method, backend="torch")
    params = [p for p in model.lm.parameters() if p.requires_grad]
    model.lm.zero_grad(set_to_none=True)
    loss, stats = obj(codes, token_mask(model.lm, mask), forget, emb, emask, ref_nll, counts,
                      7, torch.arange(B), held)
    loss.backward()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    model.lm.zero_grad(set_to_none=True)
    plain = get_method("ga")  # the forget term of bounded_ga without a cap is GA's
    ga = _reference(model, codes, mask, forget, emb, emask, plain, None, 7)
    seq = torch.stack([_reference(model, codes[b:b + 1], mask[b:b + 1], torch.tensor([False]),
                                  emb[b:b + 1], emask[b:b + 1], get_method(
                                      "graddiff", forget_weight=0.0, remain_weight=1.0),
                                  None, 7) for b in range(B)]) * valid_tokens
    excess = seq - ref_nll
    huber = torch.where(excess.abs() <= zone, 0.5 * excess ** 2 / zone,
                        excess.abs() - 0.5 * zone)
    remain_term = torch.where(held, huber, F.relu(excess)) * ~forget
    ref = ga + 0.7 * remain_term.sum() / counts[1]
    ref.backward()
    want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.lm.zero_grad(set_to_none=True)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4 * scale)
    r = float(ref.detach())
    assert abs(float(stats[4]) - r) < 1e-3 * max(1.0, abs(r))
    # the same rows unheld: the hinge alone, so row 1 (below its reference) has no pull
    rows_w = method.remain_weights
    from noencore.methods import Rows

    item = torch.arange(B).repeat_interleave(2)
    nll = (seq0 / 2).repeat_interleave(2)
    rows = Rows(targets=torch.zeros(2 * B, dtype=torch.long), item=item, nll=nll, forget=forget,
                ref_nll=ref_nll, forget_tokens=2, remain_tokens=8, held=held)
    w_held, _ = rows_w(rows)
    w_free, _ = rows_w(Rows(**{**rows.__dict__, "held": None}))
    assert (w_held[2:4] < 0).all() and (w_free[2:4] == 0).all()   # relearned: pushed back up
    assert (w_held[6:8] > 0).all() and (w_free[6:8] > 0).all()    # pushed too far: pulled down


def test_bounded_ga_row_target_switches_off_rows_that_reached_it():
    from noencore.methods import Rows

    # forget rows 0 (mean NLL 1.5) and 1 (mean 6.0), remain row 2
    rows = Rows(targets=torch.arange(6), item=torch.tensor([0, 0, 1, 1, 2, 2]),
                nll=torch.tensor([1.0, 2.0, 5.0, 7.0, 0.5, 0.5]),
                forget=torch.tensor([True, True, False]), ref_nll=None,
                forget_tokens=4, remain_tokens=2)
    m = get_method("bounded_ga", loss_cap=None, row_target=4.0, remain_weight=1.0)
    plan = m.plan(rows)
    assert plan.row_weight.tolist() == [-0.25, -0.25, 0.0, 0.0, 0.5, 0.5]
    # loss: -(1 + 2) / 4 (row 1 switched off) + mean remain CE 0.5
    assert plan.loss == pytest.approx(-0.75 + 0.5)
    m.row_target = 10.0  # a moved target switches the row back on
    assert m.plan(rows).row_weight.tolist()[:4] == [-0.25] * 4
    assert m.loss_cap is None and m.describe()["row_target"] == 10.0
    with pytest.raises(ValueError, match="needs a bound"):
        get_method("bounded_ga", loss_cap=None)
    with pytest.raises(ValueError, match="row_target must be positive"):
        get_method("bounded_ga", row_target=0.0)


def _rows(means: list[float], ref_means: list[float], tokens: int = 2):
    """Rows of forget rows with the given current and reference mean token NLLs."""
    from noencore.methods import Rows

    n = len(means)
    return Rows(targets=torch.zeros(n * tokens, dtype=torch.long),
                item=torch.arange(n).repeat_interleave(tokens),
                nll=torch.tensor(means).repeat_interleave(tokens),
                forget=torch.ones(n, dtype=torch.bool),
                ref_nll=torch.tensor(ref_means) * tokens,
                forget_tokens=n * tokens, remain_tokens=0, forget_rows=n)


def test_match_targets_by_quantile_map():
    m = get_method("match")
    assert m.needs_reference and m.needs_nonmember_targets
    # forget rows at 1..4 nats under the original model; non-members spread over 0..100:
    # the k-th of 4 rows goes to the (k + 1/2) / 4 quantile, 12.5, 37.5, 62.5, 87.5
    m.fit_targets(torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.linspace(0, 100, 101))
    rows = _rows([0.0] * 6, [1.0, 2.0, 2.5, 4.0, 0.5, 9.0])
    want = [12.5, 37.5, 50.0, 87.5, 12.5, 87.5]  # between rows: linear; outside: the ends
    torch.testing.assert_close(m.row_targets(rows), torch.tensor(want))
    # the map keeps the order of the rows: one with a higher original NLL gets a higher target
    m.fit_targets(torch.rand(37) * 3, torch.randn(11) + 7)
    t = m.row_targets(_rows([0.0] * 37, (torch.rand(37) * 3).tolist()))
    ref = _rows([0.0] * 37, (torch.rand(37) * 3).tolist())
    order = ref.ref_nll.argsort()
    assert (m.row_targets(ref)[order].diff() >= -1e-6).all() and t.min() >= 7 - 4
    with pytest.raises(ValueError, match="needs forget rows and non-member"):
        m.fit_targets(torch.zeros(0), torch.ones(3))
    unfitted = get_method("match")
    with pytest.raises(ValueError, match="fit_targets"):
        unfitted.row_targets(rows)


def test_match_with_one_forget_window_sends_it_to_the_median():
    """A request for one track of one window: the map has one point, and every row of
    that window (a batch repeats it) gets the non-members' median."""
    m = get_method("match")
    nonmembers = torch.randn(9, dtype=torch.float64) + 7
    m.fit_targets(torch.tensor([1.5]), nonmembers)
    got = m.row_targets(_rows([2.0] * 5, [1.5] * 5))
    torch.testing.assert_close(got, torch.full((5,), float(nonmembers.median()),
                                                dtype=torch.float32))
    w, loss = m.weights(_rows([2.0] * 5, [1.5] * 5))
    assert torch.isfinite(w).all() and (w < 0).all() and torch.isfinite(loss)  # ascent


def test_match_coarse_weight_spreads_each_row_pull_over_its_codebooks():
    """coarse_weight c: within a forget row, a codebook-0 token weighs c times a token of
    the other codebooks; each row's weights sum to the same pull as with equal shares."""
    from noencore.methods import Rows

    # 3 forget rows, 2 codebooks laid out codebook by codebook, rows of unequal length,
    # one invalid token
    item = torch.tensor([0, 0, 1, 2, 2, 0, 1, 1, 1, 2])
    rows = Rows(targets=torch.zeros(10, dtype=torch.long), item=item,
                nll=torch.tensor([1.0, 3.0, 2.0, 9.0, 9.5, 2.0, 4.0, 1.0, 3.0, 9.0]),
                forget=torch.ones(3, dtype=torch.bool), ref_nll=None,
                forget_tokens=9, remain_tokens=0, forget_rows=3,
                valid=torch.tensor([True] * 8 + [False, True]), codebook_sizes=(5, 5))
    assert rows.codebook.tolist() == [0] * 5 + [1] * 5
    equal = get_method("match", target=5.0, width=1.0, remain_weight=0.0, remain_anchor=False)
    heavy = get_method("match", target=5.0, width=1.0, remain_weight=0.0,
                       remain_anchor=False, coarse_weight=3.0)
    (w1, loss1), (w3, loss3) = equal.weights(rows), heavy.weights(rows)
    assert float(loss1) == float(loss3)  # the loss is the rows' Huber either way
    valid = rows.valid
    for r in range(3):
        sel = (item == r) & valid
        torch.testing.assert_close(w3[sel].sum(), w1[sel].sum())  # the row's whole pull
        cb0, rest = w3[sel & (rows.codebook == 0)], w3[sel & (rows.codebook == 1)]
        if cb0.numel() and rest.numel():
            torch.testing.assert_close(cb0 / rest[0], torch.full_like(cb0, 3.0))
    # rows 0 and 1 below the target (ascent), row 2 above it (descent)
    assert (w3[(item < 2) & valid] < 0).all() and (w3[(item == 2) & valid] > 0).all()
    with pytest.raises(ValueError, match="coarse_weight must be positive"):
        get_method("match", coarse_weight=0.0)


def test_match_codebook_profile_sends_each_codebook_to_the_held_profile():
    """codebook_profile: codebook k of a forget row goes to tau + m_k - sum_j (n_j/n) m_j
    (m: the held tracks' codebook NLLs); the row's token mean target stays tau; weights
    clamp((s_k - tau_k) / width) / (rows x tokens of the row)."""
    from noencore.methods import Rows

    item = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])  # 2 rows, codebook 0 then codebook 1
    nll = torch.tensor([6.0, 6.4, 7.0, 5.0, 6.0, 9.0, 8.0, 8.6])
    rows = Rows(targets=torch.zeros(8, dtype=torch.long), item=item, nll=nll,
                forget=torch.ones(2, dtype=torch.bool), ref_nll=None, forget_tokens=8,
                remain_tokens=0, forget_rows=2, codebook_sizes=(5, 3))
    m = get_method("match", target=7.0, width=0.5, remain_weight=0.0, remain_anchor=False,
                   codebook_profile=True)
    assert m.needs_held_codebooks and not get_method("match").needs_held_codebooks
    with pytest.raises(ValueError, match="held tracks' codebook NLLs"):
        m.weights(rows)
    m.set_held_codebooks(torch.tensor([6.5, 8.0]))
    w, loss = m.weights(rows)
    want_w, want_loss = torch.zeros(8), 0.0
    for r, (n0, n1) in enumerate([(2, 1), (3, 2)]):  # tokens of each codebook per row
        n = n0 + n1
        mean_m = (n0 * 6.5 + n1 * 8.0) / n
        for k, (n_k, m_k) in enumerate([(n0, 6.5), (n1, 8.0)]):
            sel = (item == r) & (rows.codebook == k)
            gap = float(nll[sel].mean()) - (7.0 + m_k - mean_m)
            want_w[sel] = max(-1.0, min(1.0, gap / 0.5)) / (2 * n)
            u = abs(gap)
            want_loss += n_k / n * (0.5 * u * u if u <= 0.5 else 0.5 * u - 0.125) / 0.5 / 2
    torch.testing.assert_close(w, want_w)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    # a resumed run gets the last measurement back with the quantile map
    m.target_map = (torch.tensor([1.0, 2.0]), torch.tensor([7.0, 8.0]))
    again = get_method("match", codebook_profile=True)
    again.resume(m.saved_targets(), 10, torch.device("cpu"))
    torch.testing.assert_close(again.held_means, torch.tensor([6.5, 8.0]))
    with pytest.raises(ValueError, match="give no coarse_weight"):
        get_method("match", codebook_profile=True, coarse_weight=2.0)
    # the engine's first measurement sets the device (meta stands in for the rank's GPU);
    # a check's host measurement moves there, so that no step copies it from the host
    on_gpu = get_method("match", codebook_profile=True)
    on_gpu.set_held_codebooks(torch.zeros(2, device="meta"))
    on_gpu.set_held_codebooks(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert on_gpu.held_means.device.type == "meta" and on_gpu.held_means.dtype == torch.float32


def test_match_pulls_rows_to_the_target_from_both_sides():
    m = get_method("match", target=5.0, width=1.0, remain_weight=0.0,
                   remain_anchor=False)
    # rows far below (GA strength), just below, at, just above and far above the target
    rows = _rows([1.0, 4.5, 5.0, 5.5, 9.0], [0.0] * 5)
    w, loss = m.weights(rows)
    per_row = w.reshape(5, 2)[:, 0] * 5 * 2  # slope: weight x rows x tokens
    torch.testing.assert_close(per_row, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    # Huber / width: 3.5, 0.125, 0, 0.125, 3.5 -> mean 1.45
    assert float(loss) == pytest.approx(7.25 / 5)
    with pytest.raises(ValueError, match="width must be positive"):
        get_method("match", width=0.0)
    with pytest.raises(ValueError, match="target must be positive"):
        get_method("match", target=-1.0)


def test_match_refit_steps_fire_once_each():
    m = get_method("match", refit_at=[5, 2])
    assert m.refit_at == (2, 5)
    # checks every 3 steps: the first check at or after each refit step, once
    assert [s for s in (3, 6, 9, 12) if m.refit_due(s)] == [3, 6]
    m = get_method("match", refit_at=4)
    assert not m.refit_due(3) and m.refit_due(10) and not m.refit_due(11)
    with pytest.raises(ValueError, match="steps >= 1"):
        get_method("match", refit_at=[0])
    with pytest.raises(ValueError, match="no fixed target"):
        get_method("match", target=7.0, refit_at=[3])
