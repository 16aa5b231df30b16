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
               (cached once before training: forget rows for NPO-type methods, remain
               rows for methods with ``remain_anchor``; 0 where not cached)
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

    def __init__(self, forget_weight: float = 1.0, remain_weight: float = 0.0,
                 remain_anchor: bool = False):
        self.forget_weight = float(forget_weight)
        self.remain_weight = float(remain_weight)
        self.remain_anchor = bool(remain_anchor)
        if self.remain_anchor and self.remain_weight <= 0:
            raise ValueError(f"{type(self).__name__}: remain_anchor needs a remain term "
                             f"(remain_weight > 0, got {self.remain_weight})")

    @property
    def needs_remain_reference(self) -> bool:
        """Whether the engine must cache the reference NLL of every remain window."""
        return self.remain_anchor

    def remain_weights(self, rows: Rows) -> tuple[torch.Tensor, float]:
        """(float32 [N] weights, zero on forget tokens; loss value) of the remain term.

        Plain: descent on the remain tokens' mean CE. Anchored (``remain_anchor``): the
        hinge ``sum_rows max(0, S - S_ref) / remain_tokens``, descent only on remain
        rows whose summed NLL S is above the reference model's S_ref. The remain set
        is held where the reference had it instead of being fitted ever tighter (a
        remain NLL that keeps falling is a model drifting away from the one users had,
        just as one that rises is a damaged one); the forget term's spill-over is what
        pushes S above S_ref, and that is what the hinge undoes.
        """
        remain = ~rows.is_forget
        scale = self.remain_weight / max(rows.remain_tokens, 1.0)
        if not self.remain_anchor:
            w = torch.where(remain, scale, 0.0)
            return w.float(), float((w * rows.nll).sum())
        if rows.ref_nll is None:
            raise ValueError(f"{type(self).__name__} with remain_anchor needs the reference "
                             "NLL of the remain rows (ref_nll)")
        excess = rows.seq_nll() - rows.ref_nll.float()                     # [B]
        row_remain = ~rows.forget
        active = (excess > 0) & row_remain
        w = torch.where(remain & active[rows.item], scale, 0.0)
        return w.float(), float(scale * (excess.clamp_min(0) * row_remain).sum())

    def targets(self, rows: Rows) -> torch.Tensor:
        return rows.targets

    def weights(self, rows: Rows) -> tuple[torch.Tensor, float]:
        """(row_weight float32 [N], loss value) for linear methods."""
        f = rows.is_forget
        w_f = torch.where(f, -self.forget_weight / max(rows.forget_tokens, 1.0), 0.0)
        w_r, remain_loss = self.remain_weights(rows)
        return (w_f + w_r).float(), float((w_f * rows.nll).sum()) + remain_loss

    def plan(self, rows: Rows) -> Plan:
        w, loss = self.weights(rows)
        return Plan(targets=self.targets(rows), row_weight=w, loss=loss)

    def describe(self) -> dict:
        return {"name": self.name, "forget_weight": self.forget_weight,
                "remain_weight": self.remain_weight, "remain_anchor": self.remain_anchor,
                "loss_cap": self.loss_cap}


def random_label_targets(rows: Rows) -> torch.Tensor:
    """Targets with forget tokens marked RANDOM_LABEL (the op draws the code)."""
    return torch.where(rows.is_forget, torch.full_like(rows.targets, RANDOM_LABEL), rows.targets)
