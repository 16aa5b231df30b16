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

from dataclasses import dataclass

import torch
from torch import nn


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
    probe = torch.zeros(1, lm.num_codebooks, frames, dtype=torch.long)
    return int(lm.pattern_provider.get_pattern(frames).build_pattern_sequence(
        probe, lm.special_token_id, keep_only_valid_steps=True)[0].shape[-1])


def pattern_index(lm: nn.Module, frames: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the prediction of each code sits in the interleaved sequence.

    Returns ``seq_step long [K, T]`` (the step s of the transformer output whose head
    output predicts code (k, t)) and ``valid bool [K, T]`` (the delay pattern's mask).
    Found by reverting a tensor holding each step's own index through the pattern, so it
    agrees with ``compute_predictions`` for any pattern audiocraft provides.
    """
    pattern = lm.pattern_provider.get_pattern(frames)
    K = lm.num_codebooks
    steps = pattern_steps(lm, frames)
    probe = torch.arange(steps, dtype=torch.float64).expand(1, 1, K, steps).contiguous()
    reverted, _, valid = pattern.revert_pattern_logits(probe, float("nan"),
                                                       keep_only_valid_steps=True)
    seq = reverted[0, 0]  # [K, T]
    valid = valid.bool() & ~torch.isnan(seq)
    seq = torch.where(valid, seq, torch.zeros_like(seq)).long()
    return seq.to(device), valid.to(device)


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


def dense_codebook_rows(lm: nn.Module, codes: torch.Tensor, keep: torch.Tensor,
                        condition_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                        ) -> list[tuple[CodebookRows, torch.Tensor]]:
    """Every position of a batch as per-codebook rows, with the tokens that count marked.

    codes: long [B, K, T]; keep: bool [B, K, T], the tokens that count (``token_mask``).
    Returns, per codebook, the ``CodebookRows`` of all B x T positions (ordered by item,
    then time) and ``valid`` bool [B x T] (= keep[:, k]). The shapes depend only on the
    batch's shape, so nothing is read back from the device (the training step's rows; a
    loss skips the rows that are not valid).
    """
    B, K, T = codes.shape
    out = hidden_states(lm, codes, condition_tensors)  # [B, S, D]
    seq, _ = pattern_index(lm, T, codes.device)
    item = torch.arange(B, device=codes.device).repeat_interleave(T)
    time = torch.arange(T, device=codes.device).repeat(B)
    rows = []
    for k in range(K):
        hidden, weight = head_weight(lm.linears[k], out[:, seq[k]].reshape(B * T, -1))
        rows.append((CodebookRows(hidden=hidden, weight=weight, targets=codes[:, k].reshape(-1),
                                  item=item, time=time), keep[:, k].reshape(-1)))
    return rows
