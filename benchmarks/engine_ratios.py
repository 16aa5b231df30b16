"""One unlearning step of the engine against audiocraft's MusicGen solver step, in one run.

Same LM (MusicGen-small's width unless ``--width``: dim 1024, 16 heads, card 2048, K=4;
``--layers`` layers), same batch (B windows of ``--seconds`` s, the same codes and captions), same
optimizer (AdamW, gradient norm clipped at 1.0 as audiocraft's MusicGen solver config
and the engine do), fp32 parameters, fp32 and bf16 autocast:

* cached (the baseline a careful audiocraft user runs): ``MusicGenSolver.run_step`` with
  its token cache (``cache.path``: no codec in the step). As the solver does it: the
  captions become ``ConditioningAttributes``, pass classifier-free-guidance and attribute
  dropout, are tokenized, and the condition provider runs the T5 conditioner (a random
  encoder of T5-base's size, so nothing downloads) and its projection inside the step;
  ``compute_predictions`` materialises logits [B, K, T, card]; per-codebook
  cross-entropy on the valid mask, averaged over K (``_compute_cross_entropy``);
  backward; clip; AdamW; the finiteness check.
* codec (the old baseline, kept as a second row): the same step with EnCodec (MusicGen's
  32 kHz architecture, random weights) encoding the audio inside the step, as the solver
  does without a cache.
* engine: ``UnlearnObjective`` (GradDiff: ascent on half the rows, descent on the other
  half) on the cached codes and cached T5 outputs: the LM to the hidden states, the fused
  op per codebook head; backward; clip; AdamW, as ``noencore.unlearn`` steps.
* compiled: the engine's step with ``--compile``'s transformer block
  (``noencore.models.block``: one function with torch's scaled-dot-product attention,
  compiled once by ``torch.compile`` for every layer); the compile (forward and backward,
  fp32 and bf16 autocast) runs in the set-up, and its seconds are printed apart.

Prints tokens/s (tokens = B x K x T codes) and the ratio to the cached solver step,
the peak memory of a step (CPU: peak RSS of a fresh process, sampled every ms; GPU:
peak allocated) and its extra over the memory before the step, and each step against
its FLOP floor: the matmul FLOPs of one LM forward+backward (torch's FLOP counter on the
LM alone, without T5 or the codec; attention products are not counted by it on CPU),
over the matmul rate of this machine in that precision, measured in this run. Then the
model-FLOPs utilisation of each step: those FLOPs / (step time x the peak FLOP/s of its
precision), with the peak it assumed (a GPU's datasheet figure, ``PEAKS``; elsewhere the
measured matmul rate). ``--width medium``: MusicGen-medium's width (1536, 24 heads).

    python benchmarks/engine_ratios.py [--layers 2 --batch 2 --seconds 30 --reps 3]
                                       [--width small|medium]
                                       [--device cpu|cuda] [--variants ...] [--json f]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CAPTIONS = ["an energetic rock song with electric guitar", "a calm piano piece, soft strings",
            "jazz saxophone solo over walking bass", "lofi hip hop beat with vinyl crackle"]
BASELINES = ("cached", "codec")
VARIANTS = tuple(f"{kind}-{prec}" for prec in ("fp32", "bf16")
                 for kind in ("cached", "engine", "compiled", "codec"))
ENGINES = ("engine", "compiled")  # the engine's step: eager, and with --compile's block
GRAD_CLIP = 1.0  # audiocraft's solver/musicgen/default.yaml optim.max_norm; unlearn()'s default
# Goals against the cached solver step.
SPEED_GOAL, MEMORY_GOAL, FLOOR_GOAL = 1.5, 0.8, 1.2


def base_t5_folder() -> Path:
    """A random encoder of T5-base's size (d_model 768, 12 layers) with the tiny tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from noencore.models.text import tiny_t5_folder

    tiny = tiny_t5_folder()
    folder = tiny.parent / "bench-t5-base-size"
    if not (folder / "config.json").exists():
        import shutil

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tiny, tmp)
        cfg = T5Config(vocab_size=T5Config.from_pretrained(tiny).vocab_size, d_model=768,
                       d_kv=64, d_ff=3072, num_layers=12, num_heads=12, dropout_rate=0.0,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        torch.manual_seed(0)
        T5EncoderModel(cfg).save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


WIDTHS = {"small": "small-width", "medium": "medium-width"}  # --width: MusicGen's sizes


def setup(layers: int, batch: int, seconds: float, kind: str, device: str = "cpu",
          width: str = "small") -> dict:
    """Model, optimizer and the inputs a step of ``kind`` (cached, codec, engine) starts
    from; every kind gets the same codes (seed 0) and captions. ``width``: MusicGen-small's
    (1024, 16 heads) or MusicGen-medium's (1536, 24 heads)."""
    from noencore.models import load_musicgen, register_t5

    t5 = str(base_t5_folder())
    register_t5(t5, 768)
    model = load_musicgen(WIDTHS[width], device=device, with_codec=False, overrides={
        "transformer_lm": {"num_layers": layers},
        "conditioners": {"description": {"t5": {"name": t5}}}})
    model.lm.train()
    cond = model.lm.condition_provider.conditioners[model.text_attribute]
    if kind != "engine":
        # The conditioner keeps T5 outside its submodules (never trained or saved), so
        # moving the LM leaves it behind: the solver runs it on the device, as audiocraft
        # builds it there. (The engine reads T5's outputs from its cache instead.)
        cond.t5.to(device)
        cond.device = device
    opt = torch.optim.AdamW([p for p in model.lm.parameters() if p.requires_grad], lr=1e-5)
    frames = int(seconds * 50)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.card, (batch, model.n_q, frames), generator=g).to(device)
    st = {"model": model, "opt": opt, "captions": (CAPTIONS * batch)[:batch],
          "frames": frames, "codes": codes, "device": device}
    if kind == "codec":
        from noencore.data.codec import load_codec

        st["codec"] = load_codec("musicgen-32khz", device)
        st["wav"] = (torch.randn(batch, 1, frames * 640, generator=g) * 0.1).to(device)
    elif kind in ENGINES:  # the condition cache: T5 outputs computed once, before training
        from noencore.engine.objective import UnlearnObjective
        from noencore.methods import get_method

        with torch.no_grad():
            tok = cond.tokenize(st["captions"])
            st["emb"] = cond.t5(**tok).last_hidden_state.to(device)
            st["emask"] = tok["attention_mask"].bool().to(device)
        st["objective"] = UnlearnObjective(model, get_method("graddiff"))
    if kind == "compiled":
        from noencore.models.block import install, warm_up_inputs

        fused = install(model.lm, compile=True)
        x, cond_x = warm_up_inputs(model.lm, batch, frames, device, torch.float32)
        st["compile_s"] = 0.0
        for autocast in (False, True):
            with _autocast(st, autocast):
                fused.warm_up(x, cond_x)
            if not fused.compiled:
                raise RuntimeError(f"the block did not compile: {fused.failed}")
            st["compile_s"] += fused.compile_s
    return st


def _autocast(st: dict, on: bool):
    return torch.autocast(st["device"], dtype=torch.bfloat16, enabled=on)


def _update(st: dict, loss: torch.Tensor) -> None:
    """backward, clip, AdamW, zero the gradients; then the solver's finiteness check."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st["model"].lm.parameters(), GRAD_CLIP)
    st["opt"].step()
    st["opt"].zero_grad(set_to_none=True)
    if not loss.isfinite().all():
        raise RuntimeError("the benchmark's model diverged")


def solver_step(st: dict, autocast: bool) -> None:
    """audiocraft's ``MusicGenSolver.run_step`` on a training batch: tokens from the cache
    (or, with a codec in ``st``, encoded in the step), conditions as the solver computes
    them, full logits, per-codebook masked cross-entropy averaged over K, the update."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = st["model"].lm
    attr = st["model"].text_attribute
    if "codec" in st:
        with torch.no_grad():
            codes = st["codec"].encode(st["wav"])
    else:
        codes = st["codes"]
    attributes = [ConditioningAttributes(text={attr: c}) for c in st["captions"]]
    attributes = lm.att_dropout(lm.cfg_dropout(attributes))
    tokenized = lm.condition_provider.tokenize(attributes)
    with _autocast(st, autocast):
        conditions = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], conditions)
        mask = torch.ones_like(codes, dtype=torch.bool) & out.mask
        ce = torch.zeros([], device=codes.device)
        for k in range(codes.shape[1]):
            logits_k = out.logits[:, k].contiguous().view(-1, out.logits.size(-1))
            targets_k = codes[:, k].contiguous().view(-1)
            mask_k = mask[:, k].contiguous().view(-1)
            ce += F.cross_entropy(logits_k[mask_k], targets_k[mask_k])
        loss = ce / codes.shape[1]
    _update(st, loss)


def engine_step(st: dict, autocast: bool) -> None:
    """The engine's step (``noencore.unlearn`` in one process): cached codes and T5
    outputs, the objective (LM to the hidden states, fused op per head), the update. The
    token mask, counts and layout (``counted_layout``: the batch cut after its last counted
    frame, the heads given the counted positions) are computed on the host, as the engine's
    loop does before moving a batch to its device. ``st["lengths"]`` (optional): each
    row's real frames (the rest padding); ``st["layout"] == "dense"``: every position a
    head row and no cut, the layout before the counted one (for comparison)."""
    from noencore.engine.objective import counted_layout, token_counts
    from noencore.models.adapter import token_mask

    codes = st["codes"]
    lm = st["model"].lm
    B, K, T = codes.shape
    lengths = st.get("lengths", torch.full((B,), T))
    real = (torch.arange(T)[None, :] < lengths[:, None])[:, None, :].expand(B, K, T)
    host_mask = token_mask(lm, real.contiguous())
    forget = torch.arange(B) % 2 == 0
    counts = token_counts(lm, host_mask, forget).to(codes.device)
    positions, window = None, T  # dense: the objective makes every position a row
    if st.get("layout") != "dense":
        codes, host_mask, (index, sizes), window = counted_layout(lm, codes, host_mask)
        positions = (index.to(codes.device), sizes)
    mask, forget = host_mask.to(codes.device), forget.to(codes.device)
    with _autocast(st, autocast):
        loss, _ = st["objective"](codes, mask, forget, st["emb"], st["emask"], None, counts, 0,
                                  torch.arange(B, device=codes.device), None, positions,
                                  window)
    _update(st, loss)


def run_step(variant: str, st: dict) -> None:
    kind, prec = variant.split("-")
    (engine_step if kind in ENGINES else solver_step)(st, prec == "bf16")
    if st["device"] == "cuda":
        torch.cuda.synchronize()


def lm_flops(st: dict) -> float:
    """Matmul FLOPs of one LM forward+backward on the batch (logits, per-codebook CE), as
    torch's FLOP counter sees them: the work any training step of this LM must do."""
    from torch.utils.flop_counter import FlopCounterMode

    model, codes = st["model"], st["codes"]
    emb = torch.zeros(codes.shape[0], 8, 768, device=codes.device)
    with FlopCounterMode(display=False) as counter:
        out = model.lm.compute_predictions(codes, [], model.condition_tensors(
            emb, torch.ones(emb.shape[:2], dtype=torch.bool, device=codes.device)))
        loss = sum(F.cross_entropy(out.logits[:, k][out.mask[:, k]], codes[:, k][out.mask[:, k]])
                   for k in range(codes.shape[1]))
        loss.backward()
    model.lm.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large matmul in ``dtype`` on ``device``, best (CPU) or median (GPU) of 5."""
    n = 8192 if device == "cuda" else 4096
    a = torch.randn(n, 1024, device=device).to(dtype)
    b = torch.randn(1024, n, device=device).to(dtype)
    times = []
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    best = statistics.median(times[1:]) if device == "cuda" else min(times[1:])
    return 2 * n * 1024 * n / best


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best_step_times(states: dict[str, dict], reps: int) -> dict[str, float]:
    """The fastest of ``reps`` engine steps (fp32) of each set-up in ``states``, the set-ups
    interleaved in this process after one warm-up step each: the machine's load moves
    between subprocesses, and the minimum is the least disturbed run."""
    best = dict.fromkeys(states, float("inf"))
    for st in states.values():
        engine_step(st, False)
    for _ in range(reps):
        for v, st in states.items():
            t = time.perf_counter()
            engine_step(st, False)
            best[v] = min(best[v], time.perf_counter() - t)
    return best


def peak_rss(fn) -> tuple[int, int]:
    """(RSS before, peak RSS while ``fn()`` runs), in bytes, sampled every millisecond."""
    before, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return before, peak[0]


def step_memory(variant: str, st: dict) -> dict:
    """Peak memory of one step and its extra over the memory before it, in MB (after a
    warm-up step, so optimizer state and allocator pools exist): CPU, RSS sampled every
    ms in this process (run it fresh); GPU, the allocator's peak."""
    run_step(variant, st)
    if st["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_step(variant, st)
        peak = torch.cuda.max_memory_allocated()
        return {"step_extra_mb": (peak - before) / 2**20, "peak_mb": peak / 2**20}
    before, peak = peak_rss(lambda: run_step(variant, st))
    return {"step_extra_mb": (peak - before) / 2**20, "peak_mb": peak / 2**20}


def memory_in_children(script: str, variants: list[str], a: argparse.Namespace
                       ) -> dict[str, dict]:
    """Each variant's ``script --memory-child VARIANT`` (same layers, batch and seconds) in
    a fresh process: its last stdout line, JSON. Freed blocks go back to the system at
    once, so that the peak of the measured step is not hidden in pools the warm-up step
    left behind."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = {}
    for v in variants:
        proc = subprocess.run([sys.executable, script, "--memory-child", v, "--layers",
                               str(a.layers), "--batch", str(a.batch), "--seconds",
                               str(a.seconds), *(("--width", a.width) if "width" in a else ())],
                              capture_output=True, text=True, check=True, env=env)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def memory(variants: list[str], a: argparse.Namespace) -> dict[str, dict]:
    """:func:`step_memory` of each variant with only its own model in memory: CPU, in a
    fresh process each; GPU, one set-up per kind (the allocator's peak needs no fresh
    process)."""
    if a.device != "cuda":
        return memory_in_children(__file__, variants, a)
    out = {}
    for kind in sorted({v.split("-")[0] for v in variants}):
        st = setup(a.layers, a.batch, a.seconds, kind, a.device)
        for v in variants:
            if v.startswith(kind + "-"):
                out[v] = step_memory(v, st)
        del st
        torch.cuda.empty_cache()
    return out


# Dense peak FLOP/s by GPU name (vendors' datasheets, without sparsity): (name contains,
# bf16 tensor cores, fp32 without tensor cores: torch's fp32 matmuls do not use TF32 by
# default). The first match wins: the more specific names come first.
PEAKS = (("H200", 989e12, 67e12), ("H100 NVL", 835e12, 60e12), ("H100 PCIe", 756e12, 51e12),
         ("H100", 989e12, 67e12), ("A100", 312e12, 19.5e12))


def assumed_peak(device: str, rates: dict[str, float]) -> tuple[dict[str, float], str]:
    """The peak FLOP/s per precision that model-FLOPs utilisation divides by, and where it
    comes from: the datasheet's for a GPU in ``PEAKS``, else the matmul rate measured in
    this run (a CPU, or an unknown GPU)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, bf16, fp32 in PEAKS:
            if key in name:
                return {"bf16": bf16, "fp32": fp32}, f"{name}: {key} datasheet, dense"
    return dict(rates), "the matmul rate measured in this run"


def mfu(times: dict[str, float], flops: float, peaks: dict[str, float]) -> dict[str, float]:
    """Model-FLOPs utilisation of each variant: the LM's forward+backward matmul FLOPs per
    step / (step seconds x the peak of its precision)."""
    return {v: flops / (t * peaks[v.split("-")[1]]) for v, t in times.items()}


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(a: argparse.Namespace, times: dict, mem: dict, flops: float, rates: dict,
           tokens: int, params: float, compile_s: float | None = None,
           peaks: tuple[dict[str, float], str] | None = None) -> list[str]:
    """The Markdown table and the goal lines."""
    dim, heads = {"small": (1024, 16), "medium": (1536, 24)}[getattr(a, "width", "small")]
    lines = [f"### Engine step vs audiocraft's MusicGen solver step ({a.device}; dim {dim}, "
             f"{heads} heads, {a.layers} layers, {params / 1e6:.1f} M LM params; B={a.batch} x "
             f"{a.seconds:g} s = {tokens} tokens)\n",
             "| variant | step s | tokens/s | vs cached solver | FLOP floor s | step / floor | "
             "peak MB | step extra MB |", "|---|---|---|---|---|---|---|---|"]
    for v in times:
        prec = v.split("-")[1]
        floor = flops / rates[prec]
        ref = times.get(f"cached-{prec}")
        m = mem.get(v, {})
        lines.append(f"| {v} | {times[v]:.3f} | {tokens / times[v]:.0f} | "
                     f"{f'{ref / times[v]:.2f}x' if ref else '-'} | {floor:.3f} | "
                     f"{times[v] / floor:.2f}x | {m.get('peak_mb', float('nan')):.0f} | "
                     f"{m.get('step_extra_mb', float('nan')):.0f} |")
    lines.append("")
    for prec, kind in [(p, k) for p in ("fp32", "bf16") for k in ENGINES]:
        e, c = f"{kind}-{prec}", f"cached-{prec}"
        if e not in times or c not in times:
            continue
        sp = times[c] / times[e]
        line = f"- {prec}: {kind} {sp:.2f}x the cached solver's tokens/s (>= {SPEED_GOAL}: " \
               f"{_mark(sp >= SPEED_GOAL)})"
        if e in mem and c in mem:
            r = mem[e]["peak_mb"] / mem[c]["peak_mb"]
            x = mem[e]["step_extra_mb"] / max(mem[c]["step_extra_mb"], 1e-9)
            line += (f"; peak memory {r:.2f}x (<= {MEMORY_GOAL}: {_mark(r <= MEMORY_GOAL)}), "
                     f"step extra memory {x:.2f}x")
        if prec == "fp32":
            fl = times[e] / (flops / rates[prec])
            line += f"; {kind} step {fl:.2f}x its FLOP floor (<= {FLOOR_GOAL}: " \
                    f"{_mark(fl <= FLOOR_GOAL)})"
        if f"codec-{prec}" in times:
            line += f"; vs the codec-in-step solver {times[f'codec-{prec}'] / times[e]:.2f}x"
        lines.append(line)
    if compile_s is not None:
        lines.append(f"- compiled: the transformer block compiled in {compile_s:.1f} s "
                     "(forward and backward, fp32 and bf16; once per process, torch's cache "
                     "shortens it in the next), not in the step times")
    if peaks is not None:
        util = mfu(times, flops, peaks[0])
        lines.append("- model-FLOPs utilisation: " + "; ".join(
            f"{v} {u:.1%} of {peaks[0][v.split('-')[1]] / 1e12:.1f} TFLOP/s"
            for v, u in util.items()) + f" (peak: {peaks[1]})")
    lines.append(f"\nFLOP floor: {flops / 1e9:.1f} GFLOP of matmuls per LM forward+backward "
                 f"(torch's counter) at {rates['fp32'] / 1e9:.0f} GFLOP/s fp32, "
                 f"{rates['bf16'] / 1e9:.0f} GFLOP/s bf16 (a large matmul, this run).")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", choices=sorted(WIDTHS), default="small",
                    help="MusicGen-small's width (1024) or MusicGen-medium's (1536)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--codec-reps", type=int, default=1,
                    help="timed steps of the codec-in-step rows (the slowest by far)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if a.memory_child:
        st = setup(a.layers, a.batch, a.seconds, a.memory_child.split("-")[0], a.device,
                   a.width)
        print(json.dumps(step_memory(a.memory_child, st)))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}")
    kinds = {v.split("-")[0] for v in variants}
    states = {k: setup(a.layers, a.batch, a.seconds, k, a.device, a.width)
              for k in sorted(kinds)}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(a.reps + 1):  # interleaved, after a warm-up round
        for v in variants:
            if v.startswith("codec-") and rep > a.codec_reps:
                continue
            t = time.perf_counter()
            run_step(v, states[v.split("-")[0]])
            if rep:
                samples[v].append(time.perf_counter() - t)
    pick = statistics.median if a.device == "cuda" else min  # CPU: the least disturbed run
    times = {v: pick(s) for v, s in samples.items()}
    compile_s = states["compiled"]["compile_s"] if "compiled" in states else None
    st = next(iter(states.values()))
    model = st["model"]
    tokens = a.batch * model.n_q * st["frames"]
    params = sum(p.numel() for p in model.lm.parameters())
    flops = lm_flops(st)
    rates = {"fp32": matmul_rate(a.device, torch.float32),
             "bf16": matmul_rate(a.device, torch.bfloat16)}
    del states, st, model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    peaks = assumed_peak(a.device, rates)
    mem = {} if a.skip_memory else memory(variants, a)
    print("\n".join(report(a, times, mem, flops, rates, tokens, params, compile_s, peaks)))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": a.device, "width": a.width, "layers": a.layers,
                       "batch": a.batch, "seconds": a.seconds, "tokens": tokens,
                       "step_s": times, "memory_mb": mem, "lm_flops": flops,
                       "matmul_flops_per_s": rates, "compile_s": compile_s,
                       "peak_flops_per_s": peaks[0], "peak_source": peaks[1],
                       "mfu": mfu(times, flops, peaks[0])},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
