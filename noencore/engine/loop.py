"""The unlearning loop, top to bottom: ``noencore.unlearn(...)``.

One process on CPU or one GPU by default (plain torch AdamW); DeepSpeed ZeRO 1/2/3 in
bf16 when ``zero_stage`` or ``deepspeed`` is given (launched with ``deepspeed`` /
``torchrun``, or as one process). Every step:

    batch of step s (forget + remain rows, drawn from (seed, s))
      -> cached T5 outputs of its captions
      -> UnlearnObjective: LM hidden states -> method's targets/weights -> fused op
      -> divergence guard -> optimizer step -> metrics (+ checkpoint every N steps)

Stops at ``steps`` or when the forget NLL reaches ``target_forget_nll``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noencore import distributed as dist
from noencore import trackers
from noencore.distributed import rank_device
from noencore.engine import checkpoint as ckpt
from noencore.engine.config import UnlearnConfig, fields_for_run, select_blocks
from noencore.engine.metrics import MetricsLog, plot_losses, read_metrics
from noencore.engine.objective import (
    UnlearnObjective,
    counted_layout,
    sequence_nll,
    token_counts,
)
from noencore.engine.optim import adamw
from noencore.engine.requests import (
    check_request,
    held,
    is_opt_out,
    make_request,
    set_ids,
    unheld_warning,
)
from noencore.engine.sets import UnlearningSets
from noencore.errors import NoencoreError, UsageError
from noencore.fileio import atomic_write
from noencore.methods import get_method
from noencore.models.adapter import token_mask
from noencore.planner.shape import StepShape
from noencore.progress import progress as progress_bar


class DivergenceError(NoencoreError):
    """The loss or the gradients became NaN/inf; the last good checkpoint is kept."""


@dataclass
class UnlearnResult:
    """What a run did: ``steps`` done, why it ``stopped`` ("max_steps",
    "target_forget_nll", "nonmember_auc" or "nonmember_nll"), the step ``metrics``, where
    it saved the ``model_dir``, and the stop rule's last measurement (``stop_info``)."""

    model: Any
    steps: int
    stopped: str
    metrics: list[dict] = field(default_factory=list)
    out: Path | None = None
    model_dir: Path | None = None
    stop_info: dict | None = None
    report: dict | None = None  # the audit's evaluation (``audit``), with its "verdict"
    # (forget ids, remain ids) the audit evaluates (``audit``; set by the engine)
    audit_sets: tuple[list[str], list[str]] | None = None
    # with ``compile``: compiled or not, the backend, the compile seconds, why it failed
    compile: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model and the report, JSON-ready (paths as strings)."""
        return {"steps": self.steps, "stopped": self.stopped, "metrics": list(self.metrics),
                "out": None if self.out is None else str(self.out),
                "model_dir": None if self.model_dir is None else str(self.model_dir),
                "stop_info": self.stop_info, "compile": self.compile,
                "verdict": None if self.report is None else self.report.get("verdict")}


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _slow_bf16(dev: torch.device, precision: str, distributed: bool) -> str | None:
    """Why bf16 on this CPU is slow, or None: without bf16 matrix instructions (AVX-512-BF16
    or AMX) torch runs bf16 matmuls in software, measured at 0.36 GFLOP/s against 131 in
    fp32 on an AVX2 EPYC (benchmarks/RESULTS.md), a step tens of times slower."""
    if dev.type != "cpu" or (precision != "bf16" and not distributed):
        return None
    flags = cpu_flags()
    if flags is None or flags & {"avx512_bf16", "amx_bf16"}:
        return None
    what = "DeepSpeed trains in bf16" if distributed else "precision bf16"
    return (f"{what} on a CPU without bf16 matrix instructions (no avx512_bf16 or amx_bf16 "
            "in /proc/cpuinfo): torch runs bf16 matmuls in software here, tens of times "
            "slower than fp32; use --precision fp32 in one process, or a GPU")


def _check_codec(model, shards, allow_mismatch: bool = False) -> str | None:
    """Refuse shards made with another codec than the model's: its shape (codebooks,
    vocabulary, rates), then its identity (``check_shards_codec``). Returns a note where
    the identity could not be compared or a mismatch was allowed."""
    from noencore.data.codec import check_shards_codec

    h = shards.header
    have = {"n_q": model.n_q, "card": model.card, "frame_rate": model.frame_rate,
            "sample_rate": model.sample_rate}
    got = {"n_q": h.n_q, "card": h.card, "frame_rate": h.frame_rate,
           "sample_rate": h.sample_rate}
    bad = [f"{k} {got[k]} vs model {have[k]}" for k in have if int(got[k]) != int(have[k])]
    if bad:
        raise NoencoreError(f"{shards.path}: shards (codec {h.codec!r}) do not match model "
                            f"{model.spec!r} ({', '.join(bad)}); precompute the shards with "
                            "the model's codec")
    return check_shards_codec(getattr(model, "codec", None), h, shards.path, str(model.spec),
                              allow_mismatch)


def _codec_record(header, note: str | None) -> dict[str, Any]:
    """What a request record says of the codec the run's shards were made with."""
    ident = header.identity or {}
    return {"name": header.codec, "weights_sha256": ident.get("weights_sha256"),
            "matched_model": note is None, **({"note": note} if note else {})}


def _check_conditions(cache, model, sets: UnlearningSets) -> None:
    from noencore.models.text import encoder_fingerprint

    if cache.fingerprint != encoder_fingerprint(model.text_encoder):
        raise NoencoreError(f"{cache.folder}: text conditions were computed with "
                            f"{cache.encoder!r}, the model uses {model.text_encoder!r}; rerun "
                            "`noencore condition` with this model")
    items = set(sets.forget_item.tolist()) | set(sets.remain_item.tolist())
    missing = sorted({sets.captions[i] for i in items if sets.captions[i] not in cache})
    if missing:
        raise NoencoreError(f"{cache.folder}: {len(missing)} caption(s) have no cached text "
                            f"condition (e.g. {missing[0]!r}); rerun `noencore condition`")


def _reference_nll(model, sets: UnlearningSets, cache, batch_size: int,
                   device: torch.device, *, forget: bool = True, progress: bool = False,
                   rank: int = 0, world: int = 1, autocast: bool = False,
                   runner: Callable[[Callable[[], Any]], Any] | None = None) -> torch.Tensor:
    """float32 [n windows] on ``device``: the starting model's summed NLL of each forget
    window (NPO) or each remain window (``remain_anchor``), computed once so that no
    reference model stays resident.

    Measured with the training forward's own numerics (bf16 autocast when ``autocast``;
    under DeepSpeed the engine's bf16 weights, each pass handed to ``runner``, the
    objective module's forward): ``remain_anchor``'s hinge compares a row's NLL with
    this number, and a reference from other arithmetic would put every row a rounding
    error above or below it. Under a launcher each rank scores every ``world``-th batch of ``batch_size``
    windows, every rank running the same number of forward passes (collectives inside
    a ZeRO-3 forward need that), and the table is summed over ranks."""
    n = sets.n_forget if forget else sets.n_remain
    out = torch.zeros(n, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    chunks = progress_bar(range(0, n, world * batch_size), disable=not progress,
                          desc=f"reference NLL ({'forget' if forget else 'remain'})",
                          unit="batch", leave=False)
    for chunk in chunks:
        first = chunk + rank * batch_size
        unit = torch.arange(first, first + batch_size)
        unit = torch.where(unit < n, unit, -1)
        b = sets.gather(torch.full((batch_size,), forget, dtype=torch.bool), unit)
        emb, emask = cache.batch(b.captions, present=(unit >= 0).tolist())
        def score(b=b, emb=emb, emask=emask):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return sequence_nll(model, b.codes.to(device), b.mask.to(device),
                                    emb.to(device), emask.to(device))

        nll = runner(score) if runner is not None else score()
        real = unit >= 0
        out[unit[real].to(device)] = nll[real.to(device)].float()
    model.train(was_training)
    return dist.all_reduce_sum(out)


def _window_tokens(lm: torch.nn.Module, sets: UnlearningSets, chunk: int = 64,
                   forget: bool = True) -> torch.Tensor:
    """float32 [n forget (or remain) windows]: the tokens of each window that count (under
    the delay pattern), computed on the host from the windows' lengths."""
    out = []
    n = sets.n_forget if forget else sets.n_remain
    for first in range(0, n, chunk):
        unit = torch.arange(first, min(first + chunk, n))
        b = sets.gather(torch.full((unit.numel(),), forget, dtype=torch.bool), unit)
        out.append(token_mask(lm, b.mask).sum(dim=(1, 2)).float())
    return torch.cat(out) if out else torch.zeros(0)


def _fit_targets(run: Trainer, stopper: Any) -> None:
    """A method's targets, measured once under the starting weights: each forget window's
    mean NLL (its cached reference over its tokens) mapped onto the stop rule's
    non-members' per-track mean NLLs (``stopper.original``, the same on every rank)."""
    tokens = _window_tokens(run.model.lm, run.sets).to(run.dev)
    nonmember = torch.as_tensor(stopper.original, dtype=torch.float32, device=run.dev)
    run.method.fit_targets(run.ref_forget / tokens.clamp_min(1.0),
                           nonmember[torch.isfinite(nonmember)])


def _anchor_unseen(run: Trainer, stopper: Any) -> None:
    """The anchored unseen windows' reference: the stop rule's non-members' mean NLL per
    token under the starting weights (the level the forget rows are sent to) times each
    window's tokens, in place of the window's own NLL; their held rows are then pulled to
    it from both sides."""
    nonmember = torch.as_tensor(stopper.original, dtype=torch.float64)
    level = float(nonmember[torch.isfinite(nonmember)].mean())
    tokens = _window_tokens(run.model.lm, run.sets, forget=False).to(run.dev)
    mask = torch.from_numpy(run.unseen_mask).to(run.dev)
    run.ref_remain = torch.where(mask, level * tokens, run.ref_remain)


def _row_reference(ref_forget: torch.Tensor | None, ref_remain: torch.Tensor | None,
                   forget: torch.Tensor, unit: torch.Tensor) -> torch.Tensor | None:
    """float32 [B] on the tables' device: each row's cached reference NLL (0 for padding
    rows and for the set whose reference is not cached); None when nothing is cached.
    Nothing here reads a value back to the host."""
    tables = [t for t in (ref_forget, ref_remain) if t is not None]
    if not tables:
        return None
    dev = tables[0].device
    forget, unit = forget.to(dev), unit.to(dev)
    out = torch.zeros(unit.numel(), dtype=torch.float32, device=dev)
    for table, rows in ((ref_forget, forget & (unit >= 0)), (ref_remain, ~forget & (unit >= 0))):
        if table is not None and table.numel():
            picked = table[unit.clamp(0, table.numel() - 1)]  # rows of the other set: unused
            out = torch.where(rows, picked.float(), out)
    return out


def _check_shared_folder(out_dir: Path, rank: int, world: int) -> None:
    """Refuse a run folder that the ranks do not share: DeepSpeed writes every rank's
    partition of a checkpoint into one folder, which rank 0 then seals with checksums."""

    token = out_dir / ".ranks-share-this-folder"
    nonce = dist.broadcast_object(os.urandom(8).hex() if rank == 0 else None)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        token.write_text(nonce)
    dist.barrier()
    try:
        seen = token.read_text() == nonce
    except OSError:
        seen = False
    missing = dist.all_reduce_sum(torch.tensor([0.0 if seen else 1.0]))
    dist.barrier()
    if rank == 0:
        token.unlink(missing_ok=True)
    if float(missing[0]) > 0:
        raise UsageError(f"{out_dir}: {int(missing[0])} of {world} ranks cannot see the run "
                         "folder rank 0 writes; checkpoints need a folder on a filesystem that "
                         "every rank shares (e.g. NFS or Lustre on a multi-node job)")


def _config_mismatch(folder: Path, saved: dict, config: dict) -> str:
    """Why a checkpoint cannot be resumed by this run: each differing option, both values."""
    diff = [f"{k}={saved.get(k)!r} (this run: {config.get(k)!r})"
            for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    hint = ("; DeepSpeed partitions are per rank and per ZeRO stage: resume with the same "
            "number of ranks and --zero-stage, or start a new run folder"
            if any(d.startswith(("world=", "zero=")) for d in diff)
            else "; resume with the same options or start a new run folder")
    return f"{folder}: the checkpoint was made with " + ", ".join(diff) + hint


def _resume_point(ckpt_root: Path, config: dict, rank: int) -> tuple[int, Path]:
    """(step, folder) of the newest complete checkpoint made by the same run configuration.
    Rank 0 finds and verifies it (every file hashed once) and tells the other ranks."""

    answer: tuple[int, str | None, str | None] = (0, None, None)  # step, folder, error
    if rank == 0:
        skipped: list[str] = []
        found = ckpt.latest_verified(ckpt_root, skipped)
        for why in skipped:  # a damaged newer checkpoint is passed over, never silently
            warnings.warn(f"resume passes over a damaged checkpoint: {why}", stacklevel=3)
        if found is None:
            answer = (0, None, f"{ckpt_root}: no complete checkpoint to resume from")
        elif found[1].get("run") != config:
            answer = (0, None, _config_mismatch(found[0], found[1].get("run") or {}, config))
        else:
            answer = (int(found[1]["step"]), str(found[0]), None)
    step, folder, error = dist.broadcast_object(answer)
    if error is not None:
        raise UsageError(error)
    return step, Path(folder)


def _load_resume_state(run: Trainer, folder: Path) -> Any:
    """Weights, optimizer state, reference tables and fitted targets of a checkpoint,
    onto this rank; returns the stop rule's non-member NLLs under the starting weights
    (float64 [n] or None). Tensors are read onto the CPU and moved: the checkpoint says
    nothing about devices."""
    distributed = run.engine is not None
    state = torch.load(folder / ("extra.pt" if distributed else "state.pt"),
                       map_location="cpu", weights_only=True)
    if distributed:
        run.engine.load_checkpoint(str(folder), tag="ds")
    else:
        run.model.lm.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])  # moves the state to the params
    ref_f, ref_r = state["ref_nll"], state.get("ref_nll_remain")
    run.ref_forget = ref_f.to(run.dev) if ref_f is not None else None
    run.ref_remain = ref_r.to(run.dev) if ref_r is not None else None
    run.method.resume(state.get("target_map"), run.start_step, run.dev)
    if run.stopper is not None:
        run.stopper.hits = int(state.get("stop_hits", torch.tensor(0)))
    return state.get("nonmember_nll")


def _save_checkpoint(run: Trainer, step: int, original: Any = None) -> None:
    """Checkpoint ``step`` atomically: every rank writes its part into one temporary
    folder, rank 0 seals it (checksums, manifest) and renames it into place.
    ``original``: the stop rule's non-member NLLs under the starting weights (kept, as
    the reference tables are, because a resumed run no longer has those weights)."""

    tmp = ckpt.begin(run.ckpt_root, step) if run.rank == 0 else None
    fitted = run.method.saved_targets()
    refs = {"ref_nll": None if run.ref_forget is None else run.ref_forget.cpu(),
            "ref_nll_remain": None if run.ref_remain is None else run.ref_remain.cpu(),
            "target_map": None if fitted is None else tuple(t.cpu() for t in fitted),
            "nonmember_nll": None if original is None else torch.as_tensor(original),
            # checks in a row at which the stop rule held (its patience counts on)
            "stop_hits": torch.tensor(run.stopper.hits if run.stopper is not None else 0)}
    if run.engine is not None:
        tmp = Path(dist.broadcast_object(str(tmp) if tmp else None))
        run.engine.save_checkpoint(str(tmp), tag="ds")
        dist.barrier()
        if run.rank == 0:
            torch.save(refs, tmp / "extra.pt")
    else:
        torch.save({"model": run.model.lm.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "step": step, **refs}, tmp / "state.pt")
    if run.rank == 0:
        ckpt.commit(tmp, step, extra={"run": run.run_config})
    if run.engine is not None:
        dist.barrier()


def _step_rows(run: Trainer, step: int) -> Any:
    """This rank's rows of step ``step`` (a ``StepBatch`` whose mask marks the tokens that
    count, computed on the host) and the token counts of the whole optimizer step
    (float64 [3] on the device: forget tokens, remain tokens, forget rows, summed over
    ranks), the denominators of every micro-batch's means."""
    b = run.sets.step_batch(step, run.seed, run.n_f, run.n_r, rank=run.rank,
                            world_size=run.world, swap_codes=run.method.swaps_codes)
    b = dataclasses.replace(b, mask=token_mask(run.model.lm, b.mask))
    counts = token_counts(run.model.lm, b.mask, b.forget).to(run.dev)
    return b, dist.all_reduce_sum(counts)


def _micro_inputs(run: Trainer, b: Any, counts: torch.Tensor, step: int) -> tuple:
    """A micro-batch's rows on this rank's device, as the objective takes them: cut after
    the last frame a loss reads, with the positions the heads compute (found here, on the
    host: the device is never asked how many there are)."""
    emb, emask = run.cache.batch(b.captions, present=(b.unit >= 0).tolist())
    ref = _row_reference(run.ref_forget, run.ref_remain, b.forget, b.unit)
    codes, mask, (index, sizes), window = counted_layout(run.model.lm, b.codes, b.mask)
    dev = run.dev
    return (codes.to(dev, non_blocking=True), mask.to(dev, non_blocking=True),
            b.forget.to(dev, non_blocking=True), emb.to(dev, non_blocking=True),
            emask.to(dev, non_blocking=True), ref, counts, run.seed * 1_000_003 + step,
            b.row.to(dev, non_blocking=True), b.held.to(dev, non_blocking=True),
            (index.to(dev, non_blocking=True), sizes), window)


def _micro_batches(run: Trainer, b: Any) -> list:
    """This rank's rows of a step in ``accumulation`` micro-batches, the longest windows
    first: short windows share micro-batches, which ``counted_layout`` then cuts short (the
    step's gradient is the sum over its micro-batches, whichever rows each holds)."""
    size = run.shape.micro_batch
    if run.accumulation > 1:
        frame = torch.arange(1, b.mask.shape[-1] + 1)
        length = (b.mask.any(dim=1) * frame).amax(dim=1)  # one past the last counted frame
        b = b.take(torch.argsort(length, descending=True, stable=True))
    return [b.select(slice(m * size, (m + 1) * size)) for m in range(run.accumulation)]


@dataclass
class _StepNumbers:
    """A step's numbers, still on the device (read in batches: ``_read``)."""

    step: int
    values: torch.Tensor  # float64 [9]: stats [6], objective, grad norm, all finite (0/1)
    backend: str | None
    optimizer: str  # the AdamW that ran (``noencore.engine.optim``), or "deepspeed"


def _train_step(run: Trainer, step: int) -> _StepNumbers:
    """One optimizer step over ``accumulation`` micro-batches: the host reads and lays out
    the rows, the device does the rest (``_device_step``) without the host waiting."""
    b, counts = _step_rows(run, step)
    micro = [_micro_inputs(run, m, counts, step) for m in _micro_batches(run, b)]
    return _StepNumbers(step + 1, _device_step(run, micro), run.objective.backend_used,
                        run.optimizer_impl)


def _device_step(run: Trainer, micro: list[tuple]) -> torch.Tensor:
    """Forward, backward and update over the micro-batches' inputs. Returns float64 [9]
    on the device: stats [6] (summed over micro-batches and ranks), objective, gradient
    norm, and 1 if both were finite. Nothing is read back to the host here."""
    stats = torch.zeros(6, dtype=torch.float64, device=run.dev)
    total = torch.zeros((), dtype=torch.float64, device=run.dev)
    if run.engine is not None:
        for inputs in micro:
            loss, part = run.engine(*inputs)
            stats, total = stats + part, total + loss.detach().double()
            # DeepSpeed averages gradients over ranks and micro-batches; the objective is
            # already a sum normalised by the whole step's token counts
            run.engine.backward(loss * (run.world * run.accumulation))
            run.engine.step()  # updates the weights after the last micro-batch only
        stats, total = dist.all_reduce_sum(stats), dist.all_reduce_sum(total)
        gn = run.engine.get_global_grad_norm()  # None where DeepSpeed did not report it
        gnorm = torch.as_tensor(float("nan") if gn is None else gn, dtype=torch.float64,
                                device=run.dev)
        finite = torch.isfinite(total) & (torch.isfinite(gnorm) | (gn is None))
    else:
        run.optimizer.zero_grad(set_to_none=True)
        for inputs in micro:
            with torch.autocast(run.dev.type, dtype=torch.bfloat16,
                                enabled=run.precision == "bf16"):
                loss, part = run.objective(*inputs)
            loss.backward()
            stats, total = stats + part, total + loss.detach().double()
        clip = run.grad_clip if run.grad_clip is not None else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, clip).double()
        run.optimizer.step()
        finite = torch.isfinite(total) & torch.isfinite(gnorm)
    return torch.cat([stats, torch.stack([total, gnorm, finite.double()])])


def _read(pending: list[_StepNumbers], seconds: float) -> list[dict]:
    """Metrics records of ``pending`` steps: one read from the device for all of them.
    ``seconds``: the wall time they took together (each step is given the average).
    Raises DivergenceError at the first step whose loss or gradient norm was not finite."""
    if not pending:
        return []
    rows = torch.stack([p.values for p in pending]).cpu().tolist()
    out = []
    dt = seconds / len(pending)
    for p, v in zip(pending, rows):
        if not v[8]:
            what = "loss" if not math.isfinite(v[6]) else "gradient norm"
            raise DivergenceError(f"step {p.step}: {what} is {v[6] if what == 'loss' else v[7]}")
        tokens = v[1] + v[3]
        out.append({"step": p.step,
                    "forget_nll": v[0] / v[1] if v[1] > 0 else None,
                    "remain_nll": v[2] / v[3] if v[3] > 0 else None,
                    "objective": v[6],
                    "method_loss": v[4] if math.isfinite(v[4]) else None,
                    "grad_norm": v[7], "tokens": tokens, "tokens_per_s": tokens / dt,
                    "step_s": dt, "backend": p.backend, "optimizer": p.optimizer})
    return out


class _Numbers:
    """Where a run's numbers go: steps wait on the device, are read in batches (``read``)
    and then written to metrics.jsonl and the trackers, shown on the progress bar and
    handed to ``on_step`` (rank 0's); so are the stop rule's checks (``checked``)."""

    def __init__(self, log: MetricsLog | None, bar: Any, on_step: Callable | None,
                 trackers: trackers.Trackers):
        self.log, self.bar, self.on_step, self.trackers = log, bar, on_step, trackers
        self.pending: list[_StepNumbers] = []
        self.records: list[dict] = []
        self.since = time.perf_counter()
        self.shown: dict[str, str] = {}  # the bar's postfix

    def add(self, step: _StepNumbers) -> None:
        self.pending.append(step)
        if self.bar is not None:
            self.bar.update(1)

    def read(self) -> dict:
        """The records of the steps since the last read (the last one returned)."""
        now = time.perf_counter()
        new = _read(self.pending, now - self.since)
        self.pending, self.since = [], now
        for rec in new:
            self.records.append(rec)
            if self.log is not None:
                self.log.write(rec)
            self.trackers.log(rec["step"], {f"train/{k}": v for k, v in rec.items()
                                            if k != "step"})
            if self.on_step is not None:
                self.on_step(rec["step"], rec)
        if new:
            rec = new[-1]
            self.show(forget=f"{rec['forget_nll'] or float('nan'):.3f}",
                      remain=f"{rec['remain_nll'] or float('nan'):.3f}",
                      tok_s=f"{rec['tokens_per_s']:.0f}")
        return new[-1] if new else {}

    def checked(self, last: dict, stop: dict | None) -> None:
        """A stop-rule check: its measurement ``last`` (step, auc, forget_nll,
        nonmember_nll) and, when it stops the run, the stop's (bisected AUC, fraction
        of the last step kept)."""
        values = {f"stop/{k}": v for k, v in last.items() if k != "step"}
        if stop is not None:
            values.update({"stop/stop_auc": stop["auc"], "stop/fraction": stop["fraction"]})
        self.trackers.log(last["step"], values)
        self.show(auc=f"{last['auc']:.3f}")

    def show(self, **postfix: str) -> None:
        self.shown.update(postfix)
        if self.bar is not None:
            self.bar.set_postfix(self.shown)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def unlearn(model: Any, shards: Any, config: UnlearnConfig | None = None, *,
            progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
            **overrides: Any) -> UnlearnResult:
    """Unlearn the ``forget`` set of ``shards`` from ``model`` while keeping ``remain``.

    model: a ``MusicGenModel`` or a spec for ``load_musicgen`` (hub id, folder, "tiny").
    shards: a ``TokenShards`` or its folder. config: an ``UnlearnConfig`` (every option,
    its default and meaning: ``noencore.engine.config``); ``overrides``: options by name,
    over ``config`` (``unlearn(model, shards, forget="forget", steps=50)``). progress:
    show a progress bar (rank 0). on_step(step, record): called for each step's metrics
    when they are read. Runs the phases of ``Trainer``.
    Raises NoencoreError on bad input (before training) and DivergenceError on NaN/inf.
    """
    cfg = (config or UnlearnConfig()).replace(**overrides)
    trainer = Trainer(model, shards, cfg, progress=progress, on_step=on_step)
    result = trainer.run()
    result.audit_sets = trainer.audit_sets  # ``audit``: what noencore.unlearn evaluates
    return result


# what a run writes into its folder (rank 0 and, for DeepSpeed's partitions, every rank)
RUN_FILES = ["config.json", "metrics.jsonl", "losses.png", "checkpoints", "model", "adapter",
             ".ranks-share-this-folder", trackers.FOLDER]


class Trainer:
    """One unlearning run (one process, or one rank of a launcher), phase by phase.

    ``run`` calls the phases in order: ``check_options``, ``resolve_devices`` (the rank's
    device, the model and the shards), ``build_sets`` (the method, the forget and remain
    windows, the request check, the condition cache, the stop rule), ``setup_optimizer``
    (AdamW, or DeepSpeed ZeRO; LoRA; the run folder and the resume point),
    ``compute_references`` (the starting model's NLLs, or a checkpoint's state), ``train``
    (each step, then ``check``: the numbers, the stop rule and the checkpoint) and
    ``save``. The step helpers of this module take the trainer as their ``run``.
    """

    def __init__(self, model: Any, shards: Any, cfg: UnlearnConfig, *, progress: bool = True,
                 on_step: Callable[[int, dict], None] | None = None):
        from noencore.data.shards import set_ids as named

        cfg.check()  # every option's type and range before any is read
        self.report_to = trackers.parse(cfg.report_to)
        if cfg.report_to is not None:  # config.json and the trackers' config: the names
            cfg = cfg.replace(report_to=list(self.report_to))
        self.cfg, self.progress, self.on_step = cfg, progress, on_step
        self.model, self.shards = model, shards
        self.forget = named(cfg.forget) if cfg.forget is not None else None
        self.remain = None if cfg.remain is None else named(cfg.remain)
        self.nonmembers = None if cfg.stop_nonmembers is None else named(cfg.stop_nonmembers)
        self.seed, self.precision, self.grad_clip = cfg.seed, cfg.precision, cfg.grad_clip
        self.accumulation = cfg.accumulation
        self.distributed = cfg.zero_stage is not None or cfg.deepspeed is not None
        self.rank, self.world = 0, 1
        self.engine = self.stopper = self.adapters = self.frozen = self.runner = None
        self.fused: Any = None  # with ``compile``: noencore.models.block.FusedBlocks
        self.blocks: tuple[int, ...] | None = None  # train_layers' blocks (None: everything)
        self.frozen_layers: Any = None  # what train_layers froze (restored at the end)
        self.optimizer_impl = ""  # the AdamW that runs (``noencore.engine.optim``)
        self.trackers = trackers.Trackers([])  # opened once the run folder is claimed (rank 0)
        self.ref_forget: torch.Tensor | None = None
        self.ref_remain: torch.Tensor | None = None
        self.request_ids: tuple[list[str], list[str]] | None = None
        self.folder: Any = None  # the claimed run folder (rank 0)
        self.held: list[str] = []  # earlier forget ids the anchored remain set holds
        self.codec_note: str | None = None  # why the shards' codec was not matched, if so
        self.unseen_ids: list[str] = []  # anchor_unseen's tracks
        self.audit_sets: tuple[list[str], list[str]] | None = None  # (forget, remain) ids
        self.unseen_mask: Any = None  # bool [n_remain]: their remain windows
        self.out_dir = Path(cfg.out) if cfg.out is not None else None
        self.ckpt_root = self.out_dir / "checkpoints" if self.out_dir is not None else None

    def run(self) -> UnlearnResult:
        self.check_options()
        self.resolve_devices()
        self.build_sets()
        try:
            self.setup_optimizer()
            self.compute_references()
            stopped, step, stop_info = self.train()
            return self.save(stopped, step, stop_info)
        finally:
            if self.fused is not None:  # audiocraft's forward back, whatever happened
                self.fused.restore()
            self.trackers.close()
            if self.folder is not None:  # rank 0: what the run wrote, and the lock released
                self.folder.wrote(self.out_dir)
                self.folder.release()

    def claim_folder(self) -> None:
        """Rank 0 claims the run folder (``noencore.outputs``: one run at a time; an earlier
        run only with ``resume`` or ``overwrite``; nobody else's files) before anything is
        written into it; every rank gets rank 0's answer."""
        from noencore.outputs import check_apart, claim

        error = None
        if self.rank == 0:
            try:
                check_apart(self.out_dir, {"model": self.model, "token shards": self.shards,
                                           "condition cache": self.cache})
                self.folder = claim(self.out_dir, "unlearn", resume=self.cfg.resume,
                                    overwrite=self.cfg.overwrite).__enter__()
                self.folder.own(RUN_FILES)
            except NoencoreError as exc:
                error = str(exc)
        if self.distributed:
            error = dist.broadcast_object(error)
        if error is not None:
            raise UsageError(error)

    def check_options(self) -> None:
        """Refuse contradictory options before any work."""
        c = self.cfg  # its types and ranges were checked when the trainer was made
        if self.forget is None:
            raise UsageError("the forget set is required (forget=SPLIT|IDS, --forget)")
        if c.steps < 0 or c.batch_size <= 0 or c.frames <= 0:
            raise UsageError(f"steps ({c.steps}) must be >= 0, batch_size ({c.batch_size}) "
                             f"and frames ({c.frames}) > 0")
        if c.resume and c.overwrite:
            raise UsageError("resume continues the run in --out and overwrite replaces it: "
                             "give one of them")
        if c.overwrite and c.out is None:
            raise UsageError("overwrite needs the run folder (out=...)")
        if c.resume and c.out is None:
            raise UsageError("resume needs the run folder (out=...)")
        if c.checkpoint_every and c.out is None:
            raise UsageError("checkpoint_every needs a run folder (out=...)")
        if c.lora is not None and c.compile:
            raise UsageError("compile (--compile) runs each transformer block as one function "
                             "of its weights, and LoRA (--lora-rank) parametrizes them: give "
                             "one of them")
        if c.lora is not None and str(c.train_layers).replace(" ", "") not in ("None", "all"):
            raise UsageError("train_layers (--train-layers) and lora (--lora-rank) both choose "
                             "what trains: give one (LoRA targets can name blocks, e.g. "
                             "--lora-targets layers.22,layers.23,heads)")
        trackers.check(self.report_to, c.out)
        if c.precision not in ("fp32", "bf16"):
            raise UsageError(f"precision must be 'fp32' or 'bf16', got {c.precision!r}")
        world = int(os.environ.get("WORLD_SIZE", "1")) if self.distributed else 1
        if c.batch_size < world:
            raise UsageError(f"batch_size ({c.batch_size}) is smaller than the number of ranks "
                             f"({world}): every rank needs at least one row per step; use "
                             f"--batch-size {world} or more")
        if c.log_every < 1:
            raise UsageError(f"log_every must be >= 1 step, got {c.log_every}")
        spec = isinstance(self.model, str | os.PathLike)
        if c.audit is not None and (c.out is None or not spec):
            raise UsageError("audit writes its report into the run folder and reloads the "
                             "starting model to compare with: give out=... and the model as a "
                             "spec (hub id, folder or 'tiny'), or run noencore.evaluate "
                             "yourself")
        if c.accumulation < 1:
            raise UsageError(f"accumulation must be >= 1 micro-batch per step, got "
                             f"{c.accumulation}")
        if c.accumulation > 1 and c.batch_size % (world * c.accumulation):
            unit = world * c.accumulation
            raise UsageError(f"batch_size {c.batch_size} does not split into {c.accumulation} "
                             f"micro-batches on {world} rank(s): it must be a multiple of "
                             f"{unit}; use --batch-size {unit * max(1, c.batch_size // unit)} "
                             f"or {unit * (c.batch_size // unit + 1)}")
        self.world = world
        self.shape = StepShape(c.batch_size, world, c.accumulation)

    def resolve_devices(self) -> None:
        """This rank's device; the model and the shards opened and checked against each
        other."""
        from noencore.models import load_musicgen

        self.dev = rank_device(self.cfg.device)
        slow = _slow_bf16(self.dev, self.cfg.precision, self.distributed)
        if slow and int(os.environ.get("RANK", "0")) == 0:
            warnings.warn(slow, stacklevel=3)
        if isinstance(self.model, (str, os.PathLike)):
            self.model = load_musicgen(str(self.model), device=self.dev)
        if isinstance(self.shards, (str, os.PathLike)):
            from noencore.data.shards import TokenShards

            self.shards = TokenShards(self.shards)
        self.codec_note = _check_codec(self.model, self.shards, self.cfg.allow_codec_mismatch)
        if self.codec_note and int(os.environ.get("RANK", "0")) == 0:
            warnings.warn(self.codec_note, stacklevel=3)
        if self.cfg.save_adapter and self.cfg.lora is None:
            raise UsageError("save_adapter needs LoRA (lora=... / --lora-rank)")
        self.blocks = select_blocks(self.cfg.train_layers, len(self.model.lm.transformer.layers))

    def build_sets(self) -> None:
        """The method, the forget and remain windows (refused when they contradict an
        earlier request), the rows per step, the condition cache and the stop rule."""
        from noencore.models import ConditionCache

        c, model = self.cfg, self.model
        self.method = method = get_method(c.method, **(c.method_options or {}))
        # a method that fits its targets to the non-members under the starting weights
        # holds the forget rows on them: its stop rule is a guard against running past
        # every one of them (original, AUC 0); the others stop where they cross them
        fits = method.needs_nonmember_targets
        self.stop_rule = c.stop_rule or ("original" if fits else "auc")
        self.stop_auc = c.stop_auc if c.stop_auc is not None else 0.0 if fits else 0.5
        guard = fits and self.stop_rule == "original" and self.stop_auc == 0.0
        self.stop_patience = c.stop_patience or (3 if guard else 1)
        self.sets = UnlearningSets(self.shards, self.forget, self._remain_spec(), c.frames)
        if is_opt_out(method):  # refused before any work when it contradicts an earlier one
            if c.steps < 1:
                raise UsageError(f"steps {c.steps} trains nothing, and an opt-out request is "
                                 "recorded only once training changed the model: give "
                                 "--steps 1 or more")
            self.request_ids = set_ids(self.sets)
            history = getattr(model, "requests", [])
            check_request(history, *self.request_ids, model=str(model.spec),
                          anchored=method.remain_anchor)
            loose = unheld_warning(history, self.request_ids[1])
            if loose and int(os.environ.get("RANK", "0")) == 0:
                warnings.warn(f"{model.spec}: {loose}", stacklevel=4)
            if method.remain_anchor:  # earlier forget items in the remain set: held both ways
                self.held = held(history, self.request_ids[1])
                self.sets.hold(self.held)
        self.n_f, self.n_r = self.sets.split_counts(c.batch_size, c.forget_ratio)
        if method.swaps_codes and self.n_r == 0:
            raise UsageError("RL with labels='remain_clip' needs remain rows: forget_ratio < 1")
        self.cache = ConditionCache(c.conditions or Path(self.shards.path) / "conditions")
        _check_conditions(self.cache, model, self.sets)
        if self.nonmembers is not None:
            from noencore.engine.stopping import NonmemberStop

            self.stopper = NonmemberStop(model, self.sets, self.forget, self.nonmembers,
                                         self.cache, rule=self.stop_rule,
                                         target_auc=self.stop_auc,
                                         every=c.stop_every, patience=self.stop_patience,
                                         held=(self.unseen_ids if method.needs_held_codebooks
                                               else None),
                                         batch_size=self.shape.scoring_batch, frames=c.frames)
        if method.needs_nonmember_targets and self.stopper is None:
            raise UsageError(f"method {method.name!r} (the default) sends the forget set "
                             "to where the model puts music it never trained on: name such "
                             "tracks with --stop-nonmembers SPLIT|IDS (stop_nonmembers=...): "
                             "tracks by artists absent from training, in the opt-out artist's "
                             "style, or the artist's unreleased tracks; never the tracks you "
                             "evaluate on. Or give a fixed target (--method-option "
                             "target=NATS), or another --method")
        if method.needs_held_codebooks and not self.unseen_ids:
            raise UsageError(f"method {method.name!r} with codebook_profile follows the "
                             "codebooks of the tracks it holds: name them with "
                             "--anchor-unseen SPLIT|IDS (anchor_unseen=...)")
        self._mark_unseen()
        self._check_audit()

    def _check_audit(self) -> None:
        """The audit's tracks are none the run reads (``audit.check_disjoint``); keeps the
        forget and remain ids the audit evaluates (the remain set without the anchored
        unseen tracks: those are the artist's)."""
        if self.cfg.audit is None:
            return
        from noencore.data.shards import select_set
        from noencore.engine.sets import check_disjoint

        forget, remain = set_ids(self.sets)
        unseen = set(self.unseen_ids)
        remain = [i for i in remain if i not in unseen]
        read = {"forget set": forget, "anchored unseen tracks": unseen, "remain set": remain}
        if self.nonmembers is not None:
            read["stop rule's non-members"] = select_set(self.shards, self.nonmembers).ids
        check_disjoint(select_set(self.shards, self.cfg.audit).ids, read)
        self.audit_sets = (forget, remain)

    def _remain_spec(self) -> Any:
        """The remain set, with the ``anchor_unseen`` tracks added to it."""
        if self.cfg.anchor_unseen is None:
            return self.remain
        from noencore.data.shards import select_set

        self.unseen_ids = list(dict.fromkeys(select_set(self.shards, self.cfg.anchor_unseen).ids))
        if self.nonmembers is not None:
            theirs = set(select_set(self.shards, self.nonmembers).ids)
            both = sorted(theirs & set(self.unseen_ids))
            if both:
                raise UsageError(f"{len(both)} track(s) are both anchored unseen tracks and "
                                 f"the stop rule's non-members (e.g. {both[0]!r}): give two "
                                 "disjoint sets")
        if self.remain is None:
            return None  # every other item outside the held-out splits: they are in it
        base = select_set(self.shards, self.remain).ids
        return list(dict.fromkeys([*base, *self.unseen_ids]))

    def _mark_unseen(self) -> None:
        """Hold the ``anchor_unseen`` tracks' remain windows (both ways, at the forget
        target level set in ``compute_references``)."""
        if self.cfg.anchor_unseen is None:
            return
        m = self.method
        if not (m.remain_anchor and m.needs_nonmember_targets and self.stopper is not None):
            raise UsageError("anchor_unseen holds the artist's unseen tracks at the level the "
                             "forget rows are sent to: it needs an anchored method that fits "
                             "its targets to the stop rule's non-members (e.g. --method match "
                             "--method-option remain_anchor=true, with --stop-nonmembers)")
        self.unseen_mask = self.sets.remain_windows_of(self.unseen_ids)
        if not self.unseen_mask.any():
            raise UsageError("none of the anchor_unseen tracks has a window in the remain set")
        self.sets.remain_held = self.sets.remain_held | self.unseen_mask

    def setup_optimizer(self) -> None:
        """AdamW on the trainable weights (LoRA's adapters only, with ``lora``; the
        selected blocks, output norm and heads, with ``train_layers``), or DeepSpeed ZeRO
        around it; the run's identity for checkpoints, the run folder and
        the checkpoint a resumed run starts from."""
        c, model = self.cfg, self.model
        if self.distributed:
            from noencore.engine import zero

            # the config is checked before joining the process group (which may JIT-build)
            ds_config = zero.build_config(c.deepspeed, zero_stage=c.zero_stage,
                                          micro_batch=self.shape.micro_batch,
                                          world_size=self.world, grad_clip=c.grad_clip,
                                          offload_optimizer=c.offload_optimizer,
                                          accumulation=c.accumulation)
            self.rank, self.world = zero.init_distributed(self.dev)
        model.lm.to(self.dev)
        if c.lora is not None:  # before the optimizer: only the adapters train
            from noencore.models.lora import apply_lora

            self.adapters = apply_lora(model, c.lora, seed=c.seed, save_adapter=c.save_adapter)
        if self.blocks is not None:  # before the optimizer: only the selected blocks train
            from noencore.models.train_layers import freeze_outside

            self.frozen_layers = freeze_outside(model.lm, self.blocks)
        self.run_config = {
            "method": self.method.describe(), **{k: getattr(c, k) for k in fields_for_run()},
            "world": self.world, "precision": c.precision if not self.distributed else "bf16",
            "zero": ds_config["zero_optimization"]["stage"] if self.distributed else None,
            "train_layers": None if self.blocks is None else list(self.blocks),
            **({"lora": self.adapters.describe()} if self.adapters is not None else {})}
        if self.blocks is None:  # as checkpoints made before the option record it
            del self.run_config["train_layers"]
        if self.out_dir is not None:
            self.claim_folder()
        if self.distributed and self.out_dir is not None:
            _check_shared_folder(self.out_dir, self.rank, self.world)
        self.start_step, self.resume_from = (
            _resume_point(self.ckpt_root, self.run_config, self.rank) if c.resume else (0, None))
        self.objective = UnlearnObjective(model, self.method, backend=c.backend)
        self.params = [p for p in model.lm.parameters() if p.requires_grad]
        if self.distributed:  # DeepSpeed runs the update on its own fp32 partitions
            self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
            self.optimizer_impl = "deepspeed"
        else:
            self.optimizer, self.optimizer_impl = adamw(self.params, lr=c.lr,
                                                        weight_decay=c.weight_decay)
        self.objective.train()
        model.activation_checkpointing(c.checkpointing)
        if c.compile:
            from noencore.models.block import install

            self.fused = install(model.lm, compile=True)
        if self.distributed:
            self.frozen = zero.frozen_copies(model.lm)
            self.engine = zero.initialize(self.objective, self.optimizer, ds_config)
            self.runner = self._through_engine
            if self.stopper is not None:
                self.stopper.attach(zero.MasterWeights(self.engine), self.rank, self.world,
                                    runner=self.runner)
        if self.fused is not None:
            self._compile_blocks()
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / "config.json",
                         json.dumps(self.cfg.to_dict(), indent=1, default=str).encode())
        self.trackers = trackers.open_trackers(
            self.report_to, self.out_dir, self.cfg.to_dict(), self.rank, kind="unlearn",
            resume_step=self.start_step if c.resume else None)

    def _compile_blocks(self) -> None:
        """Compile the transformer block before the first step, on stand-ins of a
        micro-batch (in the weights' dtype, under the run's autocast), so that the steps'
        times hold no compile; the seconds go to the result and the progress bar."""
        from noencore.models.block import warm_up_inputs

        lm = self.model.lm
        dtype = next(lm.parameters()).dtype
        x, cross = warm_up_inputs(lm, self.shape.micro_batch, self.cfg.frames, self.dev, dtype)
        autocast = self.precision == "bf16" and not self.distributed
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=autocast):
            self.fused.warm_up(x, cross, single_row=self.shape.micro_batch == 1)
        if self.rank == 0 and self.fused.compile_s is not None and self.progress:
            print(f"compiled the transformer block ({self.fused.backend}) in "
                  f"{self.fused.compile_s:.1f} s", file=sys.stderr)

    def _through_engine(self, fn: Callable[[], Any]) -> Any:
        """Every forward pass under DeepSpeed enters through its module."""
        return self.engine.module(measure=fn)

    def compute_references(self) -> None:
        """The starting model's reference NLLs (with training's numerics) and the stop
        rule's non-members under the starting weights, or a checkpoint's copies of them."""
        method, stopper = self.method, self.stopper
        if self.resume_from is not None:
            original = _load_resume_state(self, self.resume_from)
            if stopper is not None and original is not None:
                stopper.original = original.numpy()
            return
        ref_kw = dict(progress=self.progress and self.rank == 0, rank=self.rank,
                      world=self.world, runner=self.runner,
                      autocast=self.precision == "bf16" and not self.distributed)
        micro = self.shape.scoring_batch
        if method.needs_reference:
            self.ref_forget = _reference_nll(self.model, self.sets, self.cache, micro, self.dev,
                                             **ref_kw)
        if method.needs_remain_reference:
            self.ref_remain = _reference_nll(self.model, self.sets, self.cache, micro, self.dev,
                                             forget=False, **ref_kw)
        if stopper is not None:  # the non-members under the starting weights, once
            stopper.start(original=method.needs_nonmember_targets)
            if method.needs_nonmember_targets:
                _fit_targets(self, stopper)
            if self.unseen_mask is not None:
                _anchor_unseen(self, stopper)
            if method.needs_held_codebooks:  # their codebooks under the starting weights
                method.set_held_codebooks(stopper.held_codebooks().to(self.dev))

    def train(self) -> tuple[str, int, dict | None]:
        """Steps until ``steps`` or the stop rule; returns (why it stopped, steps done, the
        stop rule's last measurement)."""
        c = self.cfg
        log = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=self.start_step) \
            if self.out_dir is not None and self.rank == 0 else None
        bar = None
        if self.progress and self.rank == 0:
            bar = progress_bar(total=c.steps, initial=self.start_step,
                               desc=f"unlearn ({self.method.name})", unit="step")
        self.numbers = _Numbers(log, bar, self.on_step if self.rank == 0 else None,
                                self.trackers)
        stopped, step, stop_info = "max_steps", self.start_step, None
        try:
            while step < c.steps:
                self.numbers.add(_train_step(self, step))
                step += 1
                why, info = self.check(step)
                stopped, stop_info = why or stopped, info or stop_info
                if why is not None or step >= c.steps:
                    break
        except DivergenceError as exc:
            last = ckpt.latest_checkpoint(self.ckpt_root) if self.ckpt_root is not None else None
            raise DivergenceError(f"{exc}; training stopped, nothing saved after it; last good "
                                  f"checkpoint: {last if last else 'none'} (lower --lr, set "
                                  "--grad-clip, or use a bounded method)") from None
        finally:
            self.numbers.close()
            if log is not None and log.path.exists() and log.path.stat().st_size:
                self.trackers.figure("train/losses", plot_losses(
                    log.path, self.out_dir / "losses.png"), step)
        last = self.numbers.records[-1] if self.numbers.records else {}
        self.trackers.table("unlearn/summary", [{
            "method": self.method.name, "steps": step, "stopped": stopped,
            "forget_nll": last.get("forget_nll"), "remain_nll": last.get("remain_nll"),
            **({"stop_auc": stop_info["auc"]} if stop_info else {})}], step)
        return stopped, step, stop_info

    def check(self, step: int) -> tuple[str | None, dict | None]:
        """After step ``step``: read the numbers where something depends on them (NaN/inf
        raises there), apply ``target_forget_nll`` and the stop rule, checkpoint. Returns
        (why the run stops or None, the stop rule's measurement or None)."""
        c, stopper = self.cfg, self.stopper
        done = step >= c.steps
        checkpoint = self.ckpt_root is not None and (
            done or bool(c.checkpoint_every and step % c.checkpoint_every == 0))
        stop_check = stopper is not None and step % stopper.every == 0
        why, info = None, None
        # the numbers are read (and checked for NaN/inf) before anything depends on them
        if (done or checkpoint or stop_check or c.target_forget_nll is not None
                or step % c.log_every == 0):
            rec = self.numbers.read()
            if c.target_forget_nll is not None and \
                    (rec["forget_nll"] or 0) >= c.target_forget_nll:
                why, done, checkpoint = "target_forget_nll", True, self.ckpt_root is not None
        if stop_check and not done:
            info = stopper.check(step, self.method)
            if stopper.last is not None and stopper.last["step"] == step:
                self.numbers.checked(stopper.last, info)
            if info is not None:
                why, checkpoint = f"nonmember_{self.stop_rule}", self.ckpt_root is not None
                self.numbers.note(
                    f"step {step}: forget vs non-members: AUC {info['auc']:.3f}, NLL "
                    f"{info['forget_nll']:.3f} vs {info['nonmember_nll']:.3f} "
                    f"({self.stop_rule} rule; {info['fraction']:.2f} of the last step kept): stop")
        if checkpoint:
            _save_checkpoint(self, step, stopper.original if stopper is not None else None)
        return why, info

    def save(self, stopped: str, step: int, stop_info: dict | None) -> UnlearnResult:
        """The whole fp32 model back on every rank, LoRA merged, the request recorded,
        the model saved to ``out/model``; the result."""
        from noencore.models import save_musicgen

        model, c = self.model, self.cfg
        if self.engine is not None:
            from noencore.engine import zero

            zero.release_fp32_model(self.engine, model.lm, self.dev, self.frozen)
        if self.adapters is not None:
            if c.save_adapter and self.out_dir is not None and self.rank == 0:
                self.adapters.save_adapter(self.out_dir / "adapter")
            self.adapters.merge()
        if self.frozen_layers is not None:
            self.frozen_layers.restore()
        model.activation_checkpointing(False)
        model.lm.eval()
        if self.request_ids is not None:  # the model has served this request: saved with it
            model.requests = [*getattr(model, "requests", []), make_request(
                forget=self.forget, forget_ids=self.request_ids[0], remain=self.remain,
                method=self.method.describe(), shards=str(self.shards.path), steps=step,
                stopped=stopped, held=self.held,
                codec=_codec_record(self.shards.header, self.codec_note))]
        model_dir = None
        if c.save and self.out_dir is not None:
            model_dir = self.out_dir / "model"
            if self.rank == 0:
                save_musicgen(model, model_dir)
            if self.distributed:
                dist.barrier()
        records = self.numbers.records
        if self.out_dir is not None and self.rank == 0:
            records = read_metrics(self.out_dir / "metrics.jsonl")
        return UnlearnResult(model=model, steps=step, stopped=stopped, metrics=records,
                             out=self.out_dir, model_dir=model_dir, stop_info=stop_info,
                             compile=None if self.fused is None else self.fused.describe())
