"""Ratios of the fused CE-with-ascent op against eager PyTorch (and Liger-Kernel on a GPU),
measured in one run, at MusicGen's head shapes.

For each head size (small D=1024, medium D=1536, large D=2048; V=2048, K=4 codebooks,
N = B x T rows per codebook, T=1500 = a 30 s window) and precision:

* linear_ce_ascent forward+backward against eager PyTorch as audiocraft computes its loss
  (materialised logits [B, K, T, V], per-codebook ``F.cross_entropy`` on the valid mask,
  mean over K, autograd), and on a GPU against Liger-Kernel's
  ``LigerFusedLinearCrossEntropyLoss`` (>= 0.8.2; not on CPU, where it has no kernels);
  beside it the FLOP floor (the three GEMMs per codebook timed alone in this run) and the
  extra peak memory of each (CPU: peak RSS of the step minus RSS before it, in a fresh
  subprocess; GPU: peak allocated minus allocated before it).
  Precisions: "autocast" (fp32 parameters under bf16 autocast, audiocraft's training
  setting), "bf16" (bf16 parameters), "fp32".
* ce_ascent on given logits [K x N, V] against eager ``F.cross_entropy`` forward+backward,
  with the memory floor: one device copy of the logits (bytes read + written once); the
  bandwidth fraction is copy time over op time.

Times: CPU, the minimum over interleaved repetitions (the machine is shared: the minimum
is the least disturbed run); GPU, the median (synchronised). Usage::

    python benchmarks/ops_ratios.py [--device cpu|cuda] [--sizes small,medium,large]
                                    [--B 4 --reps 3] [--skip-memory] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

V, K, T = 2048, 4, 1500
SIZES = {"small": 1024, "medium": 1536, "large": 2048}  # MusicGen's model widths
MODES = ("autocast", "bf16", "fp32")
LIGER_MIN = (0, 8, 2)  # earlier versions get per-row gradients wrong with reduction="none"
# Goals: (CPU, from the first op issue) and (GPU).
CPU_GOALS = {"autocast": 0.7, "fp32": 0.95}
GPU_EAGER_GOAL, GPU_LIGER_GOAL, GPU_BANDWIDTH_GOAL = 0.6, 1.0, 0.7


# ----------------------------------------------------------------------------- workloads
def make_inputs(b: int, t: int, mode: str, d: int = SIZES["small"], device: str = "cpu",
                seed: int = 0) -> dict:
    """hidden [B, T, D], K head weights [V, D], codes [B, K, T], mask [B, K, T].

    mode: "fp32", "bf16" (bf16 parameters) or "autocast" (fp32 parameters, bf16 autocast).
    The mask drops the first k frames of codebook k, as MusicGen's delay pattern does.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    hidden = torch.randn(b, t, d, generator=g).to(device, dtype)
    weights = [(torch.randn(V, d, generator=g) / d ** 0.5).to(device, dtype) for _ in range(K)]
    codes = torch.randint(0, V, (b, K, t), generator=g).to(device)
    mask = torch.ones(b, K, t, dtype=torch.bool)
    for k in range(K):
        mask[:, k, :k] = False
    return dict(hidden=hidden, weights=weights, codes=codes, mask=mask.to(device), mode=mode)


def _leaves(inp: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h = inp["hidden"].detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in inp["weights"]]
    return h, ws


def _autocast(inp: dict):
    return torch.autocast(inp["hidden"].device.type, dtype=torch.bfloat16,
                          enabled=inp["mode"] == "autocast")


def baseline_step(inp: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """audiocraft's MusicGen loss: logits [B, K, T, V], per-codebook CE on the mask, mean
    over K; forward+backward. Returns (loss, the head weights holding their gradients)."""
    h, ws = _leaves(inp)
    codes, mask = inp["codes"], inp["mask"]
    with _autocast(inp):
        logits = torch.stack([F.linear(h, w) for w in ws], dim=1)  # [B, K, T, V]
        total = 0.0
        for k in range(K):
            lk = logits[:, k].contiguous().view(-1, V)
            tk = codes[:, k].contiguous().view(-1)
            mk = mask[:, k].contiguous().view(-1)
            total = total + F.cross_entropy(lk[mk], tk[mk])
        (total / K).backward()
    return total.detach() / K, ws


def _liger_loss() -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda hidden, weight, targets: flce(weight, hidden, targets)


def fused_step(inp: dict, impl: str = "noencore") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same loss through a fused linear-CE, one codebook head at a time: noencore's
    ``linear_ce_ascent`` or ("liger") Liger-Kernel's fused linear cross-entropy. Returns
    as :func:`baseline_step`.

    Invalid positions are marked with ignore_index instead of being gathered out, so
    the hidden states are used in place (no [N, D] copies and no scatter in backward).
    """
    if impl == "liger":
        loss_fn = _liger_loss()
    else:
        from noencore.ops import linear_ce_ascent as loss_fn
    h, ws = _leaves(inp)
    codes, mask = inp["codes"], inp["mask"]
    flat = h.view(-1, h.shape[-1])
    with _autocast(inp):
        total = 0.0
        for k in range(K):
            targets = torch.where(mask[:, k], codes[:, k], -100).reshape(-1)
            total = total + loss_fn(flat, ws[k], targets)
        (total / K).backward()
    return total.detach() / K, ws


def gemm_floor(inp: dict, reps: int) -> float:
    """Seconds of the 3 GEMMs per codebook (logits, d hidden, d weight) timed alone."""
    dtype = torch.bfloat16 if inp["mode"] != "fp32" else torch.float32
    n = int(inp["mask"][:, 0].sum())
    d = inp["hidden"].shape[-1]
    h = inp["hidden"].reshape(-1, d)[:n].to(dtype)
    w = inp["weights"][0].to(dtype)
    z = torch.randn(n, V, device=h.device).to(dtype)
    best = interleaved({"logits": lambda: h @ w.T, "dh": lambda: z @ w, "dw": lambda: z.T @ h},
                       reps, h.device)
    return K * sum(best.values())


def ce_inputs(n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, V, generator=g) * 2).to(device, dtype),
            torch.randint(0, V, (n,), generator=g).to(device))


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: torch.device | str,
                setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Time each function, running them in turn (fair under shared load), after one
    warm-up round: the minimum on CPU, the median of synchronised runs on a GPU.
    ``setup`` (untimed) makes each call's argument when given."""
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            arg = setup() if setup else None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(arg) if setup else fn()
            if cuda:
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t0)
            del arg
    pick = statistics.median if cuda else min
    return {k: pick(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step_fn(cfg: dict) -> Callable[[], object]:
    """One step of the workload ``cfg`` describes (for the memory measurements)."""
    if cfg["kind"] == "linear":
        inp = make_inputs(cfg["B"], T, cfg["mode"], cfg["D"], cfg["device"])
        if cfg["variant"] == "eager":
            return lambda: baseline_step(inp)
        return lambda: fused_step(inp, cfg["variant"])
    from noencore.ops import ce_ascent

    logits, targets = ce_inputs(cfg["N"], getattr(torch, cfg["dtype"]), cfg["device"])
    x = logits.requires_grad_() * 1  # a non-leaf, as a head's output
    loss = {"inplace": lambda: ce_ascent(x, targets, inplace=True),
            "noencore": lambda: ce_ascent(x, targets),
            "eager": lambda: F.cross_entropy(x, targets)}[cfg["variant"]]
    return lambda: torch.autograd.grad(loss(), [x])


def _memory_child(spec: str) -> None:
    """Subprocess body: print the extra peak RSS (MiB) of one step."""
    cfg = json.loads(spec)
    torch.set_num_threads(1)  # thread-private buffers alike for both variants
    run = _step_fn(cfg)
    run()  # warm-up: lazy imports, allocator pools
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak-RSS mark
        fh.write("5")
    before = _rss_kib("VmRSS")
    run()
    print(json.dumps({"extra_mib": (_rss_kib("VmHWM") - before) / 1024}))


def extra_peak_mib(**cfg) -> float:
    """Extra peak memory of one step: a fresh subprocess's RSS on CPU, the allocator's
    peak on a GPU (in this process; the step is run once before, as a warm-up)."""
    if cfg["device"] == "cuda":
        run = _step_fn(cfg)
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(cfg)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


# ----------------------------------------------------------------------------- report
def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def liger_missing(device: str) -> str | None:
    """Why Liger-Kernel's row is left out here, or None when it runs."""
    if device != "cuda":
        return "Liger-Kernel runs on GPUs only (Triton kernels, no CPU path)"
    try:
        from importlib.metadata import version

        _liger_loss()
        got = version("liger-kernel")
    except Exception as exc:  # not installed, or it does not import here
        return f"liger-kernel not importable ({exc})"
    parts = tuple(int(p) for p in got.split(".")[:3] if p.isdigit())
    if parts < LIGER_MIN:
        return f"liger-kernel {got} < 0.8.2 (wrong per-row gradients with reduction='none')"
    return None


def agreement(device: str, d: int) -> dict[str, float]:
    """Relative error of each fused implementation's loss and first head-weight gradient
    (the larger) against eager autograd in fp32 on the same bf16 values, on a small batch:
    the rows time the same computation."""
    inp = make_inputs(1, 600, "bf16", d, device, seed=1)
    ref_loss, ref_ws = baseline_step(dict(inp, hidden=inp["hidden"].float(), mode="fp32",
                                          weights=[w.float() for w in inp["weights"]]))
    ref_dw = ref_ws[0].grad.double()
    out = {}
    for impl in ["noencore"] + ([] if liger_missing(device) else ["liger"]):
        loss, ws = fused_step(inp, impl)
        dw = ws[0].grad.double()
        out[impl] = max(float((loss - ref_loss).abs() / ref_loss.abs()),
                        float((dw - ref_dw).norm() / ref_dw.norm()))
    return out


def linear_report(device: str, sizes: list[str], modes: list[str], b: int, reps: int,
                  memory: bool, results: dict) -> list[str]:
    """Markdown rows: one per (size, precision mode); progress goes to stderr."""
    rows = []
    liger_why = liger_missing(device)
    for size in sizes:
        d = SIZES[size]
        for mode in modes:
            inp = make_inputs(b, T, mode, d, device)
            fns = {"eager": lambda inp=inp: baseline_step(inp),
                   "noencore": lambda inp=inp: fused_step(inp)}
            if liger_why is None and mode != "autocast":  # Liger takes bf16 inputs as given
                fns["liger"] = lambda inp=inp: fused_step(inp, "liger")
            times = interleaved(fns, reps, device)
            floor = gemm_floor(inp, reps)
            mem = {}
            if memory:
                for variant in fns:
                    mem[variant] = extra_peak_mib(kind="linear", B=b, D=d, mode=mode,
                                                  device=device, variant=variant)
            rec = {"size": size, "D": d, "mode": mode, "rows_per_codebook": b * T,
                   "seconds": times, "gemm_floor_s": floor, "extra_peak_mib": mem}
            results.setdefault("linear", []).append(rec)
            rows.append(_linear_row(rec, device))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _linear_row(rec: dict, device: str) -> str:
    t = rec["seconds"]
    ours, eager = t["noencore"], t["eager"]
    ratio = ours / eager
    if device == "cuda":
        goal = f"<= {GPU_EAGER_GOAL}: {_mark(ratio <= GPU_EAGER_GOAL)}"
    else:
        tgt = CPU_GOALS.get(rec["mode"])
        goal = "-" if tgt is None else f"<= {tgt}: {_mark(ratio <= tgt)}"
    liger = "-"
    if "liger" in t:
        lr = ours / t["liger"]
        liger = (f"{t['liger'] * 1e3:.2f} ms: **{lr:.3f}** (<= {GPU_LIGER_GOAL}: "
                 f"{_mark(lr <= GPU_LIGER_GOAL)})")
    mem = rec["extra_peak_mib"]
    mem_s = " / ".join(f"{mem[k]:.0f}" for k in ("eager", "noencore", "liger") if k in mem)
    if mem:
        mem_s += f" (ours/eager {mem['noencore'] / max(mem['eager'], 1e-9):.3f})"
    floor = rec["gemm_floor_s"]
    return (f"| {rec['size']} (D={rec['D']}), {rec['mode']} | {eager * 1e3:.2f} ms | "
            f"{ours * 1e3:.2f} ms | **{ratio:.3f}** | {goal} | {liger} | "
            f"{floor * 1e3:.2f} ms: ours {ours / floor:.2f}x, eager {eager / floor:.2f}x | "
            f"{mem_s or '-'} |")


def ce_report(device: str, n: int, reps: int, memory: bool, results: dict) -> list[str]:
    """Markdown rows: ce_ascent (fresh gradient buffer, and in place) per dtype, against
    eager F.cross_entropy and a device copy of the logits (the bandwidth floor)."""
    from noencore.ops import ce_ascent

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets = ce_inputs(n, dtype, device)
        dst = logits.clone()
        fns = {"eager": lambda x, t=targets: torch.autograd.grad(F.cross_entropy(x, t), [x]),
               "noencore": lambda x, t=targets: torch.autograd.grad(ce_ascent(x, t), [x]),
               # x stands for a head's output: overwritten with its gradient
               "inplace": lambda x, t=targets: torch.autograd.grad(
                   ce_ascent(x, t, inplace=True), [x]),
               "copy": lambda _x, dst=dst, src=logits: dst.copy_(src)}
        # A fresh non-leaf copy of the logits per call, untimed, made alike for every
        # variant (as a head's output would be).
        best = interleaved(fns, reps, device,
                           setup=lambda src=logits: src.clone().requires_grad_() * 1)
        copy_s = best["copy"]
        nbytes = 2 * logits.numel() * logits.element_size()
        mem = {}
        if memory:
            mem = {v: extra_peak_mib(kind="ce", N=n, dtype=str(dtype)[6:], device=device,
                                     variant=v) for v in ("eager", "noencore", "inplace")}
        dt = str(dtype)[6:]
        rec = {"dtype": dt, "rows": n, "seconds": best, "copy_gbps": nbytes / copy_s / 1e9,
               "extra_peak_mib": mem}
        results.setdefault("ce", []).append(rec)
        for name, label in (("noencore", "new gradient buffer"), ("inplace", "inplace=True")):
            frac = copy_s / best[name]
            sp = best["eager"] / best[name]
            goal = (f">= {GPU_BANDWIDTH_GOAL:.0%} of copy: {_mark(frac >= GPU_BANDWIDTH_GOAL)}"
                    if device == "cuda" else f">= 5x eager: {_mark(sp >= 5)}")
            mem_s = (f"{mem['eager']:.0f} / {mem[name]:.0f}" if mem else "-")
            rows.append(f"| ce_ascent on logits [{n}, {V}] {dt}, {label} | "
                        f"{best['eager'] * 1e3:.2f} ms | {best[name] * 1e3:.2f} ms | "
                        f"**x{sp:.2f} faster** | copy {copy_s * 1e3:.2f} ms "
                        f"({nbytes / copy_s / 1e9:.0f} GB/s): **{frac:.0%} of copy "
                        f"bandwidth** | {goal} | {mem_s} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="small,medium,large",
                    help="comma-separated head sizes: " + ", ".join(SIZES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--B", type=int, default=4, help="30 s windows per batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-sizes", default="small",
                    help="sizes whose extra peak memory is measured (CPU: a subprocess each)")
    ap.add_argument("--only", choices=["linear", "ce"], default=None)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--require-liger", action="store_true",
                    help="fail (exit 1) instead of leaving out the Liger-Kernel row")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    from noencore.ops import cpp_available, resolve_backend

    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := set(sizes) - set(SIZES):
        ap.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
    modes = [m for m in args.modes.split(",") if m]
    mem_sizes = set() if args.skip_memory else set(args.memory_sizes.split(","))
    liger_why = liger_missing(args.device)
    if args.require_liger and liger_why:
        print(f"--require-liger: {liger_why}", file=sys.stderr)
        return 1
    results: dict = {"device": args.device, "B": args.B, "T": T, "V": V, "K": K,
                     "liger_missing": liger_why}
    if args.device == "cuda":
        torch.cuda.init()
        results["agreement_rel_err"] = agreement(args.device, SIZES[sizes[0]])
    rows = []
    if args.only in (None, "linear"):
        for size in sizes:
            rows += linear_report(args.device, [size], modes, args.B, args.reps,
                                  size in mem_sizes, results)
    ce_rows = []
    if args.only in (None, "ce"):
        ce_rows = ce_report(args.device, args.B * T * K, args.reps, bool(mem_sizes), results)
    probe = torch.zeros(1, device=args.device)
    dev = (torch.cuda.get_device_name(0) if args.device == "cuda"
           else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {dev}, backend {resolve_backend(probe)} (C++ built: "
          f"{cpp_available()}); MusicGen heads V={V} K={K}, B={args.B} x T={T} rows per "
          f"codebook, forward+backward, {'median' if args.device == 'cuda' else 'min'} of "
          f"{args.reps} interleaved runs.\n")
    if rows:
        print("| head, precision | eager | ours (linear_ce_ascent) | ours / eager | goal | "
              "Liger FLCE: ours / Liger | GEMM floor | extra peak MiB (eager / ours"
              f"{'' if liger_why else ' / Liger'}) |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    if ce_rows:
        print("\n| case | eager | ours | speed-up | memory floor | goal | extra peak MiB "
              "(eager / ours) |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(ce_rows))
    if "agreement_rel_err" in results:
        print("\nAgreement with eager fp32 autograd (bf16 inputs; max of loss and dW "
              "relative errors): " + ", ".join(f"{k} {v:.1e}" for k, v in
                                               results["agreement_rel_err"].items()))
    print("\nEager: audiocraft's loss, logits [B, K, T, V] then per-codebook F.cross_entropy "
          "on the valid mask, mean over K (logits: eager F.cross_entropy forward+backward). "
          "Floors: the three GEMMs per codebook timed alone; one copy of [N, V]."
          + (f" Liger-Kernel: not run ({liger_why})." if liger_why else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
