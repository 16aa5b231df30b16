"""C++ CPU backend (``noencore._C``, from ``csrc/``): thin typed wrappers.

Same kernel contract as :mod:`noencore.ops.reference`. Logits are formed ``chunk`` rows
at a time in fp32 (fp32 accumulation and output, also for bf16 inputs); everything
between the GEMMs (max, exp-sum, loss, softmax minus one-hot, scaling, bf16 rounding)
is one OpenMP pass per row in C++. The gradient GEMMs (dh, dW) run in the inputs' dtype.

The build is portable; on x86-64 AVX-512 kernels (and, with avx512_bf16, a bf16 GEMM
with fp32 output) are chosen at run time. :func:`isa` says which path runs;
``NOENCORE_CPU_ISA=portable`` (or ``avx512``) lowers the choice.
"""
from __future__ import annotations

import torch

# Rows per chunk: as many as fit a 16 MiB fp32 logits buffer (2048 rows at V=2048).
# Bigger GEMMs run closer to peak on CPU; the buffer stays far below the [N, V]
# logits the unfused loss materialises.
CHUNK_BYTES = 16 << 20


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a [chunk, vocab] fp32 logits buffer of ``CHUNK_BYTES``."""
    return max(64, CHUNK_BYTES // (max(vocab, 1) * 4))


def _ext():
    import noencore._C as ext  # built by setup.py; dispatch checks cpp_available() first

    return ext


def linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  coef: torch.Tensor, *, ignore_index: int, key: int | None, row_offset: int,
                  cap: float, need_dh: bool, need_dw: bool, chunk: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
    """See :func:`noencore.ops.reference.linear_ce_fwd` (chunk None: :func:`chunk_rows`)."""
    if chunk is None:
        chunk = chunk_rows(weight.shape[0])
    # Outputs are allocated here (not in C++) so that tests can poison them.
    loss = torch.empty(hidden.shape[0], dtype=torch.float32)
    lse = torch.empty(hidden.shape[0], dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    _ext().linear_ce_fwd(hidden.contiguous(), weight.contiguous(),
                         targets.to(torch.int64).contiguous(), coef.to(torch.float32).contiguous(),
                         ignore_index, -1 if key is None else key, row_offset, cap, loss, lse,
                         dh, dw, chunk)
    return loss, lse, dh, dw


def ce_fwd(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
           ignore_index: int, key: int | None, row_offset: int, cap: float,
           grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`noencore.ops.reference.ce_fwd`."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    lse = torch.empty(logits.shape[0], dtype=torch.float32)
    _ext().ce_fwd(logits, targets.to(torch.int64).contiguous(), coef.to(torch.float32).contiguous(),
                  ignore_index, -1 if key is None else key, row_offset, cap, loss, lse, grad)
    return loss, lse


def random_labels(key: int, row_offset: int, n: int, vocab: int) -> torch.Tensor:
    """Labels of global rows [row_offset, row_offset + n) computed in C++ (int64 [n])."""
    return _ext().random_labels(key, row_offset, n, vocab)


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                ignore_index: int, key: int | None, row_offset: int, chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, correct, logp_mean, logp_var), each [N]; fp32 logits; see ``token_stats``."""
    n = hidden.shape[0]
    out = (torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.bool),
           torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32))
    _ext().token_stats(hidden.contiguous(), weight.contiguous(),
                       targets.to(torch.int64).contiguous(), ignore_index,
                       -1 if key is None else key, row_offset, chunk, *out)
    return out


def isa() -> str:
    """The instruction-set path the C++ kernels take now: "portable", "avx512" or
    "avx512_bf16" (what the CPU supports, lowered by ``NOENCORE_CPU_ISA``)."""
    return _ext().isa()
