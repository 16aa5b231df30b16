"""Target matching: move each forget row to the NLL a model that never saw it would give
it, and hold it there.

With s(x) the mean token NLL of forget row x under the model, tau(x) its target and
h the Huber function of width delta (nats)::

    L_F = mean_x h(s(x) - tau(x)) / delta,   h(u) = u^2 / 2 if |u| <= delta else delta |u| - delta^2 / 2
    L   = forget_weight * L_F + remain_weight * (remain term; ``remain_anchor``: the hinge)

dL/dCE_token = clamp((s - tau) / delta, -1, 1) / (n_forget_rows * |x|): gradient ascent
of GA's strength while a row is more than delta below its target, fading to zero at it,
and descent on a row pushed past it. GA and bounded GA only ever push up, so the whole
artist keeps rising (the forget rows and, by spill-over, the artist's unseen tracks);
here the forget set is pulled back to the target from both sides.

The targets are measured before unlearning, under the original model (they do not
follow the model at every check, which is what let bounded GA's moving target run away:
unlearning the forget rows raises the artist's unseen tracks too, and a target that
follows them is raised by the very ascent that chases it; ``follow`` does that, for
comparison). With fixed targets the unseen tracks' rise settles (the forget rows stop
moving once on target); ``refit_at`` (steps) re-fits the targets to the non-members'
NLLs under the weights of that step, once each: a re-fit after the first pass aims the
forget rows at the level the artist's unseen tracks settled at once its sound was
unlearned, which is closer to where a model that never saw the artist has them than
the original model's level is. The stop rule does not stop the run before its re-fits.

- ``target`` (nats per token): one target for every row;
- else the engine hands the method the original model's NLLs of the forget rows and of
  non-member tracks like them (the stop rule's, e.g. the artist's unreleased tracks) and
  the method maps one onto the other by quantiles (:meth:`fit_targets`): the forget row
  with the k-th lowest NLL under the original model is sent to the k-th quantile of the
  non-members' NLLs. The forget set then ends with the non-members' whole distribution
  (its mean and its spread), which is what a membership-inference attack and TOFU's KS
  test compare, rather than every row piled on one number.

``coarse_weight`` (c, default 1): how a row's pull is spread over its tokens. With c != 1
a token of codebook 0 (the coarse level of the residual quantiser) gets c times the weight
of a token of the codebooks that refine it, the row's weights summing to the same total
(``forget_weight x slope / n_forget_rows``): the row's mean still goes to its target, with
more of the change on codebook 0. The loss value stays the Huber of the row mean; the
step is that gradient re-weighted across the row's tokens. Measured because the row mean
left codebook 0 of the forget tracks more familiar than the artist's unseen tracks' (the
``loss_coarse`` attack, docs/metrics.md).

``codebook_profile`` (default off): each forget row is matched codebook by codebook. The
row's target tau(x) is spread over its codebooks as the held tracks (``anchor_unseen``:
the artist's unreleased tracks, held at the targets' level) spread theirs under the
current weights: with m_k their mean token NLL on codebook k, codebook k of row x gets
``tau_k(x) = tau(x) + m_k - sum_j (n_j/n) m_j`` (n_j: the row's tokens of codebook j, n
all of them; the row's token mean stays at tau(x)), and::

    L_F = mean_x sum_k (n_k/n) h(s_k(x) - tau_k(x)) / delta

(s_k(x): the row's mean token NLL on codebook k), whose gradient per token is
``clamp((s_k - tau_k) / delta, -1, 1) / (n_forget_rows |x|)``. The engine
measures the held tracks' codebook NLLs under the starting weights and at every check of
the stop rule. Why: unlearning an artist lifts its unheard tracks' codebook 0 (the
coarse level, where its sound lives) by about a nat and the finer codebooks little, and a
row mean sent to its target leaves the forget tracks' codebook 0 more familiar than
theirs (the ``loss_coarse`` attack).

The defaults are the engine's default method, measured against a retrained model
(``benchmarks/RESULTS.md``, "Artists nothing trained on"): a narrow Huber zone (0.1 nats
per token: a row is pulled onto its target, not left anywhere within a nat of it), the
remain set anchored at the starting model's NLL (``remain_anchor``) with five times the
forget term's weight (the remain set within 2 % of where it was). Nothing in them
depends on the model or the request: the targets are measured on the request's
non-member tracks under the starting model. The run takes its ``steps``: the engine's
stop rule for this method ("original" at AUC 0) only stops a run that sent the whole
forget set past where those tracks were. Give it steps to sit at the targets: on the demo
600 steps left the forget set much nearer the retrained model than 150 (forget AUC
0.54-0.60 against 0.65-0.80, relearned AUC 0.58-0.73 against 0.88-0.97: weight decay
erodes what no loss term holds once the rows are on target). Stopping once the forget
set's mean reached theirs (AUC 0.5) stops too early: the rows have reached the targets'
mean, not each its own quantile, and the forget set is still a narrow clump a membership
attack tells apart.
"""
from __future__ import annotations

import torch

from noencore.methods.base import Check, Method, Rows


class TargetMatching(Method):
    name = "match"
    needs_nll = True

    def __init__(self, target: float | None = None, width: float = 0.1,
                 forget_weight: float = 1.0, remain_weight: float = 5.0,
                 remain_anchor: bool = True, follow: bool = False,
                 refit_at: int | tuple[int, ...] | list[int] = (), coarse_weight: float = 1.0,
                 codebook_profile: bool = False):
        super().__init__(forget_weight=forget_weight, remain_weight=remain_weight,
                         remain_anchor=remain_anchor)
        if target is not None and target <= 0:
            raise ValueError(f"target must be positive (nats per token), got {target}")
        if width <= 0:
            raise ValueError(f"width must be positive (nats), got {width}")
        if not coarse_weight > 0:
            raise ValueError(f"coarse_weight must be positive, got {coarse_weight}")
        self.coarse_weight = float(coarse_weight)
        self.codebook_profile = bool(codebook_profile)
        if self.codebook_profile and self.coarse_weight != 1.0:
            raise ValueError("codebook_profile sets each codebook's target: give no "
                             "coarse_weight with it")
        self.held_means: torch.Tensor | None = None  # float32 [K] (codebook_profile)
        self.target = None if target is None else float(target)
        self.width = float(width)
        self.follow = bool(follow)
        self.refit_at = tuple(sorted({int(s) for s in (
            (refit_at,) if isinstance(refit_at, int) else refit_at)}))
        if any(s < 1 for s in self.refit_at):
            raise ValueError(f"refit_at must be steps >= 1, got {refit_at}")
        if self.refit_at and self.target is not None:
            raise ValueError("refit_at re-fits the quantile map: give no fixed target")
        self.refitted: set[int] = set()  # refit steps done (the loop marks those of a resume)
        # (float32 [n] sorted original-model row means, float32 [n] their targets)
        self.target_map: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def needs_reference(self) -> bool:
        """The quantile map reads each forget row's NLL under the original model."""
        return self.target is None

    @property
    def needs_held_codebooks(self) -> bool:  # type: ignore[override]
        return self.codebook_profile

    def set_held_codebooks(self, means: torch.Tensor) -> None:
        """Keep the measurement on the device of the first one (the engine's: a check
        moves it there, so that no training step copies it from the host)."""
        dev = means.device if self.held_means is None else self.held_means.device
        self.held_means = means.detach().float().reshape(-1).to(dev)

    @property
    def needs_nonmember_targets(self) -> bool:  # type: ignore[override]
        """Whether the engine must measure non-members once and call :meth:`fit_targets`."""
        return self.target is None

    def fit_targets(self, forget_ref: torch.Tensor, nonmember: torch.Tensor) -> None:
        """Quantile map from ``forget_ref`` (float [n]: the mean token NLL of every forget
        row under the original model) to ``nonmember`` (float [m]: the mean token NLL of
        each non-member track under the same model): row k of the sorted forget rows gets
        the (k + 1/2) / n quantile of the non-members."""
        if forget_ref.numel() == 0 or nonmember.numel() == 0:
            raise ValueError("fitting targets needs forget rows and non-member tracks")
        xs = forget_ref.float().sort().values
        levels = (torch.arange(xs.numel(), dtype=torch.float64) + 0.5) / xs.numel()
        ys = torch.quantile(nonmember.double().cpu(), levels).float().to(xs.device)
        self.target_map = (xs, ys)

    def on_check(self, check: Check) -> bool:
        """Re-fit the map onto the non-members under the current weights (every check with
        ``follow``, else once at each ``refit_at`` step); the run may stop only once every
        re-fit is done (they set where it is going)."""
        if self.follow or self.refit_due(check.step):
            xs = self.target_map[0]
            self.fit_targets(xs, check.nonmember_rows().to(xs.device))
        if self.codebook_profile:
            if check.held_codebooks is None:
                raise ValueError("codebook_profile needs the held tracks' codebook NLLs at "
                                 "every check (anchor_unseen)")
            self.set_held_codebooks(check.held_codebooks())
        return all(s in self.refitted for s in self.refit_at)

    def saved_targets(self) -> tuple[torch.Tensor, ...] | None:
        if self.target_map is None or self.held_means is None:
            return self.target_map
        return (*self.target_map, self.held_means)  # the last check's held codebook NLLs

    def resume(self, saved: tuple[torch.Tensor, ...] | None, step: int,
               device: torch.device) -> None:
        if saved is not None:
            self.target_map = tuple(t.to(device) for t in saved[:2])
            if len(saved) > 2:
                self.held_means = saved[2].to(device)
        self.refitted.update(s for s in self.refit_at if s <= step)  # in the saved targets

    def refit_due(self, step: int) -> bool:
        """Whether the targets are to be re-fitted at a check at ``step`` (the first check
        at or after each ``refit_at`` step, once each); marks it done."""
        due = [s for s in self.refit_at if s <= step and s not in self.refitted]
        self.refitted.update(due)
        return bool(due)

    def row_targets(self, rows: Rows) -> torch.Tensor:
        """float32 [B]: each row's target mean token NLL (forget rows; others unused)."""
        if self.target is not None:
            return torch.full_like(rows.forget, self.target, dtype=torch.float32)
        if self.target_map is None or rows.ref_nll is None:
            raise ValueError("match without a fixed target needs its targets fitted "
                             "(fit_targets) and the forget rows' reference NLL (ref_nll)")
        xs, ys = (t.to(rows.ref_nll.device) for t in self.target_map)
        ref = rows.ref_nll.float() / rows.seq_tokens().clamp_min(1.0)
        if xs.numel() == 1:  # one forget window: its target is the non-members' median
            return ys[0].expand_as(ref).clone()
        # piecewise-linear interpolation of the map, on the device (no host read)
        hi = torch.searchsorted(xs, ref).clamp(1, max(xs.numel() - 1, 1))
        lo = hi - 1
        span = (xs[hi] - xs[lo]).clamp_min(1e-12)
        a = ((ref - xs[lo]) / span).clamp(0.0, 1.0)
        return ys[lo] + a * (ys[hi] - ys[lo])

    def weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        n_f = rows.forget_rows.clamp_min(1.0)  # global: ranks see part of the batch
        tokens = rows.seq_tokens().clamp_min(1.0)
        w_r, remain = self.remain_weights(rows)
        if self.codebook_profile:
            w_f, huber = self._codebook_weights(rows, n_f, tokens)
        else:
            gap = rows.seq_nll() / tokens - self.row_targets(rows)              # [B]
            slope = (gap / self.width).clamp(-1.0, 1.0)
            w_f, huber = self._forget_token_weights(rows, slope, n_f, tokens), self._huber(gap)
        w = torch.where(rows.is_forget, w_f, w_r)
        forget = (huber / self.width * rows.forget).sum() / n_f
        return w.float(), self.forget_weight * forget + remain

    def _huber(self, gap: torch.Tensor) -> torch.Tensor:
        u = gap.abs()
        return torch.where(u <= self.width, 0.5 * u * u, self.width * u - 0.5 * self.width ** 2)

    def _codebook_weights(self, rows: Rows, n_f: torch.Tensor, tokens: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 [N] token weights, float32 [B] each row's sum_k (n_k/n) h(s_k - tau_k))
        of ``codebook_profile``."""
        if self.held_means is None:
            raise ValueError("codebook_profile needs the held tracks' codebook NLLs "
                             "(set_held_codebooks) before the first step")
        held = self.held_means
        K, B = held.numel(), rows.forget.shape[0]
        key = rows.item * K + rows.codebook                                    # [N]
        valid = rows.valid.float()
        n_k = torch.zeros(B * K, device=key.device).index_add_(0, key, valid).view(B, K)
        sums = torch.zeros(B * K, device=key.device).index_add_(
            0, key, torch.where(rows.valid, rows.nll.float(), 0.0)).view(B, K)
        share = n_k / tokens[:, None]                                          # n_k / n
        offset = held[None] - (share * held[None]).sum(1, keepdim=True)      # [B, K]
        gap = sums / n_k.clamp_min(1.0) - (self.row_targets(rows)[:, None] + offset)
        gap = torch.where(n_k > 0, gap, 0.0)                                   # [B, K]
        slope = (gap / self.width).clamp(-1.0, 1.0)
        w = self.forget_weight * slope.reshape(-1)[key] / (n_f * tokens[rows.item])
        return w, (share * self._huber(gap)).sum(1)

    def _forget_token_weights(self, rows: Rows, slope: torch.Tensor, n_f: torch.Tensor,
                              tokens: torch.Tensor) -> torch.Tensor:
        """float32 [N]: each token's share of its row's pull ``forget_weight x slope /
        n_f``: equal shares (1 / the row's ``tokens``), or with ``coarse_weight`` c, c
        shares for a codebook-0 token and 1 for the others (only forget tokens' values are
        used)."""
        if self.coarse_weight == 1.0:
            return (self.forget_weight * slope / (n_f * tokens))[rows.item]
        share = torch.where(rows.codebook == 0, self.coarse_weight, 1.0)
        share = torch.where(rows.valid, share, 0.0)
        total = torch.zeros_like(slope).index_add_(0, rows.item, share).clamp_min(1e-12)
        return (self.forget_weight * slope / (n_f * total))[rows.item] * share

    def describe(self) -> dict:
        return {**super().describe(), "target": self.target, "width": self.width,
                "follow": self.follow, "refit_at": list(self.refit_at),
                "coarse_weight": self.coarse_weight, "codebook_profile": self.codebook_profile}
