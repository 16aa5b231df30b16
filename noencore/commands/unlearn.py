"""``noencore unlearn``: run an unlearning method on a forget set (flags or a config file).

A YAML/JSON ``--config`` holds the same keys as the flags (underscores: ``forget_ratio``);
flags given on the command line override it. Run under ``deepspeed`` / ``torchrun`` with
``--zero-stage`` (or ``--deepspeed-config``) for DeepSpeed ZeRO.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from noencore.engine.config import UnlearnConfig
from noencore.errors import UsageError

# The options of the command that are not options of ``unlearn`` (the model, the shards,
# and convenient spellings of two of its options): option -> (type, default, help).
_CLI_ONLY: dict[str, tuple[Any, Any, str]] = {
    "model": (str, None, "MusicGen: hub id, local folder, or 'tiny'"),
    "shards": (str, None, "token-shard directory (with its conditions/ cache)"),
    "forget_ids": (str, None, "file with one forget source id per line (the opt-out list)"),
    "lora_rank": (int, None, "train only LoRA adapters of this rank (the model frozen); "
                             "the saved model has them merged"),
    "lora_alpha": (float, None, "LoRA scale numerator: updates are alpha/rank * B A "
                                "(default: the rank)"),
    "lora_targets": (str, None, "comma-separated weights to adapt: aliases attention, "
                                "self_attention, cross_attention, ffn, heads, "
                                "text_projection, or path components such as linear1 or "
                                "layers.0 (default: attention,heads)"),
}
_FIELDS = {f.metadata["cli"] if isinstance(f.metadata["cli"], str) else f.name: f
           for f in dataclasses.fields(UnlearnConfig) if f.metadata["cli"]}
# option -> (type, default, help), derived from UnlearnConfig; every one is also a
# config-file key. FLAGS: its switches (store_true).
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    **{k: v for k, v in _CLI_ONLY.items() if not k.startswith("lora")},
    **{name: (f.metadata["parse"] if f.metadata["parse"] in (int, float) else str, f.default,
              f.metadata["help"])
       for name, f in _FIELDS.items() if not isinstance(f.default, bool)},
    **{k: v for k, v in _CLI_ONLY.items() if k.startswith("lora")},
}
FLAGS = tuple(name for name, f in _FIELDS.items() if isinstance(f.default, bool))


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
    for name in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None,
                       help=_FIELDS[name].metadata["help"])
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar")
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
    for name, (kind, _, _) in _CLI_ONLY.items():  # the others: UnlearnConfig.check
        value = data.get(name)
        ok = value is None or (isinstance(value, bool) is False and (
            isinstance(value, kind) or (kind is float and isinstance(value, int))
            or (name == "lora_targets" and isinstance(value, list)
                and all(isinstance(x, str) for x in value))))
        if not ok:
            want = {str: "a string", int: "a whole number", float: "a number"}[kind]
            raise UsageError(f"{path}: option {name}: {value!r} is not {want}")
    if not isinstance(data.get("method_options") or {}, dict):
        raise UsageError(f"{path}: option method_options: {data['method_options']!r} is not "
                         "a mapping of method options")
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve_options(args: argparse.Namespace) -> dict:
    """Config file, then flags: the keyword arguments of ``noencore.unlearn`` (the
    options of ``UnlearnConfig``, with model and shards)."""
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
        from noencore.data.shards import read_ids

        opts["forget"] = read_ids(opts.pop("forget_ids"))
    else:
        opts.pop("forget_ids", None)
    if opts.get("forget") is None:
        raise UsageError("--forget (split or ids) or --forget-ids is required")
    for name, f in _FIELDS.items():  # the parsing a flag's text needs beyond its type
        if f.metadata["parse"] not in (None, int, float):
            try:
                opts[name] = f.metadata["parse"](opts.get(name))
            except UsageError as exc:
                raise UsageError(f"option {name} (--{name.replace('_', '-')}): {exc}") from None
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
    from noencore.audit import unlearn

    opts = resolve_options(args)
    model, shards = opts.pop("model"), opts.pop("shards")
    res = unlearn(model, shards, progress=not args.quiet, **opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a launcher rank 0 speaks for the run
    last = res.metrics[-1] if res.metrics else {}
    print(json.dumps({"steps": res.steps, "stopped": res.stopped,
                      "forget_nll": last.get("forget_nll"), "remain_nll": last.get("remain_nll"),
                      "model_dir": str(res.model_dir) if res.model_dir else None,
                      "stop": res.stop_info}))
    if res.report is not None:  # --audit: the report a rights holder reads
        print(f"report: {res.out / 'report' / 'report.md'}\n{res.report['verdict']}")
    return 0
