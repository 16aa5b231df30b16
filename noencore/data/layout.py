"""The on-disk format of a token-shard directory, shared by the writer and the reader.

A finished directory ``OUT/`` holds::

    header.json         format name + version, codec spec, sample_rate, frame_rate,
                        n_q, card, segment_seconds, dtype and layout of the codes, and
                        codec_identity (name, sha256 of its weights, the codes of a
                        fixed probe signal: ``Codec.identity``)
    shard-00000.codes   int16 [frames_total, n_q], row-major (frames-major), so one
                        segment's codes are one contiguous run of bytes
    index.jsonl         one JSON line per segment, in shard order: id, segment,
                        start_s, frames, shard, offset (first frame row),
                        codes_sha256 (of the segment's bytes in its shard), caption,
                        split, sha256 (of the source file), source, meta
    failures.jsonl      one JSON line per manifest item that could not be encoded
    checksums.json      sha256 + size of every file above; written last

A reader checks each segment the first time it reads it (``TokenShards.codes``): its
bytes against ``codes_sha256`` and its codes against the codebook size, so a shard
changed in place or swapped with another is named before a run trains on it, at the cost
of one hash of the bytes the run reads (directories written before ``codes_sha256``
get the range check alone).

``checksums.json`` is the commit mark: a directory without it is unfinished (a run
was interrupted) and no reader accepts it. While precompute runs, committed segments
are recorded in ``journal.jsonl``; the shard files only grow, and bytes beyond what
the journal records are dropped on resume.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError
from noencore.fileio import atomic_write, fsync_dir, sha256_file  # noqa: F401 (re-exported)

FORMAT = "noencore-token-shards"
FORMAT_VERSION = 1
HEADER = "header.json"
INDEX = "index.jsonl"
FAILURES = "failures.jsonl"
CHECKSUMS = "checksums.json"
JOURNAL = "journal.jsonl"
CODES_DTYPE = "int16"
CODE_BYTES = 2


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.codes"


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    """Records as JSON lines, keys sorted so equal content gives equal bytes."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                   for r in records).encode("utf-8")


def make_header(codec_spec: str, sample_rate: int, frame_rate: int, n_q: int, card: int,
                segment_seconds: float, identity: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """``identity``: the codec's ``Codec.identity()`` (name, weights digest, probe codes),
    which ``unlearn`` and ``evaluate`` compare with the model's codec."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec_spec,
              "sample_rate": int(sample_rate), "frame_rate": int(frame_rate), "n_q": int(n_q),
              "card": int(card), "segment_seconds": float(segment_seconds),
              "dtype": CODES_DTYPE, "layout": "frames-major [frames, n_q]"}
    if identity is not None:
        header["codec_identity"] = identity
    return header


def check_header(header: Any, path: Path) -> dict[str, Any]:
    """Refuse a header this version cannot read, naming the file and what to do."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise NoencoreError(f"{path}: not a noencore token-shard header; point at a "
                            "directory written by `noencore precompute`")
    if header.get("format_version") != FORMAT_VERSION:
        raise NoencoreError(
            f"{path}: token-shard format version {header.get('format_version')}, this "
            f"noencore reads version {FORMAT_VERSION}; re-run `noencore precompute` into a "
            "new directory (or delete this one) to rebuild the shards")
    for key in ("codec", "sample_rate", "frame_rate", "n_q", "card", "segment_seconds"):
        if key not in header:
            raise NoencoreError(f"{path}: header lacks {key!r}; the directory is damaged: "
                                "delete it and re-run `noencore precompute`")
    ident = header.get("codec_identity")
    if ident is not None and not (
            isinstance(ident, dict) and isinstance(ident.get("weights_sha256"), str)
            and isinstance(ident.get("probe_codes"), list)):
        raise NoencoreError(f"{path}: damaged codec_identity; the directory is damaged: "
                            "delete it and re-run `noencore precompute`")
    return header


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NoencoreError(f"{path}: unreadable {what} ({exc}); the directory is damaged: "
                            "delete it and re-run `noencore precompute`") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file written by this package (a bad line is damage, not input)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise NoencoreError(f"{path}: line {n} is damaged ({exc}); delete the "
                                    "directory and re-run `noencore precompute`") from exc
    return out
