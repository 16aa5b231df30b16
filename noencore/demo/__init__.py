"""The demo: the whole opt-out pipeline on a corpus it synthesises (``noencore demo``).

    corpus.py     a synthetic music corpus: invented artists, one of whom opts out
    pipeline.py   corpus -> shards -> memorised, retrained and unlearned models ->
                  evaluations -> report, table, plot and each stage's digest

It sits above every stage and calls them through their public functions. Importing it
loads no torch (the command sets the threads' wait policy first).
"""
from __future__ import annotations

from noencore.demo.pipeline import (
    DEFAULT_METHOD,
    DEFAULT_METHODS,
    GOALS,
    DemoConfig,
    goals_met,
    run_demo,
    stage_digests,
    summary_table,
)

__all__ = ["DEFAULT_METHOD", "DEFAULT_METHODS", "GOALS", "DemoConfig", "goals_met", "run_demo",
           "stage_digests", "summary_table"]
