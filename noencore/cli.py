"""The ``noencore`` command: a thin face over the Python API.

Each subcommand lives in ``noencore/commands/<name>.py`` and defines
``register(subparsers)``, which adds its parser and sets ``func`` to a function
``(args) -> int``. Errors are one line (exit 1 for a failed job, 2 for bad usage)
unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from noencore.errors import NoencoreError, UsageError
from noencore.fileio import trusting

COMMANDS = ["precompute", "info", "verify", "condition", "unlearn", "evaluate", "demo", "plan",
            "convert"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noencore",
        description="Make a MusicGen model forget opted-out music, fast and measurably.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    trust = dict(action="store_true", help="read checkpoints (codec, CLAP, model folders) that "
                 "only the full unpickler reads: it runs code from the file, so only for files "
                 "you trust")
    parser.add_argument("--trust-pickle", **trust)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"noencore.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"noencore.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    for command in sub.choices.values():  # accepted after the command too
        command.add_argument("--trust-pickle", **trust, default=argparse.SUPPRESS)
    return parser


def take_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local-rank N``) that the ``deepspeed``
    launcher (and torch's older launcher) append to every command; N goes to the
    ``LOCAL_RANK`` variable, where the engine reads each rank's device from."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"noencore: {name} needs a value")
                value, i = argv[i + 1], i + 1
            env = os.environ.get("LOCAL_RANK")
            if env is not None and env != value:
                raise SystemExit(f"noencore: {name}={value} disagrees with LOCAL_RANK={env}")
            os.environ["LOCAL_RANK"] = value
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(take_local_rank(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with trusting(args.trust_pickle):
            return int(args.func(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"noencore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (NoencoreError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"noencore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
