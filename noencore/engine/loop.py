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
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noencore import distributed as dist
from noencore.distributed import rank_device
from noencore.engine import checkpoint as ckpt
from noencore.engine.metrics import MetricsLog, plot_losses, read_metrics
from noencore.engine.objective import UnlearnObjective, sequence_nll, token_counts
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
from noencore.methods import Method, get_method
from noencore.models.adapter import token_mask


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


def _check_codec(model, shards) -> None:
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
    chunks = range(0, n, world * batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"reference NLL ({'forget' if forget else 'remain'})",
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


def _window_tokens(lm: torch.nn.Module, sets: UnlearningSets, chunk: int = 64) -> torch.Tensor:
    """float32 [n forget windows]: the tokens of each forget window that count (under the
    delay pattern), computed on the host from the windows' lengths."""
    out = []
    for first in range(0, sets.n_forget, chunk):
        unit = torch.arange(first, min(first + chunk, sets.n_forget))
        b = sets.gather(torch.ones(unit.numel(), dtype=torch.bool), unit)
        out.append(token_mask(lm, b.mask).sum(dim=(1, 2)).float())
    return torch.cat(out) if out else torch.zeros(0)


def _fit_targets(run: _Run, stopper: Any) -> None:
    """A method's targets, measured once under the starting weights: each forget window's
    mean NLL (its cached reference over its tokens) mapped onto the stop rule's
    non-members' per-track mean NLLs (``stopper.original``, the same on every rank)."""
    tokens = _window_tokens(run.model.lm, run.sets).to(run.dev)
    nonmember = torch.as_tensor(stopper.original, dtype=torch.float32, device=run.dev)
    run.method.fit_targets(run.ref_forget / tokens.clamp_min(1.0),
                           nonmember[torch.isfinite(nonmember)])


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


def _run_config(method: Method, **kw) -> dict:
    return {"method": method.describe(), **kw}


@dataclass
class _Run:
    """What the loop holds once set up (one process or one rank of a launcher)."""

    model: Any
    method: Method
    sets: UnlearningSets
    cache: Any
    objective: UnlearnObjective
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    engine: Any  # the DeepSpeed engine, or None in one process
    dev: torch.device
    rank: int
    world: int
    n_f: int
    n_r: int
    accumulation: int
    seed: int
    precision: str
    grad_clip: float | None
    config: dict
    ckpt_root: Path | None
    ref_forget: torch.Tensor | None = None
    ref_remain: torch.Tensor | None = None


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
        found = ckpt.latest_verified(ckpt_root)
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


def _load_resume_state(run: _Run, folder: Path) -> Any:
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
    if state.get("target_map") is not None:
        run.method.target_map = tuple(t.to(run.dev) for t in state["target_map"])
    return state.get("nonmember_nll")


def _save_checkpoint(run: _Run, step: int, original: Any = None) -> None:
    """Checkpoint ``step`` atomically: every rank writes its part into one temporary
    folder, rank 0 seals it (checksums, manifest) and renames it into place.
    ``original``: the stop rule's non-member NLLs under the starting weights (kept, as
    the reference tables are, because a resumed run no longer has those weights)."""

    tmp = ckpt.begin(run.ckpt_root, step) if run.rank == 0 else None
    fitted = getattr(run.method, "target_map", None)
    refs = {"ref_nll": None if run.ref_forget is None else run.ref_forget.cpu(),
            "ref_nll_remain": None if run.ref_remain is None else run.ref_remain.cpu(),
            "target_map": None if fitted is None else tuple(t.cpu() for t in fitted),
            "nonmember_nll": None if original is None else torch.as_tensor(original)}
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
        ckpt.commit(tmp, step, extra={"run": run.config})
    if run.engine is not None:
        dist.barrier()


def _step_rows(run: _Run, step: int) -> Any:
    """This rank's rows of step ``step`` (a ``StepBatch`` whose mask marks the tokens that
    count, computed on the host) and the token counts of the whole optimizer step
    (float64 [3] on the device: forget tokens, remain tokens, forget rows, summed over
    ranks), the denominators of every micro-batch's means."""
    b = run.sets.step_batch(step, run.seed, run.n_f, run.n_r, rank=run.rank,
                            world_size=run.world, swap_codes=run.method.swaps_codes)
    b = dataclasses.replace(b, mask=token_mask(run.model.lm, b.mask))
    counts = token_counts(run.model.lm, b.mask, b.forget).to(run.dev)
    return b, dist.all_reduce_sum(counts)


def _micro_inputs(run: _Run, b: Any, counts: torch.Tensor, step: int) -> tuple:
    """A micro-batch's rows on this rank's device, as the objective takes them."""
    emb, emask = run.cache.batch(b.captions, present=(b.unit >= 0).tolist())
    ref = _row_reference(run.ref_forget, run.ref_remain, b.forget, b.unit)
    dev = run.dev
    return (b.codes.to(dev, non_blocking=True), b.mask.to(dev, non_blocking=True),
            b.forget.to(dev, non_blocking=True), emb.to(dev, non_blocking=True),
            emask.to(dev, non_blocking=True), ref, counts, run.seed * 1_000_003 + step,
            b.row.to(dev, non_blocking=True), b.held.to(dev, non_blocking=True))


def _micro_batches(run: _Run, b: Any) -> list:
    size = b.codes.shape[0] // run.accumulation
    return [b.select(slice(m * size, (m + 1) * size)) for m in range(run.accumulation)]


@dataclass
class _StepNumbers:
    """A step's numbers, still on the device (read in batches: ``_read``)."""

    step: int
    values: torch.Tensor  # float64 [9]: stats [6], objective, grad norm, all finite (0/1)
    backend: str | None


def _train_step(run: _Run, step: int) -> _StepNumbers:
    """One optimizer step over ``accumulation`` micro-batches: the host reads and lays out
    the rows, the device does the rest (``_device_step``) without the host waiting."""
    b, counts = _step_rows(run, step)
    micro = [_micro_inputs(run, m, counts, step) for m in _micro_batches(run, b)]
    return _StepNumbers(step + 1, _device_step(run, micro), run.objective.backend_used)


def _device_step(run: _Run, micro: list[tuple]) -> torch.Tensor:
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
                    "step_s": dt, "backend": p.backend})
    return out


class _Numbers:
    """Where a run's numbers go: steps wait on the device, are read in batches (``read``)
    and then written to metrics.jsonl, shown on the progress bar and handed to
    ``on_step`` (rank 0's)."""

    def __init__(self, log: MetricsLog | None, bar: Any, on_step: Callable | None):
        self.log, self.bar, self.on_step = log, bar, on_step
        self.pending: list[_StepNumbers] = []
        self.records: list[dict] = []
        self.since = time.perf_counter()

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
            if self.on_step is not None:
                self.on_step(rec["step"], rec)
        if self.bar is not None and new:
            rec = new[-1]
            self.bar.set_postfix(forget=f"{rec['forget_nll'] or float('nan'):.3f}",
                                 remain=f"{rec['remain_nll'] or float('nan'):.3f}",
                                 tok_s=f"{rec['tokens_per_s']:.0f}")
        return new[-1] if new else {}

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def unlearn(model: Any, shards: Any, *, forget: str | Sequence[str],
            remain: str | Sequence[str] | None = None, method: str | Method = "ga",
            method_options: dict | None = None, steps: int = 100, lr: float = 1e-5,
            weight_decay: float = 0.0, batch_size: int = 8, forget_ratio: float = 0.5,
            frames: int = 500, seed: int = 0, out: str | os.PathLike | None = None,
            checkpoint_every: int = 0, resume: bool = False,
            target_forget_nll: float | None = None, grad_clip: float | None = 1.0,
            conditions: str | os.PathLike | None = None, backend: str = "auto",
            zero_stage: int | None = None, deepspeed: dict | str | None = None,
            offload_optimizer: bool = False, device: str | None = None,
            precision: str = "fp32",
            progress: bool = True, save: bool = True,
            on_step: Callable[[int, dict], None] | None = None,
            stop_nonmembers: str | Sequence[str] | None = None, stop_rule: str = "auc",
            stop_auc: float = 0.5, stop_every: int = 1, accumulation: int = 1,
            checkpointing: bool = False, log_every: int = 10, lora: Any = None,
            save_adapter: bool = False) -> UnlearnResult:
    """Unlearn the ``forget`` set of ``shards`` from ``model`` while keeping ``remain``.

    model: a ``MusicGenModel`` or a spec for ``load_musicgen`` (hub id, folder, "tiny").
    shards: a ``TokenShards`` or its folder. forget / remain: a split name or a list of
    source ids (remain=None: every other item outside held-out splits).
    method: ga | bounded_ga | graddiff | rl | npo | simnpo (options in ``method_options``).
    batch_size: global rows per optimizer step, ``forget_ratio`` of them from the forget
    set, split over the ranks and into ``accumulation`` micro-batches per rank (gradients
    add up over them; every mean is over the whole step's tokens, so the result equals
    one big batch); frames: window length (50 frames = 1 s at 32 kHz).
    checkpointing: recompute each transformer layer's activations in backward (less
    memory, about a third more compute; same gradients).
    out: run folder (metrics.jsonl, losses.png, checkpoints/, model/); checkpoints every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from the newest
    valid checkpoint in ``out``. Under a launcher the run folder must be on a filesystem
    every rank shares (checked before training).
    zero_stage / deepspeed (config dict or JSON path): train with DeepSpeed ZeRO in bf16;
    each rank runs on GPU ``LOCAL_RANK`` (or the CPU). The returned model is a plain fp32
    model on every rank (the master weights gathered from the partitions), usable as is.
    precision (one process): "fp32", or "bf16" (fp32 weights and optimizer, forward and
    backward under bf16 autocast, as audiocraft trains; much faster where bf16 matmuls are).
    log_every: the step's numbers stay on the device and are read every ``log_every``
    steps (and before every checkpoint, stop check or ``target_forget_nll`` check), so the
    host never waits for the device in between; metrics.jsonl still gets every step. A
    NaN/inf loss or gradient norm raises DivergenceError at that read, and no checkpoint
    is written after it. on_step(step, record) is called for each step when it is read.
    stop_nonmembers (a split name or source ids of tracks never trained on, like the
    forget set): stop once membership inference cannot tell the forget set from them
    (``stop_rule`` "auc": the LOSS attack's AUC <= ``stop_auc``, the weights between the
    last two checks bisected for the crossing; "nll": the forget mean NLL reaches
    theirs), checked every ``stop_every`` steps; a ``row_target`` method option follows
    their NLL (``noencore.engine.stopping``); under a launcher every rank scores its
    share and the bisection works on each rank's partition of the weights. Keep the
    tracks a later evaluation scores out of this set.
    lora (``noencore.models.lora.LoraSpec`` or a dict of its fields: rank, alpha,
    targets): train only low-rank adapters of the targeted weights, the model frozen;
    the returned and saved model has them merged. save_adapter (transformers-format
    models): also write them as a PEFT adapter to ``out/adapter``.
    A model loaded from a folder remembers the opt-outs it has served
    (``model.requests``, the folder's requests.json): a request whose forget set overlaps
    an earlier one's, or whose remain set holds an earlier one's forget items, is refused
    (``RequestConflict``) before training; a finished run appends its own request, which
    the saved model folder keeps (``noencore.engine.requests``).
    Raises NoencoreError on bad input (before training) and DivergenceError on NaN/inf.
    """
    from noencore.models import ConditionCache, load_musicgen, save_musicgen

    if steps < 0 or batch_size <= 0 or frames <= 0:
        raise UsageError(f"steps ({steps}) must be >= 0, batch_size ({batch_size}) and "
                         f"frames ({frames}) > 0")
    if resume and out is None:
        raise UsageError("resume needs the run folder (out=...)")
    if checkpoint_every and out is None:
        raise UsageError("checkpoint_every needs a run folder (out=...)")
    distributed = zero_stage is not None or deepspeed is not None
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    if batch_size < world:
        raise UsageError(f"batch_size ({batch_size}) is smaller than the number of ranks "
                         f"({world}): every rank needs at least one row per step; use "
                         f"--batch-size {world} or more")
    if log_every < 1:
        raise UsageError(f"log_every must be >= 1 step, got {log_every}")
    if accumulation < 1:
        raise UsageError(f"accumulation must be >= 1 micro-batch per step, got {accumulation}")
    if accumulation > 1 and batch_size % (world * accumulation):
        unit = world * accumulation
        raise UsageError(f"batch_size {batch_size} does not split into {accumulation} "
                         f"micro-batches on {world} rank(s): it must be a multiple of "
                         f"{unit}; use --batch-size {unit * max(1, batch_size // unit)} or "
                         f"{unit * (batch_size // unit + 1)}")
    dev = rank_device(device)
    if isinstance(model, (str, os.PathLike)):
        model = load_musicgen(str(model), device=dev)
    if isinstance(shards, (str, os.PathLike)):
        from noencore.data.shards import TokenShards

        shards = TokenShards(shards)
    _check_codec(model, shards)
    if save_adapter and lora is None:
        raise UsageError("save_adapter needs LoRA (lora=... / --lora-rank)")
    method = get_method(method, **(method_options or {}))
    sets = UnlearningSets(shards, forget, remain, frames)
    request_ids, kept = None, []
    if is_opt_out(method):  # refused before any work when it contradicts an earlier one
        request_ids = set_ids(sets)
        history = getattr(model, "requests", [])
        check_request(history, *request_ids, model=str(model.spec),
                      anchored=bool(getattr(method, "remain_anchor", False)))
        loose = unheld_warning(history, request_ids[1])
        if loose and int(os.environ.get("RANK", "0")) == 0:
            warnings.warn(f"{model.spec}: {loose}", stacklevel=2)
        if method.remain_anchor:  # earlier forget items in the remain set: held both ways
            kept = held(history, request_ids[1])
            sets.hold(kept)
    n_f, n_r = sets.split_counts(batch_size, forget_ratio)
    if method.swaps_codes and n_r == 0:
        raise UsageError("RL with labels='remain_clip' needs remain rows: forget_ratio < 1")
    cache = ConditionCache(conditions or Path(shards.path) / "conditions")
    _check_conditions(cache, model, sets)

    stopper = None
    if stop_nonmembers is not None:
        from noencore.engine.stopping import NonmemberStop

        stopper = NonmemberStop(model, sets, forget, stop_nonmembers, cache, rule=stop_rule,
                                target_auc=stop_auc, every=stop_every,
                                batch_size=max(1, batch_size // (world * accumulation)),
                                frames=frames)
    if getattr(method, "needs_nonmember_targets", False) and stopper is None:
        raise UsageError(f"method {method.name!r} measures its targets on non-member tracks "
                         "under the starting model: give them (--stop-nonmembers SPLIT|IDS, "
                         "stop_nonmembers=...) or a fixed target (--method-option target=NATS)")

    rank = 0
    if distributed:
        from noencore.engine import zero

        # the config is checked before joining the process group (which may JIT-build)
        ds_config = zero.build_config(deepspeed, zero_stage=zero_stage,
                                      micro_batch=-(-batch_size // world) // accumulation,
                                      world_size=world, grad_clip=grad_clip,
                                      offload_optimizer=offload_optimizer,
                                      accumulation=accumulation)
        rank, world = zero.init_distributed(dev)
    model.lm.to(dev)
    adapters = None
    if lora is not None:  # before the optimizer: only the adapters train
        from noencore.models.lora import apply_lora

        adapters = apply_lora(model, lora, seed=seed, save_adapter=save_adapter)
    config = _run_config(method, seed=seed, batch_size=batch_size, forget_ratio=forget_ratio,
                         frames=frames, lr=lr, weight_decay=weight_decay, world=world,
                         precision=precision if not distributed else "bf16",
                         zero=None if not distributed else ds_config["zero_optimization"]["stage"],
                         **({"lora": adapters.describe()} if adapters is not None else {}))
    out_dir = Path(out) if out is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    if distributed and out_dir is not None:
        _check_shared_folder(out_dir, rank, world)
    start_step, resume_from = _resume_point(ckpt_root, config, rank) if resume else (0, None)

    objective = UnlearnObjective(model, method, backend=backend)
    params = [p for p in model.lm.parameters() if p.requires_grad]
    run = _Run(model=model, method=method, sets=sets, cache=cache, objective=objective,
               params=params, optimizer=torch.optim.AdamW(params, lr=lr,
                                                          weight_decay=weight_decay),
               engine=None, dev=dev, rank=rank, world=world, n_f=n_f, n_r=n_r,
               accumulation=accumulation, seed=seed,
               precision=precision, grad_clip=grad_clip, config=config, ckpt_root=ckpt_root)
    objective.train()
    model.activation_checkpointing(checkpointing)
    runner, frozen = None, None
    if distributed:
        frozen = zero.frozen_copies(model.lm)
        run.engine = zero.initialize(objective, run.optimizer, ds_config)

        def runner(fn):  # every forward pass under DeepSpeed enters through its module
            return run.engine.module(measure=fn)

        if stopper is not None:
            stopper.attach(zero.MasterWeights(run.engine), rank, world, runner=runner)
    if resume_from is None:  # the starting model's reference NLLs, with training's numerics
        ref_kw = dict(progress=progress and rank == 0, rank=rank, world=world, runner=runner,
                      autocast=precision == "bf16" and not distributed)
        micro = max(1, batch_size // (world * accumulation))
        if method.needs_reference:
            run.ref_forget = _reference_nll(model, sets, cache, micro, dev, **ref_kw)
        if method.needs_remain_reference:
            run.ref_remain = _reference_nll(model, sets, cache, micro, dev, forget=False,
                                            **ref_kw)
        if stopper is not None:  # the non-members under the starting weights, once
            stopper.start(original=getattr(method, "needs_nonmember_targets", False))
            if getattr(method, "needs_nonmember_targets", False):
                _fit_targets(run, stopper)
    if resume_from is not None:
        original = _load_resume_state(run, resume_from)
        if hasattr(method, "refitted"):  # re-fits before the checkpoint are in its targets
            method.refitted.update(s for s in getattr(method, "refit_at", ()) if s <= start_step)
        if stopper is not None and original is not None:
            stopper.original = original.numpy()

    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start_step) \
        if out_dir is not None and rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=f"unlearn ({method.name})", unit="step")
    numbers = _Numbers(log, bar, on_step if rank == 0 else None)
    stopped, step, stop_info = "max_steps", start_step, None
    try:
        while step < steps:
            numbers.add(_train_step(run, step))
            step += 1
            done = step >= steps
            checkpoint = ckpt_root is not None and (
                done or bool(checkpoint_every and step % checkpoint_every == 0))
            stop_check = stopper is not None and step % stopper.every == 0
            # the numbers are read (and checked for NaN/inf) before anything depends on them
            if (done or checkpoint or stop_check or target_forget_nll is not None
                    or step % log_every == 0):
                rec = numbers.read()
                if target_forget_nll is not None and (rec["forget_nll"] or 0) >= target_forget_nll:
                    stopped, done, checkpoint = "target_forget_nll", True, ckpt_root is not None
            if stop_check and not done:
                stop_info = stopper.check(step, method)
                if stop_info is not None:
                    stopped, done, checkpoint = f"nonmember_{stop_rule}", True, ckpt_root is not None
                    numbers.note(f"step {step}: forget vs non-members: AUC "
                                 f"{stop_info['auc']:.3f}, NLL {stop_info['forget_nll']:.3f} vs "
                                 f"{stop_info['nonmember_nll']:.3f} ({stop_rule} rule; "
                                 f"{stop_info['fraction']:.2f} of the last step kept): stop")
            if checkpoint:
                _save_checkpoint(run, step, stopper.original if stopper is not None else None)
            if done:
                break
    except DivergenceError as exc:
        last = ckpt.latest_checkpoint(ckpt_root) if ckpt_root is not None else None
        raise DivergenceError(f"{exc}; training stopped, nothing saved after it; last good "
                              f"checkpoint: {last if last else 'none'} (lower --lr, set "
                              "--grad-clip, or use a bounded method)") from None
    finally:
        numbers.close()
        if log is not None and log.path.exists() and log.path.stat().st_size:
            plot_losses(log.path, out_dir / "losses.png")

    if run.engine is not None:
        zero.release_fp32_model(run.engine, model.lm, dev, frozen)
    if adapters is not None:
        if save_adapter and out_dir is not None and rank == 0:
            adapters.save_adapter(out_dir / "adapter")
        adapters.merge()
    model.activation_checkpointing(False)
    model.lm.eval()
    if request_ids is not None:  # the model has served this request: saved with it
        model.requests = [*getattr(model, "requests", []), make_request(
            forget=forget, forget_ids=request_ids[0], remain=remain, method=method.describe(),
            shards=str(shards.path), steps=step, stopped=stopped, held=kept)]
    model_dir = None
    if save and out_dir is not None:
        model_dir = out_dir / "model"
        if rank == 0:
            save_musicgen(model, model_dir)
        if distributed:
            dist.barrier()
    records = numbers.records
    if out_dir is not None and rank == 0:
        records = read_metrics(out_dir / "metrics.jsonl")
    return UnlearnResult(model=model, steps=step, stopped=stopped, metrics=records,
                         out=out_dir, model_dir=model_dir, stop_info=stop_info)
