"""The text-condition cache of a shard folder, for one model: ``noencore.condition``.

Training and evaluation never run T5: they read its outputs, computed once per distinct
caption of the shards and stored beside them (``SHARDS/conditions/``) by this function,
which ``noencore condition`` calls.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from noencore.models.text import ConditionCache, build_condition_cache


def condition(shards: Any, model: Any, *, out: str | os.PathLike | None = None,
              batch_size: int = 32, device: str = "cpu",
              progress: bool = True) -> ConditionCache:
    """Cache the text encoder's outputs for every caption of ``shards``.

    shards: a ``TokenShards`` or its folder. model: a MusicGen spec (hub id, folder,
    "tiny") or a loaded ``MusicGenModel``: its T5 is the one run. out: the cache folder
    (default ``SHARDS/conditions``, where ``unlearn`` and ``evaluate`` look). Captions
    already cached are skipped; a cache of another encoder is refused.
    """
    from noencore.data.shards import TokenShards
    from noencore.models.musicgen import text_encoder_name

    shards = TokenShards(shards) if isinstance(shards, str | os.PathLike) else shards
    encoder = model.text_encoder if hasattr(model, "text_encoder") else text_encoder_name(
        str(model))
    folder = Path(out) if out is not None else Path(shards.path) / "conditions"
    return build_condition_cache(folder, shards.captions, encoder, batch_size=batch_size,
                                 device=device, progress=progress)
