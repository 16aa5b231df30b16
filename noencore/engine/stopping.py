"""Early stopping on membership inference: unlearn until the forget set looks like music
the model never saw, and no further.

Pushing a forget set's NLL past that of comparable non-member tracks makes the forget
items stand out again (a loss attack's AUC goes from ~1 through 0.5 to ~0), and
unlearning an artist's tracks raises the NLL of that artist's unseen tracks too, so a
target fixed before unlearning is the wrong one. ``NonmemberStop`` measures both sets
under the current weights every ``every`` steps:

* rule "auc": stop once the LOSS attack's ROC AUC, forget (members) vs the non-members,
  is <= ``target_auc``. One optimizer step can move every forget item's NLL further than
  the items' spread, so the AUC can jump from ~1 to ~0 between two checks: the weights
  between the last two checks are then bisected (``bisect_crossing``) for the point
  where it crosses the target.
* rule "nll": stop once the forget set's mean token NLL reaches the non-members'.
* rule "original": the LOSS attack of rule "auc", but against the non-members' NLLs as
  the *starting* model scored them (measured once, before the first step): stop once
  the forget set is as unlikely under the current weights as comparable music the
  original model never saw. Unlearning an artist's tracks raises its unseen tracks too,
  and a rule that chases them under the current weights can run far past the point a
  model that never saw the artist would be at; this one cannot move. Bisected as "auc".

The non-members must not be the tracks a later membership-inference evaluation scores
(hold a validation share of them out), or the evaluation would read its own stop rule.
``patience`` (checks): the run stops once the rule holds at that many checks in a row
(1: at the first, bisected; more: at the last of them, not bisected). A method that
holds its forget rows on targets (``match``) pulls a row back from both sides, so its
guard (rule "original" at AUC 0) stops only a run that stays past every non-member: a
request of one track overshoots on its first ascent (in the demo it went from 2.1 to
8.3 nats in 10 steps, past every non-member, and was back under them 10 steps later),
and a guard that fired there left the remain set 16 % worse than the whole run does.

A method with a ``row_target`` (``bounded_ga``) has it moved to the non-members' mean
NLL at every check; a method that fits its targets once (``match``) reads the
non-members' NLLs under the starting weights (``original``).

Under a launcher (DeepSpeed ZeRO 0-3) every rank scores its share of the forget and
non-member windows, the per-item NLL sums are added up over ranks, rank 0's decision is
broadcast, and the bisection works on each rank's partition of the fp32 master weights
(``noencore.engine.zero.MasterWeights``): the interpolation is element-wise, so no rank
needs the whole model. The forward passes read the bf16 compute weights there (the
fp32 master in one process).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from noencore import distributed as dist
from noencore.engine.sets import UnlearningSets, _resolve
from noencore.errors import UsageError
from noencore.methods.base import Check

STOP_RULES = ("auc", "nll", "original")


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class ModuleWeights:
    """A module's weights (one process): snapshots and interpolations of its state dict."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().clone() for k, t in self.module.state_dict().items()}

    def assign(self, before: dict, after: dict, a: float) -> None:
        with torch.no_grad():
            self.module.load_state_dict({k: (before[k] + a * (after[k] - before[k]))
                                         if after[k].is_floating_point() else after[k]
                                         for k in after})


def bisect_crossing(weights: Any, before: Any, auc_of: Callable[[], float], target: float,
                    iterations: int = 6) -> tuple[float, float]:
    """The weights ``before + a (after - before)`` (``after`` = the current weights, a in
    [0, 1]) whose AUC (``auc_of()``) is closest to ``target``, found by bisection on ``a``
    (the AUC falls as ``a`` grows); ``weights`` (``ModuleWeights`` or
    ``zero.MasterWeights``: ``snapshot()`` and ``assign(before, after, a)``) is left
    holding them. Returns (AUC, a)."""
    after = weights.snapshot()

    def set_to(a: float) -> float:
        weights.assign(before, after, a)
        return auc_of()

    lo, hi, best = 0.0, 1.0, (float("inf"), 1.0, 1.0)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        auc = set_to(mid)
        best = min(best, (abs(auc - target), mid, auc))
        lo, hi = (mid, hi) if auc > target else (lo, mid)
    set_to(best[1])
    return best[2], best[1]


def _view(shards: Any, spec: str | Sequence[str]) -> Any:
    """The items of ``spec`` (split name or source ids) as a ``TokenShards`` view."""
    return shards.select(split=spec) if isinstance(spec, str) else shards.select(ids=list(spec))


class NonmemberStop:
    """See the module docstring. ``check(step, method)`` returns None to go on, or a dict
    (step, auc, forget_nll, nonmember_nll, fraction of the last step kept) to stop.
    ``start()`` measures the non-members under the starting weights once (``original``:
    float64 [n tracks] mean token NLLs, or None), before the first step. ``last``: the
    latest check's measurement (step, auc, forget_nll, nonmember_nll), whether or not it
    stopped the run; None before the first check.

    ``sets`` (``UnlearningSets``) are the run's forget and remain windows; ``forget`` the
    spec that selected the forget set. Non-members that are also trained on (forget or
    remain) are refused. The AUC is computed on the NLLs gathered from every rank, so a
    stop set of any size works on any number of ranks. ``attach`` gives it the weights to
    bisect and this process's place among the ranks before the first check.
    """

    def __init__(self, model: Any, sets: UnlearningSets, forget: str | Sequence[str],
                 nonmembers: str | Sequence[str], conditions: Any, *, rule: str = "auc",
                 target_auc: float = 0.5, every: int = 1, batch_size: int = 16,
                 frames: int | None = None, bisect: int = 6, patience: int = 1,
                 held: Sequence[str] | None = None):
        if rule not in STOP_RULES:
            raise UsageError(f"stop rule must be one of {STOP_RULES}, got {rule!r}")
        if not 0.0 <= target_auc <= 1.0:
            raise UsageError(f"stop AUC must be in [0, 1], got {target_auc}")
        if every < 1:
            raise UsageError(f"stop check interval must be >= 1 step, got {every}")
        if patience < 1:
            raise UsageError(f"stop patience must be >= 1 check, got {patience}")
        shards = sets.shards
        # the engine's own selection checks: an empty split names those present, unknown
        # ids are listed
        items = _resolve(shards, nonmembers, "non-member")
        for name, trained, fix in (("forget", sets.forget_item, "make them disjoint"),
                                   ("remain", sets.remain_item,
                                    "give the remain set explicitly or put the non-members in "
                                    "a held-out split")):
            clash = sorted({shards.ids[i] for i in np.intersect1d(items, trained).tolist()})
            if clash:
                raise UsageError(f"{len(clash)} track(s) are both {name} and non-member tracks "
                                 f"of the stop rule, in the {name} set (e.g. {clash[0]!r}); "
                                 f"{fix}")
        self.model, self.conditions = model, conditions
        self.forget, self.nonmembers = _view(shards, forget), _view(shards, nonmembers)
        self.rule, self.target, self.every = rule, float(target_auc), int(every)
        self.batch_size, self.frames, self.bisect = batch_size, frames, bisect
        self.patience = int(patience)
        # tracks the run holds (anchor_unseen) whose per-codebook NLLs a method follows
        self.held = _view(shards, list(held)) if held else None
        self.hits = 0  # checks in a row at which the rule held (a checkpoint keeps it)
        self.weights: Any = ModuleWeights(model.lm)
        self.rank, self.world = 0, 1
        self.runner: Callable[[Callable[[], Any]], Any] = _call
        self._last: Any = None
        self.last: dict | None = None
        self.original: np.ndarray | None = None

    def attach(self, weights: Any, rank: int, world: int,
               runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        """Bisect ``weights`` (``zero.MasterWeights`` under DeepSpeed); score this rank's
        share of the windows of ``world``; hand each measurement to ``runner`` (under
        DeepSpeed: the objective module's forward, as every forward pass must go)."""
        self.weights, self.rank, self.world = weights, rank, world
        self.runner = runner or _call

    def _set_stats(self, view: Any) -> Any:
        """This rank's share of ``view``'s token statistics (``SetStats``) under the current
        weights."""
        from noencore.evaluation.token_metrics import collect_set_stats

        return collect_set_stats(self.model, view, self.conditions, batch_size=self.batch_size,
                                 frames=self.frames, precision="fp32", progress=False,
                                 rank=self.rank, world=self.world)

    def _measured(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the model in eval mode, through the runner (under DeepSpeed: the
        objective module's forward)."""
        lm = self.model.lm
        was_training = lm.training
        lm.eval()
        try:
            return self.runner(fn)
        finally:
            lm.train(was_training)

    def _item_table(self, view: Any) -> torch.Tensor:
        """float64 [2, items of ``view``]: this rank's summed token NLL and token count of
        each item."""
        st = self._set_stats(view)
        n = len(view)
        return torch.from_numpy(np.stack([np.bincount(st.item, weights=st.nll, minlength=n),
                                          np.bincount(st.item, minlength=n)]).astype(np.float64))

    def held_codebooks(self) -> torch.Tensor:
        """float64 [K]: the held tracks' mean token NLL on each codebook under the current
        weights (eval mode), from every rank's share; the same on every rank."""
        if self.held is None:
            raise UsageError("no held tracks to measure: give the stop rule held=...")
        K = int(self.model.lm.num_codebooks)
        st = self._measured(lambda: self._set_stats(self.held))
        table = torch.from_numpy(np.stack([
            np.bincount(st.codebook, weights=st.nll, minlength=K),
            np.bincount(st.codebook, minlength=K)]).astype(np.float64))
        table = dist.all_reduce_sum(table)
        return table[0] / table[1].clamp_min(1.0)

    def item_nll(self, views: list[Any]) -> list[np.ndarray]:
        """float64 [items] per view: each track's mean token NLL under the current
        weights (eval mode), from every rank's share; the same on every rank."""
        tables = self._measured(lambda: [self._item_table(v) for v in views])
        tables = [dist.all_reduce_sum(t) for t in tables]
        with np.errstate(invalid="ignore", divide="ignore"):
            return [(t[0] / t[1]).numpy() for t in tables]

    def start(self, original: bool = False) -> None:
        """Before the first step: keep the non-members' NLLs under the starting weights
        when the rule compares with them, or when ``original`` (a method fits its
        targets to them)."""
        if self.rule == "original" or original:
            self.original = self.item_nll([self.nonmembers])[0]

    def measure(self) -> tuple[float, float, float]:
        """(LOSS-attack AUC forget vs non-members, forget mean NLL, non-member mean NLL)
        under the current weights (rule "original": the non-members' as the starting
        weights scored them); the same on every rank."""
        from noencore.evaluation import mia

        if self.rule == "original":
            if self.original is None:
                raise UsageError("stop rule 'original' needs the non-members measured under "
                                 "the starting weights: call start() before training")
            nll_f, nll_n = self.item_nll([self.forget])[0], self.original
        else:
            nll_f, nll_n = self.item_nll([self.forget, self.nonmembers])
        self.items = nll_f, nll_n  # the same on every rank (summed over ranks)
        auc = mia.roc_auc(-nll_f, -nll_n, min_items=1)  # LOSS attack: higher = member
        result = auc, float(np.nanmean(nll_f)), float(np.nanmean(nll_n))
        return dist.broadcast_object(result)  # one decision for every rank: rank 0's

    def _nonmembers_now(self) -> torch.Tensor:
        """float64 [m]: the non-members' per-track mean NLLs under the current weights
        (rule "original" compares with the starting weights' and measures them here)."""
        now = self.item_nll([self.nonmembers])[0] if self.rule == "original" \
            else self.items[1]
        return torch.from_numpy(now[np.isfinite(now)])

    def check(self, step: int, method: Any = None) -> dict | None:
        if step % self.every:
            return None
        auc, nll_f, nll_n = self.measure()
        self.last = {"step": step, "auc": auc, "forget_nll": nll_f, "nonmember_nll": nll_n}
        ready = True
        if method is not None:  # the method follows the measurement and may hold the stop
            ready = method.on_check(Check(step, nll_n, self._nonmembers_now,
                                          None if self.held is None else self.held_codebooks))
        by_auc = self.rule in ("auc", "original")
        hit = (auc <= self.target if by_auc else nll_f >= nll_n) and ready
        self.hits = self.hits + 1 if hit else 0
        bisect = by_auc and self.bisect and self.patience == 1
        if self.hits < self.patience:
            if bisect:
                self._last = self.weights.snapshot()
            return None
        info = {"step": step, "auc": auc, "forget_nll": nll_f, "nonmember_nll": nll_n,
                "fraction": 1.0}
        if self.patience > 1:
            info["checks_in_a_row"] = self.hits
        if bisect and self._last is not None:
            auc, a = bisect_crossing(self.weights, self._last, lambda: self.measure()[0],
                                     self.target, self.bisect)
            info.update(auc=auc, fraction=a)
        return info
