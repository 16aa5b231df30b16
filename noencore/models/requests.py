"""The opt-out requests a saved model has served: the records in its folder.

An unlearned model may be unlearned again: a second artist opts out after the first, and
``noencore unlearn`` runs on the saved model. The model folder remembers what it forgot
in ``requests.json`` beside the weights (``save_musicgen`` writes it atomically,
``load_musicgen`` reads it into ``MusicGenModel.requests``, the next save appends)::

    {"format": "noencore-requests", "version": 1, "requests": [
        {"forget": <spec>, "forget_ids": [...], "forget_digest": "sha256:...",
         "remain": <spec or null>, "method": {...}, "date": "...", "noencore": "0.1.0",
         "shards": "...", "steps": 12, "stopped": "nonmember_auc"}, ...]}

The models read and write these records; the engine makes one per run and checks a new
request against them (``noencore.engine.requests``).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError
from noencore.fileio import atomic_write
from noencore.version import __version__

REQUESTS_FILE = "requests.json"
FORMAT = "noencore-requests"
VERSION = 1


def ids_digest(ids: Sequence[str]) -> str:
    """``sha256:<hex>`` of the sorted, newline-joined ids (names the set, order-free)."""
    text = "\n".join(sorted({str(x) for x in ids}))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def make_request(*, forget: Any, forget_ids: Sequence[str], remain: Any, method: dict,
                 shards: str, steps: int, stopped: str,
                 held: Sequence[str] = (), codec: dict | None = None) -> dict[str, Any]:
    """The record of a request the model has just served (``held``: the earlier requests'
    forget ids its anchored remain set held; ``codec``: the shards' codec and whether it
    was matched with the model's)."""
    ids = sorted({str(x) for x in forget_ids})
    return {"forget": forget if isinstance(forget, str) else [str(x) for x in forget],
            "forget_ids": ids, "forget_digest": ids_digest(ids),
            "remain": remain if remain is None or isinstance(remain, str)
            else [str(x) for x in remain],
            "method": method,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "noencore": __version__, "shards": str(shards), "steps": int(steps),
            "stopped": stopped, "held": sorted({str(x) for x in held}),
            **({"codec": codec} if codec is not None else {})}


def _path(folder: str | os.PathLike) -> Path:
    return Path(folder) / REQUESTS_FILE


def read_requests(folder: str | os.PathLike) -> list[dict]:
    """The requests recorded in a model folder ([] where it has no ``requests.json``)."""
    path = _path(folder)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NoencoreError(f"{path}: unreadable request history ({exc}); restore it from "
                            "the run that saved the model, or delete it to forget the "
                            "history (earlier opt-outs are then no longer checked)") from exc
    ok = (isinstance(data, dict) and data.get("format") == FORMAT
          and isinstance(data.get("requests"), list)
          and all(isinstance(r, dict) and isinstance(r.get("forget_ids"), list)
                  for r in data["requests"]))
    if not ok:
        raise NoencoreError(f"{path}: not a noencore request history (expected "
                            f"{{'format': {FORMAT!r}, 'requests': [...]}} with forget_ids in "
                            "each request)")
    if int(data.get("version", 0)) > VERSION:
        raise NoencoreError(f"{path}: request history version {data['version']} is newer "
                            f"than this noencore reads ({VERSION}); upgrade noencore")
    for i, req in enumerate(data["requests"]):
        if req.get("forget_digest") not in (None, ids_digest(req["forget_ids"])):
            raise NoencoreError(f"{path}: request {i + 1}'s forget_ids do not match its "
                                "forget_digest; the file was edited or damaged")
    return data["requests"]


def write_requests(folder: str | os.PathLike, history: Sequence[dict]) -> Path:
    """Write ``history`` to ``folder/requests.json`` atomically."""
    path = _path(folder)
    text = json.dumps({"format": FORMAT, "version": VERSION, "requests": list(history)},
                      indent=1)
    atomic_write(path, (text + "\n").encode())
    return path
