"""What every unlearning method sees and returns.

A method turns the rows of one batch into targets and signed row weights for the fused
op (``noencore.ops.linear_ce_ascent`` with ``reduction="sum"``): the engine minimises
``sum_n row_weight_n * CE_n``, so a negative weight is gradient *ascent* on that token.
Methods whose loss is not linear in the token losses (NPO, SimNPO) return the weights
equal to the derivative of their loss with respect to each token's CE, evaluated at the
current (no-grad) token NLLs: the gradient is then exactly the method's gradient.

Row layout: all valid tokens of the batch, every codebook concatenated (``item`` says
which batch row a token belongs to). Losses are token means per set: the forget term
averages over forget tokens, the remain term over remain tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from noencore.ops import RANDOM_LABEL


@dataclass
class Rows:
    """The valid tokens of one batch, all codebooks concatenated.

    targets:   long [N] true codes
    item:      long [N] batch row of each token
    nll:       float32 [N] current NLL of the true code (no grad)
    forget:    bool [B] which batch rows come from the forget set
    ref_nll:   float32 [B] or None: the reference model's summed NLL of each row's tokens
               (forget rows; cached once before training, for NPO-type methods)
    forget_tokens / remain_tokens: global token counts of each set in this step (all ranks),
               the denominators of the token means
    forget_rows: global number of forget rows in this step (sequence-level means)
    """

    targets: torch.Tensor
    item: torch.Tensor
    nll: torch.Tensor
    forget: torch.Tensor
    ref_nll: torch.Tensor | None
    forget_tokens: float
    remain_tokens: float
    forget_rows: float = 0.0

    @property
    def is_forget(self) -> torch.Tensor:
        """bool [N]: token belongs to a forget row."""
        return self.forget[self.item]

    def seq_nll(self) -> torch.Tensor:
        """float32 [B]: summed NLL of each batch row's tokens (current model, no grad)."""
        out = torch.zeros(self.forget.shape[0], dtype=torch.float32, device=self.nll.device)
        return out.index_add_(0, self.item, self.nll.float())

    def seq_tokens(self) -> torch.Tensor:
        """float32 [B]: number of valid tokens of each batch row."""
        out = torch.zeros(self.forget.shape[0], dtype=torch.float32, device=self.item.device)
        return out.index_add_(0, self.item, torch.ones_like(self.item, dtype=torch.float32))


@dataclass
class Plan:
    """A method's answer for one batch.

    targets:    long [N] (RANDOM_LABEL where the op draws a random code)
    row_weight: float32 [N] signed weights; the engine minimises sum(row_weight * CE)
    loss:       float, the method's own loss value for logging (no grad)
    """

    targets: torch.Tensor
    row_weight: torch.Tensor
    loss: float


class Method:
    """Base: GradDiff-style weights ``-forget_weight`` on forget and ``+remain_weight`` on
    remain tokens, token means. Subclasses say only how they differ."""

    name = "base"
    loss_cap: float | None = None   # bounded ascent: forget rows above the cap get no gradient
    needs_reference = False         # engine caches the reference model's forget NLL first
    swaps_codes = False             # engine replaces forget rows' codes (RL with remain clips)

    def __init__(self, forget_weight: float = 1.0, remain_weight: float = 0.0):
        self.forget_weight = float(forget_weight)
        self.remain_weight = float(remain_weight)

    def targets(self, rows: Rows) -> torch.Tensor:
        return rows.targets

    def weights(self, rows: Rows) -> tuple[torch.Tensor, float]:
        """(row_weight float32 [N], loss value) for linear methods."""
        f = rows.is_forget
        w = torch.where(f, -self.forget_weight / max(rows.forget_tokens, 1.0),
                        self.remain_weight / max(rows.remain_tokens, 1.0)).float()
        return w, float((w * rows.nll).sum())

    def plan(self, rows: Rows) -> Plan:
        w, loss = self.weights(rows)
        return Plan(targets=self.targets(rows), row_weight=w, loss=loss)

    def describe(self) -> dict:
        return {"name": self.name, "forget_weight": self.forget_weight,
                "remain_weight": self.remain_weight, "loss_cap": self.loss_cap}


def random_label_targets(rows: Rows) -> torch.Tensor:
    """Targets with forget tokens marked RANDOM_LABEL (the op draws the code)."""
    return torch.where(rows.is_forget, torch.full_like(rows.targets, RANDOM_LABEL), rows.targets)
