"""One unlearning step's loss: model -> rows -> method -> fused op, in one pass.

``UnlearnObjective`` is the module the optimizer (or DeepSpeed) trains. Its forward:

1. runs the LM to the hidden states before the K heads and lays out as rows the
   positions a loss reads (``dense_codebook_rows``; the training step finds them on the
   host, ``counted_positions``, and cuts frames no row needs, ``trim_frames``, before the
   batch moves, so nothing is read back from the device and no head computes a row that
   only padding or the delay pattern put there);
2. asks the method for targets (RL: random codes drawn per token);
3. calls the fused op once per codebook; the op hands back each row's log-sum-exp from
   the same pass, from which the NLL of the true code is one dot product per row
   (``noencore.ops.target_nll``); no ``[N, card]`` logits are ever kept, and no second
   forward GEMM measures the NLLs:

   * methods whose weights do not read the NLL (GA, GradDiff, RL, a token cap): the
     weights go into the op, ``reduction="sum"``: the op computes the gradient in its
     forward (one forward GEMM, two backward GEMMs per codebook);
   * methods whose weights do (NPO, SimNPO, the remain anchor, a row target): the op
     returns per-row losses (``reduction="none"``: one GEMM, no gradient buffers), the
     method turns their values into weights, and the op's backward recomputes the logits
     once with those weights as the per-row upstream gradient (three backward GEMMs):
     exactly the method's gradient. Four GEMMs is the floor for these methods unless the
     ``[N, card]`` logits were kept between the two passes.

Statistics stay on the device: the loop reads them once per logging interval.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from noencore.methods import Method, Rows
from noencore.models.adapter import (
    CodebookRows,
    codebook_rows,
    counted_positions,
    dense_codebook_rows,
    token_mask,
    trim_frames,
)

IGNORE = -100  # target of a row that does not count


def token_counts(lm: nn.Module, mask: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """float64 [3]: (forget tokens, remain tokens, forget rows) valid under the delay
    pattern and the mask.

    mask bool [B, K, T] (real frames, on the host: ``token_mask`` reads row lengths),
    forget bool [B]. Known before the forward pass, so ranks can all-reduce it to
    normalise means by the *global* batch.
    """
    per_row = token_mask(lm, mask).sum(dim=(1, 2)).double()
    rows = (forget & (per_row > 0)).sum().double()
    return torch.stack([torch.where(forget, per_row, 0.0).sum(),
                        torch.where(forget, 0.0, per_row).sum(), rows])


def counted_layout(lm: nn.Module, codes: torch.Tensor, keep: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, tuple[int, ...]],
                              int]:
    """A micro-batch as the training step hands it to the objective, laid out on the host:
    (codes, keep) cut after the last frame a loss reads (``trim_frames``), the positions
    the heads compute (``counted_positions``), and the window's frames before the cut.

    codes long [B, K, T], keep bool [B, K, T] (``token_mask``), both on the host.
    """
    window = codes.shape[-1]
    n = trim_frames(lm, keep)
    codes, keep = codes[..., :n], keep[..., :n]
    return codes, keep, counted_positions(keep), window


class UnlearnObjective(nn.Module):
    """Wraps a ``MusicGenModel`` (its ``lm`` holds every trainable parameter).

    forward(codes long [B,K,T], mask bool [B,K,T] (the tokens that count:
    ``adapter.token_mask`` of the real frames), forget bool [B], embeds float [B,L,D_t5],
    embeds_mask bool [B,L], ref_nll float32 [B] or None, counts float64 [3] (forget
    tokens, remain tokens, forget rows of the whole optimizer step, all ranks and
    micro-batches), label_seed int, rows long [B] (each row's index in the step's global
    batch), held bool [B] or None (remain rows holding an earlier request's forget items),
    positions (``adapter.counted_positions`` of ``mask``, its index on the device) or None
    (every position a row, the ones that do not count marked), window int or None (the
    frames of the windows before ``trim_frames`` cut the batch: the random labels' hash
    reads it; default T)
    -> (objective scalar, stats float64 [6] on the batch's device: forget NLL sum,
    forget tokens, remain NLL sum, remain tokens, method loss, rows).

    A random label (RL) is drawn per token from the documented hash of (label_seed,
    codebook, global row, frame) (``noencore.ops.random_label``), so it does not depend on
    how the step is split over ranks or micro-batches.
    """

    def __init__(self, model: nn.Module, method: Method, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.method = method
        self.backend = backend
        self.backend_used: str | None = None  # the op's backend in the last forward

    def forward(self, codes: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                forget: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                embeds_mask: torch.Tensor | None = None, ref_nll: torch.Tensor | None = None,
                counts: torch.Tensor | None = None, label_seed: int = 0,
                rows: torch.Tensor | None = None, held: torch.Tensor | None = None,
                positions: tuple[torch.Tensor, tuple[int, ...]] | None = None,
                window: int | None = None, *, measure: Callable[[], Any] | None = None
                ) -> Any:
        if measure is not None:
            # A no-grad measurement (reference NLLs, the stop rule) run as this module's
            # forward: under DeepSpeed ZeRO-3 the engine's start-of-forward bookkeeping and
            # the gathering of the heads (external parameters of this module) happen in
            # this module's hooks, so every forward pass of the model enters here.
            return measure()
        from noencore.ops import resolve_backend

        conds = self.model.condition_tensors(embeds, embeds_mask)
        parts = dense_codebook_rows(self.model.lm, codes, mask, conds, positions)
        tokens = Rows(targets=torch.cat([p.targets for p, _ in parts]),
                      item=torch.cat([p.item for p, _ in parts]), nll=None, forget=forget,
                      ref_nll=ref_nll, forget_tokens=counts[0], remain_tokens=counts[1],
                      forget_rows=counts[2], valid=torch.cat([v for _, v in parts]),
                      held=held, codebook_sizes=tuple(p.targets.numel() for p, _ in parts))
        targets = self._op_targets(parts, tokens, label_seed, rows, window or codes.shape[-1])
        self.backend_used = resolve_backend(parts[0][0].hidden, self.backend)
        if self.method.needs_nll:
            objective, nll, tokens, loss = self._weighted_after(parts, targets, tokens)
        else:
            objective, nll, tokens, loss = self._weighted_before(parts, targets, tokens)
        isf, isr = tokens.is_forget, tokens.is_remain
        nll = nll.double()
        stats = torch.stack([torch.where(isf, nll, 0.0).sum(), isf.sum().double(),
                             torch.where(isr, nll, 0.0).sum(), isr.sum().double(),
                             loss.double(), codes.new_full((), codes.shape[0],
                                                           dtype=torch.float64)])
        return objective, stats

    def _op_targets(self, parts: list[tuple[CodebookRows, torch.Tensor]], tokens: Rows,
                    label_seed: int, rows: torch.Tensor, frames: int) -> list[torch.Tensor]:
        """Per codebook: the op's targets, long [N_k]: the method's, random codes drawn
        where it asks for them, ``IGNORE`` where a token does not count."""
        from noencore.ops import RANDOM_LABEL, random_label

        wanted = self.method.targets(tokens).split([p.targets.numel() for p, _ in parts])
        row_of = rows.to(tokens.targets.device)
        out = []
        for k, ((p, valid), t) in enumerate(zip(parts, wanted)):
            seed_k = (int(label_seed) * 64 + k) & 0x7FFFFFFF
            drawn = random_label(seed_k, row_of[p.item] * frames + p.time, p.weight.shape[0])
            out.append(torch.where(valid, torch.where(t == RANDOM_LABEL, drawn, t), IGNORE))
        return out

    def _true_nll(self, parts: list[tuple[CodebookRows, torch.Tensor]],
                  lse: list[torch.Tensor], losses: list[torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """float32 [N]: each row's NLL of its true code (0 where it does not count): the
        op's per-row ``losses`` when its targets were the true codes, else one dot
        product per row with the op's log-sum-exp."""
        from noencore.ops import target_nll

        out = []
        for k, (p, valid) in enumerate(parts):
            nll = (losses[k].detach() if losses is not None else
                   target_nll(p.hidden.detach(), p.weight.detach(), p.targets, lse[k]))
            out.append(torch.where(valid, nll.float(), 0.0))
        return torch.cat(out)

    def _weighted_before(self, parts: list[tuple[CodebookRows, torch.Tensor]],
                         targets: list[torch.Tensor], tokens: Rows
                         ) -> tuple[torch.Tensor, torch.Tensor, Rows, torch.Tensor]:
        """One fused pass with the method's weights (they do not read the NLL):
        (objective, true-code NLL [N], rows with it, the method's loss value)."""
        from noencore.ops import linear_ce_ascent

        weights, _ = self.method.weights(tokens)
        objective = parts[0][0].hidden.new_zeros((), dtype=torch.float32)
        lse = []
        for (p, _), t, w in zip(parts, targets, weights.split([t.numel() for t in targets])):
            value, row_lse = linear_ce_ascent(p.hidden, p.weight, t, w, ignore_index=IGNORE,
                                              loss_cap=self.method.loss_cap, reduction="sum",
                                              backend=self.backend, return_lse=True)
            objective = objective + value
            lse.append(row_lse)
        tokens = dataclasses.replace(tokens, nll=self._true_nll(parts, lse))
        return objective, tokens.nll, tokens, self.method.weights(tokens)[1]

    def _weighted_after(self, parts: list[tuple[CodebookRows, torch.Tensor]],
                        targets: list[torch.Tensor], tokens: Rows
                        ) -> tuple[torch.Tensor, torch.Tensor, Rows, torch.Tensor]:
        """Per-row losses first; the method's weights from their values; the op's
        backward applies them (exact for weights that depend on the losses)."""
        from noencore.ops import linear_ce_ascent

        losses, lse = [], []
        for (p, _), t in zip(parts, targets):
            loss, row_lse = linear_ce_ascent(p.hidden, p.weight, t, ignore_index=IGNORE,
                                             reduction="none", backend=self.backend,
                                             return_lse=True)
            losses.append(loss)
            lse.append(row_lse)
        true_targets = type(self.method).targets is Method.targets  # no label replaced
        nll = self._true_nll(parts, lse, losses if true_targets else None)
        tokens = dataclasses.replace(tokens, nll=nll)
        weights, loss = self.method.weights(tokens)
        ce = torch.cat(losses)
        if self.method.loss_cap is not None:  # a token cap: ascent stops above it
            weights = torch.where((weights < 0) & (ce.detach() > self.method.loss_cap),
                                  0.0, weights)
        return (weights.detach() * ce).sum(), nll, tokens, loss


@torch.no_grad()
def sequence_nll(model: nn.Module, codes: torch.Tensor, mask: torch.Tensor,
                 embeds: torch.Tensor, embeds_mask: torch.Tensor) -> torch.Tensor:
    """float32 [B]: summed NLL of each row's valid tokens (no grad), for NPO's reference."""
    from noencore.ops import token_stats

    parts = codebook_rows(model.lm, codes, mask, model.condition_tensors(embeds, embeds_mask))
    out = torch.zeros(codes.shape[0], dtype=torch.float32, device=codes.device)
    for p in parts:
        out.index_add_(0, p.item, token_stats(p.hidden, p.weight, p.targets).nll)
    return out
