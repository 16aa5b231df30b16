"""Triton backend (CUDA): row kernel with online log-sum-exp, gradient in the forward.

``ce_fwd``: one program per row of the logits. Pass 1 walks the row in ``BLOCK_V``
blocks keeping a running max and a rescaled running sum (online log-sum-exp), so the
row is never held whole, and picks up the target logit on the way; pass 2 writes
``coef * (softmax - onehot)`` over the same blocks (in place over the logits when
asked). Softmax math is fp32 whatever the input. Nothing reads the logits after pass 2
has begun: with the gradient written in place, a warp that read a logit later could
read another warp's gradient instead (there is no barrier between the passes).

``linear_ce_fwd``: rows in equal chunks; per chunk fp32 logits come from one cuBLAS GEMM
with fp32 accumulation and fp32 output (bf16/fp16 inputs are not copied to fp32) into a
[chunk, V] buffer, the row kernel turns them into gradients in the inputs' dtype, and
two more GEMMs in that dtype give dh and dW (dW summed over chunks in fp32). Peak extra
memory is O(chunk x V), never O(N x V).

Non-finite logits follow torch (NaN in a row: NaN loss and gradient row; a +inf max:
logsumexp = +inf). Targets are not validated on the host for CUDA tensors (that would
synchronise the device): a label outside [0, V) gives a NaN loss and gradient row, and
no access outside the row.

bf16 outputs are rounded to nearest even with integer ops on the fp32 bit pattern:
the Triton interpreter (used by the CPU test suite) truncates in ``.to(tl.bfloat16)``,
real GPUs round; the explicit rounding makes both agree with the other backends.

Kernel contract and random-label hash: see ``noencore/ops/reference.py`` and
``noencore/ops/random_labels.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_CHUNK = 8192
_MASK32 = 0xFFFFFFFF


@triton.jit
def _mul32(x, c_lo, c_hi, mask32):
    # (x * c) mod 2^32 on int64 holding [0, 2^32): 16-bit halves keep products < 2^48.
    lo = x * c_lo
    hi = ((x * c_hi) & 0xFFFF) << 16
    return (lo + hi) & mask32


@triton.jit
def _labels(t, row, key, vocab, ignore_index, mask32, HAS_KEY: tl.constexpr):
    """Effective int64 label: -1 for ignored rows, the hash for RANDOM_LABEL rows."""
    t = t.to(tl.int64)
    lab = tl.where(t == ignore_index, -1, t)
    if HAS_KEY:
        x = (row.to(tl.int64) & mask32) ^ key.to(tl.int64)
        x = x ^ (x >> 16)
        x = _mul32(x, 0xCA6B, 0x85EB, mask32)
        x = x ^ (x >> 13)
        x = _mul32(x, 0xAE35, 0xC2B2, mask32)
        x = x ^ (x >> 16)
        lab = tl.where(t == -2, x % vocab, lab)
    return lab


@triton.jit
def _round_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    # A NaN stays a (quiet) NaN: rounding its payload up could carry into inf or the sign.
    rounded = tl.where(x != x, ((bits >> 16) | 0x40).to(tl.uint16), rounded)
    return rounded.to(tl.bfloat16, bitcast=True)


@triton.jit
def _ce_rows_kernel(Z, G, T, COEF, LOSS, LSE, stride_z, stride_g, vocab, ignore_index, key,
                    row0, cap, mask32, HAS_KEY: tl.constexpr, HAS_GRAD: tl.constexpr,
                    G_BF16: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 before the multiply: N x V may pass 2^31
    z_row = Z + row * stride_z
    t = tl.load(T + row)
    lab = _labels(t, row0 + row, key, vocab, ignore_index, mask32, HAS_KEY)
    ignored = t == ignore_index
    bad = ((lab < 0) | (lab >= vocab)) & (t != ignore_index)  # no class: a NaN row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    zt = tl.zeros([], tl.float32)
    nans = tl.zeros([], tl.int32)
    for off in range(0, vocab, BLOCK_V):
        idx = off + cols
        z = tl.load(z_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        zt += tl.sum(tl.where(idx == lab, z, 0.0), 0)
        nans += tl.sum((z != z).to(tl.int32), 0)  # max and the sum need not keep a NaN
        m_new = tl.maximum(m, tl.max(z, 0))
        # Subtract 0 rather than an infinite max (as torch.logsumexp does): -inf - -inf
        # would turn the running sum into NaN for good when a row starts with -inf blocks.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - base) + tl.sum(tl.exp(z - base), 0)
        m = m_new
    # torch.logsumexp on non-finite rows: NaN with a NaN, else the max itself when it is
    # +-inf (where the running sum holds inf - inf).
    lse = tl.where(tl.abs(m) == float("inf"), m, m + tl.log(s))
    lse = tl.where(nans > 0, float("nan"), lse)
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), lse - zt))
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, tl.where(ignored, float("nan"), lse))
    if HAS_GRAD:
        c = tl.load(COEF + row).to(tl.float32)
        c = tl.where((c < 0) & (loss > cap), 0.0, c)
        g_row = G + row * stride_g
        for off in range(0, vocab, BLOCK_V):
            idx = off + cols
            z = tl.load(z_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            g = tl.exp(z - lse) * c
            g = tl.where(idx == lab, g - c, g)
            # Ignored rows: exactly 0, also over a NaN logit (0 * NaN would not be).
            g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
            if G_BF16:
                tl.store(g_row + idx, _round_bf16(g), mask=idx < vocab)
            else:
                tl.store(g_row + idx, g.to(G.dtype.element_ty), mask=idx < vocab)


@triton.jit
def _random_labels_kernel(OUT, n, key, row0, vocab, mask32, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.full([BLOCK], -2, tl.int64)
    lab = _labels(t, row0 + i, key, vocab, -100, mask32, True)
    tl.store(OUT + i, lab, mask=i < n)


def _block_v(vocab: int) -> int:
    # 2048 covers MusicGen's card in one block; larger vocabularies take the online
    # (multi-block) path, which V=2049 in the tests exercises.
    return min(triton.next_power_of_2(vocab), 2048)


def ce_fwd(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
           ignore_index: int, key: int | None, row_offset: int, cap: float,
           grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`noencore.ops.reference.ce_fwd` (logits [N, V], row-contiguous)."""
    n, vocab = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n == 0:
        return loss, lse
    if logits.stride(1) != 1 or (grad is not None and grad.stride(1) != 1):
        raise ValueError("the Triton kernel needs rows with unit column stride")
    g = grad if grad is not None else logits  # unused pointer when HAS_GRAD is False
    _ce_rows_kernel[(n,)](
        logits, g, targets.contiguous(), coef.to(torch.float32).contiguous(), loss, lse,
        logits.stride(0), g.stride(0), vocab, ignore_index, 0 if key is None else key,
        row_offset, float(cap), _MASK32, HAS_KEY=key is not None, HAS_GRAD=grad is not None,
        G_BF16=g.dtype == torch.bfloat16, BLOCK_V=_block_v(vocab))
    return loss, lse


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (same dtype) with fp32 accumulation and an fp32 result, into ``out`` if given."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:  # cuBLAS reads bf16/fp16 and writes fp32: no fp32 copies of the inputs
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    # CPU tensors (the Triton interpreter in tests): the same numbers from fp32 copies.
    return torch.mm(a.float(), b.float(), out=out)


def linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  coef: torch.Tensor, *, ignore_index: int, key: int | None, row_offset: int,
                  cap: float, need_dh: bool, need_dw: bool, chunk: int = DEFAULT_CHUNK
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
    """See :func:`noencore.ops.reference.linear_ce_fwd`. Logits are fp32 (one [rows, V]
    buffer); gradients are written in hidden's dtype, over the logits when that is fp32
    and into one [rows, V] buffer otherwise; dh in hidden's dtype, dW summed in fp32."""
    n = hidden.shape[0]
    need_grad = need_dh or need_dw
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.empty(weight.shape, device=hidden.device, dtype=torch.float32) if need_dw else None
    if n == 0 and dw is not None:
        dw.zero_()
    # Equal chunks of at most `chunk` rows: no small last GEMM and launch.
    n_chunks = max(1, -(-n // chunk))
    rows = max(1, -(-n // n_chunks))
    vocab = weight.shape[0]
    z_buf = torch.empty(rows, vocab, device=hidden.device, dtype=torch.float32)
    g_buf = z_buf
    if need_grad and hidden.dtype != torch.float32:
        g_buf = torch.empty(rows, vocab, device=hidden.device, dtype=hidden.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e]
        z = _mm_fp32(h, weight.T, out=z_buf[: e - s])
        g = g_buf[: e - s] if need_grad else None
        loss[s:e], lse[s:e] = ce_fwd(z, targets[s:e], coef[s:e], ignore_index=ignore_index,
                                     key=key, row_offset=row_offset + s, cap=cap, grad=g)
        if dh is not None:
            torch.mm(g, weight, out=dh[s:e])
        if dw is not None:
            if s == 0:
                _mm_fp32(g.T, h, out=dw)
            else:
                dw.add_(_mm_fp32(g.T, h))
    return loss, lse, dh, (dw.to(weight.dtype) if dw is not None else None)


def random_labels(key: int, row_offset: int, n: int, vocab: int,
                  device: torch.device | str = "cuda") -> torch.Tensor:
    """Labels of global rows [row_offset, row_offset + n) computed by Triton (int64 [n])."""
    out = torch.empty(n, device=device, dtype=torch.int64)
    block = 1024
    _random_labels_kernel[(triton.cdiv(n, block),)](out, n, key, row_offset, vocab, _MASK32,
                                                    BLOCK=block)
    return out
