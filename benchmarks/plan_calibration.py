"""The memory planner's activation and loss terms against one real unlearning step.

A MusicGen-shaped LM (MusicGen-small's width by default: dim 1024, 16 heads, K=4 codebooks,
card 2048, cross-attention to the text, memory-efficient attention as in the released
checkpoints; ``--layers`` layers) runs one step of the engine's objective
(``UnlearnObjective``: GradDiff rows through the fused op's torch backend, forward and
backward) on the CPU, without and with activation checkpointing per layer. torch's CPU
memory profiler records every tensor allocation and free of the step; the live tensor
memory over what existed before the step (weights and their gradients: the measured step
is the second, as a micro-batch of an accumulation) gives

* the forward peak: the end of the forward, inside the loss;
* the backward peak;

which are printed next to the planner's :func:`noencore.planner.step_memory` for the same
shapes, precision and backend (its ``forward_peak``, ``backward_peak`` and ``peak``; the
peak is the planner's activations + loss columns), with the ratio measured / predicted.

    python benchmarks/plan_calibration.py [--layers 4 --dim 1024 --batch 2 --seconds 5
                                           --text-tokens 16 --precision fp32]
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from noencore.planner import MusicGenArch, StepMemory, step_memory  # noqa: E402

MIB = 2**20
BACKWARD_MARK = "plan_calibration::backward"


@dataclass(frozen=True)
class Measured:
    """Peaks of live tensor memory during one step over what existed before it, bytes."""

    forward_peak: int
    backward_peak: int

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak)


def _live_peaks(prof) -> Measured:
    """Forward and backward peaks of the allocator's running total in a profile whose
    backward ran inside ``record_function(BACKWARD_MARK)``. The CPU reporter counts only
    allocations made while profiling, so its total starts from the step's own zero."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    backward_start = next(n.start_time_ns for n in nodes if n.name == BACKWARD_MARK)
    allocs = sorted((n for n in nodes if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"),
                    key=lambda n: n.start_time_ns)
    base = allocs[0].extra_fields.total_allocated - allocs[0].extra_fields.alloc_size
    fwd = [a.extra_fields.total_allocated - base for a in allocs if a.start_time_ns < backward_start]
    bwd = [a.extra_fields.total_allocated - base for a in allocs if a.start_time_ns >= backward_start]
    return Measured(forward_peak=max(fwd), backward_peak=max(bwd))


def calibration_lm(layers: int, dim: int, heads: int):
    """The LM of ``load_musicgen("small-width")`` with the given sizes and the released
    checkpoints' memory-efficient attention (the named config's default keeps S x S scores)."""
    from noencore.models import load_musicgen

    over = {"transformer_lm": {"num_layers": layers, "dim": dim, "num_heads": heads, "memory_efficient": True}}
    return load_musicgen("small-width", with_codec=False, overrides=over)


def measure(model, *, batch: int, frames: int, text_tokens: int, checkpointing: bool,
            dtype: torch.dtype = torch.float32) -> Measured:
    """Peaks of one GradDiff step of ``model`` (a ``MusicGenModel``, cast to ``dtype``) on
    ``batch`` windows of ``frames`` frames with ``text_tokens`` condition tokens each."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from noencore.engine.objective import UnlearnObjective, token_counts
    from noencore.methods import get_method
    from noencore.models.adapter import token_mask

    lm = model.lm.to(dtype)
    lm.transformer.checkpointing = "torch" if checkpointing else "none"
    proj = lm.condition_provider.conditioners[model.text_attribute].output_proj
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.card, (batch, model.n_q, frames), generator=gen)
    mask = token_mask(lm, torch.ones_like(codes, dtype=torch.bool))
    forget = torch.arange(batch) % 2 == 0
    embeds = torch.randn(batch, text_tokens, proj.in_features, generator=gen).to(dtype)
    embeds_mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    objective = UnlearnObjective(model, get_method("graddiff"), backend="torch").train()
    counts = token_counts(lm, mask, forget)

    def step(mark: bool) -> None:
        loss, _ = objective(codes, mask, forget, embeds, embeds_mask, None, counts, 1,
                            torch.arange(codes.shape[0]))
        if mark:
            with record_function(BACKWARD_MARK):
                loss.backward()
        else:
            loss.backward()

    step(False)  # gradients and lazily built state exist before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(True)
    return _live_peaks(prof)


def arch_of(model) -> MusicGenArch:
    """The planner's description of ``model``'s LM (text width from its projection)."""
    lm = model.lm
    proj = lm.condition_provider.conditioners[model.text_attribute].output_proj
    layer = lm.transformer.layers[0]
    return MusicGenArch("calibration", dim=proj.out_features, num_layers=len(lm.transformer.layers),
                        num_heads=layer.self_attn.num_heads, hidden_scale=layer.linear1.out_features
                        // proj.out_features, n_q=model.n_q, card=model.card, text_dim=proj.in_features)


def rows(predicted: StepMemory, measured: Measured) -> list[tuple[str, int, int]]:
    """(term, predicted, measured) of one checkpointing setting."""
    return [("forward peak (saved + loss)", predicted.forward_peak, measured.forward_peak),
            ("backward peak (saved + working set)", predicted.backward_peak, measured.backward_peak),
            ("step peak (activations + loss)", predicted.peak, measured.peak)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch (windows)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    dtype, act_bytes = (torch.float32, 4) if args.precision == "fp32" else (torch.bfloat16, 2)
    model = calibration_lm(args.layers, args.dim, args.heads)
    arch = arch_of(model)
    frames = round(args.seconds * arch.frame_rate)
    print(f"LM dim {arch.dim}, {arch.num_layers} layers, {arch.num_heads} heads, K={arch.n_q}, V={arch.card}; "
          f"micro-batch {args.batch} x {frames} frames, {args.text_tokens} text tokens, {args.precision}, "
          f"fused op backend torch; MiB\n")
    print("| checkpointing | term | predicted | measured | measured / predicted |")
    print("|---|---|---:|---:|---:|")
    peaks = {}
    for checkpointing in (False, True):
        predicted = step_memory(arch, args.batch, frames / arch.frame_rate, text_tokens=args.text_tokens,
                                checkpointing=checkpointing, act_bytes=act_bytes, backend="torch")
        measured = measure(model, batch=args.batch, frames=frames, text_tokens=args.text_tokens,
                           checkpointing=checkpointing, dtype=dtype)
        peaks[checkpointing] = (predicted.peak, measured.peak)
        for term, p, m in rows(predicted, measured):
            print(f"| {'on' if checkpointing else 'off'} | {term} | {p / MIB:.1f} | {m / MIB:.1f} | {m / p:.3f} |")
    p_saved, m_saved = (peaks[False][i] - peaks[True][i] for i in (0, 1))
    print(f"| | checkpointing saves (step peak off - on) | {p_saved / MIB:.1f} | {m_saved / MIB:.1f} | "
          f"{m_saved / p_saved:.3f} |")


if __name__ == "__main__":
    main()
