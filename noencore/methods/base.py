"""What every unlearning method sees and returns.

A method turns the rows of one batch into targets and signed row weights for the fused
op (``noencore.ops.linear_ce_ascent`` with ``reduction="sum"``): the engine minimises
``sum_n row_weight_n * CE_n``, so a negative weight is gradient *ascent* on that token.
Methods whose loss is not linear in the token losses (NPO, SimNPO) return the weights
equal to the derivative of their loss with respect to each token's CE, evaluated at the
current (no-grad) token NLLs: the gradient is then exactly the method's gradient.

Row layout: the tokens of the batch, every codebook concatenated (``item`` says which
batch row a token belongs to, ``valid`` which tokens count: the engine hands the op
fixed-size rows and marks padding and positions the delay pattern leaves out as not
valid). Losses are token means per set: the forget term averages over forget tokens,
the remain term over remain tokens.

Everything here is tensor arithmetic on the batch's device: no value is read back to
the host, so a training step never waits for the GPU.

``needs_nll``: whether the weights depend on the current token NLLs (NPO, SimNPO, the
remain anchor, a row target). Methods that do not (GA, GradDiff, RL, a token cap) get
their weights before the op runs, in one fused pass; the others get the op's per-row
losses first, and the op's backward applies their weights exactly.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from noencore.ops import RANDOM_LABEL


@dataclass
class Rows:
    """The valid tokens of one batch, all codebooks concatenated.

    targets:   long [N] true codes
    item:      long [N] batch row of each token
    nll:       float32 [N] current NLL of the true code (no grad); None while the weights of
               a method that does not need it (``needs_nll`` False) are computed
    forget:    bool [B] which batch rows come from the forget set
    ref_nll:   float32 [B] or None: the reference model's summed NLL of each row's tokens
               (cached once before training: forget rows for NPO-type methods, remain
               rows for methods with ``remain_anchor``; 0 where not cached)
    forget_tokens / remain_tokens: global token counts of each set in this step (all ranks,
               all micro-batches; 0-dim tensors or numbers), the denominators of token means
    forget_rows: global number of forget rows in this step (sequence-level means)
    valid:     bool [N] or None (all valid): tokens that count
    held:      bool [B] or None (none): remain rows that hold an earlier request's forget
               item (``Method.remain_weights``)
    codebook_sizes: tokens of each codebook, in order (the tokens are concatenated codebook
               by codebook): :attr:`codebook`; None where the tokens are not so laid out
    """

    targets: torch.Tensor
    item: torch.Tensor
    nll: torch.Tensor | None
    forget: torch.Tensor
    ref_nll: torch.Tensor | None
    forget_tokens: torch.Tensor | float
    remain_tokens: torch.Tensor | float
    forget_rows: torch.Tensor | float = 0.0
    valid: torch.Tensor | None = None
    held: torch.Tensor | None = None
    codebook_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        dev = self.targets.device
        for name in ("forget_tokens", "remain_tokens", "forget_rows"):
            setattr(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float32,
                                                device=dev))
        if self.valid is None:
            self.valid = torch.ones_like(self.targets, dtype=torch.bool)
        if self.held is None:
            self.held = torch.zeros_like(self.forget)

    @property
    def codebook(self) -> torch.Tensor:
        """long [N]: the codebook of each token (from ``codebook_sizes``; no host read)."""
        if self.codebook_sizes is None:
            raise ValueError("these rows carry no codebook layout (codebook_sizes)")
        dev = self.targets.device  # filled on the device: no copy from the host, no wait
        return torch.cat([torch.full((n,), k, dtype=torch.long, device=dev)
                          for k, n in enumerate(self.codebook_sizes)])

    @property
    def is_forget(self) -> torch.Tensor:
        """bool [N]: valid token of a forget row."""
        return self.forget[self.item] & self.valid

    @property
    def is_remain(self) -> torch.Tensor:
        """bool [N]: valid token of a remain row."""
        return ~self.forget[self.item] & self.valid

    def seq_nll(self) -> torch.Tensor:
        """float32 [B]: summed NLL of each batch row's valid tokens (current model, no grad)."""
        out = torch.zeros(self.forget.shape[0], dtype=torch.float32, device=self.nll.device)
        nll = torch.where(self.valid, self.nll.float(), 0.0)
        return out.index_add_(0, self.item, nll)

    def seq_tokens(self) -> torch.Tensor:
        """float32 [B]: number of valid tokens of each batch row."""
        out = torch.zeros(self.forget.shape[0], dtype=torch.float32, device=self.item.device)
        return out.index_add_(0, self.item, self.valid.float())

    def value(self, weights: torch.Tensor) -> torch.Tensor:
        """0-dim: ``sum weights x NLL`` over valid tokens (NaN while the NLL is unknown)."""
        if self.nll is None:
            return torch.full((), float("nan"), device=weights.device)
        return torch.where(self.valid, weights * self.nll, 0.0).sum()


@dataclass
class Plan:
    """A method's answer for one batch.

    targets:    long [N] (RANDOM_LABEL where the op draws a random code)
    row_weight: float32 [N] signed weights; the engine minimises sum(row_weight * CE)
    loss:       0-dim tensor, the method's own loss value for logging (no grad; NaN when
                the NLL it needs was not given)
    """

    targets: torch.Tensor
    row_weight: torch.Tensor
    loss: torch.Tensor


@dataclass
class Check:
    """What the stop rule measured at a check (``Method.on_check``).

    step:           the optimizer steps done
    nonmember_nll:  the non-members' mean token NLL, as the stop rule compares it
    nonmember_rows: () -> float [m], each non-member track's mean token NLL under the
                    current weights (measured on the first call only where the stop rule
                    compares with the starting weights' NLLs; the same on every rank)
    held_codebooks: () -> float [K], the held (anchored unseen) tracks' mean token NLL on
                    each codebook under the current weights; None where the run holds
                    none or the method did not ask (``needs_held_codebooks``)
    """

    step: int
    nonmember_nll: float
    nonmember_rows: Callable[[], torch.Tensor]
    held_codebooks: Callable[[], torch.Tensor] | None = None


class Method:
    """Base: GradDiff-style weights ``-forget_weight`` on forget and ``+remain_weight`` on
    remain tokens, token means. Subclasses say only how they differ.

    Hooks the engine calls, each a no-op here (a method overrides those it needs):
    ``needs_nonmember_targets`` + ``fit_targets`` (targets measured once, under the
    starting weights, from the stop rule's non-members), ``on_check`` (at every check of
    the stop rule: follow its measurement, say whether the run may stop),
    ``saved_targets`` / ``resume`` (what a checkpoint keeps of fitted state).
    """

    name = "base"
    loss_cap: float | None = None   # bounded ascent: forget rows above the cap get no gradient
    needs_reference = False         # engine caches the reference model's forget NLL first
    swaps_codes = False             # engine replaces forget rows' codes (RL with remain clips)
    hold_tolerance = 0.1            # nats per token a held row may drift from its reference

    @property
    def needs_nll(self) -> bool:
        """Whether the weights read the current token NLLs (see the module docstring)."""
        return self.remain_anchor

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

    def remain_weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 [N] weights, zero on forget tokens; loss value) of the remain term.

        Plain: descent on the remain tokens' mean CE. Anchored (``remain_anchor``): the
        hinge ``sum_rows max(0, S - S_ref) / remain_tokens``, descent only on remain
        rows whose summed NLL S is above the reference model's S_ref. The remain set
        is held where the reference had it instead of being fitted ever tighter (a
        remain NLL that keeps falling is a model drifting away from the one users had,
        just as one that rises is a damaged one); the forget term's spill-over is what
        pushes S above S_ref, and that is what the hinge undoes.

        Held rows (``rows.held``: an earlier request's forgotten items, kept where that
        request left them) are pulled from both sides, as neither relearning them nor
        pushing them further is allowed: the Huber term ``H(S - S_ref)`` with its
        quadratic zone ``T * hold_tolerance`` wide (T the row's tokens), whose gradient
        is the hinge's full weight once the drift is past the tolerance either way.
        """
        remain = rows.is_remain
        scale = self.remain_weight / rows.remain_tokens.clamp_min(1.0)
        if not self.remain_anchor:
            w = torch.where(remain, scale, 0.0).float()
            return w, rows.value(w)
        if rows.ref_nll is None:
            raise ValueError(f"{type(self).__name__} with remain_anchor needs the reference "
                             "NLL of the remain rows (ref_nll)")
        excess = rows.seq_nll() - rows.ref_nll.float()                     # [B]
        row_remain = ~rows.forget
        held = rows.held & row_remain
        zone = rows.seq_tokens() * self.hold_tolerance                    # [B]
        pull = torch.where(held, (excess / zone.clamp_min(1e-6)).clamp(-1.0, 1.0),
                           (excess > 0).float())                          # dvalue/dS per row
        huber = torch.where(excess.abs() <= zone, 0.5 * excess ** 2 / zone.clamp_min(1e-6),
                            excess.abs() - 0.5 * zone)
        value = torch.where(held, huber, excess.clamp_min(0))
        w = torch.where(remain, scale * pull[rows.item], 0.0).float()
        return w, scale * (value * row_remain).sum()

    def targets(self, rows: Rows) -> torch.Tensor:
        return rows.targets

    def weights(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_weight float32 [N], loss value 0-dim) for linear methods."""
        f = rows.is_forget
        w_f = torch.where(f, -self.forget_weight / rows.forget_tokens.clamp_min(1.0), 0.0)
        w_r, remain_loss = self.remain_weights(rows)
        return (w_f + w_r).float(), rows.value(w_f) + remain_loss

    def plan(self, rows: Rows) -> Plan:
        w, loss = self.weights(rows)
        return Plan(targets=self.targets(rows), row_weight=w, loss=loss)

    def describe(self) -> dict:
        return {"name": self.name, "forget_weight": self.forget_weight,
                "remain_weight": self.remain_weight, "remain_anchor": self.remain_anchor,
                "loss_cap": self.loss_cap}

    # -- hooks of the engine --------------------------------------------------------

    needs_nonmember_targets = False  # the engine measures non-members once: fit_targets
    needs_held_codebooks = False  # the engine hands on_check the held tracks' codebook NLLs

    def fit_targets(self, forget_ref: torch.Tensor, nonmember: torch.Tensor) -> None:
        """Fit targets from the forget rows' (float [n]) and the non-members' (float [m])
        mean token NLLs under the starting weights (``needs_nonmember_targets``)."""
        raise NotImplementedError(f"method {self.name!r} fits no targets")

    def set_held_codebooks(self, means: torch.Tensor) -> None:
        """The held tracks' mean token NLL per codebook (float [K]), under the starting
        weights before the first step, then at each check (``needs_held_codebooks``)."""
        raise NotImplementedError(f"method {self.name!r} follows no held tracks")

    def on_check(self, check: Check) -> bool:
        """Called at every check of the stop rule with what it measured; returns whether
        the run may stop at this check."""
        return True

    def saved_targets(self) -> tuple[torch.Tensor, ...] | None:
        """The fitted state a checkpoint keeps (None: nothing fitted)."""
        return None

    def resume(self, saved: tuple[torch.Tensor, ...] | None, step: int,
               device: torch.device) -> None:
        """Restore ``saved_targets()`` of a checkpoint made after ``step`` steps."""


def random_label_targets(rows: Rows) -> torch.Tensor:
    """Targets with forget tokens marked RANDOM_LABEL (the op draws the code)."""
    return torch.where(rows.is_forget, torch.full_like(rows.targets, RANDOM_LABEL), rows.targets)
