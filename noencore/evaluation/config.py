"""``EvalConfig``: every option of ``noencore.evaluate``, declared once.

Each option is one field with its default, type and help text (``dataclasses.field``
metadata); ``evaluate(model, sets, config=None, **overrides)`` takes them, and the flags
of ``noencore evaluate`` that set them take their defaults and help from here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from noencore import trackers
from noencore.errors import UsageError
from noencore.evaluation import relearn
from noencore.evaluation.mia import MIN_AUC_ITEMS


def option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EvalConfig:
    """The options of one evaluation (``noencore.evaluate``; ``noencore evaluate``).

    Under a launcher (``torchrun``, ``deepspeed``: ``WORLD_SIZE`` > 1) or inside an
    initialised process group, every rank calls ``evaluate`` with the same options: the
    process group is joined if needed (NCCL on GPUs, gloo on the CPU), each rank scores
    its share of every set's windows and generates for its share of the items, rank 0
    gathers them, computes the metrics and alone writes ``out`` (and shows progress);
    every rank returns the same report. The numbers equal a one-process run's up to the
    float rounding of differently composed batches.
    """

    metrics: Sequence[str] | None = option(
        None, "any of ALL_METRICS; default: the token metrics, plus the generation metrics "
              "when clap is given (asking for a CLAP one without clap is an error; "
              "continuation and ngram, verbatim replay, need no CLAP)")
    reference: Any = option(
        None, "the model before unlearning (model or spec), or a folder/.npz of its cached "
              "token statistics (token_stats.npz from an earlier evaluation)")
    batch_size: int = option(16, "windows per forward pass for token metrics (per rank)")
    out: Any = option(None, "folder for report.json, report.md, nll_hist.png, roc.png, "
                            "token_stats.npz")
    overwrite: bool = option(False, "replace an earlier evaluation in out (only the files "
                                    "this tool listed there are removed)")
    retrained: Any = option(
        None, "a model retrained without the forget set (or its cached statistics), for "
              "privleak relative to it, TOFU forget quality, its own membership-inference "
              "AUCs and NLLs beside the model's, and (a model) its verbatim replay; it must "
              "share the model's codec and vocabulary")
    conditions: Any = option(None, "text-condition cache (a ConditionCache or its folder; "
                                   "default SHARDS/conditions)")
    frames: int | None = option(None, "window length for token metrics (default: the longest "
                                      "item)")
    precision: str = option("bf16", "bf16 (autocast the LM forward) or fp32")
    device: str | None = option(
        None, "where models given as specs are loaded and run (default: cuda:LOCAL_RANK "
              "under a launcher, else the current GPU, else cpu); a model object stays "
              "where it is")
    allow_codec_mismatch: bool = option(
        False, "evaluate although the shards record another codec than the model's (the "
               "numbers then compare unlike tokens; not advised)")
    clap: Any = option(None, "laion-clap checkpoint (.pt), or a loaded Clap")
    clap_tokenizer: str = option("roberta-base", "local RoBERTa tokenizer folder (or a cached "
                                                 "hub id)")
    clap_model: str = option("HTSAT-base", "laion-clap audio model")
    generation: Any = option(None, "sampling settings for generation metrics "
                                   "(GenerationConfig)")
    criteria: Any = option(None, "verdict thresholds (Criteria)")
    min_auc_items: int = option(MIN_AUC_ITEMS, "fewest items per side for an AUC, and per "
                                                "half of the forget and the holdout set for "
                                                "dataset inference")
    progress: bool = option(True, "progress bars (rank 0)")
    relearn_steps: Any = option(
        None, "relearning probe: a step count or several ([5, 10], '5,10'): fine-tune a "
              "copy of the model on the remain set (AdamW, relearn_lr, relearn_batch_size "
              "rows per step, windows of frames frames or up to 500) and measure the "
              "forget-vs-holdout LOSS AUC and the NLLs again after each count (the report's "
              "relearn block; needs the remain set; under a launcher DeepSpeed ZeRO-2 in "
              "fp32)")
    relearn_lr: float = option(relearn.DEFAULT_LR, "relearning probe learning rate (AdamW)")
    relearn_batch_size: int = option(relearn.DEFAULT_BATCH_SIZE,
                                     "relearning probe rows per step, all ranks together")
    shards: Any = option(None, "a TokenShards (or folder) in which the sets may be named as "
                               "unlearn names them: a split name or a list of source ids")
    report_to: Any = option(None, "experiment trackers for the report's numbers, its goal "
                                  "table and plots: comma-separated tensorboard, wandb, csv "
                                  "(written to OUT/trackers; wandb follows its WANDB_* "
                                  "variables)")

    def tracker_names(self) -> tuple[str, ...]:
        """``report_to`` as tracker names (``noencore.trackers.parse``)."""
        return trackers.parse(self.report_to)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (others as their text), for a tracker's run
        config."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                value = list(value)
            out[f.name] = value if isinstance(value, str | int | float | bool | list | None) \
                else str(value)
        return out

    def check(self) -> None:
        """Each numeric option's type and range, and the choices: one line naming the
        option and what it takes."""
        for name, (kind, ok, want) in _CHECKS.items():
            value = getattr(self, name)
            if value is None and name in ("frames",):
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)) \
                    or not math.isfinite(value) or not ok(value):
                raise UsageError(f"option {name} (--{name.replace('_', '-')}): {value!r}; it "
                                 f"must be {want}")
        if self.precision not in ("bf16", "fp32"):
            raise UsageError(f"option precision (--precision): {self.precision!r}; it must "
                             "be bf16 or fp32")
        if self.metrics is not None and (not isinstance(self.metrics, Sequence) or isinstance(
                self.metrics, str) or not all(isinstance(m, str) for m in self.metrics)):
            raise UsageError(f"option metrics (--metrics): {self.metrics!r}; it must be a "
                             "list of metric names")

    def replace(self, **overrides: Any) -> EvalConfig:
        """A copy with ``overrides``; an unknown name is refused with the known ones."""
        known = sorted(f.name for f in dataclasses.fields(self))
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise UsageError(f"unknown evaluate option(s) {unknown}; known: {known}")
        return dataclasses.replace(self, **overrides)


# (type, range, what it must be) of each numeric option
_CHECKS: dict[str, tuple[type, Any, str]] = {
    "batch_size": (int, lambda v: v >= 1, "a whole number >= 1"),
    "frames": (int, lambda v: v >= 1, "a whole number of frames >= 1 (or unset)"),
    "min_auc_items": (int, lambda v: v >= 1, "a whole number >= 1"),
    "relearn_lr": (float, lambda v: v > 0, "a positive finite number"),
    "relearn_batch_size": (int, lambda v: v >= 1, "a whole number >= 1"),
}


def cli_option(name: str) -> dict[str, Any]:
    """``default`` and ``help`` of a flag that sets the option ``name`` (argparse kwargs)."""
    f = next(f for f in dataclasses.fields(EvalConfig) if f.name == name)
    shown = f" (default: {f.default})" if f.default is not None else ""
    return {"default": f.default, "help": f.metadata["help"] + shown}
