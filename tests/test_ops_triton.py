"""The Triton row kernel's GPU pitfalls, checked where the interpreter can check them:
int64 row offsets past 2^31 elements, power-of-two blocks, the autotuning candidates.

On CPU the kernel runs under TRITON_INTERPRET=1 (conftest), on a GPU for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import noencore.ops as ops

pytestmark = pytest.mark.skipif(not ops.triton_available(),
                                reason="triton unavailable (needs a GPU or TRITON_INTERPRET=1)")

# Rows 2^30 + 64 elements apart: the third row starts past 2^31, where an int32 offset
# (row * stride) wraps to a negative address. bf16 keeps the buffer at 4 GiB of address
# space, of which only the three rows are ever touched (a few pages resident on CPU).
_FAR_ROWS = textwrap.dedent("""
    import json, math, sys, torch
    from noencore.ops.dispatch import backend_module
    dev = sys.argv[1]
    V, stride, n = 64, 2**30 + 64, 3
    try:
        buf = torch.empty(stride * (n - 1) + V, dtype=torch.bfloat16, device=dev)
    except (RuntimeError, MemoryError) as exc:
        print(json.dumps({"skip": str(exc)}))
        sys.exit(0)
    z = buf.as_strided((n, V), (stride, 1))
    src = (torch.randn(n, V, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    z.copy_(src)
    t = torch.tensor([1, 5, 63], device=dev)
    coef = torch.ones(n, device=dev)
    kern = backend_module("triton")
    kw = dict(ignore_index=-100, key=None, row_offset=0, cap=math.inf)
    grad = torch.empty(n, V, dtype=torch.bfloat16, device=dev)
    loss, lse = kern.ce_fwd(z, t, coef, grad=grad, **kw)
    loss2, _ = kern.ce_fwd(z, t, coef, grad=z, **kw)  # in place: the far rows written
    print(json.dumps({"loss": loss.tolist(), "lse": lse.tolist(), "loss2": loss2.tolist(),
                      "grad": grad.float().tolist(), "grad2": z.float().tolist()}))
""")


def test_row_offsets_past_2_to_the_31():
    """A logits view whose last row starts past 2^31 elements (N x V > 2^31 in effect):
    the kernel reads and writes the right rows. Run in a subprocess, because an int32
    offset would make it read outside the buffer and crash instead of failing."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.run([sys.executable, "-c", _FAR_ROWS, dev], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {out['skip']}")
    src = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    z = src.double()
    t = torch.tensor([1, 5, 63])
    lse = torch.logsumexp(z, 1)
    loss = lse - z.gather(1, t[:, None])[:, 0]
    grad = torch.softmax(z, 1) - torch.nn.functional.one_hot(t, 64)
    for key in ("loss", "loss2"):
        torch.testing.assert_close(torch.tensor(out[key], dtype=torch.float64), loss,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out["lse"], dtype=torch.float64), lse,
                               rtol=1e-5, atol=1e-5)
    for key in ("grad", "grad2"):  # bf16 gradients
        torch.testing.assert_close(torch.tensor(out[key], dtype=torch.float64), grad,
                                   rtol=1e-2, atol=4e-3)


def test_blocks_are_powers_of_two_no_wider_than_the_row():
    """tl.arange needs a power-of-two width: every candidate and every pruned set has
    one; no block is wider than the row rounded up (extra lanes are only masked work)."""
    import triton

    from noencore.kernels import ce_ascent as tk

    configs = tk._row_configs()
    for vocab in (1, 7, 300, 1024, 2048, 2049, 5000, 32000, 256000):
        kept = tk._prune_blocks(configs, {"vocab": vocab})
        assert kept
        for c in kept:
            b = c.kwargs["BLOCK_V"]
            assert b & (b - 1) == 0 and b <= triton.next_power_of_2(vocab), (vocab, b)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert len(configs) == 1  # the interpreter cannot time candidates
    else:
        widths = {c.kwargs["BLOCK_V"] for c in configs}
        assert len(configs) > 1 and 2048 in widths  # MusicGen's card in one block


def test_autotuning_key_and_restored_buffer():
    """One tuned configuration per V and per pass (loss only, or gradients too); Triton
    adds the tensors' dtypes to the key itself, so bf16 and fp32 rows are tuned apart."""
    from noencore.kernels import ce_ascent as tk

    tuner = tk._ce_rows_kernel
    assert tuner.keys == ["vocab", "HAS_GRAD"]
    assert tuner.restore_value == ["G"]  # in place, G is the logits: trials must not eat them
