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

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noencore.engine import checkpoint as ckpt
from noencore.engine.metrics import MetricsLog, plot_losses, read_metrics
from noencore.engine.objective import UnlearnObjective, sequence_nll, token_counts
from noencore.engine.sets import UnlearningSets
from noencore.errors import NoencoreError, UsageError
from noencore.methods import Method, get_method, swap_forget_codes


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
    have = {"n_q": model.n_q, "card": model.card, "frame_rate": model.frame_rate}
    got = {"n_q": h.n_q, "card": h.card, "frame_rate": h.frame_rate}
    bad = [f"{k} {got[k]} vs model {have[k]}" for k in have if int(got[k]) != int(have[k])]
    if bad:
        raise NoencoreError(f"{shards.path}: shards do not match the model ({', '.join(bad)}); "
                            "precompute the shards with the model's codec")


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
                   device: torch.device, *, forget: bool = True,
                   progress: bool = False) -> torch.Tensor:
    """float32 [n windows]: the starting model's summed NLL of each forget window (NPO) or
    each remain window (``remain_anchor``), computed once so that no reference model
    stays resident."""
    n = sets.n_forget if forget else sets.n_remain
    out = torch.empty(n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"reference NLL ({'forget' if forget else 'remain'})",
                      unit="batch", leave=False)
    for s in starts:
        unit = torch.arange(s, min(s + batch_size, n))
        b = sets.gather(torch.full((unit.numel(),), forget, dtype=torch.bool), unit)
        emb, emask = cache.batch(b.captions)
        out[unit] = sequence_nll(model, b.codes.to(device), b.mask.to(device),
                                 emb.to(device), emask.to(device)).cpu()
    model.train(was_training)
    return out


def _row_reference(ref_forget: torch.Tensor | None, ref_remain: torch.Tensor | None,
                   forget: torch.Tensor, unit: torch.Tensor) -> torch.Tensor | None:
    """float32 [B]: each row's cached reference NLL (0 for padding rows and for the set
    whose reference is not cached); None when nothing is cached."""
    if ref_forget is None and ref_remain is None:
        return None
    out = torch.zeros(unit.numel(), dtype=torch.float32)
    for table, rows in ((ref_forget, forget & (unit >= 0)), (ref_remain, ~forget & (unit >= 0))):
        if table is not None and bool(rows.any()):
            out[rows] = table[unit[rows]]
    return out


def _conditions(cache, captions: list[str], unit: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached T5 outputs (embeds float32 [B, L, D], mask bool [B, L]); empty rows
    (unit -1, padding of a rank's share) get a zero, fully masked condition."""
    real = [i for i in range(len(captions)) if int(unit[i]) >= 0]
    if not real:
        return torch.zeros(len(captions), 1, cache.dim), torch.zeros(len(captions), 1,
                                                                       dtype=torch.bool)
    emb, mask = cache.batch([captions[i] for i in real])
    out_e = torch.zeros(len(captions), *emb.shape[1:])
    out_m = torch.zeros(len(captions), mask.shape[1], dtype=torch.bool)
    out_e[real], out_m[real] = emb, mask
    return out_e, out_m


def _run_config(method: Method, **kw) -> dict:
    return {"method": method.describe(), **kw}


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
            stop_auc: float = 0.5, stop_every: int = 1) -> UnlearnResult:
    """Unlearn the ``forget`` set of ``shards`` from ``model`` while keeping ``remain``.

    model: a ``MusicGenModel`` or a spec for ``load_musicgen`` (hub id, folder, "tiny").
    shards: a ``TokenShards`` or its folder. forget / remain: a split name or a list of
    source ids (remain=None: every other item outside held-out splits).
    method: ga | bounded_ga | graddiff | rl | npo | simnpo (options in ``method_options``).
    batch_size: global rows per step, ``forget_ratio`` of them from the forget set;
    frames: window length (50 frames = 1 s at 32 kHz).
    out: run folder (metrics.jsonl, losses.png, checkpoints/, model/); checkpoints every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from the newest
    valid checkpoint in ``out``.
    zero_stage / deepspeed (config dict or JSON path): train with DeepSpeed ZeRO in bf16.
    precision (one process): "fp32", or "bf16" (fp32 weights and optimizer, forward and
    backward under bf16 autocast, as audiocraft trains; much faster where bf16 matmuls are).
    on_step(step, record) is called after each step (after its checkpoint).
    stop_nonmembers (a split name or source ids of tracks never trained on, like the
    forget set): stop once membership inference cannot tell the forget set from them
    (``stop_rule`` "auc": the LOSS attack's AUC <= ``stop_auc``, the weights between the
    last two checks bisected for the crossing; "nll": the forget mean NLL reaches
    theirs), checked every ``stop_every`` steps; a ``row_target`` method option follows
    their NLL (``noencore.engine.stopping``). One process only. Keep the tracks a later
    evaluation scores out of this set.
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
    if distributed and stop_nonmembers is not None:
        raise UsageError("the non-member stop rule runs in one process; under DeepSpeed stop "
                         "on --steps or --target-forget-nll and evaluate afterwards")
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model, (str, os.PathLike)):
        model = load_musicgen(str(model), device=dev)
    if isinstance(shards, (str, os.PathLike)):
        from noencore.data.shards import TokenShards

        shards = TokenShards(shards)
    _check_codec(model, shards)
    method = get_method(method, **(method_options or {}))
    sets = UnlearningSets(shards, forget, remain, frames)
    n_f, n_r = sets.split_counts(batch_size, forget_ratio)
    if method.swaps_codes and n_r == 0:
        raise UsageError("RL with labels='remain_clip' needs remain rows: forget_ratio < 1")
    cache = ConditionCache(conditions or Path(shards.path) / "conditions")
    _check_conditions(cache, model, sets)

    rank, world = 0, 1
    if distributed:
        from noencore.engine import zero

        # the config is checked before joining the process group (which may JIT-build)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_rank = -(-batch_size // world)
        ds_config = zero.build_config(deepspeed, zero_stage=zero_stage, micro_batch=per_rank,
                                      world_size=world, grad_clip=grad_clip,
                                      offload_optimizer=offload_optimizer)
        rank, world = zero.init_distributed(dev)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model.lm.to(dev)
    run = _run_config(method, seed=seed, batch_size=batch_size, forget_ratio=forget_ratio,
                      frames=frames, lr=lr, weight_decay=weight_decay, world=world,
                      precision=precision if not distributed else "bf16",
                      zero=None if not distributed else ds_config["zero_optimization"]["stage"])
    out_dir = Path(out) if out is not None else None
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None

    start_step, ref_nll, ref_remain, resume_from = 0, None, None, None
    if resume:
        resume_from = ckpt.latest_checkpoint(ckpt_root)
        if resume_from is None:
            raise UsageError(f"{ckpt_root}: no complete checkpoint to resume from")
        manifest = ckpt.verify(resume_from)
        if manifest.get("run") != run:
            raise UsageError(f"{resume_from}: checkpoint was made by another run configuration "
                             f"({manifest.get('run')}); resume with the same options")
        start_step = int(manifest["step"])

    state = None
    if resume_from is not None:
        state = torch.load(resume_from / ("extra.pt" if distributed else "state.pt"),
                           map_location=dev, weights_only=True)
        ref_nll, ref_remain = state["ref_nll"], state.get("ref_nll_remain")
    # before DeepSpeed partitions the parameters (ZeRO-3), with the starting weights
    if method.needs_reference and ref_nll is None:
        ref_nll = _reference_nll(model, sets, cache, max(1, batch_size), dev,
                                 progress=progress and rank == 0)
    if method.needs_remain_reference and ref_remain is None:
        ref_remain = _reference_nll(model, sets, cache, max(1, batch_size), dev, forget=False,
                                    progress=progress and rank == 0)

    stopper = None
    if stop_nonmembers is not None:
        from noencore.engine.stopping import NonmemberStop

        stopper = NonmemberStop(model, sets, forget, stop_nonmembers, cache, rule=stop_rule,
                                target_auc=stop_auc, every=stop_every,
                                batch_size=max(1, batch_size), frames=frames)

    objective = UnlearnObjective(model, method, backend=backend)
    objective.train()
    params = [p for p in model.lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    engine = None
    if distributed:
        engine = zero.initialize(objective, optimizer, ds_config)
        if resume_from is not None:
            engine.load_checkpoint(str(resume_from), tag="ds")
    elif state is not None:
        model.lm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(step: int) -> None:
        tmp = ckpt.begin(ckpt_root, step) if rank == 0 else None
        if engine is not None:
            tmp = Path(zero.broadcast_object(str(tmp) if tmp else None))
            engine.save_checkpoint(str(tmp), tag="ds")
            zero.barrier()
            if rank == 0:
                torch.save({"ref_nll": ref_nll, "ref_nll_remain": ref_remain}, tmp / "extra.pt")
        else:
            torch.save({"model": model.lm.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "ref_nll": ref_nll, "ref_nll_remain": ref_remain},
                       tmp / "state.pt")
        if rank == 0:
            ckpt.commit(tmp, step, extra={"run": run})
        if engine is not None:
            zero.barrier()

    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start_step) \
        if out_dir is not None and rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=f"unlearn ({method.name})", unit="step")
    records: list[dict] = []
    stopped, step, stop_info = "max_steps", start_step, None
    try:
        while step < steps:
            t0 = time.perf_counter()
            b = sets.step_batch(step, seed, n_f, n_r, rank=rank, world_size=world)
            codes, mask = b.codes, b.mask
            if method.swaps_codes:
                swap_gen = torch.Generator().manual_seed(seed * 31 + step)
                codes, mask = swap_forget_codes(codes, mask, b.forget & (b.unit >= 0),
                                                swap_gen)
            emb, emask = _conditions(cache, b.captions, b.unit)
            codes, mask, forget = codes.to(dev), mask.to(dev), b.forget.to(dev)
            counts = token_counts(model.lm, mask, forget)
            if engine is not None:
                counts = zero.all_reduce_sum(counts)
            ref = _row_reference(ref_nll, ref_remain, b.forget, b.unit)
            ref = ref.to(dev) if ref is not None else None
            label_seed = seed * 1_000_003 + step * world + rank
            args = (codes, mask, forget, emb.to(dev), emask.to(dev), ref, counts, label_seed)
            if engine is not None:
                loss, stats = engine(*args)
                loss_world = loss * world  # DeepSpeed averages gradients over ranks
                stats = zero.all_reduce_sum(stats)
                total = float(zero.all_reduce_sum(loss.detach().double().reshape(1)))
                if not math.isfinite(total):
                    raise DivergenceError(f"step {step}: loss is {total}")
                engine.backward(loss_world)
                engine.step()
                gn = engine.get_global_grad_norm()
                gnorm = float(gn) if gn is not None else float("nan")
                if gn is not None and not math.isfinite(gnorm):
                    raise DivergenceError(f"step {step}: gradient norm is {gnorm}")
            else:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16,
                                    enabled=precision == "bf16"):
                    loss, stats = objective(*args)
                if not torch.isfinite(loss):
                    raise DivergenceError(f"step {step}: loss is {float(loss.detach())}")
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(
                    params, grad_clip if grad_clip is not None else float("inf")))
                if not math.isfinite(gnorm):
                    raise DivergenceError(f"step {step}: gradient norm is {gnorm}")
                optimizer.step()
                total = float(loss.detach())
            step += 1
            dt = time.perf_counter() - t0
            tokens = float(stats[1] + stats[3])
            rec = {"step": step,
                   "forget_nll": float(stats[0] / stats[1]) if stats[1] > 0 else None,
                   "remain_nll": float(stats[2] / stats[3]) if stats[3] > 0 else None,
                   "objective": total,
                   "method_loss": float(stats[4]) if math.isfinite(float(stats[4])) else None,
                   "grad_norm": gnorm, "tokens": tokens, "tokens_per_s": tokens / dt,
                   "step_s": dt}
            records.append(rec)
            if log is not None:
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(forget=f"{rec['forget_nll'] or float('nan'):.3f}",
                                remain=f"{rec['remain_nll'] or float('nan'):.3f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
            done = step >= steps
            if (target_forget_nll is not None and rec["forget_nll"] is not None
                    and rec["forget_nll"] >= target_forget_nll):
                stopped, done = "target_forget_nll", True
            if stopper is not None and not done:
                stop_info = stopper.check(step, method)
                if stop_info is not None:
                    stopped, done = f"nonmember_{stop_rule}", True
                    note = (f"step {step}: forget vs non-members: AUC {stop_info['auc']:.3f}, "
                            f"NLL {stop_info['forget_nll']:.3f} vs "
                            f"{stop_info['nonmember_nll']:.3f} ({stop_rule} rule; "
                            f"{stop_info['fraction']:.2f} of the last step kept): stop")
                    if bar is not None:
                        bar.write(note)
            if ckpt_root is not None and ((checkpoint_every and step % checkpoint_every == 0)
                                          or done):
                save_checkpoint(step)
            if on_step is not None and rank == 0:
                on_step(step, rec)
            if done:
                break
    except DivergenceError as exc:
        last = ckpt.latest_checkpoint(ckpt_root) if ckpt_root is not None else None
        raise DivergenceError(f"{exc}; training stopped, nothing saved for this step; last good "
                              f"checkpoint: {last if last else 'none'} (lower --lr, set "
                              "--grad-clip, or use a bounded method)") from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
            if log.path.exists() and log.path.stat().st_size:
                plot_losses(log.path, out_dir / "losses.png")

    model.lm.eval()
    model_dir = None
    if save and out_dir is not None:
        if engine is not None:
            final = ckpt.latest_checkpoint(ckpt_root) if rank == 0 else None
            if rank == 0 and final is not None:
                from noencore.engine.zero import fp32_state_dict

                model_dir = save_musicgen(model, out_dir / "model",
                                          state_dict=fp32_state_dict(final))
            zero.barrier()
        else:
            model_dir = save_musicgen(model, out_dir / "model")
    if out_dir is not None and rank == 0:
        records = read_metrics(out_dir / "metrics.jsonl")
    return UnlearnResult(model=model, steps=step, stopped=stopped, metrics=records,
                         out=out_dir, model_dir=model_dir, stop_info=stop_info)
