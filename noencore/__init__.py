"""noencore: fast, measurable unlearning (opt-out) for MusicGen.

The data path, one sub-package per stage::

    noencore.data        manifest -> audio -> EnCodec tokens -> memory-mapped shards -> batches
    noencore.models      MusicGen LM adapter (hidden states before the codebook heads), load/save
    noencore.methods     GA, RL, GradDiff, bounded GA, NPO, SimNPO: a batch -> targets + row weights
    noencore.ops         fused linear cross-entropy with ascent (Triton / C++ / torch)
    noencore.engine      the training loop: one process or DeepSpeed ZeRO
    noencore.evaluation  batched token metrics, membership inference, CLAP, FAD, reports
    noencore.planner     which ZeRO stage, micro-batch and accumulation fit G GPUs
    noencore.demo        the whole pipeline on a synthetic corpus

Imports run one way, down that path (``tests/test_import_graph.py`` checks it).

``import noencore`` is light: heavy packages (audiocraft, deepspeed, triton,
laion_clap) load only inside the code paths that use them. The names below are
resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from noencore.version import __version__

# public name -> module that defines it
_LAZY = {
    # the stages, in the order of the data path
    "precompute": "noencore.data.precompute",
    "TokenShards": "noencore.data.shards",
    "SetSpec": "noencore.data.shards",
    "condition": "noencore.models.conditions",
    "load_musicgen": "noencore.models.musicgen",
    "save_musicgen": "noencore.models.musicgen",
    "MusicGenModel": "noencore.models.lm",
    "unlearn": "noencore.audit",  # the engine's, then the audit (with ``audit``)
    "UnlearnConfig": "noencore.engine.config",
    "evaluate": "noencore.evaluation.evaluate",
    "EvalConfig": "noencore.evaluation.config",
    "run_demo": "noencore.demo.pipeline",
    # what they return
    "UnlearnResult": "noencore.engine.loop",
    "EvalResult": "noencore.evaluation.evaluate",
    # what they raise
    "NoencoreError": "noencore.errors",
    "UsageError": "noencore.errors",
    "RequestConflict": "noencore.errors",
    "DivergenceError": "noencore.engine.loop",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noencore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
