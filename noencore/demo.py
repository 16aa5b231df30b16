"""The main job end to end, on a corpus the demo synthesises itself (CPU, no network).

    corpus  -> token shards (tiny EnCodec) -> text-condition cache
            -> a tiny MusicGen fine-tuned on forget + remain until it memorised them
            -> unlearned with GA, RL (the study's methods) and the engine's own methods,
               each from the same memorised model
            -> evaluated before/after: token NLL, membership inference, verdicts
            -> OUT/report.md (one table for all methods) + per-method reports and plots

Every stage is resumable: a stage whose output is complete is reused, so a second run
only re-does what is missing (or what ``fresh=True`` asks for).

The figures are a pure function of the configuration on a given kind of CPU: every run
uses ``DemoConfig.threads`` intra-op threads whatever the machine's core count (float sums
are split by thread, and one thread instead of two moved GA's remain damage from +215 %
to +285 %), with torch's deterministic algorithms; nothing depends on a listing order,
the hash seed or timing. ``report.md`` ends with a digest of each stage's output, so
that two runs can be compared stage by stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOLDOUT = "holdout_optout"  # splits of the demo corpus (noencore.demo_corpus)
VALID = "valid_optout"
STOP_RULES = ("auc", "matched", "fixed")

# (method, options): the study's two methods, then the engine's best on this corpus: GA
# bounded per row at the level of the artist's unseen tracks (row_target "unseen": moved
# with that level at every check) with the remain set anchored at the memorised model's
# NLL. Options the demo reads itself: "steps" (this method's step budget), "method" (the
# engine's method when the entry's name is a label of its own, e.g. "bounded_ga_lora")
# and "lora" (unlearn's LoRA option).
DEFAULT_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ga", {}),
    ("rl", {"remain_weight": 1.0, "steps": 60}),
    ("bounded_ga", {"loss_cap": None, "row_target": "unseen", "remain_weight": 3.0,
                    "remain_anchor": True}),
)
_DEMO_OPTIONS = ("steps", "method", "lora")


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    n_clips: int = 144
    seconds: tuple[float, float] = (3.5, 5.0)  # one 5 s window per clip
    forget_fraction: float = 0.5    # share of clips by the opt-out artist: a third of them
    optout_holdout: float = 1 / 3   # never trained on, the MIA non-members (test)...
    optout_valid: float = 1 / 3     # ...and a third never trained on, for the stop rule
    seed: int = 0
    memorise_steps: int = 350
    memorise_lr: float = 3e-3
    # weight decay (AdamW) holds the memorised model at an equilibrium: remain NLL settles
    # at a moderate value instead of creeping to ~0, so unlearning with the same decay and a
    # remain term keeps it there (and "within 10%" is not a ratio of two tiny numbers)
    memorise_weight_decay: float = 1.0
    unlearn_steps: int = 150
    unlearn_weight_decay: float = 1.0
    unlearn_lr: float = 1e-3
    unlearn_forget_ratio: float = 0.5
    # When to stop unlearning (every rule reads the validation tracks, never the holdout
    # that the report's membership inference scores):
    # "auc": once a loss-based membership-inference attack can no longer tell the forget
    #   set from the opt-out artist's validation tracks (their AUC <= stop_auc), measured
    #   with the current weights every `check_every` steps;
    # "matched": once the forget set's mean NLL reaches the validation tracks' mean NLL
    #   under the current weights;
    # "fixed": once the training batches' forget NLL reaches the memorised model's
    #   validation NLL (one number, fixed before unlearning).
    stop: str = "auc"
    stop_auc: float = 0.5
    check_every: int = 1
    batch_size: int = 16
    frames: int = 250          # 5 s windows (50 frames/s)
    methods: tuple[tuple[str, dict[str, Any]], ...] = DEFAULT_METHODS
    # intra-op threads of torch (and of the OpenMP, MKL and oneDNN under it) in every stage,
    # whatever the machine: results depend on the count, not on the cores
    threads: int = 2
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


@contextmanager
def _reproducible_torch(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads and torch's deterministic algorithms
    (oneDNN's too); the caller's settings are restored afterwards.

    A float reduction split over n threads adds in an order that follows n (ATen's
    reductions, MKL's GEMMs, oneDNN's convolutions), so the thread count is fixed rather
    than taken from the machine or from OMP_NUM_THREADS.
    """
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.mkldnn.deterministic)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.deterministic = True
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.mkldnn.deterministic = saved[3]


def _claim(folder: Path, settings: dict, fresh: bool) -> bool:
    """Whether ``folder`` may keep what an earlier run put there: only when that run used
    the same ``settings`` (stored beside it, in ``.<name>.stage.json``: some stages want
    their folder to hold nothing else). Otherwise (or when
    ``fresh``) the folder is emptied, so that a changed configuration is never served
    stale results; the settings are written before the stage runs, so an interrupted
    stage with the same settings resumes."""
    import shutil

    stamp = folder.parent / f".{folder.name}.stage.json"
    key = json.loads(json.dumps(settings, default=str))
    if not fresh and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == key:
                return True
        except json.JSONDecodeError:
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _write_json(stamp, key)
    return False


def run_demo(out: str | os.PathLike = "demo_out", config: DemoConfig | None = None,
             *, fresh: bool = False) -> Path:
    """Run the whole opt-out pipeline on a synthetic corpus; return the path of report.md."""
    from noencore.errors import UsageError

    cfg = config or DemoConfig()
    if cfg.stop not in STOP_RULES:
        raise UsageError(f"DemoConfig.stop must be one of {STOP_RULES}, got {cfg.stop!r}")
    if cfg.threads < 1:
        raise UsageError(f"DemoConfig.threads must be at least 1, got {cfg.threads}")
    with _reproducible_torch(cfg.threads):
        return _run_demo(Path(out), cfg, fresh)


def _run_demo(out: Path, cfg: DemoConfig, fresh: bool) -> Path:
    import torch

    from noencore.data.precompute import precompute
    from noencore.data.shards import TokenShards
    from noencore.demo_corpus import make_demo_corpus
    from noencore.engine import checkpoint as ckpt
    from noencore.engine.loop import unlearn
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.token_metrics import collect_set_stats
    from noencore.models.musicgen import load_musicgen, text_encoder_name
    from noencore.models.text import build_condition_cache

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()

    # 1. corpus
    t0 = _stage("1/6 corpus: synthesising music with an opt-out artist")
    manifest = out / "corpus" / "manifest.jsonl"
    corpus_key = {"n_clips": cfg.n_clips, "seconds": cfg.seconds, "seed": cfg.seed,
                  "forget_fraction": cfg.forget_fraction, "optout_holdout": cfg.optout_holdout,
                  "optout_valid": cfg.optout_valid}
    corpus_kept = _claim(out / "corpus", corpus_key, fresh)
    if not corpus_kept or not manifest.exists():
        manifest = make_demo_corpus(out / "corpus", n_clips=cfg.n_clips, seconds=cfg.seconds,
                                    seed=cfg.seed, forget_fraction=cfg.forget_fraction,
                                    optout_holdout=cfg.optout_holdout,
                                    optout_valid=cfg.optout_valid)
    _done(t0, f"manifest: {manifest}")

    # 2. shards (precompute is itself resumable and a no-op when finished)
    t0 = _stage("2/6 precompute: EnCodec tokens into memory-mapped shards")
    shards_dir = out / "shards"
    _claim(shards_dir, {"corpus": corpus_key, "frames": cfg.frames, "threads": cfg.threads},
           fresh or not corpus_kept)
    precompute(manifest, shards_dir, codec="tiny", segment_seconds=cfg.frames / 50,
               batch_size=8, workers=1)
    shards = TokenShards(shards_dir)
    counts = {s: len(shards.select(split=s)) for s in ("forget", "remain", HOLDOUT, VALID)}
    _done(t0, f"shards: {shards_dir} {counts}")

    # 3. text conditions: T5 runs once per caption, never during training
    t0 = _stage("3/6 text-condition cache")
    cache = build_condition_cache(shards_dir / "conditions", shards.captions,
                                  text_encoder_name("tiny"))
    _done(t0, f"{len(set(shards.captions))} captions in {cache.folder}")

    # 4. the starting point: a model that memorised forget + remain
    t0 = _stage("4/6 fine-tune a tiny MusicGen on forget + remain (memorisation)")
    memorised = out / "models" / "memorised"
    memorise_key = {"corpus": corpus_key, "steps": cfg.memorise_steps, "lr": cfg.memorise_lr,
                    "weight_decay": cfg.memorise_weight_decay, "batch_size": cfg.batch_size,
                    "frames": cfg.frames, "threads": cfg.threads}
    memorised_kept = _claim(memorised, memorise_key, fresh)
    if not memorised_kept or not (memorised / "model" / "state_dict.bin").exists():
        unlearn("tiny", shards, forget="forget", remain="remain", method="finetune",
                steps=cfg.memorise_steps, lr=cfg.memorise_lr, batch_size=cfg.batch_size,
                weight_decay=cfg.memorise_weight_decay,
                forget_ratio=0.5, frames=cfg.frames, seed=cfg.seed, out=memorised,
                checkpoint_every=100, resume=ckpt.latest_checkpoint(memorised / "checkpoints")
                is not None,
                grad_clip=1.0)
    _done(t0, f"memorised model: {memorised / 'model'}")
    reference = str(memorised / "model")
    # Holdout = the opt-out artist's tracks the model never saw: the non-members that
    # membership inference must not tell apart from the forget set once it is forgotten.
    sets = {"forget": shards.select(split="forget"), "remain": shards.select(split="remain"),
            "holdout": shards.select(split=HOLDOUT)}
    valid = shards.select(split=VALID) if counts[VALID] else sets["holdout"]
    if not counts[VALID]:
        print(f"   no {VALID} clips (optout_valid=0): the stop rule reads the holdout")
    # Stop criterion: unlearn until the forget set is as unlikely as music of the same
    # artist that was never trained on, not further: pushing past it makes forget items
    # stand out again (AUC -> 0 instead of 0.5). Measured on validation tracks of the
    # artist, under the model being unlearned (unlearning an artist raises the NLL of its
    # unseen tracks too), so the holdout stays a test set.
    # (evaluated once; its cached statistics are the "before" of every method's report)
    ref_stats = out / "reports" / "memorised"
    base = evaluate(reference, sets, batch_size=cfg.batch_size, frames=cfg.frames,
                    out=ref_stats, progress=False)
    # the validation tracks' token NLL under the memorised model (the same statistic as
    # the report's; the forget set's is in `base` already)
    target_nll = float(collect_set_stats(
        load_musicgen(reference), valid, cache, batch_size=cfg.batch_size, frames=cfg.frames,
        progress=False).summary()["nll"])
    rule = {"auc": f"a loss attack's AUC, forget vs the artist's validation tracks, is <= "
                   f"{cfg.stop_auc}",
            "matched": "forget NLL reaches the validation tracks' NLL under the unlearned model",
            "fixed": f"forget NLL reaches {target_nll:.3f}"}[cfg.stop]
    print(f"   forget NLL {base['token']['after']['forget']['nll']:.3f}, unseen same-artist "
          f"NLL {base['token']['after']['holdout']['nll']:.3f} (holdout), {target_nll:.3f} "
          f"(validation); unlearning stops when {rule}")

    # 5. unlearn with each method from the same starting model
    results: dict[str, Path] = {}
    for i, (name, options) in enumerate(cfg.methods):
        t0 = _stage(f"5/6 unlearn [{i + 1}/{len(cfg.methods)}]: {name} {options or ''}")
        run_dir = out / "models" / name
        run_key = {"memorised": memorise_key, "method": name, "options": options,
                   "steps": cfg.unlearn_steps, "lr": cfg.unlearn_lr,
                   "weight_decay": cfg.unlearn_weight_decay,
                   "forget_ratio": cfg.unlearn_forget_ratio, "stop": cfg.stop,
                   "stop_auc": cfg.stop_auc, "check_every": cfg.check_every}
        kept = _claim(run_dir, run_key, fresh or not memorised_kept)
        if not kept or not (run_dir / "model" / "state_dict.bin").exists():
            method_options = {k: v for k, v in options.items() if k not in _DEMO_OPTIONS}
            if method_options.get("row_target") == "unseen":
                method_options["row_target"] = target_nll  # moved at every check
            kw = dict(method=options.get("method", name), method_options=method_options,
                      lora=options.get("lora"),
                      steps=int(options.get("steps", cfg.unlearn_steps)),
                      lr=cfg.unlearn_lr, batch_size=cfg.batch_size,
                      forget_ratio=cfg.unlearn_forget_ratio, frames=cfg.frames,
                      weight_decay=cfg.unlearn_weight_decay, seed=cfg.seed, out=run_dir,
                      grad_clip=1.0)
            if cfg.stop == "fixed":
                unlearn(reference, shards, forget="forget", remain="remain",
                        target_forget_nll=target_nll, **kw)
            else:  # the engine's membership-inference stop rule, on the validation tracks
                unlearn(reference, shards, forget="forget", remain="remain",
                        stop_nonmembers=VALID if counts[VALID] else HOLDOUT,
                        stop_rule="auc" if cfg.stop == "auc" else "nll",
                        stop_auc=cfg.stop_auc, stop_every=cfg.check_every, **kw)
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

    rows = {n: _summary_row(r) for n, r in reports.items()}
    table = summary_table(reports)
    report_md = out / "report.md"
    tmp = report_md.with_name("report.md.tmp")
    described = "".join(f"- **{n}**: {o or 'default options'}\n" for n, o in cfg.methods
                        if n in reports)
    tmp.write_text("# noencore demo: unlearning an opt-out artist\n\n" + table + "\n\n"
                   "![forget AUC and remain NLL per method](summary.png)\n\n"
                   "Methods and options (the same memorised start for each; stop rule "
                   f"{cfg.stop!r}):\n\n" + described + "\n"
                   "Per-method reports (tables, verdicts, NLL histograms, MIA ROC curves): "
                   + ", ".join(f"[{n}](reports/{n}/report.md)" for n in reports) + "\n\n"
                   + _reproducibility(stage_digests(out, list(reports)), cfg.threads))
    os.replace(tmp, report_md)
    _write_json(out / "summary.json", rows)
    summary_plot(rows, out / "summary.png")
    print("\n" + table)
    print(f"\nall outputs in {out.resolve()} ({time.perf_counter() - t_all:.0f} s); "
          f"table: {report_md}; plot: {out / 'summary.png'}")
    return report_md


def stage_digests(out: str | os.PathLike, methods: list[str]) -> dict[str, str]:
    """sha256 of what each stage of a finished demo in ``out`` produced: the corpus
    manifest (it holds every audio file's sha256), the token codes of the shards, and the
    weights of the memorised model and of each method's model (tensor bytes in name order:
    the files themselves also hold paths and metadata in no fixed order). Two runs whose
    tables differ first differ at some stage here."""
    from safetensors.torch import load_file

    from noencore.fileio import sha256_file

    out = Path(out)
    codes = hashlib.sha256()
    for f in sorted((out / "shards").glob("shard-*.codes")):
        codes.update(f.read_bytes())
    digests = {"corpus": sha256_file(out / "corpus" / "manifest.jsonl"),
               "token codes": codes.hexdigest()}
    for name in ["memorised", *methods]:
        weights = load_file(str(out / "models" / name / "model" / "model.safetensors"))
        h = hashlib.sha256()
        for key in sorted(weights):
            h.update(key.encode() + weights[key].numpy().tobytes())
        digests[f"{name} model"] = h.hexdigest()
    return digests


def _reproducibility(digests: dict[str, str], threads: int) -> str:
    """The report's last section: what the figures depend on, and each stage's digest."""
    import numpy as np
    import soundfile
    import torch

    lines = ["## Reproducibility", "",
             f"Every stage ran on {threads} intra-op threads with torch's deterministic "
             "algorithms: the same configuration gives the same digests and figures on "
             "any machine with this kind of CPU and these packages "
             f"(CPU kernels {torch.backends.cpu.get_cpu_capability()}, torch "
             f"{torch.__version__}, numpy {np.__version__}, libsndfile "
             f"{soundfile.__libsndfile_version__}).", "",
             "| stage output | sha256 |", "|---|---|"]
    lines += [f"| {k} | `{v[:16]}` |" for k, v in digests.items()]
    return "\n".join(lines) + "\n"


def _auc(mia: dict, when: str, which: str) -> float | None:
    """The LOSS-attack AUC of one set, or None where it was not computed (too few items:
    the block then holds only a note; or an undefined AUC)."""
    block = (mia.get(when) or {}).get(which) or {}
    value = block.get("loss")
    return None if value is None else float(value)


def _summary_row(rep: dict) -> dict[str, float | None]:
    tok, mia = rep["token"], rep.get("mia") or {}
    return {
        "forget_nll_before": tok["before"]["forget"]["nll"],
        "forget_nll_after": tok["after"]["forget"]["nll"],
        "remain_nll_before": tok["before"]["remain"]["nll"],
        "remain_nll_after": tok["after"]["remain"]["nll"],
        "holdout_nll_before": tok["before"]["holdout"]["nll"],
        "holdout_nll_after": tok["after"]["holdout"]["nll"],
        "forget_mia_auc_before": _auc(mia, "before", "forget"),
        "forget_mia_auc_after": _auc(mia, "after", "forget"),
        "remain_mia_auc_after": _auc(mia, "after", "remain"),
    }


def summary_plot(rows: dict[str, dict], path: Path) -> Path:
    """Two panels, one bar group per method: the forget set's MIA AUC before/after (goal
    0.5, the band is the verdict's +-0.1) and the remain NLL's change (band +-10 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 3.6))
    def auc(n: str, key: str) -> float:  # None (too few items) is no bar; 0.0 is a bar
        v = rows[n][key]
        return np.nan if v is None else v

    before = [auc(n, "forget_mia_auc_before") for n in names]
    after = [auc(n, "forget_mia_auc_after") for n in names]
    a1.axhspan(0.4, 0.6, color="tab:green", alpha=0.15, label="forgotten (0.5 ± 0.1)")
    a1.bar(x - 0.2, before, 0.4, color="tab:gray", label="memorised model")
    a1.bar(x + 0.2, after, 0.4, color="tab:blue", label="after unlearning")
    a1.set(xticks=x, xticklabels=names, ylim=(0, 1.4), yticks=np.linspace(0, 1, 6),
           ylabel="ROC AUC (LOSS attack)", title="Forget set vs unseen tracks of the artist")
    a1.legend(fontsize=7, loc="upper center", ncol=2)
    change = [100.0 * (rows[n]["remain_nll_after"] / rows[n]["remain_nll_before"] - 1.0)
              for n in names]
    a2.axhspan(-10, 10, color="tab:green", alpha=0.15, label="kept (±10 %)")
    a2.bar(x, change, 0.5, color=["tab:green" if abs(c) <= 10 else "tab:red" for c in change])
    a2.set_yscale("symlog", linthresh=10)
    a2.axhline(0, color="black", lw=0.8)
    a2.set(xticks=x, xticklabels=names, ylabel="remain NLL change (%)",
           title="Remain set (other artists)")
    a2.legend(fontsize=7, loc="upper left")
    fig.suptitle("noencore demo: unlearning an opt-out artist", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_table(reports: dict[str, dict]) -> str:
    """One Markdown row per method: forget/remain/holdout NLL and forget MIA AUC, before -> after."""
    lines = ["| method | forget NLL ↑ | unseen same-artist NLL | remain NLL (Δ%) ≈ | "
             "forget MIA AUC (LOSS) →0.5 | remain MIA AUC | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        s = _summary_row(rep)
        d_remain = 100.0 * (s["remain_nll_after"] / s["remain_nll_before"] - 1.0)
        auc = s["forget_mia_auc_after"]
        forgot = auc is not None and abs(auc - 0.5) <= 0.1 and \
            s["forget_nll_after"] > s["forget_nll_before"]
        kept = abs(d_remain) <= 10.0
        verdict = {(True, True): "forgot, remain kept", (True, False): "forgot, remain damaged",
                   (False, True): "not forgotten", (False, False): "not forgotten, damaged"}
        lines.append(
            f"| {name} | {s['forget_nll_before']:.3f} → {s['forget_nll_after']:.3f} | "
            f"{s['holdout_nll_before']:.3f} → {s['holdout_nll_after']:.3f} | "
            f"{s['remain_nll_before']:.3f} → {s['remain_nll_after']:.3f} ({d_remain:+.1f}%) | "
            f"{_fmt(s['forget_mia_auc_before'])} → {_fmt(auc)} | "
            f"{_fmt(s['remain_mia_auc_after'])} | {verdict[(forgot, kept)]} |")
    return "\n".join(lines)
