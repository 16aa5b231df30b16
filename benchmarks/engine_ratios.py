"""One unlearning step of the engine against a step written as audiocraft's MusicGen solver.

Same LM (MusicGen-small's width: dim 1024, 16 heads, card 2048, K=4; ``--layers`` layers),
same batch (B clips of ``--seconds`` s), same optimizer (AdamW), fp32 parameters:

* reference (audiocraft's solver): inside the step, EnCodec (full-size MusicGen
  architecture, random weights) encodes the audio and a T5-base-sized encoder (random
  weights) embeds the captions; ``compute_predictions`` materialises logits [B, K, T,
  card]; masked per-codebook cross-entropy averaged over K; backward; AdamW.
* engine: codes and T5 outputs precomputed (token shards + condition cache); the LM runs
  to the hidden states and the fused op computes loss and gradients per codebook head
  (GradDiff: ascent on half the rows, descent on the other half); AdamW.

Prints tokens/s (tokens = B x K x T codes), the ratio, the extra peak memory of one step
(peak RSS during the step minus RSS before it, each variant in a fresh subprocess) and
the total peak RSS, and the engine's step time against its FLOP floor: 6 x LM
parameters x sequence positions over the fp32 matmul rate measured in this run. Both
variants also run under bf16 autocast (audiocraft trains that way; this CPU has bf16).

    python benchmarks/engine_ratios.py [--layers 2 --batch 2 --seconds 5 --reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
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


def setup(layers: int, batch: int, seconds: float, variant: str):
    """Model, optimizer and the inputs each variant starts its step from."""
    from noencore.models import load_musicgen, register_t5
    from noencore.models.text import TextEncoder

    t5 = str(base_t5_folder())
    register_t5(t5, 768)
    model = load_musicgen("small-width", with_codec=False, overrides={
        "transformer_lm": {"num_layers": layers},
        "conditioners": {"description": {"t5": {"name": t5}}}})
    model.lm.train()
    opt = torch.optim.AdamW([p for p in model.lm.parameters() if p.requires_grad], lr=1e-5)
    captions = (CAPTIONS * batch)[:batch]
    frames = int(seconds * 50)
    g = torch.Generator().manual_seed(0)
    state = {"model": model, "opt": opt, "captions": captions, "frames": frames}
    if variant.startswith("reference"):
        from noencore.data.codec import load_codec

        state["codec"] = load_codec("musicgen-32khz")
        state["t5"] = TextEncoder(t5)
        state["wav"] = torch.randn(batch, 1, frames * 640, generator=g) * 0.1
    else:
        enc = TextEncoder(t5)
        pairs = enc.encode(captions)
        L = max(e.shape[0] for e, _ in pairs)
        emb = torch.zeros(batch, L, 768)
        emask = torch.zeros(batch, L, dtype=torch.bool)
        for i, (e, m) in enumerate(pairs):
            emb[i, :e.shape[0]], emask[i, :m.shape[0]] = e, m
        del enc
        state.update(codes=torch.randint(0, 2048, (batch, 4, frames), generator=g),
                     emb=emb, emask=emask)
    return state


def reference_step(st: dict, autocast: bool) -> None:
    """audiocraft's solver: codec + T5 in the step, full logits, masked CE over K, AdamW."""
    model, opt = st["model"], st["opt"]
    with torch.no_grad():
        codes = st["codec"].encode(st["wav"])
        enc = st["t5"]
        inputs = enc.tokenizer(st["captions"], return_tensors="pt", padding=True)
        hidden = enc.model(**inputs).last_hidden_state
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        conds = model.condition_tensors(hidden, inputs["attention_mask"].bool())
        out = model.lm.compute_predictions(codes, [], conds)
        loss = 0.0
        for k in range(model.n_q):
            logits_k = out.logits[:, k].reshape(-1, model.card)
            mask_k = out.mask[:, k].reshape(-1)
            loss = loss + F.cross_entropy(logits_k[mask_k].float(),
                                          codes[:, k].reshape(-1)[mask_k])
        (loss / model.n_q).backward()
    opt.step()


def engine_step(st: dict, autocast: bool) -> None:
    """The engine: precomputed codes + T5 outputs, hidden states, fused op, AdamW."""
    from noencore.engine.objective import UnlearnObjective, token_counts
    from noencore.methods import get_method
    from noencore.models.adapter import token_mask

    model, opt = st["model"], st["opt"]
    if "objective" not in st:
        st["objective"] = UnlearnObjective(model, get_method("graddiff"))
    codes = st["codes"]
    mask = torch.ones_like(codes, dtype=torch.bool)
    forget = torch.arange(codes.shape[0]) % 2 == 0
    counts = token_counts(model.lm, mask, forget)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = st["objective"](codes, token_mask(model.lm, mask), forget, st["emb"],
                                  st["emask"], None, counts, 0,
                                  torch.arange(codes.shape[0]))
    loss.backward()
    opt.step()


def run_step(variant: str, st: dict) -> None:
    autocast = variant.endswith("bf16")
    (reference_step if variant.startswith("reference") else engine_step)(st, autocast)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(variant: str, layers: int, batch: int, seconds: float) -> dict:
    """In this (fresh) process: RSS before a step, peak RSS during it (sampled every ms)."""
    st = setup(layers, batch, seconds, variant)
    run_step(variant, st)  # warm-up: optimizer state and allocator pools exist afterwards
    before, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    run_step(variant, st)
    stop.set()
    th.join()
    return {"step_extra_mb": (peak[0] - before) / 2**20, "peak_mb": peak[0] / 2**20}


def matmul_rate() -> float:
    """fp32 FLOP/s of a [4096, 1024] x [1024, 4096] matmul, best of 5."""
    a, b = torch.randn(4096, 1024), torch.randn(1024, 4096)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 1024 * 4096 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.memory_child:
        print(json.dumps(measure_memory(a.memory_child, a.layers, a.batch, a.seconds)))
        return
    variants = ["reference-fp32", "engine-fp32", "reference-bf16", "engine-bf16"]
    states = {v: setup(a.layers, a.batch, a.seconds, v) for v in ("reference", "engine")}
    times = {v: float("inf") for v in variants}
    for v in variants:  # warm-up
        run_step(v, states[v.split("-")[0]])
    for _ in range(a.reps):  # interleaved; the minimum is the least disturbed run
        for v in variants:
            t = time.perf_counter()
            run_step(v, states[v.split("-")[0]])
            times[v] = min(times[v], time.perf_counter() - t)
    model = states["engine"]["model"]
    tokens = a.batch * model.n_q * states["engine"]["frames"]
    positions = a.batch * (states["engine"]["frames"] + model.n_q - 1)
    params = sum(p.numel() for p in model.lm.parameters())
    rate = matmul_rate()
    floor = 6 * params * positions / rate
    mem = {}
    if not a.skip_memory:
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--memory-child", v, "--layers",
                                  str(a.layers), "--batch", str(a.batch), "--seconds",
                                  str(a.seconds)], capture_output=True, text=True, check=True)
            mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"### Engine step vs audiocraft-solver step (dim 1024, {a.layers} layers, "
          f"{params / 1e6:.1f} M LM params, B={a.batch}, {a.seconds:g} s = {tokens} tokens)\n")
    print("| variant | step s | tokens/s | vs reference | step extra MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        ref = times["reference-" + v.split("-")[1]]
        m = mem.get(v, {})
        extra = f"{m['step_extra_mb']:.0f}" if m else "-"
        peak = f"{m['peak_mb']:.0f}" if m else "-"
        print(f"| {v} | {times[v]:.3f} | {tokens / times[v]:.0f} | {ref / times[v]:.2f}x | "
              f"{extra} | {peak} |")
    if mem:
        for prec in ("fp32", "bf16"):
            e, r = mem[f"engine-{prec}"], mem[f"reference-{prec}"]
            print(f"\n{prec}: engine/reference peak RSS {e['peak_mb'] / r['peak_mb']:.2f}x, "
                  f"step extra memory {e['step_extra_mb'] / max(r['step_extra_mb'], 1):.2f}x")
    print(f"\nFLOP floor (6 x {params / 1e6:.1f} M params x {positions} positions at "
          f"{rate / 1e9:.0f} GFLOP/s fp32): {floor:.3f} s; engine fp32 step = "
          f"{times['engine-fp32'] / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
