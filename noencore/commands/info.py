"""``noencore info OUT_DIR``: counts, hours, splits and failures of token shards."""
from __future__ import annotations

import argparse
import json
from collections import Counter


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info", help="summarize token shards: codec, counts, hours, splits, failures",
        description="Print the codec facts, item and segment counts, audio hours per split and "
                    "the failures report of a token-shard directory.")
    p.add_argument("out_dir", help="token-shard directory written by `noencore precompute`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def summarize(path: str) -> dict:
    """The summary ``noencore info`` prints, as a dict."""
    from noencore.data.shards import TokenShards

    shards = TokenShards(path)
    h = shards.header
    per_split: dict[str, dict[str, float]] = {}
    frames = shards.frames
    ids_by_split: dict[str, set[str]] = {}
    for sid, split, f in zip(shards.ids, shards.splits, frames.tolist()):
        key = split if split is not None else "(none)"
        row = per_split.setdefault(key, {"items": 0, "segments": 0, "hours": 0.0})
        row["segments"] += 1
        row["hours"] += f / h.frame_rate / 3600
        ids_by_split.setdefault(key, set()).add(sid)
    for key, ids in ids_by_split.items():
        per_split[key]["items"] = len(ids)
    return {"path": str(shards.path), "codec": h.codec, "sample_rate": h.sample_rate,
            "frame_rate": h.frame_rate, "n_q": h.n_q, "card": h.card,
            "segment_seconds": h.segment_seconds, "format_version": h.format_version,
            "items": len(set(shards.ids)), "segments": len(shards), "hours": shards.hours,
            "splits": dict(sorted(per_split.items())),
            "failures": len(shards.failures),
            "failure_reasons": dict(Counter(f["reason"].split(":")[0].split(" (")[0]
                                            for f in shards.failures)),
            "failed": [{"id": f["id"], "reason": f["reason"]} for f in shards.failures]}


def run(args: argparse.Namespace) -> int:
    s = summarize(args.out_dir)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}")
    print(f"  codec {s['codec']}: {s['sample_rate']} Hz, {s['frame_rate']} frames/s, "
          f"n_q={s['n_q']}, card={s['card']}; segments of {s['segment_seconds']:g} s; "
          f"format v{s['format_version']}")
    print(f"  {s['items']} items, {s['segments']} segments, {s['hours']:.3f} h")
    for name, row in s["splits"].items():
        print(f"  split {name}: {row['items']} items, {row['segments']} segments, "
              f"{row['hours']:.3f} h")
    print(f"  failures: {s['failures']}")
    for f in s["failed"][:20]:
        print(f"    {f['id'] or '-'}: {f['reason']}")
    if s["failures"] > 20:
        print(f"    ... and {s['failures'] - 20} more")
    return 0
