"""The ``noencore`` command: a thin face over the Python API.

Each subcommand lives in ``noencore/commands/<name>.py`` and defines
``register(subparsers)``, which adds its parser and sets ``func`` to a function
``(args) -> int``. Errors are one line (exit 1 for a failed job, 2 for bad usage)
unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from noencore.errors import NoencoreError, UsageError

COMMANDS = ["precompute", "info", "verify", "condition", "unlearn", "evaluate", "demo", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noencore",
        description="Make a MusicGen model forget opted-out music, fast and measurably.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"noencore.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"noencore.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
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
