"""MusicGen for unlearning: load/save, the hidden-state adapter, the text-condition cache."""
from __future__ import annotations

from noencore.models.adapter import CodebookRows, codebook_rows, pattern_index
from noencore.models.lm import MusicGenModel
from noencore.models.musicgen import load_musicgen, save_musicgen
from noencore.models.text import ConditionCache, build_condition_cache, register_t5

__all__ = ["CodebookRows", "ConditionCache", "MusicGenModel", "build_condition_cache",
           "codebook_rows", "load_musicgen", "pattern_index", "register_t5", "save_musicgen"]
