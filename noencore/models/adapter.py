"""The MusicGen LM seen as hidden states + K codebook heads, for the fused op.

audiocraft's ``LMModel.compute_predictions`` interleaves the codes ``[B, K, T]`` with
the delay pattern into a sequence ``[B, K, S]``, runs the transformer, applies the K
heads and reverts the pattern, giving logits ``[B, K, T, card]`` and a mask of the
positions the pattern makes valid. The adapter stops before the heads: for codebook
k it gathers the hidden state that predicts each valid ``(b, k, t)`` and hands the
fused op ``hidden [N_k, D]`` and the head weight ``[card, D]``, so the ``[N, card]``
logits are never materialised.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CUT_LENGTHS = 16  # a window's frames are cut to one of at most this many lengths


@dataclass
class CodebookRows:
    """The rows of one codebook that the loss sees.

    hidden:  [N_k, D] float (model dtype), the states that predict these tokens
             (with a trailing column of ones when the head has a bias)
    weight:  [V, D] the head weight (``[V, D+1]`` with the bias folded in)
    targets: [N_k] long, the tokens to predict (0 <= target < V)
    item:    [N_k] long, the row of the batch each token belongs to
    time:    [N_k] long, the frame index t of each token
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    item: torch.Tensor
    time: torch.Tensor


def pattern_steps(lm: nn.Module, frames: int) -> int:
    """S: the steps of the interleaved sequence the transformer runs over for ``frames``
    frames (audiocraft's pattern with ``keep_only_valid_steps``)."""
    return _pattern_steps(lm.pattern_provider, lm.num_codebooks, frames)


def _pattern_steps(provider: Any, codebooks: int, frames: int) -> int:
    probe = torch.zeros(1, codebooks, frames, dtype=torch.long)
    return int(provider.get_pattern(frames).build_pattern_sequence(
        probe, 0, keep_only_valid_steps=True)[0].shape[-1])  # the token only fills steps


def pattern_index(lm: nn.Module, frames: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the prediction of each code sits in the interleaved sequence.

    Returns ``seq_step long [K, T]`` (the step s of the transformer output whose head
    output predicts code (k, t)) and ``valid bool [K, T]`` (the delay pattern's mask).
    Found by reverting a tensor holding each step's own index through the pattern, so it
    agrees with ``compute_predictions`` for any pattern audiocraft provides.
    """
    seq, valid = _pattern_index(lm.pattern_provider, lm.num_codebooks, frames)
    return seq.to(device), valid.to(device)


def _pattern_index(provider: Any, codebooks: int, frames: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = provider.get_pattern(frames)
    steps = _pattern_steps(provider, codebooks, frames)
    probe = torch.arange(steps, dtype=torch.float64).expand(1, 1, codebooks, steps).contiguous()
    reverted, _, valid = pattern.revert_pattern_logits(probe, float("nan"),
                                                       keep_only_valid_steps=True)
    seq = reverted[0, 0]  # [K, T]
    valid = valid.bool() & ~torch.isnan(seq)
    return torch.where(valid, seq, torch.zeros_like(seq)).long(), valid


@functools.lru_cache(maxsize=4 * CUT_LENGTHS)
def _step_of(provider: Any, codebooks: int, frames: int, device: torch.device) -> torch.Tensor:
    """``pattern_index``'s steps on ``device``, kept (never written to): the training step
    asks for the same few lengths (``trim_frames``) every micro-batch, and a fresh copy to
    a GPU would wait for the stream each time."""
    return _pattern_index(provider, codebooks, frames)[0].to(device)


def hidden_states(lm: nn.Module, codes: torch.Tensor,
                  condition_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Transformer output before the heads, ``[B, S, D]``, for codes ``long [B, K, T]``.

    Mirrors ``LMModel.forward`` up to its output norm (same modules, same order), so the
    heads applied to it give exactly ``compute_predictions``' logits.
    """
    pattern = lm.pattern_provider.get_pattern(codes.shape[-1])
    seq, _, _ = pattern.build_pattern_sequence(codes.contiguous(), lm.special_token_id,
                                               keep_only_valid_steps=True)
    S = seq.shape[-1]
    x = sum(lm.emb[k](seq[:, k]) for k in range(lm.num_codebooks))
    x, cross = lm.fuser(x, condition_tensors)
    out = lm.transformer(x, cross_attention_src=cross)
    if lm.out_norm is not None:
        out = lm.out_norm(out)
    if len(lm.fuser.fuse2cond["prepend"]) > 0:
        out = out[:, -S:]
    return out


def head_weight(linear: nn.Linear, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(hidden, weight)`` with a bias folded in as an extra input column.

    The fused op takes no bias; ``[h, 1] @ [W, b]^T = h W^T + b`` keeps it exact.
    """
    if linear.bias is None:
        return hidden, linear.weight
    ones = torch.ones(*hidden.shape[:-1], 1, dtype=hidden.dtype, device=hidden.device)
    return (torch.cat([hidden, ones], dim=-1),
            torch.cat([linear.weight, linear.bias[:, None].to(linear.weight.dtype)], dim=1))


def pattern_mask(lm: nn.Module, mask: torch.Tensor,
                 cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``mask`` bool [B, K, T] narrowed, per row, to the delay pattern's valid positions
    for that row's own length (up to its last real frame: padding sits at the end).

    A window shorter than T is padded; under the delay pattern the last codes of the
    delayed codebooks of such a row would be predicted from steps that already hold
    padding. audiocraft scores a segment of length L with the pattern of length L, which
    leaves those positions out; so does this, so that a row's loss does not depend on
    what else shares its batch, in training and in evaluation alike.
    """
    t = mask.shape[-1]
    frame = torch.arange(1, t + 1, device=mask.device)
    lengths = (mask.any(dim=1) * frame).amax(dim=1)
    out = mask.clone()
    cache = {} if cache is None else cache
    for length in lengths.unique().tolist():
        if length in (0, t):
            continue
        if length not in cache:
            _, valid = pattern_index(lm, length)
            cache[length] = torch.nn.functional.pad(valid, (0, t - length))
        out[lengths == length] &= cache[length].to(out.device)
    return out


def token_mask(lm: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """bool [B, K, T]: the tokens a loss counts, for ``mask`` bool [B, K, T] (True = real
    frame): real frames at positions the delay pattern makes valid for each row's own
    length (``pattern_mask``). Reads the row lengths back: compute it where the mask lives
    on the host (the engine does, before moving a batch to its device)."""
    _, valid = pattern_index(lm, mask.shape[-1], mask.device)
    return valid.expand_as(mask) & pattern_mask(lm, mask.bool())


def codebook_rows(lm: nn.Module, codes: torch.Tensor, mask: torch.Tensor | None,
                  condition_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[CodebookRows]:
    """Split a batch into per-codebook rows valid under the delay pattern and the mask.

    codes: long [B, K, T]; mask: bool [B, K, T] (True = real frame) or None.
    Rows are ordered by (item, time) within each codebook. Only the counted tokens are
    kept (their number depends on the data: for evaluation; the training step uses
    ``dense_codebook_rows``).
    """
    B, K, T = codes.shape
    out = hidden_states(lm, codes, condition_tensors)  # [B, S, D]
    seq, valid = pattern_index(lm, T, codes.device)
    keep = valid.expand(B, K, T) if mask is None else token_mask(lm, mask)
    rows = []
    for k in range(K):
        item, time = keep[:, k].nonzero(as_tuple=True)
        hidden, weight = head_weight(lm.linears[k], out[item, seq[k, time]])
        rows.append(CodebookRows(hidden=hidden, weight=weight, targets=codes[item, k, time],
                                 item=item, time=time))
    return rows


def counted_positions(keep: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The positions a loss reads, per codebook, found on the host before a batch moves.

    keep: bool [B, K, T] (``token_mask``). Returns ``index`` long [N_0 + ... + N_{K-1}]:
    for each codebook k in turn, the flat positions ``b * T + t`` of its counted tokens in
    (item, time) order, and ``sizes`` (N_0, ..., N_{K-1}). A codebook with no counted token
    keeps position 0 (not valid, so no loss reads it): every head still takes part in the
    backward, as DeepSpeed needs a gradient for every trained parameter on every rank.
    """
    per = []
    for k in range(keep.shape[1]):
        idx = keep[:, k].reshape(-1).nonzero().squeeze(1)
        per.append(idx if idx.numel() else idx.new_zeros(1))
    return torch.cat(per), tuple(int(p.numel()) for p in per)


def cut_frames(last: int, frames: int) -> int:
    """The length a batch of ``frames``-frame windows is cut to when its counted tokens end
    at frame ``last`` (exclusive): ``last`` rounded up to a multiple of
    ceil(frames / ``CUT_LENGTHS``), at most ``frames``."""
    step = -(-frames // CUT_LENGTHS)
    return min(frames, -(-max(last, 1) // step) * step)


def trim_frames(lm: nn.Module, keep: torch.Tensor) -> int:
    """How many frames of a batch its counted tokens need: one past the last counted frame,
    rounded up to a multiple of ceil(T / ``CUT_LENGTHS``) (so that a run sees few sequence
    lengths: audiocraft's pattern caches, the device's index copies and a compiled block
    stay warm); T where nothing would be cut, for a pattern other than the delay pattern
    (or its parallel case), or where the pattern of that length would place a counted
    token on another step. keep: bool [B, K, T] on the host.

    Padding sits at the end of a row; when every row of a batch ends before T, the steps
    after the last counted one feed no loss (self-attention is causal; under the delay
    pattern the first n + 1 steps of a window hold only its first n frames), so the
    transformer can run over the shorter sequence and give the counted positions the same
    states.
    """
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider

    T = keep.shape[-1]
    if not isinstance(lm.pattern_provider, DelayedPatternProvider):
        return T
    frames = keep.any(dim=(0, 1)).nonzero()
    n = cut_frames(int(frames.max()) + 1 if frames.numel() else 1, T)
    if n == T:
        return T
    used = keep[:, :, :n].any(dim=0)  # [K, n]
    same = _same_steps(lm.pattern_provider, lm.num_codebooks, n, T)
    return n if bool(same[used].all()) else T


@functools.lru_cache(maxsize=4 * CUT_LENGTHS)
def _same_steps(provider: Any, codebooks: int, n: int, frames: int) -> torch.Tensor:
    """bool [K, n]: the codes whose prediction sits on the same step, and is valid, under
    the pattern of ``n`` frames as under that of ``frames`` (kept, never written to: the
    training step asks for the same few lengths every micro-batch)."""
    seq_n, valid_n = _pattern_index(provider, codebooks, n)
    seq_t, _ = _pattern_index(provider, codebooks, frames)
    return (seq_n == seq_t[:, :n]) & valid_n


def dense_codebook_rows(lm: nn.Module, codes: torch.Tensor, keep: torch.Tensor,
                        condition_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        positions: tuple[torch.Tensor, tuple[int, ...]] | None = None
                        ) -> list[tuple[CodebookRows, torch.Tensor]]:
    """A batch as per-codebook rows, with the tokens that count marked.

    codes: long [B, K, T]; keep: bool [B, K, T], the tokens that count (``token_mask``).
    Returns, per codebook, ``CodebookRows`` ordered by item, then time, and ``valid`` bool
    [N_k] (keep at those rows). The rows are the B x T positions of each codebook, or with
    ``positions`` (``counted_positions`` of ``keep``, its index on the batch's device) only
    those. Neither reads anything back from the device: the training step passes the
    positions it found on the host, so the heads compute no row that no loss reads.
    """
    B, K, T = codes.shape
    out = hidden_states(lm, codes, condition_tensors)  # [B, S, D]
    S = out.shape[1]
    flat = out.reshape(B * S, out.shape[-1])
    seq = _step_of(lm.pattern_provider, lm.num_codebooks, T, codes.device)
    if positions is None:
        everywhere = torch.arange(B * T, device=codes.device)
        per_codebook = [everywhere] * K
    else:
        index, sizes = positions
        per_codebook = index.split(list(sizes))
    rows = []
    for k, pos in enumerate(per_codebook):
        item, time = pos // T, pos % T
        hidden, weight = head_weight(lm.linears[k], flat.index_select(0, item * S + seq[k, time]))
        rows.append((CodebookRows(hidden=hidden, weight=weight,
                                  targets=codes[:, k].reshape(-1)[pos], item=item, time=time),
                     keep[:, k].reshape(-1)[pos]))
    return rows
