"""benchmarks/wasted_positions.py: its counts of the transformer steps and head rows a loss
reads agree with what the evaluation path's rows actually read (the steps that receive a
gradient from a loss on every counted token), on windows of awkward real lengths."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "wasted_positions", ROOT / "benchmarks" / "wasted_positions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_match_the_steps_a_loss_reads():
    from noencore.models import load_musicgen
    from noencore.models.adapter import codebook_rows

    wp = _script()
    lm = load_musicgen("tiny", with_codec=False).lm.train()
    T, lengths = 23, np.array([23, 14, 5, 1, 23, 9])
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (lengths.size, lm.num_codebooks, T), generator=g)
    mask = (torch.arange(T) < torch.as_tensor(lengths)[:, None, None]).expand_as(codes)
    conds = {"description": (torch.randn(lengths.size, 3, 64), torch.ones(lengths.size, 3,
                                                                           dtype=torch.long))}
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["out"] = out
    lm.transformer.register_forward_hook(keep)
    rows = codebook_rows(lm, codes, mask, conds)
    sum((r.hidden * torch.randn(r.hidden.shape, generator=g)).sum() for r in rows).backward()
    grad = seen["out"].grad  # [B, S, D]: nonzero at the steps some counted token reads
    read_steps = int((grad.abs().sum(-1) > 0).sum())
    got = wp.shares(lm, lengths, T)
    assert got["read_steps"] == read_steps
    assert got["read_rows"] == sum(r.targets.numel() for r in rows)
    assert got["computed_steps"] == lengths.size * seen["out"].shape[1]
    assert abs(got["wasted_share"] - (1 - read_steps / got["computed_steps"])) < 1e-12
    assert abs(got["pattern_share"] + got["padding_share"] + read_steps / got["computed_steps"]
               - 1) < 1e-12 and got["padding_share"] > 0


def test_window_lengths_tile_each_track_from_its_start():
    wp = _script()
    got = wp.window_lengths(np.array([10, 25, 3]), 10)
    assert got.tolist() == [10, 10, 10, 5, 3]


def test_cut_share_counts_the_steps_of_each_micro_batch_longest_window():
    """After the cut, a micro-batch computes S(n) steps per window for its longest window's
    n frames (rounded up to one of a few lengths): one window per micro-batch leaves the
    delay pattern's steps and the rounding; one
    micro-batch holding a full window computes what the uncut batch computes."""
    from noencore.models import load_musicgen
    from noencore.models.adapter import cut_frames, pattern_steps

    def steps_of(n):  # the cut rounds up to one of a few lengths
        return pattern_steps(lm, cut_frames(int(n), T))

    wp = _script()
    lm = load_musicgen("tiny", with_codec=False).lm
    T, lengths = 23, np.array([23, 14, 5, 1, 23, 9, 17])
    got = wp.shares(lm, lengths, T)
    alone = sum(steps_of(n) for n in lengths)
    assert abs(wp.cut_share(lm, lengths, T, 1) - (1 - got["read_steps"] / alone)) < 1e-12
    assert abs(wp.cut_share(lm, lengths, T, lengths.size) - got["wasted_share"]) < 1e-12
    shares = [wp.cut_share(lm, lengths, T, m) for m in (1, 2, 3, lengths.size)]
    assert shares[0] < got["wasted_share"] and all(0 <= s <= got["wasted_share"]
                                                   for s in shares)
    # micro-batches of 2 filled longest first from steps of 6: (23, 23) (17, 14) (9, 5), 1
    first6 = np.random.default_rng(0).permutation(lengths)[:6]
    steps = 2 * sum(steps_of(n) for n in sorted(first6, reverse=True)[::2])
    rest = steps_of(np.random.default_rng(0).permutation(lengths)[6])
    assert abs(wp.cut_share(lm, lengths, T, 2, 3) - (1 - got["read_steps"] / (steps + rest))
               ) < 1e-12
