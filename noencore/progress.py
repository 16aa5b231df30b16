"""Progress bars for long work, in the unit of the work.

``progress(...)`` is tqdm where stderr is a terminal. Where it is not (a batch job's log,
a pipe), a bar's redraws would pile up on one line or vanish, so it prints a plain line
every ``NOENCORE_PROGRESS_SECONDS`` seconds (default 30) and one at the end, so the log
shows how far the job is.

Under a launcher only rank 0 draws: every bar of a process whose ``RANK`` is not 0 is
silent, so that a job of N ranks shows one set of bars.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

INTERVAL_ENV = "NOENCORE_PROGRESS_SECONDS"


class _Lines(tqdm):
    """A tqdm that writes each refresh as a line of its own."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = (msg if msg is not None else self.__str__()).strip("\r\n ")
        if text:
            self.fp.write(text + "\n")
            self.fp.flush()
        return bool(text)  # nothing shown: tqdm writes no line-clearing "\r" after it

    def close(self) -> None:
        if self.disable:
            return
        self.leave = False  # the final line is ours, without tqdm's trailing newline
        self.display()
        super().close()


def interval() -> float:
    """Seconds between the plain lines of a bar that is not on a terminal."""
    raw = os.environ.get(INTERVAL_ENV, "30")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines "
                         "(a positive number)")
    return value


def progress(iterable: Any = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, **kw: Any) -> tqdm:
    """A progress bar over ``iterable`` or ``total`` units (see the module docstring)."""
    stream = kw.pop("file", None) or sys.stderr
    if disable or int(os.environ.get("RANK", "0")) != 0:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream,
                    dynamic_ncols=True, **kw)
    return _Lines(iterable, total=total, desc=desc, unit=unit, file=stream,
                  mininterval=interval(), miniters=1, ascii=True, **kw)
