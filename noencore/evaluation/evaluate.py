"""``noencore.evaluate``: did the model forget, and did it stay a good music model?

One call measures an unlearned model (and, for before/after comparisons, its
reference: the model before unlearning, or that model's cached statistics) on the
forget, remain and holdout sets of token shards:

- token level (batched, teacher-forced, bf16 autocast): NLL and top-1 per set and per
  codebook, per-item NLL distributions;
- membership inference, forget vs holdout and remain vs holdout: every attack of
  ``mia.ATTACKS`` (LOSS, Min-K%, MUSE's Min-K%, Min-K%++, compression, LOSS on codebook 0, reference ratio
  against the model before unlearning and against the retrained model); ROC AUC each;
  MUSE's privleak and the same formula on the project's attacks (``privleak_<attack>``);
  forget quality (KS test on per-item mean NLL) and the strongest attack against the
  retrained model (the largest AUC gap) when a model retrained without the forget set is
  given; dataset inference, the forget set as a whole against the holdout, for every
  model (docs/metrics.md defines each);
- generation level (when a CLAP checkpoint is given): CLAP text-audio score, FAD on
  CLAP embeddings, CLAP memorisation similarity; and, without CLAP, verbatim replay
  (exact-token continuation match from a prompt of the true track, n-gram overlap of
  free generations with the track), for the retrained model too when given;
- relearning probe (``relearn_steps``): the forget AUC and NLLs again after fine-tuning
  a copy of the model on the remain set (``noencore.evaluation.relearn``);

and writes report.json / report.md / plots / token_stats.npz into ``out``. Under a
launcher the ranks share the work and rank 0 writes the report (``evaluate``'s doc).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noencore import trackers
from noencore.errors import NoencoreError, UsageError
from noencore.evaluation import dataset_inference, mia, relearn
from noencore.evaluation.config import EvalConfig
from noencore.evaluation.generation import GenerationConfig
from noencore.evaluation.report import Criteria, verdicts, write_report
from noencore.evaluation.token_metrics import (
    SetStats,
    collect_set_stats,
    gather_set_stats,
    load_stats,
    save_stats,
)

TOKEN_METRICS = ("token", "mia", "privleak", "forget_quality", "dataset_inference")
GENERATION_METRICS = ("clap", "fad", "memorization", "continuation", "ngram")
ALL_METRICS = TOKEN_METRICS + GENERATION_METRICS
SET_NAMES = ("forget", "remain", "holdout")
#: the attacks that read no other model: ROC curves, the AUC verdict
_MIA_ATTACKS = tuple(a.name for a in mia.ATTACKS.values() if a.reference is None)


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively, so report.json stays valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _open_sets(sets: Mapping[str, Any], shards: Any = None) -> dict[str, Any]:
    from noencore.data.shards import TokenShards, select_set

    unknown = set(sets) - set(SET_NAMES)
    if unknown:
        raise UsageError(f"unknown set name(s) {sorted(unknown)}; use {', '.join(SET_NAMES)}")
    if "forget" not in sets:
        raise UsageError("sets must include 'forget' (the music to be forgotten)")
    out = {}
    for name in SET_NAMES:
        if name not in sets or sets[name] is None:
            continue
        s = sets[name]
        if shards is not None:
            s = select_set(TokenShards(shards) if isinstance(shards, str | os.PathLike)
                           else shards, s)
        s = TokenShards(s) if isinstance(s, str | os.PathLike) else s
        if len(s) == 0:
            raise NoencoreError(f"{s.path}: the {name} set is empty; check its split name or "
                                "id list")
        out[name] = s
    _check_disjoint(out)
    return out


def _check_disjoint(sets: Mapping[str, Any]) -> None:
    """The forget set shares no track with the remain or the holdout set (of the same
    shards): a track in both would be scored as a member and as a non-member at once."""
    forget = sets["forget"]
    for name in ("remain", "holdout"):
        other = sets.get(name)
        if other is None or Path(other.path) != Path(forget.path):
            continue
        both = sorted(set(forget.ids) & set(other.ids))
        if both:
            raise UsageError(f"{forget.path}: {len(both)} track(s) are in both the forget and "
                             f"the {name} set (e.g. {both[0]!r}); make the sets disjoint")


def _load_model(spec: Any, device: torch.device) -> Any:
    if spec is None or not isinstance(spec, str | os.PathLike):
        return spec
    from noencore.models.musicgen import load_musicgen

    return load_musicgen(str(spec), device=device)


def _is_cached_stats(ref: Any) -> bool:
    if not isinstance(ref, str | os.PathLike):
        return False
    p = Path(ref)
    return (p.is_dir() and (p / "token_stats.npz").is_file()) or p.suffix == ".npz"


def _check_compatible(model: Any, shards: Any, name: str,
                      allow_mismatch: bool = False) -> str | None:
    """Refuse ``name`` shards made with another codec than ``model``'s (its shape, then its
    identity: ``check_shards_codec``); a note where the identity was not compared or a
    mismatch was allowed."""
    from noencore.data.codec import check_shards_codec

    h = shards.header
    if (h.n_q, h.card) != (model.n_q, model.card):
        raise NoencoreError(
            f"{shards.path}: {name} shards were encoded with codec {h.codec!r} (n_q={h.n_q}, "
            f"card={h.card}); model {model.spec!r} expects n_q={model.n_q}, card={model.card}: "
            "evaluate on shards made with the model's codec")
    if model.codec is not None and (h.sample_rate, h.frame_rate) != (
            model.codec.sample_rate, model.codec.frame_rate):
        raise NoencoreError(
            f"{shards.path}: shards are {h.sample_rate} Hz / {h.frame_rate} frames/s, model "
            f"{model.spec!r}'s codec {model.codec.sample_rate} Hz / {model.codec.frame_rate}: "
            "mismatched codec")
    return check_shards_codec(model.codec, h, shards.path, str(model.spec), allow_mismatch)


def _conditions_for(shards: Any, conditions: Any, model: Any) -> Any:
    from noencore.models.text import ConditionCache

    cache = conditions if conditions is not None else shards.path / "conditions"
    if not hasattr(cache, "batch"):
        cache = ConditionCache(cache)
    if cache.encoder != model.text_encoder:
        raise NoencoreError(
            f"{cache.folder}: text conditions were computed with {cache.encoder!r}, model "
            f"{model.spec!r} uses {model.text_encoder!r}; rebuild them with `noencore condition`")
    return cache


def _mia_block(stats: dict[str, SetStats], refs: dict[str, dict[str, SetStats]],
               min_items: int) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """AUCs of every attack for forget/remain vs holdout; also returns per-attack scores
    for ROC curves. ``refs``: the statistics of the models the reference attacks compare
    with ({"before": ..., "retrained": ...}, those given)."""
    if "holdout" not in stats:
        return {"note": "no holdout set: membership inference needs non-members"}, {}
    out: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for s in ("holdout", "forget", "remain"):
        if s in stats:
            scores[s] = mia.attack_scores(
                stats[s].tokens(), stats[s].sizes,
                {r: st[s].tokens() for r, st in refs.items() if s in st})
    for s in ("forget", "remain"):
        if s not in scores:
            continue
        block: dict[str, Any] = {}
        why = mia.check_auc_sizes(stats[s].n_items, stats["holdout"].n_items, min_items)
        if why:
            block["note"] = why
        else:
            for a, v in scores[s].items():
                block[a] = mia.roc_auc(v, scores["holdout"][a], min_items)
        out[s] = block
    # items whose token statistics hold NaN have no score and stay out of the AUCs
    unscored = {s: max(mia.unscored(v) for v in sc.values()) for s, sc in scores.items()}
    if any(unscored.values()):
        out["unscored"] = unscored
    return out, scores


def evaluate(model: Any, sets: Mapping[str, Any], config: EvalConfig | None = None,
             **overrides: Any) -> EvalResult:
    """Evaluate an unlearned MusicGen model; return the report (an ``EvalResult``, a dict;
    also written to ``out``).

    model: a ``MusicGenModel`` or a spec for ``load_musicgen`` (folder, hub id, "tiny").
    sets: ``{"forget": ..., "remain": ..., "holdout": ...}``, each a ``TokenShards`` (e.g.
    ``shards.select(split="forget")``) or a shard folder; with the ``shards`` option, each
    may also be named as ``unlearn`` names its sets: a split name or a list of source ids
    (``noencore.data.shards.select_set``). forget is required, holdout is needed for
    membership inference. config: an ``EvalConfig`` (every option, its default and
    meaning: ``noencore.evaluation.config``); ``overrides``: options by name, over it.
    Runs the phases of ``Evaluation``.
    """
    if config is not None and not isinstance(config, EvalConfig):
        raise UsageError(f"config must be an EvalConfig, got {type(config).__name__}; give "
                         "the options by name (metrics=..., reference=...)")
    return Evaluation(model, sets, (config or EvalConfig()).replace(**overrides)).run()


class Evaluation:
    """One ``evaluate`` call, phase by phase: ``prepare`` (options checked, the sets, the
    rank's device, the model, the condition caches), ``measure`` (each model's or cached
    statistics' token statistics per set, generations, the relearning probe), ``report``
    (rank 0: the report's blocks, verdicts, the files in ``out``)."""

    def __init__(self, model: Any, sets: Mapping[str, Any], config: EvalConfig):
        self.model, self.sets, self.o = model, sets, config
        self.t0 = time.time()

    def run(self) -> EvalResult:
        from noencore import distributed as dist

        self.folder = None  # the claimed output folder (rank 0)
        try:
            self.prepare()
            self.measure()
            return EvalResult(dist.on_rank0(self.report))
        finally:
            if self.folder is not None:  # what the evaluation wrote, and the lock released
                self.folder.wrote(self.folder.folder)
                self.folder.release()

    def claim_folder(self) -> None:
        """Rank 0 claims ``out`` (``noencore.outputs``: one job at a time, an earlier
        evaluation replaced only with ``overwrite``, nobody else's files touched, apart
        from every input); every rank gets rank 0's answer."""
        from noencore import distributed as dist
        from noencore.outputs import check_apart, claim

        o, error = self.o, None
        if dist.rank() == 0:
            try:
                check_apart(o.out, {"model": self.model, "reference": o.reference,
                                    "retrained model": o.retrained, "CLAP checkpoint": o.clap,
                                    "condition cache": o.conditions,
                                    **{f"{n} set's shards": s for n, s in
                                       self.shard_sets.items()}})
                self.folder = claim(o.out, "evaluate", overwrite=o.overwrite).__enter__()
                self.folder.own(EVAL_FILES)
            except NoencoreError as exc:
                error = str(exc)
        error = dist.broadcast_object(error)
        if error is not None:
            raise UsageError(error)

    def prepare(self) -> None:
        from noencore import distributed as dist

        o = self.o
        metrics = list(o.metrics) if o.metrics is not None else None
        bad = [m for m in (metrics or []) if m not in ALL_METRICS]
        if bad:
            raise UsageError(f"unknown metric(s) {bad}; choose from {', '.join(ALL_METRICS)}")
        if metrics is None:
            metrics = list(TOKEN_METRICS) + (list(GENERATION_METRICS) if o.clap is not None
                                             else [])
        self.metrics = metrics
        o.check()
        self.report_to = o.tracker_names()
        trackers.check(self.report_to, o.out)
        self.shard_sets = _open_sets(self.sets, o.shards)
        self.relearn_counts = relearn.parse_steps(o.relearn_steps)
        if self.relearn_counts:
            relearn.check_sets(self.shard_sets)
        if self.model is None:
            raise UsageError("model is required")
        # a model object stays where it is; specs are loaded onto this rank's device
        given = not isinstance(self.model, str | os.PathLike)
        self.dev = self.model.device if given and o.device is None else \
            dist.rank_device(o.device)
        self.rank, self.world = dist.join(self.dev)
        if o.out is not None:
            self.claim_folder()
        self.progress = o.progress and self.rank == 0  # one set of bars, not one per rank
        self.model = model = _load_model(self.model, self.dev)
        self.codec_notes = sorted({note for name, s in self.shard_sets.items() if (
            note := _check_compatible(model, s, name, o.allow_codec_mismatch))})
        self.gen_cfg = o.generation or GenerationConfig()
        self.caches = {name: _conditions_for(s, o.conditions, model)
                       for name, s in self.shard_sets.items()}
        # every set is scored with the same text-condition padding, so that no set's items
        # hear more padding than another's (members vs non-members)
        self.cond_length = max(cache.length for cache in self.caches.values())

    def stats_of(self, m: Any, role: str) -> dict[str, SetStats | None]:
        """Each set's statistics under ``m``: whole on rank 0, None on the other ranks."""
        o, res = self.o, {}
        for name, s in self.shard_sets.items():
            cache = _conditions_for(s, self.caches[name], m)  # checks m's text encoder
            res[name] = gather_set_stats(collect_set_stats(
                m, s, cache, batch_size=o.batch_size, frames=o.frames, precision=o.precision,
                progress=self.progress, desc=f"{role} {name}", rank=self.rank,
                world=self.world, cond_length=self.cond_length))
        return res

    def cached_stats(self, spec: Any, role: str) -> tuple[dict[str, SetStats], str]:
        st, meta = load_stats(spec)
        missing = [n for n in self.shard_sets if n not in st]
        for n in self.shard_sets:
            if n in st and st[n].ids != list(self.shard_sets[n].ids):
                raise NoencoreError(f"{spec}: cached {role} statistics of the {n} set cover "
                                    "other items than this set; evaluate the same sets")
        if missing:
            raise NoencoreError(f"{spec}: cached {role} statistics lack set(s) {missing}")
        # token statistics of another vocabulary are not comparable, token for token
        theirs = {k: meta[k] for k in _CODEC_KEYS if k in meta}
        ours = _codec_of(self.model)
        clash = [f"{k} {theirs[k]} (model {ours[k]})" for k in theirs if theirs[k] != ours[k]]
        if clash:
            raise NoencoreError(f"{spec}: cached {role} statistics were computed by a model "
                                f"with another codec or vocabulary ({', '.join(clash)}); "
                                "give a model with this model's codec, or its statistics")
        return {n: st[n] for n in self.shard_sets}, f"{meta.get('model')} (cached: {spec})"

    def stats_or_cached(self, spec: Any, role: str) -> tuple[Any, Any, str | None]:
        """(statistics, loaded model or None, name); the statistics are None on ranks > 0."""
        from noencore import distributed as dist

        if spec is None:
            return None, None, None
        if _is_cached_stats(spec):
            # rank 0 alone reads them (the others have no use for them); a bad file stops
            # every rank
            loaded = dist.on_rank0(lambda: self.cached_stats(spec, role), share=False)
            st, name = loaded if loaded is not None else (None, None)
            return st, None, name
        m = _load_model(spec, self.dev)
        ours, theirs = _codec_of(self.model), _codec_of(m)
        if theirs != ours:
            clash = ", ".join(f"{k} {theirs[k]} (model {ours[k]})" for k in ours
                              if theirs[k] != ours[k])
            raise NoencoreError(f"{role} model {getattr(m, 'spec', spec)!r} has another codec "
                                f"or vocabulary than model {self.model.spec!r} ({clash}); "
                                "compare models that share the codec (retrain from the same "
                                "base model)")
        for name, s in self.shard_sets.items():
            _check_compatible(m, s, name, self.o.allow_codec_mismatch)
        return self.stats_of(m, role), m, str(getattr(m, "spec", spec))

    def measure(self) -> None:
        o, model = self.o, self.model
        self.after = self.stats_of(model, "after")
        self.before, self.ref_model, self.ref_name = self.stats_or_cached(o.reference, "before")
        self.retr, retr_model, self.retr_name = self.stats_or_cached(o.retrained, "retrained")
        self.gen_metrics = [m for m in self.metrics if m in GENERATION_METRICS]
        self.gen_items = None
        if self.gen_metrics:
            from noencore.evaluation.generation_metrics import collect_generation

            others = {"before": self.ref_model, "retrained": retr_model}
            self.gen_items = collect_generation(
                {"after": model} | {r: m for r, m in others.items() if m is not None},
                self.shard_sets, self.gen_metrics, clap=o.clap,
                clap_tokenizer=o.clap_tokenizer, clap_model=o.clap_model, cfg=self.gen_cfg,
                progress=self.progress)
        self.relearned = []  # (steps, each set's statistics after that much fine-tuning)
        if self.relearn_counts:
            for n, m in relearn.relearned_models(
                    model, self.shard_sets, self.relearn_counts, lr=o.relearn_lr,
                    batch_size=o.relearn_batch_size, frames=o.frames, seed=self.gen_cfg.seed,
                    conditions=self.caches["remain"].folder, out=o.out,
                    progress=self.progress):
                self.relearned.append((n, self.stats_of(m, f"relearned {n} steps")))

    def report(self) -> dict[str, Any]:
        """The report's blocks (rank 0), written to ``out`` when given."""
        o, model, after, retr = self.o, self.model, self.after, self.retr
        results: dict[str, Any] = {
            "models": {"after": str(model.spec), "before": self.ref_name,
                       "retrained": self.retr_name},
            "sets": {n: {"shards": str(s.path), "items": len(s), "frames": int(s.frames.sum()),
                         "codec": s.header.codec} for n, s in self.shard_sets.items()},
            "metrics": self.metrics, "precision": _effective_precision(o.precision, model),
            "batch_size": o.batch_size, "ranks": self.world, "frames": o.frames,
            "seed": self.gen_cfg.seed, "op_backend": _op_backend(),
        }
        roles = {"after": after} | ({"before": self.before} if self.before is not None else {})
        results["token"] = {r: {n: s.summary() for n, s in st.items()} for r, st in roles.items()}
        if retr is not None:
            results["token"]["retrained"] = {n: s.summary() for n, s in retr.items()}
        curves = _mia_results(results, self.metrics, roles, retr, o.min_auc_items)
        if "forget_quality" in self.metrics:
            results["forget_quality"] = _forget_quality(roles, retr)
        if "dataset_inference" in self.metrics:
            results["dataset_inference"] = _dataset_inference(
                roles | ({"retrained": retr} if retr is not None else {}), o.min_auc_items,
                self.gen_cfg.seed)
        results["notes"] = self.generation_and_notes(results)
        crit = o.criteria or Criteria()
        results["verdicts"] = verdicts(results, crit)
        results["criteria"] = crit
        results["seconds"] = round(time.time() - self.t0, 2)
        results = _finite(_jsonable(results))
        if o.out is not None:
            folder = Path(o.out)
            folder.mkdir(parents=True, exist_ok=True)
            results["token_stats_sha256"] = save_stats(folder / "token_stats.npz", after,
                                                       {"model": str(model.spec),
                                                        **_codec_of(model)})
            item_nll = {r: {n: mia.mean_nll(s.tokens()) for n, s in st.items()}
                        for r, st in roles.items()}
            write_report(folder, results, item_nll, curves)
        self.track(results)
        return results

    def track(self, results: dict[str, Any]) -> None:
        """The report to the trackers of ``report_to`` (rank 0): its numbers, the goal
        table (the verdicts) and the plots."""
        if not self.report_to:
            return
        report = trackers.open_trackers(self.report_to, self.o.out, self.o.to_dict(),
                                        self.rank, kind="evaluate")
        try:
            report.log(0, trackers.flatten({k: results[k] for k in _TRACKED if k in results},
                                           "eval"))
            report.table("eval/goals", [{k: v.get(k) for k in ("criterion", "value",
                                                                "threshold", "pass", "detail")}
                                        for v in results["verdicts"]])
            for plot in ("nll_hist", "roc"):
                path = Path(self.o.out or "") / f"{plot}.png"
                if self.o.out is not None and path.exists():
                    report.figure(f"eval/{plot}", path)
        finally:
            report.close()

    def generation_and_notes(self, results: dict[str, Any]) -> list[str]:
        """Fill the "generation" and "relearn" blocks of ``results``; return the notes."""
        o, notes = self.o, list(self.codec_notes)
        if self.gen_items is not None:
            from noencore.evaluation.generation_metrics import generation_report

            results.update(generation_report(self.gen_items, self.gen_metrics))
            if results["generation"].get("random_clap"):
                notes.append("CLAP weights are RANDOM (a test model): CLAP scores, FAD and "
                             "memorisation similarities below mean nothing.")
            if o.reference is not None and self.ref_model is None:
                notes.append("the reference is cached token statistics: generation metrics "
                             "have no 'before' column")
        elif o.clap is None:
            results["generation"] = {"skipped": "no CLAP checkpoint given (--clap PATH); CLAP "
                                                "score, FAD and memorisation were not computed"}
        if self.relearned:
            results["relearn"] = relearn.relearn_block(
                self.relearned, self.after, lr=o.relearn_lr, batch_size=o.relearn_batch_size,
                frames=o.frames, min_items=o.min_auc_items)
        if self.before is None:
            notes.append("no reference model: no 'before' column, no reference-ratio attack, "
                         "no remain-NLL verdict")
        return notes


class EvalResult(dict):
    """What ``evaluate`` measured: report.json's content, a dict (blocks "token", "mia",
    "privleak", "forget_quality", "dataset_inference", "generation", "relearn",
    "verdicts", ...; the metrics not asked for are absent), with the blocks a caller reads
    most as attributes and ``to_dict()`` for a plain, JSON-ready copy."""

    @property
    def verdicts(self) -> dict[str, Any]:
        """Each criterion's verdict (``noencore.evaluation.report.verdicts``)."""
        return self["verdicts"]

    @property
    def token(self) -> dict[str, Any]:
        """Token-level NLL and top-1 per set (and per role: after, before, retrained)."""
        return self.get("token", {})

    @property
    def mia(self) -> dict[str, Any]:
        """Membership-inference AUCs per role, set and attack ({} when not measured)."""
        return self.get("mia", {})

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


_CODEC_KEYS = ("n_q", "card", "sample_rate", "frame_rate")
# what an evaluation writes into its folder (the relearning probe's run, the trackers' files:
# folders)
EVAL_FILES = ["report.json", "report.md", "nll_hist.png", "roc.png", "token_stats.npz",
              "relearn", "trackers"]
#: the report's blocks whose numbers go to the trackers
_TRACKED = ("token", "mia", "privleak", "privleak_variants", "forget_quality",
            "dataset_inference", "generation", "relearn")


def _codec_of(model: Any) -> dict[str, int]:
    """What makes two models' tokens comparable: codebooks, vocabulary, codec rates."""
    return {k: int(getattr(model, k)) for k in _CODEC_KEYS}


def _mia_results(results: dict[str, Any], metrics: list[str],
                 roles: dict[str, dict[str, SetStats]], retr: dict[str, SetStats] | None,
                 min_auc_items: int) -> dict[str, dict[str, tuple]]:
    """Fill the "mia" (with "vs_retrained", the strongest attack against the retrained
    model, where one is given), "privleak" and "privleak_variants" blocks of ``results``;
    return the forget ROC curves per role and attack, (fpr, tpr, auc)."""
    curves: dict[str, dict[str, tuple]] = {}
    if "mia" not in metrics and "privleak" not in metrics:
        return curves
    results["mia"] = {}
    retr_mia = _mia_block(retr, {}, min_auc_items)[0] if retr is not None else None
    for role, st in roles.items():
        # the reference attacks: the unlearned model against the model before unlearning
        # and (MUSE's) against the retrained model; the model before against the retrained
        refs = {"before": roles["before"]} if role == "after" and "before" in roles else {}
        refs |= {"retrained": retr} if retr is not None else {}
        block, scores = _mia_block(st, refs, min_auc_items)
        results["mia"][role] = block
        if "forget" in block and "note" not in block["forget"]:
            curves[role] = {a: (*mia.roc_curve(scores["forget"][a], scores["holdout"][a]),
                                block["forget"][a]) for a in _MIA_ATTACKS}
    if retr_mia is not None:  # the level a model that never saw the forget set is at
        results["mia"]["retrained"] = retr_mia
        results["mia"]["vs_retrained"] = mia.vs_retrained_block(results["mia"]["after"],
                                                                retr_mia)
    if "privleak" in metrics:
        results.update(mia.privleak_blocks(results["mia"], list(roles), retr_mia))
    if "mia" not in metrics:
        results.pop("mia")
    return curves


def _forget_quality(roles: dict[str, dict[str, SetStats]],
                    retr: dict[str, SetStats] | None) -> dict[str, Any]:
    """The "forget_quality" block: each role's forget items' mean NLLs against the
    retrained model's (``mia.forget_quality_block``)."""
    return mia.forget_quality_block(
        {role: mia.mean_nll(st["forget"].tokens()) for role, st in roles.items()},
        None if retr is None else mia.mean_nll(retr["forget"].tokens()))


def _dataset_inference(roles: dict[str, dict[str, SetStats]], min_half: int,
                       seed: int) -> dict[str, Any]:
    """The "dataset_inference" block: for each role (after, before, retrained), the forget
    set as a whole tested against the holdout (``dataset_inference.dataset_inference``).

    The features are the attacks that read no other model, the same for every role, so
    that the unlearned model's p-value and the retrained model's are one test on two
    models. The reference attacks stay out: the ratio to the model before unlearning
    separates the forget set from the holdout for any model that forgot it, the retrained
    model included (the model before had memorised the forget set), and the ratio to the
    retrained model is 0 for the retrained model itself. Every role is split alike (one
    seed, sets of the same sizes).
    """
    if any("holdout" not in st for st in roles.values()):
        return {"note": "no holdout set: dataset inference needs known non-members"}
    block: dict[str, Any] = {
        "suspect": "forget", "validation": "holdout", "features": list(_MIA_ATTACKS),
        "test": dataset_inference.TEST, "splits": dataset_inference.SPLITS, "seed": seed,
        "aggregation": dataset_inference.AGGREGATION}
    for role, st in roles.items():
        forget, holdout = (mia.attack_scores(st[s].tokens(), st[s].sizes)
                           for s in ("forget", "holdout"))
        block[role] = dataset_inference.dataset_inference(
            forget, holdout, _MIA_ATTACKS, seed=seed, min_half=min_half)
    return block


def _op_backend() -> str | None:
    """Which backend computed the token statistics (the C++ one with its vector path)."""
    from noencore.ops import cpp, last_backend

    name = last_backend()
    return f"cpp ({cpp.isa()})" if name == "cpp" else name


def _effective_precision(precision: str, model: Any) -> str:
    from noencore.evaluation.token_metrics import autocast_dtype

    if precision == "bf16" and autocast_dtype(precision, model.device) is None:
        return "fp32 (bf16 asked; this device has no native bf16)"
    return precision


def _jsonable(x: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(x) and not isinstance(x, type):
        return asdict(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x
