"""One unlearning step's loss: model -> rows -> method -> fused op.

``UnlearnObjective`` is the module the optimizer (or DeepSpeed) trains. Its forward:

1. runs the LM to the hidden states before the K heads (``codebook_rows``);
2. measures each token's NLL of its true code, no grad (``token_stats``), for the
   metrics and for methods whose weights depend on it (NPO, SimNPO);
3. asks the method for targets and signed row weights;
4. sums ``linear_ce_ascent(..., reduction="sum")`` over the K codebooks: the gradient is
   computed inside the op, no ``[N, card]`` logits are kept.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from noencore.methods import Method, Rows
from noencore.models.adapter import codebook_rows, pattern_index, pattern_mask


def token_counts(lm: nn.Module, mask: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """float64 [3]: (forget tokens, remain tokens, forget rows) valid under the delay
    pattern and the mask.

    mask bool [B, K, T], forget bool [B]. Known before the forward pass, so ranks can
    all-reduce it to normalise means by the *global* batch.
    """
    _, valid = pattern_index(lm, mask.shape[-1], mask.device)
    per_row = (pattern_mask(lm, mask.bool()) & valid).sum(dim=(1, 2)).double()
    rows = (forget & (per_row > 0)).sum().double()
    return torch.stack([per_row[forget].sum(), per_row[~forget].sum(), rows])


class UnlearnObjective(nn.Module):
    """Wraps a ``MusicGenModel`` (its ``lm`` holds every trainable parameter).

    forward(codes long [B,K,T], mask bool [B,K,T], forget bool [B], embeds float
    [B,L,D_t5], embeds_mask bool [B,L], ref_nll float32 [B] or None, counts float64 [3]
    (forget tokens, remain tokens, forget rows of the whole optimizer step, all ranks and
    micro-batches), label_seed int, rows long [B] (each row's index in the step's global
    batch)) -> (objective scalar, stats float64 [6]: forget NLL sum, forget tokens, remain
    NLL sum, remain tokens, method loss, rows).

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
                rows: torch.Tensor | None = None, *, measure: Callable[[], Any] | None = None
                ) -> Any:
        if measure is not None:
            # A no-grad measurement (reference NLLs, the stop rule) run as this module's
            # forward: under DeepSpeed ZeRO-3 the engine's start-of-forward bookkeeping and
            # the gathering of the heads (external parameters of this module) happen in
            # this module's hooks, so every forward pass of the model enters here.
            return measure()
        from noencore.ops import (
            RANDOM_LABEL,
            linear_ce_ascent,
            random_label,
            resolve_backend,
            token_stats,
        )

        conds = self.model.condition_tensors(embeds, embeds_mask)
        parts = codebook_rows(self.model.lm, codes, mask, conds)
        with torch.no_grad():
            nll = [token_stats(p.hidden.detach(), p.weight.detach(), p.targets).nll
                   for p in parts]
        sizes = [p.targets.numel() for p in parts]
        row_of = rows.to(codes.device)
        tokens = Rows(targets=torch.cat([p.targets for p in parts]),
                      item=torch.cat([p.item for p in parts]), nll=torch.cat(nll),
                      forget=forget, ref_nll=ref_nll, forget_tokens=float(counts[0]),
                      remain_tokens=float(counts[1]), forget_rows=float(counts[2]))
        plan = self.method.plan(tokens)
        targets = plan.targets.split(sizes)
        weights = plan.row_weight.to(codes.device).split(sizes)
        objective = codes.new_zeros((), dtype=torch.float32)
        self.backend_used = resolve_backend(parts[0].hidden, self.backend)
        for k, p in enumerate(parts):
            if sizes[k] == 0:
                # Every parameter must get a gradient on every rank in every micro-batch
                # (DeepSpeed ZeRO-2/3 reduce gradients in buckets filled by hooks that fire
                # in backward; a head left out on one rank shifts every bucket), also when
                # no row of this batch reaches codebook k (short windows, padding rows):
                # a zero connected to the head and to the transformer output.
                objective = objective + 0.0 * (p.hidden.sum() + p.weight.sum())
                continue
            seed_k = (int(label_seed) * 64 + k) & 0x7FFFFFFF
            drawn = random_label(seed_k, row_of[p.item] * codes.shape[-1] + p.time,
                                 p.weight.shape[0])
            target = torch.where(targets[k] == RANDOM_LABEL, drawn, targets[k])
            objective = objective + linear_ce_ascent(
                p.hidden, p.weight, target, weights[k], loss_cap=self.method.loss_cap,
                reduction="sum", backend=self.backend)
        # statistics stay on the device of the batch: ranks all-reduce them there
        isf = tokens.is_forget
        nll = tokens.nll.double()
        zero = torch.zeros((), dtype=torch.float64, device=nll.device)
        stats = torch.stack([torch.where(isf, nll, zero).sum(), isf.sum().double(),
                             torch.where(isf, zero, nll).sum(), (~isf).sum().double(),
                             torch.as_tensor(plan.loss, dtype=torch.float64, device=nll.device),
                             torch.tensor(float(codes.shape[0]), dtype=torch.float64,
                                          device=nll.device)])
        return objective, stats


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
