"""The report a rights holder reads at the end of a run (``noencore.unlearn(...,
audit=SPLIT|IDS)``, ``noencore unlearn --audit``): the public ``unlearn``, which trains
through the engine (``noencore.engine.unlearn``) and then audits.

The unlearned model is evaluated against the starting model (``noencore.evaluate``) on
the forget set, the remain set and the audit tracks: music like the forget set that the
model never trained on (e.g. a share of the artist's unreleased tracks), which the run
reads nowhere else. The report holds the forget-vs-audit AUC of every membership-inference
attack, the artist-level dataset-inference p-value, verbatim replay, the remain set's
change, the relearning probe (the unlearned model fine-tuned on the remain set for
``RELEARN_STEPS`` steps, then the forget AUC again) and one verdict line over all of them,
with the plots (per-item NLL histograms, ROC curves) in ``OUT/report``.

The audit tracks must be disjoint from every set the run reads (forget, remain, the stop
rule's non-members, the anchored unseen tracks): a membership test on tracks the method
was fitted to would grade its own homework. The engine refuses that before any training
(``noencore.engine.sets.check_disjoint``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from noencore.engine.config import UnlearnConfig
from noencore.engine.loop import UnlearnResult
from noencore.engine.loop import unlearn as train

RELEARN_STEPS = 10    # the relearning probe's fine-tuning steps on the remain set
REPORT_FOLDER = "report"
AUDIT_METRICS = ("token", "mia", "privleak", "dataset_inference", "continuation")
# the remain set's NLL may move this far from the starting model's (the evaluation's own
# default, 10 %, is a loose bound for a model users keep using)
REMAIN_NLL_REL = 0.02


def unlearn(model: Any, shards: Any, config: UnlearnConfig | None = None, *,
            progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
            **overrides: Any) -> UnlearnResult:
    """``noencore.engine.unlearn`` (every option: ``UnlearnConfig``), then, with ``audit``,
    the audit of the unlearned model against the starting model (``audit_run``), its
    report in the result's ``report``."""
    cfg = (config or UnlearnConfig()).replace(**overrides)
    result = train(model, shards, cfg, progress=progress, on_step=on_step)
    if cfg.audit is not None:
        forget, remain = result.audit_sets
        result.report = audit_run(result.model, model, shards, forget, remain, cfg.audit,
                                  result.out, lr=cfg.lr, batch_size=cfg.batch_size,
                                  frames=cfg.frames, progress=progress)
    return result


def audit_run(model: Any, start: Any, shards: Any, forget: Any, remain: Any, audit: Any,
              out: Path, *, lr: float, batch_size: int, frames: int,
              progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (the unlearned model) against ``start`` (the starting model's
    spec) and write ``out / report``; returns the evaluation's result with ``verdict``
    (one line) added. Every rank calls it (the evaluation splits its work over them)."""
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.report import Criteria, verdict_line

    result = evaluate(model, {"forget": forget, "remain": remain, "holdout": audit},
                      shards=shards, reference=start, metrics=list(AUDIT_METRICS),
                      batch_size=batch_size, frames=frames, out=out / REPORT_FOLDER,
                      overwrite=True, relearn_steps=RELEARN_STEPS, relearn_lr=lr,
                      relearn_batch_size=batch_size, progress=progress,
                      criteria=Criteria(remain_nll_rel=REMAIN_NLL_REL))
    result["verdict"] = verdict_line(result)
    return result
