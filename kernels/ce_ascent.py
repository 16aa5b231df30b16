"""Triton backend (CUDA): row kernel with online log-sum-exp, gradient in the forward.

``ce_fwd``: one program per row of the logits, one launch for all rows. When the row
fits one ``BLOCK_V`` block (MusicGen's card of 2048 does) it is read once into
registers: max, sum of exponentials, target logit, then ``coef * (softmax - onehot)``
written from the same registers, so the logits cross memory once, as in a copy. A
longer row is walked in blocks twice: pass 1 keeps a running max and a rescaled running
sum (online log-sum-exp) and picks up the target logit; pass 2 re-reads each block and
writes its gradient (in place over the logits when asked). Softmax math is fp32
whatever the input. Nothing reads a logit after the gradient writes have begun, except
pass 2 its own block: with the gradient written in place, a warp that read a logit
later could read another warp's gradient instead (the one-block path is safe because
its reductions make every warp finish its loads before any store).

``BLOCK_V`` and ``num_warps`` are autotuned on the GPU (``triton.autotune``, keyed on V,
whether gradients are written and the tensors' dtypes; tuned once per key on the first
call, with the gradient buffer restored after each trial because it may be the logits
themselves). Under ``TRITON_INTERPRET=1`` (the CPU test suite) one fixed configuration
runs instead, with no timing.

``linear_ce_fwd``: rows in equal chunks of at most ``DEFAULT_CHUNK`` rows (one chunk for
up to 8192 rows); per chunk fp32 logits come from one cuBLAS GEMM with fp32 accumulation
and fp32 output (bf16/fp16 inputs are not copied to fp32) into a [chunk, V] buffer, one
launch of the row kernel turns them into gradients in the inputs' dtype, and two more
GEMMs in that dtype give dh and dW (dW summed over chunks in fp32). Peak extra memory is
O(chunk x V), never O(N x V). Nothing on this path reads a device value on the host.

Offsets: row offsets are int64 (``row * stride`` passes 2^31 once N x V does); column
offsets stay int32 (they are below V).

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

import os

import torch
import triton
import triton.language as tl

DEFAULT_CHUNK = 8192
_MASK32 = 0xFFFFFFFF
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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


def _row_configs() -> list[triton.Config]:
    """Autotuning candidates for the row kernel; one fixed choice in the interpreter, which
    cannot time kernels (2048 holds MusicGen's card in one block; V=2049 in the tests
    takes the two-pass path)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 2048}, num_warps=4)]
    return [triton.Config({"BLOCK_V": b}, num_warps=w)
            for b in (1024, 2048, 4096, 8192) for w in (4, 8)]


def _prune_blocks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Blocks no wider than the row rounded up to a power of two (a wider one only adds
    masked lanes); a short row gets exactly its own width."""
    width = triton.next_power_of_2(named_args["vocab"])
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= width]
    return kept or [triton.Config({"BLOCK_V": width}, num_warps=4)]


@triton.jit
def _grad_block(z, idx, lse, c, lab, ignored, bad):
    """coef * (softmax - onehot) of one fp32 block; exactly 0 on ignored rows (also over a
    NaN logit, where 0 * NaN would not be), NaN on rows whose label is no class."""
    g = tl.exp(z - lse) * c
    g = tl.where(idx == lab, g - c, g)
    return tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))


@triton.jit
def _store_grad(g_row, idx, g, vocab, G_BF16: tl.constexpr):
    if G_BF16:
        tl.store(g_row + idx, _round_bf16(g), mask=idx < vocab)
    else:
        tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=idx < vocab)


@triton.autotune(configs=_row_configs(), key=["vocab", "HAS_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_blocks}, restore_value=["G"])
@triton.heuristics({"ONE_BLOCK": lambda args: args["vocab"] <= args["BLOCK_V"]})
@triton.jit
def _ce_rows_kernel(Z, G, T, COEF, LOSS, LSE, stride_z, stride_g, vocab, ignore_index, key,
                    row0, cap, mask32, HAS_KEY: tl.constexpr, HAS_GRAD: tl.constexpr,
                    G_BF16: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 before the multiply: N x V may pass 2^31
    z_row = Z + row * stride_z
    t = tl.load(T + row)
    lab = _labels(t, row0 + row, key, vocab, ignore_index, mask32, HAS_KEY)
    ignored = t == ignore_index
    bad = ((lab < 0) | (lab >= vocab)) & (t != ignore_index)  # no class: a NaN row
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        # The whole row in registers, read once (pass 2 below reuses it).
        z_all = tl.load(z_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        zt = tl.sum(tl.where(cols == lab, z_all, 0.0), 0)
        nans = tl.sum((z_all != z_all).to(tl.int32), 0)  # max and the sum need not keep a NaN
        m = tl.max(z_all, 0)
        # Subtract 0 rather than an infinite max (as torch.logsumexp does).
        base = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp(z_all - base), 0)
    else:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        zt = tl.zeros([], tl.float32)
        nans = tl.zeros([], tl.int32)
        for off in range(0, vocab, BLOCK_V):
            idx = off + cols
            z = tl.load(z_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            zt += tl.sum(tl.where(idx == lab, z, 0.0), 0)
            nans += tl.sum((z != z).to(tl.int32), 0)
            m_new = tl.maximum(m, tl.max(z, 0))
            # -inf - -inf would turn the running sum into NaN for good when a row starts
            # with -inf blocks.
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
        if ONE_BLOCK:
            _store_grad(g_row, cols, _grad_block(z_all, cols, lse, c, lab, ignored, bad), vocab,
                        G_BF16)
        else:
            for off in range(0, vocab, BLOCK_V):
                idx = off + cols
                z = tl.load(z_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
                _store_grad(g_row, idx, _grad_block(z, idx, lse, c, lab, ignored, bad), vocab,
                            G_BF16)


@triton.jit
def _random_labels_kernel(OUT, n, key, row0, vocab, mask32, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.full([BLOCK], -2, tl.int64)
    lab = _labels(t, row0 + i, key, vocab, -100, mask32, True)
    tl.store(OUT + i, lab, mask=i < n)


def _rows(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, loss: torch.Tensor,
          lse: torch.Tensor, grad: torch.Tensor | None, *, ignore_index: int, key: int | None,
          row_offset: int, cap: float) -> None:
    """One launch of the row kernel over every row of ``logits`` [n, V] (n >= 1): losses and
    logsumexps into ``loss`` and ``lse`` (contiguous fp32 [n]), gradients into ``grad``."""
    if logits.stride(1) != 1 or (grad is not None and grad.stride(1) != 1):
        raise ValueError("the Triton kernel needs rows with unit column stride")
    g = grad if grad is not None else logits  # unused pointer when HAS_GRAD is False
    _ce_rows_kernel[(logits.shape[0],)](
        logits, g, targets.contiguous(), coef.to(torch.float32).contiguous(), loss, lse,
        logits.stride(0), g.stride(0), logits.shape[1], ignore_index,
        0 if key is None else key, row_offset, float(cap), _MASK32, HAS_KEY=key is not None,
        HAS_GRAD=grad is not None, G_BF16=g.dtype == torch.bfloat16)


def ce_fwd(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, *,
           ignore_index: int, key: int | None, row_offset: int, cap: float,
           grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`noencore.ops.reference.ce_fwd` (logits [N, V], unit column stride)."""
    n = logits.shape[0]
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _rows(logits, targets, coef, loss, lse, grad, ignore_index=ignore_index, key=key,
              row_offset=row_offset, cap=cap)
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
    and into one [rows, V] buffer otherwise; dh in hidden's dtype, dW summed in fp32.
    Per chunk: one logits GEMM, one row-kernel launch, then the dh and dW GEMMs if asked."""
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
        _rows(z, targets[s:e], coef[s:e], loss[s:e], lse[s:e], g, ignore_index=ignore_index,
              key=key, row_offset=row_offset + s, cap=cap)
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
