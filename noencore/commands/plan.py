"""``noencore plan``: which ZeRO stage, micro-batch, accumulation and checkpointing fit a
MusicGen model on G GPUs, and the memory per GPU (or one micro-batch's per-stage table)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from noencore.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="which ZeRO stage, micro-batch, accumulation and checkpointing fit, and the memory per GPU",
        description="Answer which DeepSpeed ZeRO stage, micro-batch, gradient accumulation and activation "
                    "checkpointing fit unlearning a MusicGen model on the given GPUs, fastest first, with "
                    "the expected memory per GPU (weights, gradients, AdamW states, activations, loss, "
                    "reduction buckets) computed from the model's architecture, and the `noencore unlearn` "
                    "flags of each. With --micro-batch (or --accumulation), print instead the per-stage "
                    "table of that one configuration.",
    )
    p.add_argument("--model", default="facebook/musicgen-large",
                   help="hub id, short name (small, medium, large, melody, melody-large, stereo-*) "
                        "or a local audiocraft checkpoint folder")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--gpu-memory", "--gpu-mem", dest="gpu_memory", default="80",
                   help="memory of one GPU: 80GB, 80GiB, 81920MiB, or a bare number of GiB (default 80); "
                        "GB counts in 1024s, as GPU memory is labelled (an 80GB A100/H100 holds 80 GiB)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch: windows per optimizer step, all GPUs together, as `noencore "
                        "unlearn --batch-size` (default 64)")
    p.add_argument("--seconds", type=float, default=30.0, help="window length in seconds (default 30)")
    p.add_argument("--micro-batch", "--batch", dest="micro_batch", type=int, default=None,
                   help="plan this micro-batch per GPU only: print the per-stage table")
    p.add_argument("--accumulation", type=int, default=None,
                   help="plan this many accumulation steps only (micro-batch = batch-size / (gpus x "
                        "accumulation)): print the per-stage table")
    p.add_argument("--checkpointing", action="store_true",
                   help="per-stage table: activation checkpointing per layer (the answer searches both)")
    p.add_argument("--offload-optimizer", "--offload", dest="offload", action="store_true",
                   help="per-stage table: optimizer states on CPU, ZeRO 1-3 (the answer uses offload only "
                        "when nothing fits without it)")
    p.add_argument("--stop-rule", action="store_true",
                   help="count the copy of the fp32 master weights the membership-inference stop rule "
                        "keeps (unlearn --stop-nonmembers)")
    p.add_argument("--loss", choices=("fused", "materialized"), default="fused",
                   help="fused linear cross-entropy (default) or the full-logits baseline")
    p.add_argument("--backend", choices=("triton", "cpp", "torch"), default="triton",
                   help="the fused op's backend (default triton, the GPU one)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per block of logits of the fused op (default: the backend's)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--text-tokens", type=int, default=64, help="T5 tokens per caption (default 64)")
    p.add_argument("--reserve", type=float, default=2.0,
                   help="fixed per-GPU reserve in GiB: CUDA context, NCCL, fragmentation (default 2)")
    p.add_argument("--fp32-grads", action="store_true",
                   help="count the fp32 gradient partition of the update as resident through the step, as "
                        "DeepSpeed's estimators do (by default it is counted at the update only)")
    p.add_argument("--deepspeed-config", default=None, metavar="PATH",
                   help="the DeepSpeed JSON config the run will use (as `noencore unlearn "
                        "--deepspeed-config`): its reduction bucket, ZeRO-3 live-parameter and "
                        "sub-group sizes replace DeepSpeed's defaults in the plan")
    p.add_argument("--cpu-ranks", action="store_true",
                   help="plan CPU ranks (gloo) instead of GPUs: a CPU rank's AdamW temporaries "
                        "and reduction bucket; use --reserve 0")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (bytes) instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore import planner as plan

    fixed = args.micro_batch is not None or args.accumulation is not None
    if not fixed and (args.checkpointing or args.offload):
        raise UsageError("--checkpointing and --offload-optimizer set the per-stage table of one "
                         "configuration (with --micro-batch or --accumulation); the answer tries "
                         "checkpointing both ways, and offload when nothing fits without it")
    try:
        gpu_mem = plan.parse_memory(args.gpu_memory)
        arch = plan.get_arch(args.model)
        options = dict(seconds=args.seconds, loss=args.loss, backend=args.backend, chunk_rows=args.chunk_rows,
                       precision=args.precision, text_tokens=args.text_tokens, reserve_gib=args.reserve,
                       stop_rule=args.stop_rule, fp32_grads=args.fp32_grads,
                       device="cpu" if args.cpu_ranks else "cuda",
                       zero_config=_read_deepspeed_config(args.deepspeed_config))
        if fixed:
            micro, accumulation = _fixed_split(args)
            rows = plan.plan_memory(arch, gpus=args.gpus, gpu_mem_gib=gpu_mem, micro_batch=micro,
                                    accumulation=accumulation, checkpointing=args.checkpointing,
                                    offload_optimizer=args.offload, **options)
        else:
            batch = plan.DEFAULT_GLOBAL_BATCH if args.batch_size is None else args.batch_size
            rows = plan.recommend(arch, args.gpus, gpu_mem, batch, **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print(json.dumps([{**dataclasses.asdict(r), "total": r.total, "fits": r.fits, "free": r.free,
                           "global_batch": r.global_batch, "flags": r.flags(), "command": r.command(arch.name)}
                          for r in rows], indent=1))
        return 0
    seq = arch.sequence_length(args.seconds, args.text_tokens)
    text = (f"T5-base encoder ({plan.T5_BASE_ENCODER_PARAMS / 1e6:.0f}M)" if arch.text_dim == plan.T5_BASE_DIM
            else f"text encoder (width {arch.text_dim})")
    print(f"{arch.name}: {arch.n_params() / 1e6:.1f}M trainable parameters "
          f"(dim {arch.dim}, {arch.num_layers} layers, {arch.num_heads} heads, K={arch.n_q}, V={arch.card}); "
          f"{text} frozen and cached, not resident")
    frames = math.ceil(arch.frame_rate * args.seconds)
    window = f"{args.seconds:g} s ({frames} frames, {seq} steps)"
    loss = f"{args.loss} loss" + (f" ({args.backend})" if args.loss == "fused" else "")
    if fixed:
        _print_fixed(args, arch, rows, gpu_mem, window, loss, options)
    else:
        _print_answer(args, arch, rows, gpu_mem, window, loss)
    return 0


def _read_deepspeed_config(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--deepspeed-config {path}: not a readable JSON file ({exc}); give the "
                         "DeepSpeed config the run will use") from exc
    if not isinstance(config, dict):
        raise UsageError(f"--deepspeed-config {path}: a DeepSpeed config is a JSON object")
    return config


def _fixed_split(args: argparse.Namespace) -> tuple[int, int]:
    """(micro-batch, accumulation) of the per-stage table, checked against --batch-size."""
    from noencore.planner import DEFAULT_GLOBAL_BATCH, split_batch

    accumulation = args.accumulation or 1
    if args.micro_batch is None:
        batch = DEFAULT_GLOBAL_BATCH if args.batch_size is None else args.batch_size
        return split_batch(batch, args.gpus, accumulation), accumulation
    implied = args.micro_batch * args.gpus * accumulation
    if args.batch_size is not None and args.batch_size != implied:
        raise ValueError(f"--batch-size {args.batch_size} disagrees with --micro-batch {args.micro_batch} x "
                         f"--gpus {args.gpus} x --accumulation {accumulation} = {implied}; give two of them")
    return args.micro_batch, accumulation


def _print_fixed(args, arch, rows, gpu_mem: float, window: str, loss: str, options: dict) -> None:
    from noencore.planner import GIB, format_plan_table, max_micro_batch

    r = rows[0]
    print(f"{args.gpus} GPU(s) x {gpu_mem:g} GiB, micro-batch {r.micro_batch} x {r.accumulation} accumulation "
          f"step(s) (global batch {r.global_batch}) of {window}, {args.precision}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {loss}; GiB per GPU:")
    print(format_plan_table(rows))
    kw = dict(gpus=args.gpus, gpu_mem_gib=gpu_mem, checkpointing=args.checkpointing,
              offload_optimizer=args.offload, **options)
    largest = ", ".join(f"ZeRO-{s.stage} {max_micro_batch(arch, s.stage, **kw)}" for s in rows)
    print(f"largest micro-batch per GPU that fits: {largest}")
    offloaded = max(s.cpu for s in rows)
    if offloaded:
        print(f"host memory for the offloaded optimizer: up to {offloaded / GIB:.2f} GiB per rank")


def _print_answer(args, arch, rows, gpu_mem: float, window: str, loss: str) -> None:
    from noencore.planner import DEFAULT_GLOBAL_BATCH, GIB, format_recommendations

    batch = DEFAULT_GLOBAL_BATCH if args.batch_size is None else args.batch_size
    print(f"{args.gpus} GPU(s) x {gpu_mem:g} GiB; global batch {batch} windows of {window}, {args.precision}, "
          f"{loss}")
    if not rows:
        print("nothing fits, even with checkpointing, optimizer offload and a micro-batch of 1: use more or "
              "larger GPUs, or shorter windows (--seconds)")
        return
    print("configurations that fit, fastest first (no optimizer offload, then no checkpointing, then the "
          "fewest accumulation steps, then the lowest ZeRO stage; each one below needs less memory than "
          "those above); GiB per GPU:")
    print(format_recommendations(rows))
    if rows[0].offload_optimizer:
        print(f"nothing fits without optimizer offload; host memory for it: {rows[0].cpu / GIB:.2f} GiB per rank")
    print(f"run (#1): {rows[0].command(arch.name)}")
