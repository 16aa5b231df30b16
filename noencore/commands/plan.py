"""``noencore plan``: per-GPU memory of unlearning a MusicGen model at each ZeRO stage."""
from __future__ import annotations

import argparse
import dataclasses
import json

from noencore.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate per-GPU memory at ZeRO stages 0-3 and recommend one",
        description="Estimate the per-GPU memory of unlearning a MusicGen model (weights, gradients, "
                    "AdamW states, activations, loss) at DeepSpeed ZeRO stages 0-3, computed from the "
                    "model's architecture, and recommend the lowest stage that fits.",
    )
    p.add_argument("--model", default="facebook/musicgen-large",
                   help="hub id, short name (small, medium, large, melody, melody-large, stereo-*) "
                        "or a local audiocraft checkpoint folder")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default 1)")
    p.add_argument("--seconds", type=float, default=30.0, help="clip length in seconds (default 30)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--loss", choices=("fused", "materialized"), default="fused",
                   help="fused linear cross-entropy (default) or the full-logits baseline")
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows per block of the fused loss")
    p.add_argument("--offload", action="store_true", help="optimizer states on CPU (ZeRO 1-3)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--text-tokens", type=int, default=64, help="T5 tokens per caption (default 64)")
    p.add_argument("--reserve", type=float, default=2.0,
                   help="fixed per-GPU reserve in GiB: CUDA context, fragmentation, buckets (default 2)")
    p.add_argument("--reference-model", action="store_true",
                   help="a frozen copy of the weights is resident too (NPO, SimNPO)")
    p.add_argument("--fp32-grads", action="store_true",
                   help="count DeepSpeed's fp32 gradient partition too (18 instead of 16 bytes/param)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (bytes) instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore.plan import (
        GIB,
        T5_BASE_DIM,
        T5_BASE_ENCODER_PARAMS,
        format_plan_table,
        get_arch,
        loss_bytes,
        max_batch,
        plan_memory,
    )

    try:
        arch = get_arch(args.model)
        rows = plan_memory(
            arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, batch=args.batch, seconds=args.seconds,
            checkpointing=args.checkpointing, loss=args.loss, chunk_rows=args.chunk_rows,
            offload_optimizer=args.offload, precision=args.precision, text_tokens=args.text_tokens,
            reserve_gib=args.reserve, reference_model=args.reference_model, fp32_grads=args.fp32_grads,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print(json.dumps([{**dataclasses.asdict(r), "total": r.total, "fits": r.fits} for r in rows], indent=1))
        return 0
    seq = arch.sequence_length(args.seconds, args.text_tokens)
    text = (f"T5-base encoder ({T5_BASE_ENCODER_PARAMS / 1e6:.0f}M)" if arch.text_dim == T5_BASE_DIM
            else f"text encoder (width {arch.text_dim})")
    print(f"{arch.name}: {arch.n_params() / 1e6:.1f}M trainable parameters "
          f"(dim {arch.dim}, {arch.num_layers} layers, {arch.num_heads} heads, K={arch.n_q}, V={arch.card}); "
          f"{text} frozen and cached, not resident")
    print(f"{args.gpus} GPU(s) x {args.gpu_mem:g} GiB, micro-batch {args.batch} x {seq} steps "
          f"({args.seconds:g} s), {args.precision}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{args.loss} loss; global batch {args.gpus * args.batch} per step; GiB per GPU:")
    print(format_plan_table(rows))
    fused = loss_bytes(arch, args.batch, seq, loss="fused", chunk_rows=args.chunk_rows)
    full = loss_bytes(arch, args.batch, seq, loss="materialized", chunk_rows=args.chunk_rows)
    print(f"loss memory per GPU: fused {fused / 2**20:.1f} MiB vs materialized logits "
          f"{full / 2**20:.1f} MiB ({full / fused:.1f}x)")
    options = dict(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, seconds=args.seconds,
                   checkpointing=args.checkpointing, loss=args.loss, chunk_rows=args.chunk_rows,
                   offload_optimizer=args.offload, precision=args.precision, text_tokens=args.text_tokens,
                   reserve_gib=args.reserve, reference_model=args.reference_model, fp32_grads=args.fp32_grads)
    largest = ", ".join(f"ZeRO-{r.stage} {max_batch(arch, r.stage, **options)}" for r in rows)
    print(f"largest micro-batch per GPU that fits: {largest}")
    offloaded = max(r.cpu for r in rows)
    if offloaded:
        print(f"host memory for the offloaded optimizer: up to {offloaded / GIB:.2f} GiB per rank")
    return 0
