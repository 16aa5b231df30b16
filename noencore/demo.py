"""The main job end to end, on a corpus the demo synthesises itself (CPU, no network).

    corpus  -> token shards (tiny EnCodec) -> text-condition cache
            -> a tiny MusicGen fine-tuned on forget + remain until it memorised them
            -> unlearned with GA, RL (the study's methods) and the engine's own methods,
               each from the same memorised model
            -> evaluated before/after: token NLL, membership inference, verdicts
            -> OUT/report.md (one table for all methods) + per-method reports and plots

Every stage is resumable: a stage whose output is complete is reused, so a second run
only re-does what is missing (or what ``fresh=True`` asks for).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOLDOUT = "holdout_optout"  # split of the demo corpus (noencore.demo_corpus)

# (method, options): the study's two methods and the engine's own, the same budget each.
DEFAULT_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ga", {}),
    ("rl", {"remain_weight": 1.0}),
    ("npo", {"beta": 0.5}),
    ("graddiff", {}),
)


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    n_clips: int = 40
    seconds: tuple[float, float] = (4.0, 6.0)
    forget_fraction: float = 0.4    # share of clips by the opt-out artist...
    optout_holdout: float = 0.5     # ...half of which are never trained on (MIA non-members)
    seed: int = 0
    memorise_steps: int = 300
    memorise_lr: float = 3e-3
    unlearn_steps: int = 60
    unlearn_lr: float = 1e-3
    batch_size: int = 16
    frames: int = 250          # 5 s windows (50 frames/s)
    methods: tuple[tuple[str, dict[str, Any]], ...] = DEFAULT_METHODS
    extra: dict[str, Any] = field(default_factory=dict)


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run_demo(out: str | os.PathLike = "demo_out", config: DemoConfig | None = None,
             *, fresh: bool = False) -> Path:
    """Run the whole opt-out pipeline on a synthetic corpus; return the path of report.md."""
    import torch

    from noencore.data.precompute import precompute
    from noencore.data.shards import TokenShards
    from noencore.demo_corpus import make_demo_corpus
    from noencore.engine.loop import unlearn
    from noencore.evaluation.evaluate import evaluate
    from noencore.models.musicgen import text_encoder_name
    from noencore.models.text import build_condition_cache

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()

    # 1. corpus
    t0 = _stage("1/6 corpus: synthesising music with an opt-out artist")
    manifest = out / "corpus" / "manifest.jsonl"
    if fresh or not manifest.exists():
        manifest = make_demo_corpus(out / "corpus", n_clips=cfg.n_clips, seconds=cfg.seconds,
                                    seed=cfg.seed, forget_fraction=cfg.forget_fraction,
                                    optout_holdout=cfg.optout_holdout)
    _done(t0, f"manifest: {manifest}")

    # 2. shards (precompute is itself resumable and a no-op when finished)
    t0 = _stage("2/6 precompute: EnCodec tokens into memory-mapped shards")
    shards_dir = out / "shards"
    precompute(manifest, shards_dir, codec="tiny", segment_seconds=cfg.frames / 50,
               batch_size=8, workers=1)
    shards = TokenShards(shards_dir)
    counts = {s: len(shards.select(split=s)) for s in ("forget", "remain", HOLDOUT)}
    _done(t0, f"shards: {shards_dir} {counts}")

    # 3. text conditions: T5 runs once per caption, never during training
    t0 = _stage("3/6 text-condition cache")
    cache = build_condition_cache(shards_dir / "conditions", shards.captions,
                                  text_encoder_name("tiny"))
    _done(t0, f"{len(set(shards.captions))} captions in {cache.folder}")

    # 4. the starting point: a model that memorised forget + remain
    t0 = _stage("4/6 fine-tune a tiny MusicGen on forget + remain (memorisation)")
    memorised = out / "models" / "memorised"
    if fresh or not (memorised / "model" / "state_dict.bin").exists():
        unlearn("tiny", shards, forget="forget", remain="remain", method="finetune",
                steps=cfg.memorise_steps, lr=cfg.memorise_lr, batch_size=cfg.batch_size,
                forget_ratio=0.5, frames=cfg.frames, seed=cfg.seed, out=memorised,
                checkpoint_every=100, resume=(memorised / "checkpoints").exists() and not fresh,
                grad_clip=1.0)
    _done(t0, f"memorised model: {memorised / 'model'}")
    reference = str(memorised / "model")
    # Holdout = the opt-out artist's tracks the model never saw: the non-members that
    # membership inference must not tell apart from the forget set once it is forgotten.
    sets = {"forget": shards.select(split="forget"), "remain": shards.select(split="remain"),
            "holdout": shards.select(split=HOLDOUT)}
    # Stop criterion: unlearn until the forget set is as unlikely as music of the same
    # artist that was never trained on (the memorised model's holdout NLL), not further:
    # pushing past it makes forget items stand out again (AUC -> 0 instead of 0.5).
    # (evaluated once; its cached statistics are the "before" of every method's report)
    ref_stats = out / "reports" / "memorised"
    base = evaluate(reference, sets, batch_size=cfg.batch_size, frames=cfg.frames,
                    out=ref_stats, progress=False)
    target_nll = float(base["token"]["after"]["holdout"]["nll"])
    print(f"   forget NLL {base['token']['after']['forget']['nll']:.3f}, unseen same-artist "
          f"NLL {target_nll:.3f}: unlearning stops when forget NLL reaches it")

    # 5. unlearn with each method from the same starting model
    results: dict[str, Path] = {}
    for i, (name, options) in enumerate(cfg.methods):
        t0 = _stage(f"5/6 unlearn [{i + 1}/{len(cfg.methods)}]: {name} {options or ''}")
        run_dir = out / "models" / name
        if fresh or not (run_dir / "model" / "state_dict.bin").exists():
            unlearn(str(memorised / "model"), shards, forget="forget", remain="remain",
                    method=name, method_options=options, steps=cfg.unlearn_steps,
                    lr=cfg.unlearn_lr, batch_size=cfg.batch_size, forget_ratio=0.5,
                    frames=cfg.frames, seed=cfg.seed, out=run_dir, grad_clip=1.0,
                    target_forget_nll=target_nll)
        results[name] = run_dir / "model"
        _done(t0, f"{name}: {run_dir}")

    # 6. evaluate each against the memorised model
    reports: dict[str, dict] = {}
    for name, model_dir in results.items():
        t0 = _stage(f"6/6 evaluate: {name}")
        rep_dir = out / "reports" / name
        reports[name] = evaluate(str(model_dir), sets, reference=ref_stats,
                                 batch_size=cfg.batch_size, out=rep_dir, frames=cfg.frames)
        _done(t0, f"report: {rep_dir / 'report.md'}")

    table = summary_table(reports)
    report_md = out / "report.md"
    tmp = report_md.with_name("report.md.tmp")
    tmp.write_text("# noencore demo: unlearning an opt-out artist\n\n" + table + "\n\n"
                   "Per-method reports (tables, verdicts, NLL histograms, MIA ROC curves): "
                   + ", ".join(f"[{n}](reports/{n}/report.md)" for n in reports) + "\n")
    os.replace(tmp, report_md)
    _write_json(out / "summary.json", {n: _summary_row(r) for n, r in reports.items()})
    print("\n" + table)
    print(f"\nall outputs in {out.resolve()} ({time.perf_counter() - t_all:.0f} s); "
          f"table: {report_md}")
    return report_md


def _summary_row(rep: dict) -> dict[str, float]:
    tok, mia = rep["token"], rep["mia"]
    return {
        "forget_nll_before": tok["before"]["forget"]["nll"],
        "forget_nll_after": tok["after"]["forget"]["nll"],
        "remain_nll_before": tok["before"]["remain"]["nll"],
        "remain_nll_after": tok["after"]["remain"]["nll"],
        "forget_mia_auc_before": mia["before"]["forget"]["loss"],
        "forget_mia_auc_after": mia["after"]["forget"]["loss"],
        "remain_mia_auc_after": mia["after"]["remain"]["loss"],
    }


def summary_table(reports: dict[str, dict]) -> str:
    """One Markdown row per method: forget/remain NLL and forget MIA AUC, before -> after."""
    lines = ["| method | forget NLL ↑ | remain NLL (Δ%) ≈ | forget MIA AUC (LOSS) →0.5 | "
             "remain MIA AUC | verdict |",
             "|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        s = _summary_row(rep)
        d_remain = 100.0 * (s["remain_nll_after"] / s["remain_nll_before"] - 1.0)
        forgot = abs(s["forget_mia_auc_after"] - 0.5) <= 0.1 and \
            s["forget_nll_after"] > s["forget_nll_before"]
        kept = abs(d_remain) <= 10.0
        verdict = {(True, True): "forgot, remain kept", (True, False): "forgot, remain damaged",
                   (False, True): "not forgotten", (False, False): "not forgotten, damaged"}
        lines.append(
            f"| {name} | {s['forget_nll_before']:.3f} → {s['forget_nll_after']:.3f} | "
            f"{s['remain_nll_before']:.3f} → {s['remain_nll_after']:.3f} ({d_remain:+.1f}%) | "
            f"{s['forget_mia_auc_before']:.3f} → {s['forget_mia_auc_after']:.3f} | "
            f"{s['remain_mia_auc_after']:.3f} | {verdict[(forgot, kept)]} |")
    return "\n".join(lines)
