"""Experiment trackers: where ``--report-to tensorboard,wandb,csv`` sends a run's numbers.

``open_trackers(names, out_dir, config, rank)`` gives one object with ``log(step, metrics)``
(scalars; other values are left out), ``figure(name, fig, step)`` (a matplotlib figure or
a PNG file), ``table(name, rows, step)`` (a list of dicts) and ``close()``. Each tracker is
its library's own writer:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``OUT/trackers/tensorboard``;
- ``wandb``: one ``wandb`` run (project ``$WANDB_PROJECT`` or "noencore"; ``WANDB_MODE``,
  ``WANDB_DIR`` and the other ``WANDB_*`` variables are wandb's own; without
  ``WANDB_DIR`` its files go to ``OUT/trackers``);
- ``csv``: ``OUT/trackers/metrics.csv`` (one row per value: step, name, value) and one
  ``OUT/trackers/<table>.csv`` per table.

Only rank 0 writes: the other ranks get trackers that do nothing. tensorboard and wandb
are optional (``pip install 'noencore[trackers]'``); ``check`` names the missing one when
the options are checked, before any work.

DeepSpeed's own monitor (the ``tensorboard`` / ``wandb`` / ``csv_monitor`` sections of its
config) is not used for the training steps: the engine then also logs its own events
indexed by samples seen, and a wandb run drops every value logged at a step lower than
one it has seen, so the step metrics logged after them would be lost; it also has no way
to log a figure or a table, and a one-process run has no engine. Every run therefore
reports through the writers above.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from noencore.errors import UsageError
from noencore.fileio import atomic_write

KNOWN = ("tensorboard", "wandb", "csv")
INSTALL = "pip install 'noencore[trackers]'"
FOLDER = "trackers"  # inside the output folder: everything the trackers write
_NEEDS_FOLDER = ("tensorboard", "csv")
_LIBRARY = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse(value: Any) -> tuple[str, ...]:
    """The tracker names of a ``report_to`` value: None, "", "none", a comma-separated
    string or a list. Unknown names are refused, naming the option."""
    if value is None:
        return ()
    if not isinstance(value, str | list | tuple) or not all(
            isinstance(x, str) for x in ([] if isinstance(value, str) else value)):
        raise UsageError(f"option report_to (--report-to): {value!r}; give a comma-separated "
                         f"list of {', '.join(KNOWN)} (or none)")
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in KNOWN]
    if bad:
        raise UsageError(f"option report_to (--report-to): unknown tracker(s) {bad}; give a "
                         f"comma-separated list of {', '.join(KNOWN)} (or none)")
    return tuple(dict.fromkeys(names))


def check(names: Iterable[str], out: Any) -> None:
    """Refuse, before any work, a tracker whose library is not installed or that has no
    output folder to write into."""
    for name in names:
        module = _LIBRARY.get(name)
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError:
            raise UsageError(f"--report-to {name} needs the {module} package, which is not "
                             f"installed: {INSTALL}") from None
    folderless = [n for n in names if n in _NEEDS_FOLDER]
    if folderless and out is None:
        raise UsageError(f"--report-to {','.join(folderless)} writes into the output folder: "
                         "give one (--out, out=...)")


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers (None, text and flags left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict as {"a/b/c": value} (lists and text left out)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out.update(scalars({name: value}))
    return out


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run is watched while it trains

    def figure(self, name: str, fig: Any, step: int) -> None:
        if isinstance(fig, str | os.PathLike):
            from matplotlib.image import imread

            self.writer.add_image(name, imread(fig)[..., :3], step, dataformats="HWC")
        else:
            self.writer.add_figure(name, fig, step, close=False)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, _markdown(rows), step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path | None, config: dict, kind: str):
        import wandb

        self.wandb = wandb
        where = None
        if "WANDB_DIR" not in os.environ and folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            where = str(folder)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "noencore",
                              dir=where, config=config, job_type=kind, reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def figure(self, name: str, fig: Any, step: int) -> None:
        image = str(fig) if isinstance(fig, str | os.PathLike) else fig
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        columns = _columns(rows)
        data = [[_cell(r.get(c)) for c in columns] for r in rows]
        self.run.log({name: self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _CSV:
    """``metrics.csv`` (step, name, value); a resumed run keeps the rows up to its
    checkpoint's step and appends after them."""

    def __init__(self, folder: Path, resume_step: int | None):
        self.folder = folder
        self.path = folder / "metrics.csv"
        folder.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                kept = [r for r in csv.reader(fh) if r and r[0] != "step"
                        and _int(r[0]) is not None and _int(r[0]) <= resume_step]
        text = io.StringIO()
        csv.writer(text).writerows([["step", "name", "value"], *kept])
        atomic_write(self.path, text.getvalue().encode())
        self.fh = open(self.path, "a", newline="")
        self.writer = csv.writer(self.fh)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.writer.writerows([step, name, repr(value)] for name, value in values.items())
        self.fh.flush()

    def figure(self, name: str, fig: Any, step: int) -> None:
        pass  # a figure has no CSV form; the run folder holds its PNG

    def table(self, name: str, rows: list[dict], step: int) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        atomic_write(self.folder / (name.replace("/", "_") + ".csv"), text.getvalue().encode())

    def close(self) -> None:
        self.fh.close()


class Trackers:
    """The trackers of one run (none: every call does nothing); see the module docstring."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = scalars(metrics)
        if values:
            for t in self.trackers:
                t.log(int(step), values)

    def figure(self, name: str, fig: Any, step: int = 0) -> None:
        for t in self.trackers:
            t.figure(name, fig, int(step))

    def table(self, name: str, rows: list[dict], step: int = 0) -> None:
        if rows:
            for t in self.trackers:
                t.table(name, rows, int(step))

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()


def open_trackers(names: Iterable[str], out_dir: Any, config: dict, rank: int, *,
                  kind: str = "unlearn", resume_step: int | None = None) -> Trackers:
    """The trackers ``names`` (``parse``d) writing into ``out_dir/trackers`` on rank 0; on
    other ranks, or without names, trackers that do nothing. ``config``: the run's
    options (wandb's run config); ``kind``: "unlearn" or "evaluate"; ``resume_step``: the
    step a resumed run continues from."""
    names = parse(list(names))
    if rank != 0 or not names:
        return Trackers([])
    folder = Path(out_dir) / FOLDER if out_dir is not None else None
    check(names, folder)
    opened: list[Any] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(_TensorBoard(folder))
            elif name == "wandb":
                opened.append(_WandB(folder, config, kind))
            else:
                opened.append(_CSV(folder, resume_step))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _markdown(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns)
              + " |" for r in rows]
    return "\n".join(lines)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
