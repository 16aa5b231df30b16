"""Per-token statistics for evaluation (no grad): NLL, top-1, Min-K%++ moments."""
from __future__ import annotations

from typing import NamedTuple

import torch

from noencore.ops.dispatch import record_backend, resolve_backend
from noencore.ops.random_labels import label_key, resolve_targets


class TokenStats(NamedTuple):
    """Per-row statistics, all [N]; ignored rows hold NaN (floats) / False (correct)."""

    nll: torch.Tensor        # fp32, -log p(t_n)
    correct: torch.Tensor    # bool, argmax_v z_nv == t_n
    logp_mean: torch.Tensor  # fp32, mu_n = sum_v p_v log p_v
    logp_var: torch.Tensor   # fp32, sum_v p_v (log p_v)^2 - mu_n^2


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                ignore_index: int = -100, random_labels: int | None = None,
                row_offset: int = 0, chunk: int = 1024, backend: str = "auto") -> TokenStats:
    """NLL, top-1 correctness and the mean/variance of log-probs under the model's own
    distribution (Min-K%++ uses ``(log p(t) - mu) / sqrt(var)``), per row.

    hidden [N, D] and weight [V, D] (any float dtype; logits computed in fp32), targets
    [N] integer (``ignore_index`` rows -> NaN; RANDOM_LABEL rows as in the op; other
    values raise ValueError for CPU tensors, and give NaN / False on a GPU, where the
    check would synchronise the device). Memory
    is O(chunk x V): logits exist one row chunk at a time. ``backend``: "auto" runs the
    C++ kernel for fp32/bf16 CPU tensors when built, the torch path otherwise (also for
    "triton": there is no Triton kernel for these statistics).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.dim() != 1 or targets.numel() != n:
        raise ValueError(f"targets must be [N]={n}, got shape {tuple(targets.shape)}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if vocab < 1:
        raise ValueError("the vocabulary is empty (V = 0: weight [0, D]); there is no class "
                         "to score")
    key = None if random_labels is None else label_key(random_labels)
    labels = resolve_targets(targets, key, row_offset, vocab, ignore_index)
    if hidden.device.type == "cpu" and bool(((labels < -1) | (labels >= vocab)).any()):
        raise ValueError(f"targets must be in [0, {vocab}), ignore_index or RANDOM_LABEL "
                         "(with random_labels=seed)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    # There is no Triton kernel for these statistics: "triton" (and "auto" on CUDA) run
    # the torch path.
    name = resolve_backend(hidden, "torch" if backend == "triton" else backend)
    record_backend("cpp" if name == "cpp" else "torch")
    if name == "cpp":
        from noencore.ops import cpp

        return TokenStats(*cpp.token_stats(hidden, weight, targets, ignore_index=ignore_index,
                                           key=key, row_offset=row_offset, chunk=chunk))
    w32 = weight.float()
    out = TokenStats(*(torch.empty(n, device=hidden.device, dtype=dt) for dt in
                       (torch.float32, torch.bool, torch.float32, torch.float32)))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logp = torch.log_softmax(hidden[s:e].float() @ w32.T, dim=1)
        lab = labels[s:e]
        valid = (lab >= 0) & (lab < vocab)
        nll = -logp.gather(1, lab.clamp(0, vocab - 1)[:, None])[:, 0]
        p = logp.exp()
        mu = (p * logp).sum(1)
        var = ((p * logp * logp).sum(1) - mu * mu).clamp_min(0)
        nan = torch.full_like(nll, float("nan"))
        out.nll[s:e] = torch.where(valid, nll, nan)
        out.correct[s:e] = valid & (logp.argmax(1) == lab)
        out.logp_mean[s:e] = torch.where(valid, mu, nan)
        out.logp_var[s:e] = torch.where(valid, var, nan)
    return out
