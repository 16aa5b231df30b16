"""The forget and remain sets of a run, and the batch of each step.

Both sets are lists of windows ``(item, start)`` of ``frames`` frames cut from the
shards (``noencore.data.batches.windows``: every segment tiled from frame 0). The
batch of step s is drawn from a generator seeded by ``(seed, s)`` alone, so a resumed
run draws exactly the batches the uninterrupted run would have, and every rank of a
data-parallel run agrees on the global batch (rank r keeps rows r, r + world, ...).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from noencore.errors import NoencoreError, UsageError

# the splits a remain set never takes by default: evaluation's held-out data
HELD_OUT_SPLITS = ("holdout", "test", "eval", "validation")


@dataclass
class StepBatch:
    """One step's rows (this rank's share).

    codes long [B, K, T], mask bool [B, K, T], forget bool [B], unit long [B] (index into
    the forget or remain window list, -1 for an empty row), captions list[str], row long
    [B] (the row's index in the step's global batch, -1 for an empty row), held bool [B]
    (a remain row holding an earlier request's forget item: ``UnlearningSets.hold``).
    """

    codes: torch.Tensor
    mask: torch.Tensor
    forget: torch.Tensor
    unit: torch.Tensor
    captions: list[str]
    row: torch.Tensor
    held: torch.Tensor | None = None

    def __post_init__(self):
        if self.held is None:
            self.held = torch.zeros_like(self.forget)

    def select(self, rows: slice) -> StepBatch:
        """The rows ``rows`` of this batch (a micro-batch)."""
        return StepBatch(self.codes[rows], self.mask[rows], self.forget[rows],
                         self.unit[rows], self.captions[rows], self.row[rows],
                         self.held[rows])

    def take(self, index: torch.Tensor) -> StepBatch:
        """The rows ``index`` (long [n]) of this batch, in that order."""
        return StepBatch(self.codes[index], self.mask[index], self.forget[index],
                         self.unit[index], [self.captions[i] for i in index.tolist()],
                         self.row[index], self.held[index])


def _resolve(shards, spec, name: str) -> np.ndarray:
    """Item indices selected by ``spec``: a split name, or a list of source ids."""
    if isinstance(spec, str):
        splits = shards.splits
        rows = np.array([i for i, s in enumerate(splits) if s == spec], dtype=np.int64)
        if rows.size == 0:
            raise NoencoreError(f"{shards.path}: the {name} set is empty: no item has split "
                                f"{spec!r} (splits present: {sorted({str(s) for s in splits})})")
        return rows
    wanted = {str(x) for x in spec}
    if not wanted:
        raise NoencoreError(f"the {name} set is empty: give at least one source id or a split")
    ids = shards.ids
    absent = sorted(wanted.difference(ids))
    if absent:
        raise NoencoreError(f"{shards.path}: {len(absent)} {name} id(s) not in the shards: "
                            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; "
                            "check the opt-out list against `noencore info`")
    return np.array([i for i, x in enumerate(ids) if x in wanted], dtype=np.int64)


class UnlearningSets:
    """Forget and remain windows over one shard directory, and per-step sampling.

    forget: split name or source ids. remain: split name, source ids, or None for every
    item outside the forget set and the held-out splits (``HELD_OUT_SPLITS``).
    """

    def __init__(self, shards, forget: str | Sequence[str], remain: str | Sequence[str] | None,
                 frames: int):
        from noencore.data.batches import windows

        self.shards, self.frames = shards, int(frames)
        f_items = _resolve(shards, forget, "forget")
        if remain is None:
            fset = set(f_items.tolist())
            splits = shards.splits
            r_items = np.array([i for i in range(len(shards)) if i not in fset
                                and splits[i] not in HELD_OUT_SPLITS], dtype=np.int64)
        else:
            r_items = _resolve(shards, remain, "remain")
            overlap = set(r_items.tolist()) & set(f_items.tolist())
            if overlap:
                raise NoencoreError(f"{shards.path}: {len(overlap)} item(s) are in both the "
                                    "forget and the remain set; make the sets disjoint")
        item, start = windows(shards, self.frames)
        by_item: dict[int, list[int]] = {}
        for w, i in enumerate(item.tolist()):
            by_item.setdefault(i, []).append(w)
        fw = np.array([w for i in f_items.tolist() for w in by_item[i]], dtype=np.int64)
        rw = np.array([w for i in r_items.tolist() for w in by_item[i]], dtype=np.int64)
        self.forget_item, self.forget_start = item[fw], start[fw]
        self.remain_item, self.remain_start = item[rw], start[rw]
        self.captions = shards.captions
        self.remain_held = np.zeros(self.n_remain, dtype=bool)

    def hold(self, ids: Sequence[str]) -> int:
        """Mark the remain windows of the items ``ids`` as held (an earlier request's forget
        items kept where that request left them: ``Method.remain_weights``); returns the
        number of held windows."""
        self.remain_held = self.remain_windows_of(ids)
        return int(self.remain_held.sum())

    def remain_windows_of(self, ids: Sequence[str]) -> np.ndarray:
        """bool [n_remain]: the remain windows of the items ``ids``."""
        wanted = {str(x) for x in ids}
        item_ids = self.shards.ids
        return np.array([item_ids[i] in wanted for i in self.remain_item.tolist()], dtype=bool)

    @property
    def n_forget(self) -> int:
        return int(self.forget_item.size)

    @property
    def n_remain(self) -> int:
        return int(self.remain_item.size)

    def split_counts(self, batch_size: int, forget_ratio: float) -> tuple[int, int]:
        """(forget rows, remain rows) of a global batch. ``forget_ratio`` 0: remain rows
        only (training without the forget set: a retrained baseline, a relearning probe);
        above 0, at least one forget row."""
        if not 0.0 <= forget_ratio <= 1.0:
            raise NoencoreError(f"forget_ratio must be in [0, 1], got {forget_ratio}")
        n_f = max(1, int(round(batch_size * forget_ratio))) if forget_ratio > 0 else 0
        n_r = batch_size - n_f
        if n_r > 0 and self.n_remain == 0:
            raise NoencoreError("the remain set is empty but the batch asks for remain rows; "
                                "give a remain set or forget_ratio=1")
        return n_f, n_r

    def global_units(self, step: int, seed: int, n_f: int, n_r: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forget bool [B], unit long [B]) of step ``step``'s global batch.

        Forget windows are visited in a random order that cycles, so a forget set of a
        few clips is seen evenly; remain windows are drawn uniformly (thousands of them).
        """
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        epoch, pos = divmod(step * n_f, self.n_forget)
        idx = []
        while len(idx) < n_f:  # cycling permutation, one per forget epoch
            perm = torch.randperm(self.n_forget, generator=torch.Generator().manual_seed(
                int(seed) * 7_919 + epoch))
            idx.extend(perm[pos:pos + n_f - len(idx)].tolist())
            epoch, pos = epoch + 1, 0
        f_units = torch.tensor(idx, dtype=torch.long)
        r_units = (torch.randint(self.n_remain, (n_r,), generator=g) if n_r > 0
                   else torch.zeros(0, dtype=torch.long))
        forget = torch.cat([torch.ones(n_f, dtype=torch.bool), torch.zeros(n_r, dtype=torch.bool)])
        return forget, torch.cat([f_units, r_units])

    def gather(self, forget: torch.Tensor, unit: torch.Tensor,
               source: tuple[torch.Tensor, torch.Tensor] | None = None,
               row: torch.Tensor | None = None) -> StepBatch:
        """Read the windows of rows (forget bool [B], unit long [B]; unit -1 = empty row).

        ``source`` (forget, unit) names another window whose codes a row reads (its caption
        stays its own); ``row`` the rows' global indices (default 0..B-1, -1 if empty)."""
        B, K, T = forget.numel(), self.shards.header.n_q, self.frames
        src_forget, src_unit = source if source is not None else (forget, unit)
        codes = torch.zeros(B, K, T, dtype=torch.long)
        mask = torch.zeros(B, K, T, dtype=torch.bool)
        captions = []
        for r, (f, u, sf, su) in enumerate(zip(forget.tolist(), unit.tolist(),
                                               src_forget.tolist(), src_unit.tolist())):
            if u < 0:
                captions.append("")
                continue
            captions.append(self.captions[int((self.forget_item if f else self.remain_item)[u])])
            items, starts = ((self.forget_item, self.forget_start) if sf
                             else (self.remain_item, self.remain_start))
            i, s = int(items[su]), int(starts[su])
            window = self.shards.codes(i)[:, s:s + T]
            codes[r, :, :window.shape[1]] = window
            mask[r, :, :window.shape[1]] = True
        if row is None:
            row = torch.where(unit >= 0, torch.arange(B), -1)
        held = torch.zeros(B, dtype=torch.bool)
        remain_row = ~forget & (unit >= 0)
        if self.remain_held.any():
            held[remain_row] = torch.from_numpy(self.remain_held)[unit[remain_row]]
        return StepBatch(codes, mask, forget.clone(), unit.clone(), captions, row.clone(),
                         held)

    def step_batch(self, step: int, seed: int, n_f: int, n_r: int, rank: int = 0,
                   world_size: int = 1, swap_codes: bool = False) -> StepBatch:
        """This rank's rows of the global batch of ``step`` (padded with empty rows).

        ``swap_codes``: every forget row reads the codes of a remain row of the same global
        batch, drawn from ``(seed, step)`` (RL with remain clips), keeping its caption.
        """
        forget, unit = self.global_units(step, seed, n_f, n_r)
        src_forget, src_unit = forget.clone(), unit.clone()
        if swap_codes:
            if n_r == 0:
                raise NoencoreError("swapping forget codes for remain clips needs remain rows "
                                    "in every batch: forget_ratio < 1")
            g = torch.Generator().manual_seed(int(seed) * 31 + int(step))
            pick = n_f + torch.randint(n_r, (n_f,), generator=g)
            src_forget[:n_f], src_unit[:n_f] = False, unit[pick]
        mine = torch.arange(forget.numel())[rank::world_size]
        pad = -(-forget.numel() // world_size) - mine.numel()
        row = torch.cat([mine, torch.full((pad,), -1, dtype=torch.long)])
        take = row.clamp_min(0)
        empty = row < 0
        return self.gather(forget[take] & ~empty, torch.where(empty, -1, unit[take]),
                           source=(src_forget[take], src_unit[take]), row=row)


def check_disjoint(audit_ids: Sequence[str], read: Mapping[str, Sequence[str]]) -> None:
    """Refuse audit tracks that the run reads as any of ``read`` (set name -> source ids),
    naming the set and an example; refuse an empty audit set (``noencore.audit``)."""
    if not audit_ids:
        raise UsageError("the audit set (--audit) selects no track: give a split or ids of "
                         "tracks like the forget set that the model never trained on")
    mine = set(audit_ids)
    for name, ids in read.items():
        both = sorted(mine & set(ids))
        if both:
            raise UsageError(f"{len(both)} audit track(s) are also the run's {name} (e.g. "
                             f"{both[0]!r}): the audit scores tracks the run never reads; "
                             "give disjoint sets")
