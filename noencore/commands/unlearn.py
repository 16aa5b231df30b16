"""``noencore unlearn``: run an unlearning method on a forget set (flags or a config file).

A YAML/JSON ``--config`` holds the same keys as the flags (underscores: ``forget_ratio``);
flags given on the command line override it. Run under ``deepspeed`` / ``torchrun`` with
``--zero-stage`` (or ``--deepspeed-config``) for DeepSpeed ZeRO.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from noencore.errors import UsageError

# option -> (type, default, help); every one is also a config-file key
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "model": (str, None, "MusicGen: hub id, local folder, or 'tiny'"),
    "shards": (str, None, "token-shard directory (with its conditions/ cache)"),
    "forget": (str, None, "forget set: a split name, or comma-separated source ids"),
    "forget_ids": (str, None, "file with one forget source id per line (the opt-out list)"),
    "remain": (str, None, "remain set: split name or comma-separated ids (default: all "
                          "other items outside held-out splits)"),
    "method": (str, "ga", "ga | bounded_ga | graddiff | rl | npo | simnpo"),
    "steps": (int, 100, "maximum optimizer steps"),
    "lr": (float, 1e-5, "AdamW learning rate"),
    "weight_decay": (float, 0.0, "AdamW weight decay"),
    "batch_size": (int, 8, "global rows per optimizer step (all ranks, all micro-batches)"),
    "accumulation": (int, 1, "micro-batches per optimizer step on each rank (gradient "
                             "accumulation: the same step in less memory)"),
    "forget_ratio": (float, 0.5, "fraction of each batch drawn from the forget set"),
    "frames": (int, 500, "window length in codec frames (50 per second)"),
    "seed": (int, 0, "seed of the batch order and random labels"),
    "out": (str, None, "run folder: metrics.jsonl, losses.png, checkpoints/, model/"),
    "checkpoint_every": (int, 0, "checkpoint every N steps (0: only at the end)"),
    "target_forget_nll": (float, None, "stop when the forget token NLL reaches this (nats)"),
    "stop_nonmembers": (str, None, "stop when membership inference cannot tell the forget "
                                   "set from these never-trained tracks (split or "
                                   "comma-separated ids; not the tracks you evaluate on)"),
    "stop_rule": (str, "auc", "with --stop-nonmembers: auc (LOSS-attack AUC <= --stop-auc), "
                              "nll (forget NLL reaches theirs) or original (the AUC against "
                              "their NLLs under the starting model)"),
    "stop_auc": (float, 0.5, "with --stop-nonmembers: the AUC to stop at"),
    "stop_every": (int, 1, "with --stop-nonmembers: check every N steps"),
    "grad_clip": (float, 1.0, "gradient norm clip (0: none)"),
    "log_every": (int, 10, "read the step numbers from the device every N steps (metrics.jsonl "
                           "still holds every step; NaN/inf is caught at the read)"),
    "backend": (str, "auto", "fused op backend: auto | triton | cpp | torch"),
    "zero_stage": (int, None, "train with DeepSpeed ZeRO stage 1, 2 or 3 (bf16)"),
    "deepspeed_config": (str, None, "DeepSpeed JSON config (checked against the flags)"),
    "device": (str, None, "cpu or cuda (default: cuda when available)"),
    "precision": (str, "fp32", "one process: fp32, or bf16 (autocast on fp32 weights)"),
    "lora_rank": (int, None, "train only LoRA adapters of this rank (the model frozen); "
                             "the saved model has them merged"),
    "lora_alpha": (float, None, "LoRA scale numerator: updates are alpha/rank * B A "
                                "(default: the rank)"),
    "lora_targets": (str, None, "comma-separated weights to adapt: aliases attention, "
                                "self_attention, cross_attention, ffn, heads, "
                                "text_projection, or path components such as linear1 or "
                                "layers.0 (default: attention,heads)"),
}
FLAGS = ("offload_optimizer", "resume", "checkpointing", "save_adapter")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "unlearn", help="make a MusicGen forget a set of clips",
        description="Unlearn a forget set from a MusicGen model while protecting a remain set; "
                    "one process by default, DeepSpeed ZeRO with --zero-stage.")
    p.add_argument("--config", default=None, help="YAML or JSON file with the options below")
    for name, (typ, default, text) in OPTIONS.items():
        shown = f" (default: {default})" if default is not None else ""
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=text + shown)
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. beta=0.1, loss_cap=8, labels=remain_clip, remain_anchor=true "
                        "(repeatable)")
    p.add_argument("--offload-optimizer", action="store_true", default=None,
                   help="DeepSpeed: keep optimizer state in CPU memory")
    p.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing per transformer layer (less memory, "
                        "about a third more compute)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in --out")
    p.add_argument("--save-adapter", action="store_true", default=None,
                   help="with --lora-rank, transformers-format models: also write the "
                        "adapters as a PEFT adapter to OUT/adapter")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _read_config(path: str) -> dict:
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise UsageError(f"{path}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of options")
    known = set(OPTIONS) | {"method_options", *FLAGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _id_list(value: str | list | None) -> str | list[str] | None:
    """A split name stays a string; a comma-separated value is a list of ids."""
    if value is None or isinstance(value, list):
        return value
    return [x.strip() for x in value.split(",") if x.strip()] if "," in value else value


def resolve_options(args: argparse.Namespace) -> dict:
    """Config file, then flags: the keyword arguments of ``noencore.unlearn``."""
    opts: dict[str, Any] = {k: d for k, (_, d, _) in OPTIONS.items()}
    opts.update(method_options={}, **dict.fromkeys(FLAGS, False))
    if args.config:
        opts.update(_read_config(args.config))
    for name in list(OPTIONS) + list(FLAGS):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    for item in args.method_option:
        if "=" not in item:
            raise UsageError(f"--method-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        opts["method_options"][key.strip()] = _parse_value(value)
    for need in ("model", "shards"):
        if not opts.get(need):
            raise UsageError(f"--{need} is required (flag or config key)")
    if opts.get("forget_ids"):
        if opts.get("forget"):
            raise UsageError("give --forget or --forget-ids, not both")
        lines = Path(opts.pop("forget_ids")).read_text().splitlines()
        opts["forget"] = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    else:
        opts.pop("forget_ids", None)
    if opts.get("forget") is None:
        raise UsageError("--forget (split or ids) or --forget-ids is required")
    opts["forget"] = _id_list(opts["forget"])
    opts["remain"] = _id_list(opts["remain"])
    opts["stop_nonmembers"] = _id_list(opts.get("stop_nonmembers"))
    if opts.get("grad_clip") == 0:
        opts["grad_clip"] = None
    opts["deepspeed"] = opts.pop("deepspeed_config")
    opts["lora"] = _lora(opts.pop("lora_rank"), opts.pop("lora_alpha"), opts.pop("lora_targets"))
    return opts


def _lora(rank: int | None, alpha: float | None, targets: str | list | None) -> dict | None:
    """The ``lora`` argument of ``unlearn`` from the three options (None: no LoRA)."""
    if rank is None:
        if alpha is not None or targets is not None:
            raise UsageError("--lora-alpha / --lora-targets need --lora-rank")
        return None
    lora: dict[str, Any] = {"rank": rank, "alpha": alpha}
    if targets is not None:
        names = targets.split(",") if isinstance(targets, str) else targets
        lora["targets"] = tuple(t.strip() for t in names if t.strip())
    return lora


def run(args: argparse.Namespace) -> int:
    from noencore.engine import unlearn

    opts = resolve_options(args)
    model, shards = opts.pop("model"), opts.pop("shards")
    res = unlearn(model, shards, progress=not args.no_progress, **opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a launcher rank 0 speaks for the run
    last = res.metrics[-1] if res.metrics else {}
    print(json.dumps({"steps": res.steps, "stopped": res.stopped,
                      "forget_nll": last.get("forget_nll"), "remain_nll": last.get("remain_nll"),
                      "model_dir": str(res.model_dir) if res.model_dir else None,
                      "stop": res.stop_info}))
    return 0
