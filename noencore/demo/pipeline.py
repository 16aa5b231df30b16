"""The main job end to end, on a corpus the demo synthesises itself (CPU, no network).

    corpus  -> token shards (tiny EnCodec) -> text-condition cache
            -> a tiny MusicGen fine-tuned on forget + remain until it memorised them
            -> the gold standard: the same start and training on the remain set only
               (a model retrained without the forget set)
            -> unlearned with GA, RL (the study's methods) and the engine's own methods,
               each from the same memorised model
            -> evaluated against the memorised and the retrained model: token NLL,
               membership inference, forget quality (KS), privleak, verbatim replay
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

from noencore.demo.corpus import UNKNOWN_SPLIT  # tracks by artists nothing trains on

HOLDOUT = "holdout_optout"  # splits of the demo corpus (noencore.demo.corpus)
VALID = "valid_optout"
STOP_RULES = ("auc", "matched", "fixed")
TWIN_PREFIX = "retrained_order"  # models/<prefix>k: the gold standard in batch order seed + k

# (method, options): the study's two methods; GA bounded per row at the level of the
# artist's unseen tracks (row_target "unseen": moved with that level at every check),
# which over-unlearns (kept for comparison); then the engine's default method, target
# matching with its default options: each forget row pulled onto a target fitted, under
# the memorised model, by a quantile map onto the tracks of artists nothing trained on
# (split "unknown": the level at which the model treats music it never met), the artist's
# validation tracks trained as remain rows held at that level (so that the artist's other
# music does not follow the forget set past it), the remain set anchored at the memorised
# model's NLL; 600 steps (the engine's stop rule for it is a guard: "original" at AUC 0,
# once the forget set stayed past every unknown artist's track as the memorised model
# scored them at 3 checks in a row; checked every 10 steps). More steps at the targets bring the forget set
# closer to the artist's unseen tracks and let weight decay erode what no loss holds:
# on seed 0, 150 / 300 / 600 steps gave forget AUC 0.79 / 0.63 / 0.60 (retrained 0.44)
# and relearned AUC 0.97 / 0.94 / 0.73 (benchmarks/RESULTS.md).
# Options the demo reads itself: "steps" (this method's step budget), "stop_rule" and
# "stop_auc" (the engine's stop rule for this method, instead of DemoConfig's; a method
# that fits its targets to the non-members gets the engine's own by default),
# "stop_nonmembers" (the split its stop rule and targets read: default the artist's
# validation tracks), "anchor_unseen" (a split held as the engine's anchor_unseen),
# "method" (the engine's method when the entry's name is a label of its own, e.g.
# "bounded_ga_lora"), "lora", "train_layers", "weight_decay", "stop_every" and
# "stop_patience" (unlearn's options of those names; by default DemoConfig's
# unlearn_weight_decay and check_every, and the engine's patience).
DEFAULT_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ga", {}),
    ("rl", {"remain_weight": 1.0, "steps": 60}),
    ("bounded_ga", {"loss_cap": None, "row_target": "unseen", "remain_weight": 3.0,
                    "remain_anchor": True}),
    ("match", {"stop_nonmembers": UNKNOWN_SPLIT, "anchor_unseen": VALID, "steps": 600,
               "stop_every": 10}),
)
DEFAULT_METHOD = "match"  # the engine's default: the one the goals are checked for
_DEMO_OPTIONS = ("steps", "stop_rule", "stop_auc", "stop_nonmembers", "anchor_unseen",
                 "method", "lora", "train_layers", "weight_decay", "stop_every",
                 "stop_patience")
REPLAY_METRICS = ("continuation", "ngram")


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    n_clips: int = 144
    seconds: tuple[float, float] = (3.5, 5.0)  # one 5 s window per clip
    forget_fraction: float = 0.5    # share of clips by the opt-out artist: a third of them
    optout_holdout: float = 1 / 3   # never trained on, the MIA non-members (test)...
    optout_valid: float = 1 / 3     # ...and a third never trained on, for the stop rule
    corpus: str = "distinct"        # or "shared": the other artists sound like the opt-out one
    forget_share: float = 1.0       # share of the artist's trained clips the request names
    # clips by artists nothing trains on (split "unknown"): the default method's reference
    # for music the model never met (a real request brings such tracks)
    unknown_clips: int = 24
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
    # relearning probe after each method: fine-tune the unlearned model on the remain set
    # alone for this many steps (lr unlearn_lr, no weight decay) and measure the forget
    # AUC again (0: no probe)
    relearn_steps: int = 10
    # the goals' resolution: this many more models retrained without the forget set, from
    # the same start in another batch order (seed + 1, + 2, ...), each evaluated against
    # the gold standard as a method row ("retrained_order1", ...). A model that never saw
    # the forget set is what every goal asks for, so the goals such a twin misses are
    # beyond what this corpus's track counts can tell (0: none)
    retrain_twins: int = 1
    batch_size: int = 16
    frames: int = 250          # 5 s windows (50 frames/s)
    methods: tuple[tuple[str, dict[str, Any]], ...] = DEFAULT_METHODS
    # verbatim replay (no CLAP): greedy continuation of `replay_prompt` true frames over
    # the next `replay_frames`, and a free generation of `replay_free` frames from the
    # caption (its 4-grams against the track), on at most `replay_items` items per set.
    # No classifier-free guidance (coefficient 1): the demo's models are fine-tuned without
    # condition dropout, so their unconditioned branch is untrained and guidance with it
    # scrambles what they would replay (a memorised model's continuation match drops from
    # up to 0.4 to about 0.01 at coefficient 3)
    replay_cfg_coef: float = 1.0
    replay_items: int = 12
    replay_prompt: int = 50
    replay_frames: int = 50
    replay_free: int = 100
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
             *, fresh: bool = False, progress: bool = True) -> Path:
    """Run the whole opt-out pipeline on a synthetic corpus; return the path of report.md.
    ``progress``: progress bars inside the stages (corpus, precompute, text conditions,
    training); the stages' own lines are printed either way."""
    from noencore.errors import UsageError

    cfg = config or DemoConfig()
    if cfg.stop not in STOP_RULES:
        raise UsageError(f"DemoConfig.stop must be one of {STOP_RULES}, got {cfg.stop!r}")
    if cfg.threads < 1:
        raise UsageError(f"DemoConfig.threads must be at least 1, got {cfg.threads}")
    if cfg.retrain_twins < 0:
        raise UsageError(f"DemoConfig.retrain_twins must be 0 or more, got {cfg.retrain_twins}")
    if any(name.startswith(TWIN_PREFIX) for name, _ in cfg.methods):
        raise UsageError(f"demo method names starting with {TWIN_PREFIX!r} are the retrained "
                         "twins' folders: rename the entry")
    from noencore.outputs import claim

    # the demo keeps and replaces its own stages in ``out``: a folder that held anything
    # else at the first claim is refused, and a second demo into it at once too
    with claim(out, "demo", resume=True, whole=True), _reproducible_torch(cfg.threads):
        return _run_demo(Path(out), cfg, fresh, progress)


def _run_demo(out: Path, cfg: DemoConfig, fresh: bool, progress: bool = True) -> Path:
    """The stages in order (``_Demo``'s methods), each reusing what an earlier run with
    the same settings finished."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    demo = _Demo(out, cfg, fresh, progress)
    demo.corpus()
    demo.shards()
    demo.conditions()
    demo.memorise()
    demo.retrain()
    demo.references()
    demo.unlearn_all()
    demo.evaluate_all()
    return demo.write_report()


class _Demo:
    """The demo's stages and what they hand on to the next ones."""

    def __init__(self, out: Path, cfg: DemoConfig, fresh: bool, progress: bool = True):
        self.out, self.cfg, self.fresh, self.progress = out, cfg, fresh, progress
        self.t_all = time.perf_counter()

    def corpus(self) -> None:
        from noencore.demo.corpus import make_demo_corpus

        cfg, out = self.cfg, self.out
        t0 = _stage("1/7 corpus: synthesising music with an opt-out artist")
        manifest = out / "corpus" / "manifest.jsonl"
        self.corpus_key = {"n_clips": cfg.n_clips, "seconds": cfg.seconds, "seed": cfg.seed,
                           "forget_fraction": cfg.forget_fraction,
                           "optout_holdout": cfg.optout_holdout,
                           "optout_valid": cfg.optout_valid,
                           # (absent at their defaults: earlier demo folders stay valid)
                           **({"corpus": cfg.corpus} if cfg.corpus != "distinct" else {}),
                           **({"forget_share": cfg.forget_share}
                              if cfg.forget_share != 1.0 else {}),
                           **({"unknown_clips": cfg.unknown_clips}
                              if cfg.unknown_clips else {})}
        self.corpus_kept = _claim(out / "corpus", self.corpus_key, self.fresh)
        if not self.corpus_kept or not manifest.exists():
            manifest = make_demo_corpus(out / "corpus", n_clips=cfg.n_clips,
                                        seconds=cfg.seconds, seed=cfg.seed,
                                        forget_fraction=cfg.forget_fraction,
                                        optout_holdout=cfg.optout_holdout,
                                        optout_valid=cfg.optout_valid,
                                        style=cfg.corpus, forget_share=cfg.forget_share,
                                        unknown_clips=cfg.unknown_clips,
                                        progress=self.progress)
        self.manifest = manifest
        _done(t0, f"manifest: {manifest}")

    def shards(self) -> None:
        """Precompute is itself resumable and a no-op when finished."""
        from noencore.data.precompute import precompute
        from noencore.data.shards import TokenShards

        cfg = self.cfg
        t0 = _stage("2/7 precompute: EnCodec tokens into memory-mapped shards")
        self.shards_dir = shards_dir = self.out / "shards"
        _claim(shards_dir, {"corpus": self.corpus_key, "frames": cfg.frames,
                            "threads": cfg.threads}, self.fresh or not self.corpus_kept)
        precompute(self.manifest, shards_dir, codec="tiny", segment_seconds=cfg.frames / 50,
                   batch_size=8, workers=1, progress=self.progress)
        self.token_shards = shards = TokenShards(shards_dir)
        self.counts = {s: len(shards.select(split=s)) for s in ("forget", "remain", HOLDOUT,
                                                                 VALID, UNKNOWN_SPLIT)}
        _done(t0, f"shards: {shards_dir} {self.counts}")

    def conditions(self) -> None:
        """T5 runs once per caption, never during training."""
        from noencore.models.musicgen import text_encoder_name
        from noencore.models.text import build_condition_cache

        t0 = _stage("3/7 text-condition cache")
        captions = self.token_shards.captions
        self.cache = build_condition_cache(self.shards_dir / "conditions", captions,
                                           text_encoder_name("tiny"),
                                           progress=self.progress)
        _done(t0, f"{len(set(captions))} captions in {self.cache.folder}")

    def memorise(self) -> None:
        """The starting point: a model that memorised forget + remain."""
        cfg = self.cfg
        t0 = _stage("4/7 fine-tune a tiny MusicGen on forget + remain (memorisation)")
        memorised = self.out / "models" / "memorised"
        self.memorise_key = {"corpus": self.corpus_key, "steps": cfg.memorise_steps,
                             "lr": cfg.memorise_lr, "weight_decay": cfg.memorise_weight_decay,
                             "batch_size": cfg.batch_size, "frames": cfg.frames,
                             "threads": cfg.threads}
        self.memorised_kept = _claim(memorised, self.memorise_key, self.fresh)
        if not self.memorised_kept or not (memorised / "model" / "state_dict.bin").exists():
            self._finetune(memorised, cfg.batch_size, forget_ratio=0.5)
        _done(t0, f"memorised model: {memorised / 'model'}")
        self.reference = str(memorised / "model")

    def retrain(self) -> None:
        """The gold standard: the same start and training, on the remain set only: the
        memorised model's remain rows per step (half its batch), no forget rows, so that
        the remain set is seen as often and with the same gradient scale (a whole batch
        of remain rows would see it twice as often)."""
        cfg = self.cfg
        t0 = _stage("5/7 retrain: the same training without the forget set (gold standard)")
        self.retrained = retrained = self.out / "models" / "retrained"
        retrain_batch = cfg.batch_size - max(1, round(cfg.batch_size * 0.5))
        retrain_key = {**self.memorise_key, "forget_ratio": 0.0, "batch_size": retrain_batch}
        retrained_kept = _claim(retrained, retrain_key, self.fresh)
        if not retrained_kept or not (retrained / "model" / "state_dict.bin").exists():
            self._finetune(retrained, retrain_batch, forget_ratio=0.0)
        _done(t0, f"retrained model: {retrained / 'model'}")
        self.twins: dict[str, Path] = {}
        for k in range(1, cfg.retrain_twins + 1):
            t0 = _stage(f"5/7 retrain [twin {k}/{cfg.retrain_twins}]: the same, batch order "
                        f"seed {cfg.seed + k}")
            twin = self.out / "models" / f"{TWIN_PREFIX}{k}"
            kept = _claim(twin, {**retrain_key, "seed": cfg.seed + k}, self.fresh)
            if not kept or not (twin / "model" / "state_dict.bin").exists():
                self._finetune(twin, retrain_batch, forget_ratio=0.0, seed=cfg.seed + k)
            self.twins[twin.name] = twin / "model"
            _done(t0, f"retrained twin: {twin / 'model'}")

    def _finetune(self, run_dir: Path, batch_size: int, forget_ratio: float,
                  seed: int | None = None) -> None:
        from noencore.engine import checkpoint as ckpt
        from noencore.engine.loop import unlearn

        cfg = self.cfg
        unlearn("tiny", self.token_shards, forget="forget", remain="remain",
                method="finetune", steps=cfg.memorise_steps, lr=cfg.memorise_lr,
                batch_size=batch_size, weight_decay=cfg.memorise_weight_decay,
                forget_ratio=forget_ratio, frames=cfg.frames,
                seed=cfg.seed if seed is None else seed, out=run_dir, checkpoint_every=100,
                resume=ckpt.latest_checkpoint(run_dir / "checkpoints") is not None,
                grad_clip=1.0, progress=self.progress)

    def references(self) -> None:
        """The memorised and the retrained model evaluated once (their cached statistics
        are the "before" and the "retrained" of every method's report), and the stop
        rule's tracks: the opt-out artist's validation tracks.

        Holdout = the opt-out artist's tracks the model never saw: the non-members that
        membership inference must not tell apart from the forget set once it is
        forgotten. Stop criterion: unlearn until the forget set is as unlikely as music of
        the same artist that was never trained on, not further: pushing past it makes
        forget items stand out again (AUC -> 0 instead of 0.5). Measured on validation
        tracks of the artist, under the model being unlearned (unlearning an artist raises
        the NLL of its unseen tracks too), so the holdout stays a test set."""
        from noencore.evaluation.evaluate import evaluate
        from noencore.evaluation.token_metrics import collect_set_stats
        from noencore.models.musicgen import load_musicgen

        cfg, out, shards = self.cfg, self.out, self.token_shards
        self.sets = sets = {"forget": shards.select(split="forget"),
                            "remain": shards.select(split="remain"),
                            "holdout": shards.select(split=HOLDOUT)}
        valid = shards.select(split=VALID) if self.counts[VALID] else sets["holdout"]
        if not self.counts[VALID]:
            print(f"   no {VALID} clips (optout_valid=0): the stop rule reads the holdout")
        self.ref_stats, self.retr_stats = out / "reports" / "memorised", \
            out / "reports" / "retrained"
        self.gen = _replay_config(cfg)
        tokens_and_replay = ["token", "mia", "dataset_inference", *REPLAY_METRICS]
        self.base = base = evaluate(self.reference, sets, metrics=tokens_and_replay,
                                    batch_size=cfg.batch_size, frames=cfg.frames,
                                    out=self.ref_stats, overwrite=True, progress=False,
                                    generation=self.gen)
        self.gold = gold = evaluate(str(self.retrained / "model"), sets,
                                    metrics=tokens_and_replay, batch_size=cfg.batch_size,
                                    frames=cfg.frames, out=self.retr_stats, overwrite=True,
                                    progress=False,
                                    generation=self.gen)
        # the validation tracks' token NLL under the memorised model (the same statistic as
        # the report's; the forget set's is in `base` already)
        self.target_nll = target_nll = float(collect_set_stats(
            load_musicgen(self.reference), valid, self.cache, batch_size=cfg.batch_size,
            frames=cfg.frames, progress=False).summary()["nll"])
        rule = {"auc": f"a loss attack's AUC, forget vs the artist's validation tracks, is "
                       f"<= {cfg.stop_auc}",
                "matched": "forget NLL reaches the validation tracks' NLL under the unlearned "
                           "model",
                "fixed": f"forget NLL reaches {target_nll:.3f}"}[cfg.stop]
        print(f"   forget NLL {base['token']['after']['forget']['nll']:.3f}, unseen same-artist "
              f"NLL {base['token']['after']['holdout']['nll']:.3f} (holdout), "
              f"{target_nll:.3f} (validation); unlearning stops when {rule}")
        print(f"   retrained model: forget NLL {gold['token']['after']['forget']['nll']:.3f}, "
              f"unseen same-artist NLL {gold['token']['after']['holdout']['nll']:.3f}, remain "
              f"NLL {gold['token']['after']['remain']['nll']:.3f}")

    def unlearn_all(self) -> None:
        """Each method from the same starting model."""
        self.results: dict[str, Path] = {}
        for i, (name, options) in enumerate(self.cfg.methods):
            t0 = _stage(f"6/7 unlearn [{i + 1}/{len(self.cfg.methods)}]: {name} "
                        f"{options or ''}")
            run_dir = self.out / "models" / name
            self._unlearn_one(name, options, run_dir)
            self.results[name] = run_dir / "model"
            _done(t0, f"{name}: {run_dir}")
        self.results.update(self.twins)  # evaluated as methods are: the goals' resolution

    def _unlearn_one(self, name: str, options: dict[str, Any], run_dir: Path) -> None:
        from noencore.engine.loop import unlearn
        from noencore.errors import UsageError
        from noencore.methods import get_method

        cfg = self.cfg
        stop_rule = options.get("stop_rule")
        run_key = {"memorised": self.memorise_key, "method": name, "options": options,
                   "steps": cfg.unlearn_steps, "lr": cfg.unlearn_lr,
                   "weight_decay": cfg.unlearn_weight_decay,
                   "forget_ratio": cfg.unlearn_forget_ratio, "stop": cfg.stop,
                   "stop_auc": cfg.stop_auc, "check_every": cfg.check_every}
        kept = _claim(run_dir, run_key, self.fresh or not self.memorised_kept)
        if kept and (run_dir / "model" / "state_dict.bin").exists():
            return
        method_options = {k: v for k, v in options.items() if k not in _DEMO_OPTIONS}
        if method_options.get("row_target") == "unseen":
            method_options["row_target"] = self.target_nll  # moved at every check
        kw = dict(method=options.get("method", name), method_options=method_options,
                  lora=options.get("lora"), train_layers=options.get("train_layers"),
                  steps=int(options.get("steps", cfg.unlearn_steps)),
                  lr=cfg.unlearn_lr, batch_size=cfg.batch_size,
                  forget_ratio=cfg.unlearn_forget_ratio, frames=cfg.frames,
                  weight_decay=float(options.get("weight_decay", cfg.unlearn_weight_decay)),
                  seed=cfg.seed, out=run_dir,
                  grad_clip=1.0, progress=self.progress,
                  # a run of these settings that stopped before saving its model (the
                  # folder is the demo's: _claim emptied it for any other settings)
                  overwrite=(run_dir / "config.json").exists())
        fits = get_method(kw["method"], **method_options).needs_nonmember_targets
        if cfg.stop == "fixed" and stop_rule is None and not fits:
            unlearn(self.reference, self.token_shards, forget="forget", remain="remain",
                    target_forget_nll=self.target_nll, **kw)
            return
        # the engine's membership-inference stop rule, on the validation tracks or the
        # entry's own non-members; a method that fits its targets to them stops by the
        # engine's rule for it unless the entry names one
        nonmembers = options.get("stop_nonmembers") or (VALID if self.counts[VALID]
                                                        else HOLDOUT)
        for split in (nonmembers, options.get("anchor_unseen")):
            if split is not None and not self.counts.get(split):
                raise UsageError(f"demo method {name!r} reads split {split!r}, which the "
                                 f"corpus does not have (counts: {self.counts}); for "
                                 f"{UNKNOWN_SPLIT!r} set DemoConfig.unknown_clips > 0")
        if stop_rule is None and not fits:
            stop_rule = "auc" if cfg.stop == "auc" else "nll"
        unlearn(self.reference, self.token_shards, forget="forget", remain="remain",
                stop_nonmembers=nonmembers, anchor_unseen=options.get("anchor_unseen"),
                stop_rule=stop_rule,
                stop_auc=options.get("stop_auc", None if fits else cfg.stop_auc),
                stop_every=int(options.get("stop_every", cfg.check_every)),
                stop_patience=options.get("stop_patience"), **kw)

    def evaluate_all(self) -> None:
        """Each model against the memorised model and the retrained one."""
        from noencore.evaluation.evaluate import evaluate

        cfg = self.cfg
        self.reports: dict[str, dict] = {}
        for name, model_dir in self.results.items():
            t0 = _stage(f"7/7 evaluate: {name}")
            rep_dir = self.out / "reports" / name
            self.reports[name] = evaluate(
                str(model_dir), self.sets, reference=self.ref_stats, retrained=self.retr_stats,
                batch_size=cfg.batch_size, out=rep_dir, overwrite=True, frames=cfg.frames,
                generation=self.gen,
                progress=False, metrics=["token", "mia", "privleak", "forget_quality",
                                         "dataset_inference", *REPLAY_METRICS],
                relearn_steps=cfg.relearn_steps or None, relearn_lr=cfg.unlearn_lr,
                relearn_batch_size=cfg.batch_size)
            _done(t0, f"report: {rep_dir / 'report.md'}")

    def write_report(self) -> Path:
        """report.md (the table, the notes, each stage's digest), summary.json and
        summary.png."""
        cfg, out, reports, base, gold = self.cfg, self.out, self.reports, self.base, self.gold
        rows = {n: _summary_row(r, base, gold) for n, r in reports.items()}
        table = summary_table(rows, _summary_row(gold, base, gold, retrained_row=True))
        report_md = out / "report.md"
        tmp = report_md.with_name("report.md.tmp")
        described = "".join(f"- **{n}**: {o or 'default options'}\n" for n, o in cfg.methods
                            if n in reports)
        tmp.write_text("# noencore demo: unlearning an opt-out artist\n\n" + table + "\n\n"
                       + TABLE_NOTES + "\n\n"
                       "![forget AUC and remain NLL per method](summary.png)\n\n"
                       "Methods and options (the same memorised start for each; stop rule "
                       f"{cfg.stop!r}):\n\n" + described + "\n"
                       "Per-method reports (tables, verdicts, NLL histograms, MIA ROC curves): "
                       + ", ".join(f"[{n}](reports/{n}/report.md)" for n in reports) + "\n\n"
                       + _reproducibility(stage_digests(out, list(reports)), cfg.threads))
        os.replace(tmp, report_md)
        _write_json(out / "summary.json", rows)
        summary_plot(rows, out / "summary.png",
                     retrained=_summary_row(gold, base, gold, retrained_row=True))
        print("\n" + table)
        print(f"\nall outputs in {out.resolve()} ({time.perf_counter() - self.t_all:.0f} s); "
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
    for name in ["memorised", "retrained", *methods]:
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


def _replay_config(cfg: DemoConfig) -> Any:
    """The generation settings of the demo's verbatim-replay metrics."""
    from noencore.evaluation.generation import GenerationConfig

    return GenerationConfig(frames=cfg.replay_free, prompt_frames=cfg.replay_prompt,
                            continuation_frames=cfg.replay_frames, max_items=cfg.replay_items,
                            cfg_coef=cfg.replay_cfg_coef, seed=cfg.seed)


def _auc(mia: dict, when: str, which: str) -> float | None:
    """The LOSS-attack AUC of one set, or None where it was not computed (too few items:
    the block then holds only a note; or an undefined AUC)."""
    block = (mia.get(when) or {}).get(which) or {}
    value = block.get("loss")
    return None if value is None else float(value)


def _get(rep: dict, *keys: str) -> Any:
    """rep[k0][k1]... or None where a level is missing (a metric not computed)."""
    for k in keys:
        if not isinstance(rep, dict) or rep.get(k) is None:
            return None
        rep = rep[k]
    return rep


def _summary_row(rep: dict, base: dict, gold: dict, retrained_row: bool = False
                 ) -> dict[str, float | None]:
    """One method's figures (``rep``: its evaluation against the memorised model's and
    the retrained model's cached statistics), with the memorised model's (``base``) and
    the retrained model's (``gold``) own evaluations for replay and their NLLs.
    ``retrained_row``: the retrained model's own row (``rep`` is ``gold``)."""
    tok, mia = rep["token"], rep.get("mia") or {}
    return {
        "forget_nll_before": base["token"]["after"]["forget"]["nll"],
        "forget_nll_after": tok["after"]["forget"]["nll"],
        "remain_nll_before": base["token"]["after"]["remain"]["nll"],
        "remain_nll_after": tok["after"]["remain"]["nll"],
        "holdout_nll_before": base["token"]["after"]["holdout"]["nll"],
        "holdout_nll_after": tok["after"]["holdout"]["nll"],
        "forget_mia_auc_before": _auc(base.get("mia") or {}, "after", "forget"),
        "forget_mia_auc_after": _auc(mia, "after", "forget"),
        "remain_mia_auc_after": _auc(mia, "after", "remain"),
        # the gold standard: a model retrained without the forget set
        "forget_nll_retrained": gold["token"]["after"]["forget"]["nll"],
        "holdout_nll_retrained": gold["token"]["after"]["holdout"]["nll"],
        "forget_mia_auc_retrained": _auc(gold.get("mia") or {}, "after", "forget"),
        # the strongest attack of the family: the largest |AUC - the retrained model's AUC|
        "forget_auc_worst_attack": None if retrained_row else _get(
            rep, "mia", "vs_retrained", "worst_attack"),
        "forget_auc_gap": 0.0 if retrained_row else _get(rep, "mia", "vs_retrained", "gap"),
        # dataset inference (the forget set as a whole vs the unseen tracks): p-values
        "di_p_after": _get(rep, "dataset_inference", "after", "p_value"),
        "di_p_retrained": _get(gold, "dataset_inference", "after", "p_value"),
        # privleak (%) relative to the retrained model's AUC: MUSE's (Min-K% at k = 0.4,
        # last token out) and the same formula on the LOSS attack (the AUC column's)
        "privleak": 0.0 if retrained_row else _get(rep, "privleak", "after"),
        "privleak_loss": 0.0 if retrained_row else _get(rep, "privleak_variants", "after",
                                                        "loss"),
        # forget quality: KS p-value of the forget items' mean NLLs vs the retrained
        # model's, and the item counts it ran on
        "forget_quality": 1.0 if retrained_row else _get(rep, "forget_quality", "after"),
        "forget_quality_n": [_get(rep, "forget_quality", "n", "after"),
                             _get(rep, "forget_quality", "n", "retrained")],
        # verbatim replay of the forget tracks: continuation share, free-generation 4-grams
        "replay_before": _get(base, "continuation", "after", "forget"),
        "replay_after": _get(rep, "continuation", "after", "forget"),
        "replay_retrained": _get(gold, "continuation", "after", "forget"),
        "ngram_before": _get(base, "ngram", "after", "forget"),
        "ngram_after": _get(rep, "ngram", "after", "forget"),
        "ngram_retrained": _get(gold, "ngram", "after", "forget"),
        # relearning probe: the forget AUC after fine-tuning on the remain set alone
        **_relearned(rep),
    }


def _relearned(rep: dict) -> dict[str, float | None]:
    """The last checkpoint of the report's relearning probe (steps, forget AUC), or None."""
    points = (rep.get("relearn") or {}).get("checkpoints") or []
    last = points[-1] if len(points) > 1 else {}
    return {"relearn_steps": last.get("steps"), "relearn_auc": last.get("forget_auc_loss")}


# The goals for the engine's default method, checked for every row.
GOALS = {
    "KS": "forget quality (KS p-value vs the retrained model) >= 0.05",
    "AUC": "forget-vs-holdout AUC within 0.05 of the retrained model's, for the strongest "
           "attack (the largest gap among LOSS, Min-K%, MUSE's Min-K%, Min-K%++, zlib, "
           "LOSS on codebook 0)",
    "unseen": "the artist's unseen tracks' NLL within 10 % of the retrained model's",
    "remain": "remain NLL within 2 % of the memorised model's",
    "replay": "forget replay (continuation) <= the retrained model's + 0.05",
}


def goals_met(row: dict[str, float | None]) -> dict[str, bool | None]:
    """Each goal of :data:`GOALS`: True, False, or None where its figure is missing."""
    def check(ok: Any, *need: float | None) -> bool | None:
        return None if any(v is None for v in need) else bool(ok())

    r = row
    return {
        "KS": check(lambda: r["forget_quality"] >= 0.05, r["forget_quality"]),
        "AUC": check(lambda: r["forget_auc_gap"] <= 0.05, r.get("forget_auc_gap")),
        "unseen": check(lambda: abs(r["holdout_nll_after"] / r["holdout_nll_retrained"] - 1)
                        <= 0.10, r["holdout_nll_after"], r["holdout_nll_retrained"]),
        "remain": check(lambda: abs(r["remain_nll_after"] / r["remain_nll_before"] - 1)
                        <= 0.02, r["remain_nll_after"], r["remain_nll_before"]),
        "replay": check(lambda: r["replay_after"] <= r["replay_retrained"] + 0.05,
                        r["replay_after"], r["replay_retrained"]),
    }


TABLE_NOTES = (
    "Columns: NLLs are mean token NLL (nats) under the memorised model → after unlearning, "
    "[retrained model]; the remain Δ is against the memorised model. AUC: LOSS attack, forget "
    "set vs the artist's unseen (holdout) tracks [retrained model's]. strongest attack: "
    "the attack whose forget AUC is farthest from the retrained model's (LOSS, Min-K%, "
    "MUSE's Min-K%, Min-K%++, zlib, LOSS on codebook 0) and that distance, which the AUC goal "
    "reads. privleak, in %, "
    "relative to the retrained model's AUC of the same attack (0 = as the retrained model; "
    "negative = the forget set still leaks, -100 fully; positive = over-unlearned: forget "
    "tracks look less familiar than never-seen ones): MUSE's (its Min-K% attack at k = 0.4, "
    "each track's last token left out) and privleak_loss (the same formula on the LOSS "
    "attack of the AUC column). KS p: forget quality, the p-value of a two-sample KS test "
    "of the forget tracks' mean token NLLs, unlearned vs retrained (n: tracks on each side; "
    ">= 0.05: indistinguishable; TOFU runs the test on its truth ratio, docs/metrics.md). "
    "DI p: dataset inference, the p-value of a test whether a classifier on the attacks' "
    "scores tells the forget tracks, as a whole, from the unseen ones [the retrained "
    "model's] (small = told apart; docs/metrics.md). "
    "replay: share "
    "of the true tokens a greedy continuation of a forget track's first frames reproduces, "
    "memorised → after [retrained]; 4-gram: share of a free generation's codebook-0 4-grams "
    "found in the track. relearned AUC: the forget AUC again after fine-tuning the unlearned "
    "model on the remain set alone (steps in brackets; an unlearned model whose forget set "
    "comes back from a little fine-tuning on other music had hidden it, not removed it). "
    "Goals (" + "; ".join(f"{k}: {v}" for k, v in GOALS.items()) + ").")


def summary_plot(rows: dict[str, dict], path: Path,
                 retrained: dict[str, float | None] | None = None) -> Path:
    """Three panels, one bar group per method: the forget set's MIA AUC before/after (the
    retrained model's as a line), the artist's unseen tracks' NLL after (the retrained
    model's as a line) and the remain NLL's change (band +-2 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    x = np.arange(len(names))
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(5 + 2.2 * len(names), 3.6))
    def val(n: str, key: str) -> float:  # None (too few items) is no bar; 0.0 is a bar
        v = rows[n][key]
        return np.nan if v is None else v

    before = [val(n, "forget_mia_auc_before") for n in names]
    after = [val(n, "forget_mia_auc_after") for n in names]
    a1.bar(x - 0.2, before, 0.4, color="tab:gray", label="memorised model")
    a1.bar(x + 0.2, after, 0.4, color="tab:blue", label="after unlearning")
    if retrained and retrained["forget_mia_auc_after"] is not None:
        r = retrained["forget_mia_auc_after"]
        a1.axhspan(r - 0.05, r + 0.05, color="tab:green", alpha=0.2,
                   label="retrained model ± 0.05")
    a1.set(xticks=x, xticklabels=names, ylim=(0, 1.4), yticks=np.linspace(0, 1, 6),
           ylabel="ROC AUC (LOSS attack)", title="Forget set vs unseen tracks of the artist")
    a1.legend(fontsize=7, loc="upper center", ncol=2)
    a3.bar(x - 0.2, [val(n, "forget_nll_after") for n in names], 0.4, color="tab:blue",
           label="forget tracks")
    a3.bar(x + 0.2, [val(n, "holdout_nll_after") for n in names], 0.4, color="tab:orange",
           label="unseen tracks")
    if retrained:
        r = retrained["holdout_nll_after"]
        a3.axhspan(0.9 * r, 1.1 * r, color="tab:green", alpha=0.2,
                   label="retrained, unseen ± 10 %")
    a3.set(xticks=x, xticklabels=names, ylabel="mean token NLL (nats)",
           title="The opt-out artist after unlearning")
    a3.legend(fontsize=7, loc="upper left")
    change = [100.0 * (rows[n]["remain_nll_after"] / rows[n]["remain_nll_before"] - 1.0)
              for n in names]
    a2.axhspan(-2, 2, color="tab:green", alpha=0.15, label="kept (±2 %)")
    a2.bar(x, change, 0.5, color=["tab:green" if abs(c) <= 2 else "tab:red" for c in change])
    a2.set_yscale("symlog", linthresh=10)
    a2.axhline(0, color="black", lw=0.8)
    a2.set(xticks=x, xticklabels=names, ylabel="remain NLL change (%)",
           title="Remain set (other artists)")
    a2.legend(fontsize=7, loc="upper left")
    fig.suptitle("noencore demo: unlearning an opt-out artist, against a retrained model",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    return "n/a" if p is None else f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _strongest_cell(row: dict[str, Any]) -> str:
    """"minkpp 0.120": the attack whose forget AUC is farthest from the retrained model's,
    and that distance."""
    if row.get("forget_auc_gap") is None:
        return "n/a"
    return f"{row.get('forget_auc_worst_attack')} {_fmt(row['forget_auc_gap'])}"


def _relearn_cell(row: dict[str, Any]) -> str:
    if row.get("relearn_steps") is None:
        return "–"
    return f"{_fmt(row['relearn_auc'])} [{row['relearn_steps']}]"


def _ks_items(rows: dict[str, dict]) -> str:
    """" (n = 40 vs 40)": the forget items each side of every row's KS test ("" where the
    rows' counts are unknown)."""
    pairs = {tuple(s.get("forget_quality_n") or (None, None)) for s in rows.values()}
    if len(pairs) != 1:
        return " (n: " + ", ".join(f"{name} {s.get('forget_quality_n')}"
                                   for name, s in rows.items()) + ")"
    ((a, b),) = pairs
    return "" if a is None or b is None else f" (n = {a} vs {b})"


def summary_table(rows: dict[str, dict], retrained: dict[str, float | None]) -> str:
    """One Markdown row per method (figures from :func:`_summary_row`), the retrained
    model's row first, and which goals each method meets."""
    n = _ks_items(rows)
    lines = ["| method | forget NLL | unseen same-artist NLL | remain NLL (Δ%) | "
             "forget AUC (LOSS) | strongest attack: ΔAUC vs retrained | "
             "privleak % (MUSE: Min-K% k=0.4) | privleak_loss % | "
             f"KS p{n} | DI p | replay | 4-gram | relearned AUC | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    r = retrained
    lines.append(f"| retrained (gold) | {r['forget_nll_after']:.3f} | "
                 f"{r['holdout_nll_after']:.3f} | {r['remain_nll_after']:.3f} | "
                 f"{_fmt(r['forget_mia_auc_after'])} | 0 | 0 | 0 | 1 | "
                 f"{_fmt_p(r.get('di_p_after'))} | {_fmt(r['replay_after'])} | "
                 f"{_fmt(r['ngram_after'])} | – | (reference) |")
    for name, s in rows.items():
        d_remain = 100.0 * (s["remain_nll_after"] / s["remain_nll_before"] - 1.0)
        goals = goals_met(s)
        failed = [k for k, v in goals.items() if v is False]
        unknown = [k for k, v in goals.items() if v is None]
        met = f"{sum(v is True for v in goals.values())}/{len(goals)}"
        detail = (f" (not: {', '.join(failed)})" if failed else "") + \
                 (f" (n/a: {', '.join(unknown)})" if unknown else "")
        lines.append(
            f"| {name} | {s['forget_nll_before']:.3f} → {s['forget_nll_after']:.3f} | "
            f"{s['holdout_nll_before']:.3f} → {s['holdout_nll_after']:.3f} "
            f"[{s['holdout_nll_retrained']:.3f}] | "
            f"{s['remain_nll_before']:.3f} → {s['remain_nll_after']:.3f} ({d_remain:+.2f}%) | "
            f"{_fmt(s['forget_mia_auc_before'])} → {_fmt(s['forget_mia_auc_after'])} "
            f"[{_fmt(s['forget_mia_auc_retrained'])}] | {_strongest_cell(s)} | "
            f"{_fmt(s['privleak'], 1)} | "
            f"{_fmt(s['privleak_loss'], 1)} | {_fmt(s['forget_quality'])} | "
            f"{_fmt_p(s.get('di_p_after'))} [{_fmt_p(s.get('di_p_retrained'))}] | "
            f"{_fmt(s['replay_before'])} → "
            f"{_fmt(s['replay_after'])} [{_fmt(s['replay_retrained'])}] | "
            f"{_fmt(s['ngram_before'])} → {_fmt(s['ngram_after'])} "
            f"[{_fmt(s['ngram_retrained'])}] | {_relearn_cell(s)} | {met}{detail} |")
    return "\n".join(lines)
