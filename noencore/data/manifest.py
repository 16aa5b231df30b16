"""The corpus manifest: JSONL or CSV rows of ``id``, ``path``, ``caption``, optional
``split`` and any other columns (artist, license, ...), kept as the item's metadata.

``path`` is relative to the manifest's folder or absolute. Rows that cannot be used
(bad JSON, a missing id or path, a duplicate id) become failures with their line
number; the other rows are returned in manifest order.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError

RESERVED = ("id", "path", "caption", "split")


@dataclass(frozen=True)
class ManifestItem:
    """One usable manifest row. ``path`` is resolved; ``source`` is the path as written."""

    id: str
    path: Path
    source: str
    caption: str
    split: str | None
    line: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """An item (or manifest line) that could not be encoded, and why."""

    id: str | None
    line: int | None
    source: str | None
    reason: str

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "source": self.source, "reason": self.reason}


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row or an error string) for each non-blank line."""
    text = path.read_text(encoding="utf-8-sig")
    fmt = path.suffix.lower()
    if fmt not in (".jsonl", ".json", ".ndjson", ".csv"):
        fmt = ".jsonl" if text.lstrip().startswith("{") else ".csv"
    if fmt == ".csv":
        lines = text.splitlines(keepends=True)
        reader = csv.DictReader(lines)
        out = []
        for row in reader:
            if reader.restkey in row or None in row.values():
                out.append((reader.line_num, f"expected {len(reader.fieldnames or [])} CSV "
                                             "fields, got a different number"))
            else:
                out.append((reader.line_num, {k: v for k, v in row.items() if v != ""}))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((n, f"not valid JSON ({exc.msg} at column {exc.colno})"))
    return out


def read_manifest(path: str | Path) -> tuple[list[ManifestItem], list[Failure]]:
    """Parse a manifest into its usable items (manifest order) and its bad lines."""
    path = Path(path)
    if not path.is_file():
        raise NoencoreError(f"manifest {path} not found; pass a JSONL or CSV file with "
                            "columns id, path, caption (optional: split, metadata)")
    base = path.resolve().parent
    items: list[ManifestItem] = []
    failures: list[Failure] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path):
        where = f"{path.name} line {line}"
        if isinstance(row, str):
            failures.append(Failure(None, line, None, f"bad manifest line ({where}): {row}"))
            continue
        if not isinstance(row, dict):
            failures.append(Failure(None, line, None,
                                    f"bad manifest line ({where}): not a JSON object"))
            continue
        item_id, source = row.get("id"), row.get("path")
        if not isinstance(item_id, (str, int)) or str(item_id).strip() == "":
            failures.append(Failure(None, line, source if isinstance(source, str) else None,
                                    f"bad manifest line ({where}): missing 'id'"))
            continue
        item_id = str(item_id)
        if not isinstance(source, str) or not source.strip():
            failures.append(Failure(item_id, line, None,
                                    f"bad manifest line ({where}): missing 'path'"))
            continue
        if item_id in seen:
            failures.append(Failure(item_id, line, source,
                                    f"duplicate id ({where}): already used on line "
                                    f"{seen[item_id]}; ids must be unique"))
            continue
        seen[item_id] = line
        caption = row.get("caption", "")
        split = row.get("split")
        items.append(ManifestItem(
            id=item_id, path=(base / source), source=source,
            caption="" if caption is None else str(caption),
            split=None if split is None else str(split), line=line,
            meta={k: v for k, v in row.items() if k not in RESERVED}))
    return items, failures
