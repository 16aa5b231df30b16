"""The opt-out requests a saved model has served, and the check of a new one against them.

An unlearned model may be unlearned again: a second artist opts out after the first, and
``noencore unlearn`` runs on the saved model, whose folder records what it forgot
(``noencore.models.requests``: the records, their file, ``read_requests`` and
``write_requests``, re-exported here for the engine's callers).

Before training, a new request is refused (``RequestConflict``) when

- its forget set overlaps an earlier request's: those items are already forgotten, and
  ascending on them again over-unlearns them;
- its remain set holds an earlier request's forget items and the method descends on
  the remain set freely: that would teach the model the first artist again. With an
  anchored remain set (``remain_anchor``: descent only on rows whose NLL rose above the
  starting model's) those items are allowed, and it is the way to keep them where the
  earlier request left them: held, neither relearned nor pushed further by the new
  request's ascent.

Every rank of a launcher reads the same folder and the same shards, so every rank takes
the same decision before any collective. Fine-tuning (method ``finetune``) is not an
opt-out: it is neither checked nor recorded.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from noencore.errors import RequestConflict
from noencore.models.requests import (
    FORMAT,
    REQUESTS_FILE,
    VERSION,
    ids_digest,
    make_request,
    read_requests,
    write_requests,
)

__all__ = ["FORMAT", "REQUESTS_FILE", "VERSION", "check_request", "ids_digest", "is_opt_out",
           "make_request", "read_requests", "set_ids", "held", "unheld", "unheld_warning",
           "write_requests"]


def _shown(ids: Sequence[str], limit: int = 8) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def _name(i: int, req: dict) -> str:
    return f"request {i + 1} (forget {req.get('forget')!r}, {req.get('date', '?')})"


def check_request(history: Sequence[dict], forget_ids: Sequence[str],
                  remain_ids: Sequence[str], model: str = "the model", *,
                  anchored: bool = False) -> None:
    """Raise ``RequestConflict`` if the new request (its forget and remain item ids)
    contradicts one in ``history``; names the items and the earlier request.
    ``anchored``: the method holds remain rows at the starting model's NLL instead of
    descending on them (``remain_anchor``), so earlier forget items may be among them."""
    forget, remain = {str(x) for x in forget_ids}, {str(x) for x in remain_ids}
    for i, req in enumerate(history):
        done = set(req.get("forget_ids") or [])
        again = forget & done
        if again:
            raise RequestConflict(
                f"{model}: {len(again)} forget item(s) were already forgotten by "
                f"{_name(i, req)}: {_shown(again)}; leave them out of the new forget set "
                "(unlearning them again pushes them past a never-trained model)")
        relearn = remain & done
        if relearn and not anchored:
            raise RequestConflict(
                f"{model}: the remain set holds {len(relearn)} item(s) forgotten by "
                f"{_name(i, req)}: {_shown(relearn)}; training on them would relearn them. "
                "Exclude them from the remain set (give --remain a split or an id list "
                "without them), or anchor the remain set (method option "
                "remain_anchor=true) to hold them where that request left them")


def _forgotten(history: Sequence[dict]) -> set[str]:
    """Every forget id of the earlier requests."""
    return {x for req in history for x in req.get("forget_ids") or []}


def unheld(history: Sequence[dict], remain_ids: Sequence[str]) -> list[str]:
    """Earlier requests' forget ids that the new remain set does not hold: the new ascent
    may push them past a never-trained model (an anchored remain set holding them keeps
    them where they were)."""
    return sorted(_forgotten(history) - {str(x) for x in remain_ids})


def held(history: Sequence[dict], remain_ids: Sequence[str]) -> list[str]:
    """Earlier requests' forget ids that the new remain set holds (an anchored remain set
    keeps them where those requests left them, from both sides)."""
    return sorted(_forgotten(history) & {str(x) for x in remain_ids})


def unheld_warning(history: Sequence[dict], remain_ids: Sequence[str]) -> str | None:
    """The warning for ``unheld`` items, or None when every earlier item is held."""
    loose = unheld(history, remain_ids)
    if not loose:
        return None
    return (f"{len(loose)} item(s) forgotten by earlier requests are not in this request's "
            f"remain set ({_shown(loose)}): the new ascent may push them past a "
            "never-trained model; hold them in an anchored remain set (remain_anchor=true)")


def is_opt_out(method: Any) -> bool:
    """Whether a run of ``method`` serves an opt-out request (fine-tuning does not)."""
    return getattr(method, "name", None) != "finetune"


def set_ids(sets: Any) -> tuple[list[str], list[str]]:
    """(forget ids, remain ids) of an ``UnlearningSets``: the source ids of its windows."""
    ids = sets.shards.ids
    return (sorted({ids[i] for i in set(sets.forget_item.tolist())}),
            sorted({ids[i] for i in set(sets.remain_item.tolist())}))
