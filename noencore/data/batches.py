"""Fixed-length training windows cut from token shards.

Every item (segment) of F frames gives ceil(F / frames) windows starting at 0, frames,
2 * frames, ...; a window shorter than ``frames`` is padded with code 0 and mask False.
The window order is a permutation drawn from ``seed`` (or the natural order), and rank r
of ``world_size`` takes windows r, r + world_size, ... of it: ranks are disjoint. All
ranks yield the same number of batches of the same sizes (distributed training needs
the steps to line up): a rank that runs out of windows gets *empty rows* (mask all
False, index -1) that carry no loss.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from noencore.data.shards import TokenShards


@dataclass
class Batch:
    """A batch of code windows.

    codes: long [B, K, T] (0 where padded); mask: bool [B, K, T], True = real frame;
    index: long [B], item index in the shards it came from (-1 for an empty row);
    captions: list of B strings ("" for an empty row); start: long [B], first frame of
    the window within its item.
    """

    codes: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    captions: list[str]
    start: torch.Tensor | None = None

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.codes.to(device, non_blocking=non_blocking),
                     self.mask.to(device, non_blocking=non_blocking),
                     self.index.to(device, non_blocking=non_blocking), list(self.captions),
                     None if self.start is None
                     else self.start.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.codes.shape[0]


def windows(shards: TokenShards, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of ``frames`` frames: (item int64 [W], start int64 [W]), item-major."""
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    per_item = np.maximum(1, -(-shards.frames // frames))
    item = np.repeat(np.arange(len(shards), dtype=np.int64), per_item)
    first = np.cumsum(per_item) - per_item  # index of each item's first window
    start = (np.arange(item.size, dtype=np.int64) - np.repeat(first, per_item)) * frames
    return item, start


def rank_windows(shards: TokenShards, frames: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The (item, start) windows rank ``rank`` visits, in order; item -1 = empty row."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    item, start = windows(shards, frames)
    order = (np.random.default_rng(seed).permutation(item.size) if shuffle
             else np.arange(item.size))
    per_rank = item.size // world_size if drop_last else -(-item.size // world_size)
    mine = order[rank::world_size][:per_rank]
    pad = per_rank - mine.size
    it = np.concatenate([item[mine], np.full(pad, -1, dtype=np.int64)])
    st = np.concatenate([start[mine], np.zeros(pad, dtype=np.int64)])
    return it, st


def iter_batches(shards: TokenShards, batch_size: int, frames: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False) -> Iterator[Batch]:
    """Yield ``Batch``es of ``batch_size`` windows of ``frames`` frames (see the module doc).

    Deterministic for a seed; ``drop_last`` drops a final batch smaller than batch_size
    (and, across ranks, the windows that do not divide evenly).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    item, start = rank_windows(shards, frames, seed=seed, rank=rank, world_size=world_size,
                               shuffle=shuffle, drop_last=drop_last)
    n_batches = item.size // batch_size if drop_last else -(-item.size // batch_size)
    k = shards.header.n_q
    all_captions = shards.captions
    for b in range(n_batches):
        its = item[b * batch_size:(b + 1) * batch_size]
        sts = start[b * batch_size:(b + 1) * batch_size]
        codes = torch.zeros(len(its), k, frames, dtype=torch.long)
        mask = torch.zeros(len(its), k, frames, dtype=torch.bool)
        captions = []
        for row, (i, s) in enumerate(zip(its.tolist(), sts.tolist())):
            if i < 0:
                captions.append("")
                continue
            window = shards.codes(i)[:, s:s + frames]
            n = window.shape[1]
            codes[row, :, :n] = window  # int16 -> long on copy
            mask[row, :, :n] = True
            captions.append(all_captions[i])
        yield Batch(codes, mask, torch.from_numpy(its.copy()), captions,
                    torch.from_numpy(sts.copy()))
