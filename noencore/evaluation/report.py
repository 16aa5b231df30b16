"""The evaluation report: ``report.json`` (every number), ``report.md`` (the before/after
table with arrows for the good direction, and the verdicts) and PNG plots (per-item NLL
histograms, MIA ROC curves). Files are written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noencore.evaluation.mia import ATTACKS as _REGISTRY

ATTACKS = tuple(_REGISTRY)
ATTACK_NAMES = {a.name: a.label for a in _REGISTRY.values()}
#: the attacks that read no other model (the AUC table, the ROC curves, the AUC verdict)
_SELF_ATTACKS = tuple(a.name for a in _REGISTRY.values() if a.reference is None)


@dataclass
class Criteria:
    """Thresholds of the verdict lines (all configurable).

    forget_auc_tol: every token MIA AUC, forget vs holdout, within this of 0.5.
    remain_nll_rel: remain NLL within this fraction of the reference model's.
    privleak_tol: |privleak| (percent) at most this, for MUSE's privleak and for the
        project's privleak_minkpp (the same formula on Min-K%++ at k = 0.2).
    forget_quality_min: KS p-value at least this (needs a retrained model).
    clap_remain_rel: remain CLAP score within this fraction of the reference's.
    retrained_auc_tol: every attack's forget MIA AUC within this of the retrained model's
        AUC of the same attack (the strongest attack decides; needs a retrained model).
    dataset_inference_min: the dataset-inference p-value of the unlearned model at least
        ``min(dataset_inference_min, the retrained model's p-value)``
        (:func:`dataset_inference_verdict`).
    relearn_auc_tol: after the relearning probe's last step, the forget AUC (LOSS) within
        this of chance: forgetting that lasts (needs the probe).
    """

    forget_auc_tol: float = 0.05
    remain_nll_rel: float = 0.10
    privleak_tol: float = 10.0
    forget_quality_min: float = 0.05
    clap_remain_rel: float = 0.10
    retrained_auc_tol: float = 0.05
    dataset_inference_min: float = 0.05
    relearn_auc_tol: float = 0.10

    @classmethod
    def parse(cls, text: str | None) -> Criteria:
        """From ``"name=value,name=value"`` (CLI); unknown names are an error."""
        out = cls()
        for part in filter(None, (text or "").split(",")):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"unknown verdict criterion {name!r}; known: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            setattr(out, name, float(value))
        return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def verdicts(results: dict[str, Any], crit: Criteria) -> list[dict[str, Any]]:
    """One verdict per criterion that the results can decide; others say why not."""
    out = []
    mia = results.get("mia", {}).get("after", {}).get("forget", {})
    aucs = {a: mia.get(a) for a in _SELF_ATTACKS if mia.get(a) is not None}
    if aucs:
        worst = max(aucs, key=lambda a: abs(aucs[a] - 0.5))
        dev = abs(aucs[worst] - 0.5)
        out.append({"criterion": "forget MIA AUC near chance", "value": aucs[worst],
                    "detail": f"worst attack {ATTACK_NAMES[worst]}",
                    "threshold": f"|AUC - 0.5| <= {crit.forget_auc_tol}",
                    "pass": dev <= crit.forget_auc_tol})
    else:
        out.append({"criterion": "forget MIA AUC near chance", "value": None, "pass": None,
                    "threshold": f"|AUC - 0.5| <= {crit.forget_auc_tol}",
                    "detail": mia.get("note", "no AUC computed")})
    tok = results.get("token", {})
    after, before = tok.get("after", {}).get("remain"), tok.get("before", {}).get("remain")
    if after and before and before.get("nll"):
        rel = (after["nll"] - before["nll"]) / before["nll"]
        out.append({"criterion": "remain NLL kept", "value": after["nll"],
                    "detail": f"reference {before['nll']:.4f}, change {rel:+.1%}",
                    "threshold": f"within {crit.remain_nll_rel:.0%} of reference",
                    "pass": abs(rel) <= crit.remain_nll_rel})
    pl = results.get("privleak", {})
    pv = results.get("privleak_variants", {})
    for name, value in (("privleak (MUSE's: Min-K% at k=40%, last token out)", pl.get("after")),
                        ("privleak_minkpp (MUSE's formula on Min-K%++ at k=20%)",
                         pv.get("after", {}).get("minkpp"))):
        if value is not None:
            out.append({"criterion": name, "value": value,
                        "detail": f"relative to {pl['relative_to']}",
                        "threshold": f"|privleak| <= {crit.privleak_tol}%",
                        "pass": abs(value) <= crit.privleak_tol})
    fq = results.get("forget_quality", {})
    if fq.get("after") is not None:
        out.append({"criterion": "forget quality (KS p-value)", "value": fq["after"],
                    "detail": f"{fq['statistic']}, unlearned vs retrained, {_n_items(fq, 'after')}",
                    "threshold": f">= {crit.forget_quality_min}",
                    "pass": fq["after"] >= crit.forget_quality_min})
    out += _retrained_verdicts(results, crit)
    out += _relearn_verdict(results, crit)
    gen = results.get("generation", {})
    ca = gen.get("after", {}).get("clap_score", {}).get("remain")
    cb = gen.get("before", {}).get("clap_score", {}).get("remain")
    if ca is not None and cb:
        rel = (ca - cb) / abs(cb)
        out.append({"criterion": "remain CLAP score kept", "value": ca,
                    "detail": f"reference {cb:.4f}, change {rel:+.1%}"
                              + (" (RANDOM CLAP WEIGHTS: meaningless)" if gen.get("random_clap") else ""),
                    "threshold": f"within {crit.clap_remain_rel:.0%} of reference",
                    "pass": abs(rel) <= crit.clap_remain_rel})
    return out


def _relearn_verdict(results: dict[str, Any], crit: Criteria) -> list[dict[str, Any]]:
    """The relearning probe's verdict (none where the probe did not run or measured no
    AUC): the forget AUC after its last step within ``relearn_auc_tol`` of chance."""
    points = (results.get("relearn") or {}).get("checkpoints") or []
    last = points[-1] if points else {}
    auc = last.get("forget_auc_loss")
    if auc is None:
        return []
    return [{"criterion": "forgetting lasts (relearning probe)", "value": auc,
             "detail": f"forget AUC (LOSS) after {last['steps']} steps of fine-tuning on "
                       "the remain set",
             "threshold": f"|AUC - 0.5| <= {crit.relearn_auc_tol}",
             "pass": abs(auc - 0.5) <= crit.relearn_auc_tol}]


def verdict_line(results: dict[str, Any]) -> str:
    """One line over the report's verdicts: 'forgotten' when every criterion that could be
    decided passes, else what failed, with its value and threshold."""
    checks = [v for v in results.get("verdicts", []) if v.get("pass") is not None]
    if not checks:
        return "verdict: undecided (no criterion could be measured; see the report's notes)"
    failed = [v for v in checks if not v["pass"]]
    if not failed:
        return f"verdict: forgotten ({len(checks)} of {len(checks)} criteria pass)"
    what = "; ".join(f"{v['criterion']}: {_fmt(v['value'])} (needs {v['threshold']})"
                     for v in failed)
    return (f"verdict: NOT forgotten ({len(checks) - len(failed)} of {len(checks)} criteria "
            f"pass): {what}")


def _retrained_verdicts(results: dict[str, Any], crit: Criteria) -> list[dict[str, Any]]:
    """The verdicts against the retrained model: the strongest attack's AUC gap and the
    dataset-inference p-value (each where the report holds it)."""
    out = []
    vs = results.get("mia", {}).get("vs_retrained", {})
    if vs.get("gap") is not None:
        out.append({"criterion": "forget MIA AUC near the retrained model's, every attack",
                    "value": vs["gap"],
                    "detail": f"strongest attack {ATTACK_NAMES[vs['worst_attack']]}: AUC "
                              f"{vs['auc']:.3f}, retrained {vs['auc_retrained']:.3f}",
                    "threshold": f"max |AUC - AUC_retrained| <= {crit.retrained_auc_tol}",
                    "pass": vs["gap"] <= crit.retrained_auc_tol})
    di = results.get("dataset_inference", {})
    if (di.get("after") or {}).get("p_value") is not None:
        out.append(dataset_inference_verdict(di, crit.dataset_inference_min))
    return out


def dataset_inference_verdict(di: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The dataset-inference verdict: pass when the unlearned model's p-value is at least
    ``min(alpha, p_retrained)``.

    A p-value at or above ``alpha`` means the forget set is not detected as a member set.
    Below it, the unlearned model still passes if the retrained model's own p-value is no
    larger: then the forget tracks differ from the holdout for a model that never saw
    them too (a corpus whose forget and holdout tracks are not exchangeable), and the
    unlearned model is held to that level, not to one no model could reach. Without a
    retrained model the threshold is ``alpha``.
    """
    p = di["after"]["p_value"]
    p_retr = (di.get("retrained") or {}).get("p_value")
    floor = alpha if p_retr is None else min(alpha, p_retr)
    n = f"n = {di['after']['n_suspect']} vs {di['after']['n_validation']} items"
    return {"criterion": "dataset inference (forget set as a whole vs holdout)", "value": p,
            "detail": n + ("" if p_retr is None else f", retrained p {p_retr:.3g}"),
            "threshold": f">= min({alpha}, p_retrained)" if p_retr is not None
            else f">= {alpha}",
            "pass": p >= floor}


def _n_items(fq: dict[str, Any], role: str) -> str:
    """The item counts a forget-quality p-value ran on: "n = 40 vs 40 items"."""
    n = fq.get("n", {})
    return f"n = {n.get(role)} vs {n.get('retrained')} items"


def _row(name: str, arrow: str, values: dict[str, dict[str, Any]], key: Any) -> str:
    cells = []
    for s in ("forget", "remain"):
        for role in ("before", "after"):
            cells.append(_fmt(key(values.get(role, {}), s)))
    return f"| {name} | {arrow} | " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    """The study's before/after table (forget vs remain) plus MIA, privleak and verdicts."""
    lines = ["# Unlearning evaluation", ""]
    m = results["models"]
    lines.append(f"- model (after): `{m['after']}`")
    lines.append(f"- reference (before): `{m.get('before') or 'none'}`")
    if m.get("retrained"):
        lines.append(f"- retrained without the forget set: `{m['retrained']}`")
    sizes = ", ".join(f"{k} {v['items']} items" for k, v in results["sets"].items())
    lines += [f"- sets: {sizes}", f"- precision {results['precision']}, batch size "
              f"{results['batch_size']}, seed {results['seed']}, token statistics by the "
              f"{results.get('op_backend') or 'unknown'} backend", ""]
    for note in results.get("notes", []):
        lines.append(f"> **Note:** {note}")
    lines += ["", "Arrows give the good direction: on the forget set we want the model to "
              "lose what it memorised, on the remain set to stay as it was "
              "(`~` = should not change, `→0.5` = should approach chance).", "",
              "| metric | good | forget before | forget after | remain before | remain after |",
              "|---|---|---|---|---|---|"]
    tok = results.get("token", {})
    lines.append(_row("NLL (nats/token)", "forget ↑, remain ~", tok,
                      lambda v, s: v.get(s, {}).get("nll")))
    lines.append(_row("top-1 accuracy", "forget ↓, remain ~", tok,
                      lambda v, s: v.get(s, {}).get("accuracy")))
    mia = results.get("mia", {})
    for a in _SELF_ATTACKS:
        lines.append(_row(f"MIA AUC vs holdout: {ATTACK_NAMES[a]}", "forget →0.5", mia,
                          lambda v, s, a=a: v.get(s, {}).get(a)))
    gen = results.get("generation", {})
    if gen.get("after"):
        lines.append(_row("CLAP text-audio score", "forget ↓, remain ~", gen,
                          lambda v, s: v.get("clap_score", {}).get(s)))
        lines.append(_row("FAD (CLAP emb.) vs set audio", "forget ↑, remain ~", gen,
                          lambda v, s: v.get("fad", {}).get(s)))
        lines.append(_row("CLAP sim. generation vs its clip", "forget ↓", gen,
                          lambda v, s: v.get("memorization", {}).get(s, {}).get("clip")))
        lines.append(_row("CLAP sim. to nearest clip of set", "forget ↓", gen,
                          lambda v, s: v.get("memorization", {}).get(s, {}).get("nearest")))
    cont = results.get("continuation", {})
    if cont.get("after"):
        lines.append(_row("exact continuation match", "forget ↓, remain ~", cont,
                          lambda v, s: v.get(s)))
    lines.append("")
    for a, reading in (("ref_before", "below 0.5: forget items lost more likelihood than "
                                      "never-seen music"),
                       ("ref_retrained", "MUSE's reference attack; the retrained model "
                                         "itself scores 0.5; above: the forget items are "
                                         "still favoured")):
        ref = mia.get("after", {}).get("forget", {}).get(a)
        if ref is not None:
            lines.append(f"MIA AUC, forget vs holdout, {ATTACK_NAMES[a]}: {_fmt(ref)} "
                         f"({reading}).")
    lines += _privleak_lines(results)
    fq = results.get("forget_quality", {})
    if "after" in fq:
        lines.append(f"forget quality (KS p-value of the {fq['statistic']}, against the "
                     f"retrained model; shrinks with n): after {_fmt(fq.get('after'))} "
                     f"({_n_items(fq, 'after')})"
                     + (f", before {_fmt(fq.get('before'))} ({_n_items(fq, 'before')})"
                        if "before" in fq else "")
                     + (f" ({fq['note']})" if fq.get("note") else ""))
    elif "note" in fq:
        lines.append(f"forget quality (KS p-value): n/a ({fq['note']})")
    lines += _vs_retrained_lines(mia)
    lines += _dataset_inference_lines(results.get("dataset_inference"))
    if gen.get("skipped"):
        lines.append(f"Generation metrics skipped: {gen['skipped']}")
    lines += _relearn_lines(results.get("relearn"))
    lines += ["", "## Verdicts", "", f"**{verdict_line(results)}**", ""]
    for v in results.get("verdicts", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]]
        lines.append(f"- **{mark}** {v['criterion']}: {_fmt(v['value'], 4)} "
                     f"(threshold {v['threshold']}; {v['detail']})")
    lines += ["", "## Plots", "", "![per-item NLL](nll_hist.png)", "", "![MIA ROC](roc.png)", ""]
    return "\n".join(lines)


def _privleak_lines(results: dict[str, Any]) -> list[str]:
    """MUSE's privleak and the project's variants, each named with its definition."""
    pl, pv = results.get("privleak", {}), results.get("privleak_variants", {})
    if "after" not in pl:
        return []
    roles = [r for r in ("before", "after") if r in pl]
    lines = ["", f"privleak (%, relative to {pl['relative_to']}; 0 = as the retrained model, "
             "-100 = fully leaking, positive = over-unlearned; docs/metrics.md):", "",
             "| name | attack | reference AUC | " + " | ".join(roles) + " |",
             "|---|---|---|" + "---|" * len(roles)]
    lines.append(f"| privleak (MUSE) | {ATTACK_NAMES[pl['attack']]} | "
                 f"{_fmt(pl.get('reference_auc'))} | "
                 + " | ".join(_fmt(pl.get(r), 1) for r in roles) + " |")
    for a, ref in pv.get("reference_auc", {}).items():
        lines.append(f"| privleak_{a} | {ATTACK_NAMES[a]} | {_fmt(ref)} | "
                     + " | ".join(_fmt(pv.get(r, {}).get(a), 1) for r in roles) + " |")
    if pl.get("note"):
        lines.append(f"> **Note:** {pl['note']}")
    return lines + [""]


def _vs_retrained_lines(mia: dict[str, Any]) -> list[str]:
    """Each attack's forget AUC beside the retrained model's, the strongest attack (the
    largest gap) first."""
    vs = mia.get("vs_retrained")
    if not vs:
        return []
    if "per_attack" not in vs:
        return ["", f"MIA AUC against the retrained model's: n/a ({vs.get('note')})"]
    after, retr = mia["after"]["forget"], mia["retrained"]["forget"]
    lines = ["", "Forget-vs-holdout MIA AUC against the retrained model's, per attack, "
             "strongest first (goal: every gap small):", "",
             "| attack | AUC after | AUC retrained | gap |", "|---|---|---|---|"]
    for a, gap in sorted(vs["per_attack"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {ATTACK_NAMES[a]} | {_fmt(after[a])} | {_fmt(retr[a])} | "
                     f"{_fmt(gap)} |")
    return lines + [""]


def _dataset_inference_lines(di: dict[str, Any] | None) -> list[str]:
    """The dataset-inference p-value of each role, the retrained model's beside the
    unlearned model's."""
    if not di:
        return []
    if "note" in di:
        return [f"dataset inference: n/a ({di['note']})"]
    roles = [r for r in ("after", "before", "retrained") if r in di]
    cells = []
    for r in roles:
        v = di[r]
        cells.append(f"{r} {_fmt(v['p_value'], 4)}" + (f" ({v['note']})" if v.get("note") else
                     f" (n = {v['n_suspect']} vs {v['n_validation']}, score gap "
                     f"{_fmt(v['score_gap'])})"))
    return [f"dataset inference (the forget set as a whole vs the holdout, "
            f"{len(di['features'])} attacks as features, {di['splits']} splits; p-value, "
            "small = still a member set; docs/metrics.md): " + ", ".join(cells), ""]


def _relearn_lines(block: dict[str, Any] | None) -> list[str]:
    """The relearning probe's table: the forget AUC and NLLs after each step count."""
    if not block:
        return []
    lines = ["", "## Relearning probe", "",
             f"A copy fine-tuned on the {block['trained_on']} set ({block['method']}, lr "
             f"{block['lr']}, {block['batch_size']} rows per step); a robust unlearning keeps "
             "the forget AUC near 0.5.", "",
             "| steps | forget vs holdout AUC (LOSS) →0.5 | forget NLL | remain NLL | "
             "holdout NLL |", "|---|---|---|---|---|"]
    for c in block["checkpoints"]:
        lines.append(f"| {c['steps']} | {_fmt(c.get('forget_auc_loss'))} | "
                     f"{_fmt(c.get('forget_nll'))} | {_fmt(c.get('remain_nll'))} | "
                     f"{_fmt(c.get('holdout_nll'))} |")
    if block.get("note"):
        lines.append(f"> **Note:** {block['note']}")
    return lines


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; reports are meant to be shared
    os.replace(tmp, path)


def _atomic_figure(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def plot_nll_histograms(item_nll: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """item_nll[role][set] = float [n_items] mean NLL; one panel per role (before, after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in ("before", "after") if r in item_nll]
    allv = np.concatenate([v[np.isfinite(v)] for r in roles for v in item_nll[r].values()])
    bins = np.linspace(allv.min(), allv.max() + 1e-6, 31) if allv.size else 10
    fig, axes = plt.subplots(1, len(roles), figsize=(6 * len(roles), 4), squeeze=False,
                             sharex=True, sharey=True)
    colors = {"forget": "tab:red", "remain": "tab:blue", "holdout": "tab:gray"}
    for ax, role in zip(axes[0], roles):
        for name, v in item_nll[role].items():
            v = v[np.isfinite(v)]
            c = colors.get(name)
            # filled with an outline, so that overlapping sets stay distinguishable
            ax.hist(v, bins=bins, alpha=0.35, label=f"{name} ({v.size} items)", color=c,
                    histtype="stepfilled", edgecolor=c, linewidth=1.5)
        ax.set_title({"before": "Before unlearning (reference model)",
                      "after": "After unlearning"}[role])
        ax.set_xlabel("per-item mean NLL (nats / token)")
        ax.set_ylabel("items")
        ax.legend()
    fig.suptitle("Per-item NLL: forget should move right after unlearning, remain stay put")
    fig.tight_layout()
    _atomic_figure(fig, path)
    plt.close(fig)


def plot_roc(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]], path: Path) -> None:
    """curves[role][attack] = (fpr, tpr, auc) for forget vs holdout; one panel per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in ("before", "after") if r in curves]
    fig, axes = plt.subplots(1, max(len(roles), 1), figsize=(5.5 * max(len(roles), 1), 5),
                             squeeze=False)
    for ax, role in zip(axes[0], roles):
        for attack, (fpr, tpr, auc) in curves[role].items():
            ax.plot(fpr, tpr, label=f"{ATTACK_NAMES[attack]}: AUC {auc:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance (AUC 0.5)")
        ax.set_title(f"MIA ROC, forget vs holdout, {role} unlearning")
        ax.set_xlabel("false positive rate (holdout called member)")
        ax.set_ylabel("true positive rate (forget called member)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=8)
    _atomic_figure(fig, path)
    plt.close(fig)


def write_report(out: str | os.PathLike, results: dict[str, Any],
                 item_nll: dict[str, dict[str, np.ndarray]],
                 curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]) -> Path:
    """Write report.json, report.md, nll_hist.png and roc.png into ``out``; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_nll_histograms(item_nll, out / "nll_hist.png")
    plot_roc(curves, out / "roc.png")
    _atomic_text(out / "report.json", json.dumps(results, indent=2, default=_json_default))
    _atomic_text(out / "report.md", markdown(results))
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
