"""TokenShards: the memory-mapped reader of a token-shard directory (see ``layout.py``).

An *item* is one segment of a source file (a song cut into ``segment_seconds``
windows gives several items sharing one source id). ``codes(i)`` is a zero-copy
torch view [n_q, frames] (int16) of the memory-mapped shard file.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noencore.data import layout
from noencore.errors import NoencoreError


@dataclass(frozen=True)
class ShardHeader:
    """Codec facts of a shard directory (``codec`` is the spec string it was encoded with)."""

    codec: str
    sample_rate: int
    frame_rate: int
    n_q: int
    card: int
    segment_seconds: float
    format_version: int
    identity: dict[str, Any] | None = None  # Codec.identity() of the codec (None: not recorded)


@dataclass(frozen=True)
class ShardItem:
    """One segment: ``id`` of its source, ``segment`` number, ``start_s`` in the source."""

    id: str
    segment: int
    start_s: float
    frames: int
    caption: str
    split: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    source: str = ""


class _Store:
    """Everything read from one directory, shared by all views of it."""

    def __init__(self, path: Path, verify: bool):
        self.path = path
        if not path.is_dir():
            raise NoencoreError(f"{path}: no such token-shard directory; create it with "
                                "`noencore precompute MANIFEST OUT_DIR`")
        head_file = path / layout.HEADER
        if not head_file.is_file():
            raise NoencoreError(f"{path}: no {layout.HEADER}, not a token-shard directory; "
                                "create it with `noencore precompute MANIFEST OUT_DIR`")
        sums_file = path / layout.CHECKSUMS
        if not sums_file.is_file():
            raise NoencoreError(
                f"{path}: unfinished token shards ({layout.CHECKSUMS} missing: precompute "
                "was interrupted or is still running); re-run the same `noencore "
                "precompute` command to finish them")
        sums = layout.read_json(sums_file, "checksum list")
        files = sums.get("files") if isinstance(sums, dict) else None
        if not isinstance(files, dict):
            raise NoencoreError(f"{sums_file}: damaged checksum list; delete the directory "
                                "and re-run `noencore precompute`")
        self.checksums: dict[str, dict[str, Any]] = files
        for name in (layout.HEADER, layout.INDEX, layout.FAILURES):
            self.check_file(name, full=True)
        header = layout.check_header(layout.read_json(head_file, "header"), head_file)
        self.header = ShardHeader(
            codec=str(header["codec"]), sample_rate=int(header["sample_rate"]),
            frame_rate=int(header["frame_rate"]), n_q=int(header["n_q"]),
            card=int(header["card"]), segment_seconds=float(header["segment_seconds"]),
            format_version=int(header["format_version"]),
            identity=header.get("codec_identity"))
        records = layout.read_jsonl(path / layout.INDEX)
        self.failures = layout.read_jsonl(path / layout.FAILURES)
        self.records = records
        self.ids = [r["id"] for r in records]
        self.captions = [r.get("caption", "") for r in records]
        self.splits = [r.get("split") for r in records]
        self.frames = np.array([r["frames"] for r in records], dtype=np.int64)
        self.offsets = np.array([r["offset"] for r in records], dtype=np.int64)
        self.shard = np.array([r["shard"] for r in records], dtype=np.int64)
        self.digests = [r.get("codes_sha256") for r in records]
        self.checked = np.zeros(len(records), dtype=bool)  # segments read and found intact
        shard_names = sorted(n for n in files if n.endswith(".codes"))
        self.maps: list[np.ndarray] = []
        n_q = self.header.n_q
        for s, name in enumerate(shard_names):
            if name != layout.shard_name(s):
                raise NoencoreError(f"{path}: shard files are not numbered 0..{len(shard_names)}"
                                    f" ({name}); delete the directory and re-run precompute")
            size = self.check_file(name, full=verify)
            rows = size // (layout.CODE_BYTES * n_q)
            if rows == 0:
                self.maps.append(np.zeros((0, n_q), dtype=np.int16))
                continue
            # mode "c" (copy-on-write): writable for torch.from_numpy, never writes back.
            self.maps.append(np.memmap(path / name, dtype=np.int16, mode="c",
                                       shape=(rows, n_q)))
        if len(records):
            if self.shard.min() < 0 or self.shard.max() >= len(self.maps):
                raise NoencoreError(f"{path / layout.INDEX}: refers to a shard file that "
                                    "is not listed; delete the directory and re-run precompute")
            ends = self.offsets + self.frames
            rows = np.array([len(m) for m in self.maps], dtype=np.int64)[self.shard]
            bad = np.flatnonzero((ends > rows) | (self.offsets < 0) | (self.frames <= 0))
            if bad.size:
                r = records[int(bad[0])]
                raise NoencoreError(f"{path / layout.shard_name(r['shard'])}: too short for "
                                    f"item {r['id']} segment {r['segment']} (truncated); "
                                    "delete the directory and re-run `noencore precompute`")

    def check_segment(self, r: int, block: np.ndarray) -> None:
        """The first read of segment ``r`` (int16 [frames, n_q] ``block``): its codes must
        lie in [0, card) and its bytes hash to the index's ``codes_sha256``."""
        # one pass: a negative int16 read as uint16 is >= 32768, above any codebook size
        bad = bool((block.view(np.uint16) >= self.header.card).any())
        want = self.digests[r]
        if not bad and (want is None or hashlib.sha256(block).hexdigest() == want):
            self.checked[r] = True
            return
        rec = self.records[r]
        where = (f"{self.path / layout.shard_name(int(self.shard[r]))}: segment "
                 f"{rec.get('segment')} of item {rec['id']!r}")
        fix = ("the shard was changed after precompute; restore it, or re-run `noencore "
               "precompute` into a new directory (`noencore verify` checks every file)")
        if bad:
            raise NoencoreError(f"{where}: codes outside [0, {self.header.card}) "
                                f"(min {int(block.min())}, max {int(block.max())}); {fix}")
        raise NoencoreError(f"{where}: its bytes do not match the index's digest; {fix}")

    def check_file(self, name: str, full: bool) -> int:
        """Check a listed file's size (always) and sha256 (when ``full``); return its size."""
        entry = self.checksums.get(name)
        file = self.path / name
        if entry is None:
            raise NoencoreError(f"{self.path / layout.CHECKSUMS}: does not list {name}; the "
                                "directory is damaged: delete it and re-run precompute")
        if not file.is_file():
            raise NoencoreError(f"{file}: missing; the directory is damaged: delete it and "
                                "re-run `noencore precompute`")
        size = file.stat().st_size
        if size != entry["size"]:
            raise NoencoreError(f"{file}: {size} bytes, the checksum list says "
                                f"{entry['size']} (truncated or modified); delete the "
                                "directory and re-run `noencore precompute`")
        if full and layout.sha256_file(file) != entry["sha256"]:
            raise NoencoreError(f"{file}: wrong sha256 (corrupted or modified); delete the "
                                "directory and re-run `noencore precompute`")
        return size


class TokenShards:
    """Read-only access to precomputed EnCodec tokens.

    ``TokenShards(path)`` checks the header's format version, the checksums of the
    header, index and failures report, and each shard file's size; ``verify=True``
    also checks every shard file's sha256 (a full read; ``noencore verify`` does it).

    ``len()``: items (segments); ``codes(i)``: torch.int16 [n_q, frames], a zero-copy
    view of the memory map; ``item(i)``: a ``ShardItem``; ``select(split=, ids=)``: a
    view on a subset (``ids`` are source ids: all their segments).
    """

    def __init__(self, path: str | Path, *, verify: bool = False,
                 _store: _Store | None = None, _rows: np.ndarray | None = None):
        self._store = _store if _store is not None else _Store(Path(path), verify)
        n = len(self._store.records)
        self._rows = np.arange(n, dtype=np.int64) if _rows is None else _rows

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def header(self) -> ShardHeader:
        return self._store.header

    @property
    def files(self) -> list[str]:
        """Names of the files that checksums.json lists (header, index, failures, shards)."""
        return sorted(self._store.checksums)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The failures report of the precompute run (one record per failed manifest item)."""
        return self._store.failures

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, items={len(self)}, "
                f"hours={self.hours:.3f}, codec={self.header.codec!r})")

    def _row(self, i: int) -> int:
        if not -len(self._rows) <= i < len(self._rows):
            raise IndexError(f"item {i} out of range for {len(self._rows)} items")
        return int(self._rows[i])

    def codes(self, i: int):
        """Codes of item ``i``: torch.int16 [n_q, frames], a view (no copy) of the shard map."""
        import torch

        r = self._row(i)
        s = self._store
        off, n = int(s.offsets[r]), int(s.frames[r])
        block = s.maps[int(s.shard[r])][off:off + n]
        if not s.checked[r]:
            s.check_segment(r, block)
        return torch.from_numpy(block).T

    def item(self, i: int) -> ShardItem:
        rec = self._store.records[self._row(i)]
        return ShardItem(id=rec["id"], segment=int(rec["segment"]),
                         start_s=float(rec["start_s"]), frames=int(rec["frames"]),
                         caption=rec.get("caption", ""), split=rec.get("split"),
                         meta=dict(rec.get("meta") or {}), sha256=rec.get("sha256", ""),
                         source=rec.get("source", ""))

    @property
    def ids(self) -> list[str]:
        """Source id of each item (repeated for the segments of one source)."""
        return [self._store.ids[r] for r in self._rows]

    @property
    def captions(self) -> list[str]:
        return [self._store.captions[r] for r in self._rows]

    @property
    def splits(self) -> list[str | None]:
        return [self._store.splits[r] for r in self._rows]

    @property
    def frames(self) -> np.ndarray:
        """Frames of each item, int64 [len]."""
        return self._store.frames[self._rows]

    @property
    def hours(self) -> float:
        return float(self.frames.sum()) / self.header.frame_rate / 3600.0

    def select(self, split: str | Sequence[str] | None = None,
               ids: Iterable[str] | None = None, *, missing: str = "error") -> TokenShards:
        """A view on the items of ``split`` (one name or several) and/or of the source ``ids``.

        ``missing="error"`` refuses ids absent from the shards (a typo in an opt-out list
        would otherwise forget nothing, silently); ``"ignore"`` skips them.
        """
        keep = np.ones(len(self._rows), dtype=bool)
        if split is not None:
            wanted = {split} if isinstance(split, str) else set(split)
            keep &= np.array([s in wanted for s in self.splits], dtype=bool)
        if ids is not None:
            wanted_ids = set(ids)
            present = self.ids
            if missing == "error":
                absent = wanted_ids.difference(present)
                if absent:
                    shown = ", ".join(sorted(absent)[:5])
                    raise NoencoreError(f"{self.path}: {len(absent)} requested id(s) not in "
                                        f"the shards ({shown}{' ...' if len(absent) > 5 else ''})"
                                        "; check the list, or pass missing='ignore'")
            elif missing != "ignore":
                raise ValueError(f"missing must be 'error' or 'ignore', not {missing!r}")
            keep &= np.array([i in wanted_ids for i in present], dtype=bool)
        return TokenShards(self.path, _store=self._store, _rows=self._rows[keep])


SetSpec = str | Sequence[str] | TokenShards
"""How a set of items is named, the same for ``unlearn`` and ``evaluate``: a split name,
a list of source ids, or a ``TokenShards`` selection (``shards.select(...)``)."""


def select_set(shards: TokenShards, spec: SetSpec) -> TokenShards:
    """The items of ``shards`` that ``spec`` names: a split name, source ids (all their
    segments; an absent id is refused) or a selection, returned as it is."""
    if isinstance(spec, TokenShards):
        return spec
    if isinstance(spec, str):
        return shards.select(split=spec)
    return shards.select(ids=[str(x) for x in spec])


def set_ids(spec: SetSpec) -> str | list[str]:
    """``spec`` as a split name or a list of source ids (a selection gives its ids, in
    order, each once): what the engine's sets read."""
    if isinstance(spec, TokenShards):
        return list(dict.fromkeys(spec.ids))
    return spec if isinstance(spec, str) else [str(x) for x in spec]


def read_ids(path: str | Path) -> list[str]:
    """The source ids of an id list: one id per line, exactly (a line that begins with
    ``#`` is an id like any other: ids are data, not a syntax), blank lines skipped. Every
    id must then exist in the shards (the set's selection says which do not)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoencoreError(f"{path}: no such id list (one source id per line)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoencoreError(f"{path}: unreadable id list ({exc}); give a UTF-8 text file "
                            "with one source id per line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise NoencoreError(f"{path}: the id list is empty; give one source id per line")
    return ids

