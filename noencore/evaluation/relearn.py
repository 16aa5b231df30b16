"""Relearning probe: does a little fine-tuning on the remain set bring the forget set back?

A model that only hides what it was asked to forget relearns it within a few steps of
ordinary fine-tuning on other data (the "relearning attack" of the unlearning
literature, e.g. Lynch et al. 2024, "Eight methods to evaluate robust unlearning in
LLMs"; Hu et al. 2024, "Jogging the memory of unlearned LLMs"). The probe fine-tunes a
copy of the unlearned model on the remain set alone for N steps and measures the
forget-vs-holdout LOSS AUC and the forget NLL again; a robustly unlearned model keeps
its AUC near 0.5.

The fine-tuning is the engine's (``noencore.unlearn``, method ``finetune`` with
``forget_weight=0``: each batch carries one forget row that gets no weight, the rest are
remain rows), so it runs where the engine runs: one process (fp32), or under a launcher
DeepSpeed ZeRO-2 with fp32 weights, which gives the one-process numbers up to the
reduction order. Several step counts (``steps=[5, 10]``) are one continued run: it is
checkpointed at each count and resumed from there (``OUT/relearn/checkpoints``, removed
at the end; ``OUT/relearn/metrics.jsonl`` keeps the training curve).
"""
from __future__ import annotations

import copy
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from noencore.errors import UsageError

DEFAULT_LR = 1e-5  # the engine's own default: what a user fine-tuning MusicGen would pick
DEFAULT_BATCH_SIZE = 8
DEFAULT_FRAMES = 500  # the engine's default window (10 s at 50 frames/s)
# under a launcher: ZeRO-2 with fp32 weights (no bf16), so the ranks train as one process
ZERO_FP32 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}


def parse_steps(text: str | int | Sequence[int] | None) -> list[int]:
    """Step counts from ``"5,10"`` (CLI), an int or a list: sorted, distinct, positive
    (None, "" or an empty list: no probe)."""
    if text is None or text == "" or (isinstance(text, Sequence) and not isinstance(text, str)
                                      and len(text) == 0):
        return []
    if isinstance(text, str):
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--relearn-steps {text!r}: expected step counts such as 5 or "
                             "5,10") from None
    else:
        items = [text] if not isinstance(text, Sequence) else list(text)
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in items):
            raise UsageError(f"relearn steps {text!r}: expected whole step counts such as 5 "
                             "or [5, 10]")
        values = [int(x) for x in items]
    if not values or min(values) <= 0:
        raise UsageError(f"relearn steps {text!r}: every step count must be a positive integer")
    return sorted(set(values))


def check_sets(sets: Mapping[str, Any]) -> None:
    """The probe needs a remain set to train on, and the forget set in the same shards."""
    if sets.get("remain") is None:
        raise UsageError("the relearning probe fine-tunes on the remain set: give one "
                         "(--remain-split, or sets['remain'])")
    if Path(sets["forget"].path) != Path(sets["remain"].path):
        raise UsageError(f"the relearning probe reads the forget set ({sets['forget'].path}) "
                         f"and the remain set ({sets['remain'].path}) from one shard folder; "
                         "select both from the same shards")


def _copy(model: Any) -> Any:
    """An independent trainable copy of the LM (the codec is not needed to train)."""
    from noencore.models.lm import MusicGenModel

    return MusicGenModel(copy.deepcopy(model.lm), model.cfg, codec=None,
                         spec=f"{model.spec} (relearned)", requests=model.requests)


def _work_dir(out: str | os.PathLike | None) -> tuple[Path, bool]:
    """(folder of the fine-tuning run, whether it is temporary); the same on every rank."""
    from noencore import distributed as dist

    if out is not None:
        return Path(out) / "relearn", False
    tmp = tempfile.mkdtemp(prefix="noencore-relearn-") if dist.rank() == 0 else None
    return Path(dist.broadcast_object(tmp)), True


def relearned_models(model: Any, sets: Mapping[str, Any], steps: Sequence[int], *,
                     lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE,
                     frames: int | None = None, seed: int = 0,
                     conditions: str | os.PathLike | None = None,
                     out: str | os.PathLike | None = None,
                     progress: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(n, model after n steps)`` for each count in ``steps`` (ascending), one
    copy of ``model`` fine-tuned on ``sets["remain"]``; ``model`` itself is not touched.

    Every rank of a launcher calls this with the same arguments (the fine-tuning runs
    under DeepSpeed there); each yielded model is whole on every rank.
    """
    from noencore import distributed as dist
    from noencore.data.shards import TokenShards
    from noencore.engine import unlearn
    from noencore.methods import get_method

    check_sets(sets)
    counts = parse_steps(steps)
    remain = sets["remain"]
    shards = TokenShards(remain.path)
    window = int(frames) if frames else min(DEFAULT_FRAMES, int(remain.frames.max()))
    work, temporary = _work_dir(out) if len(counts) > 1 else (None, False)
    probe = _copy(model)
    kw = dict(forget=list(dict.fromkeys(sets["forget"].ids)),
              remain=list(dict.fromkeys(remain.ids)), method=get_method(
                  "finetune", forget_weight=0.0, remain_weight=1.0),
              lr=lr, batch_size=batch_size, forget_ratio=1.0 / batch_size, frames=window,
              seed=seed, conditions=conditions, device=str(model.device), save=False,
              progress=progress, out=work,
              deepspeed=ZERO_FP32 if dist.world_size() > 1 else None)
    try:
        for i, n in enumerate(counts):
            unlearn(probe, shards, steps=n, resume=i > 0, **kw)
            yield n, probe
    finally:
        if work is not None and dist.rank() == 0:
            shutil.rmtree(work if temporary else work / "checkpoints", ignore_errors=True)


def relearn_block(relearned: Sequence[tuple[int, Mapping[str, Any]]],
                  after: Mapping[str, Any], *, lr: float, batch_size: int, frames: int | None,
                  min_items: int) -> dict[str, Any]:
    """The report's "relearn" block: the unlearned model's forget-vs-holdout LOSS AUC and
    set NLLs (``at 0 steps``) and the same after each step count.

    relearned: ``[(n, {set name: SetStats})]``; after: the unlearned model's SetStats.
    """
    from noencore.evaluation import mia

    def measure(stats: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {f"{name}_nll": s.summary()["nll"] for name, s in stats.items()}
        auc = None
        if "holdout" in stats and not mia.check_auc_sizes(
                stats["forget"].n_items, stats["holdout"].n_items, min_items):
            auc = mia.roc_auc(mia.loss_score(stats["forget"].tokens()),
                              mia.loss_score(stats["holdout"].tokens()), min_items)
        return {"forget_auc_loss": auc, **row}

    block: dict[str, Any] = {
        "trained_on": "remain", "lr": lr, "batch_size": batch_size, "frames": frames,
        "method": "finetune (forget_weight=0)",
        "checkpoints": [{"steps": 0, **measure(after)}]
        + [{"steps": n, **measure(stats)} for n, stats in relearned]}
    if "holdout" not in after:
        block["note"] = "no holdout set: the forget AUC needs non-members"
    return block
