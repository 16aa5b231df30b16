"""``UnlearnConfig``: every option of ``noencore.unlearn``, declared once.

Each option is one field with its default, type and help text (``dataclasses.field``
metadata). What derives from it:

- ``unlearn(model, shards, config=None, **overrides)``: the keywords it takes;
- the CLI's flags of ``noencore unlearn`` and the keys of its YAML/JSON ``--config``
  (``noencore.commands.unlearn``; metadata ``cli``: the flag's name where it differs,
  ``False`` for an option the CLI does not offer);
- the resume check: the options marked ``run`` must be the same as the checkpoint's;
- ``config.json`` in the run folder (``to_dict``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from noencore import trackers
from noencore.errors import UsageError
from noencore.methods import METHODS


def option(default: Any, help: str, *, cli: str | bool = True, run: bool = False,
           parse: Any = None) -> Any:
    """A field of the config: ``help`` is its text everywhere (CLI, docs); ``cli`` the
    flag's option name when it differs from the field's (False: no flag); ``run``: part
    of the configuration a resumed run must share; ``parse``: the CLI's type."""
    return field(default=default,
                 metadata={"help": help, "cli": cli, "run": run, "parse": parse})


LAYER_FORMS = "'all', 'top:N' (N >= 1) or block indices (e.g. 20,21,22,23)"


def _layers_form_ok(value: Any) -> bool:
    """Whether ``value`` is a ``train_layers`` value of one of the ``LAYER_FORMS`` (None
    too); the blocks are checked against the model by ``select_blocks``."""
    if value is None:
        return True
    if isinstance(value, str):
        return re.fullmatch(r"all|top:[1-9]\d*|\d+(,\d+)*", value.replace(" ", "")) is not None
    items = list(value) if isinstance(value, Sequence) else [value]
    return bool(items) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                               for i in items)


def select_blocks(value: Any, n_layers: int) -> tuple[int, ...] | None:
    """The sorted transformer blocks ``train_layers`` = ``value`` selects in a model of
    ``n_layers`` blocks, or None for every parameter ("all", None). Raises ``UsageError``
    (one line naming the option) for a malformed value or a block the model lacks."""
    where = "option train_layers (--train-layers)"
    if not _layers_form_ok(value):
        raise UsageError(f"{where}: {value!r}; it must be {LAYER_FORMS}")
    text = value.replace(" ", "") if isinstance(value, str) else None
    if value is None or text == "all":
        return None
    if text is not None and text.startswith("top:"):
        if int(text[4:]) > n_layers:
            raise UsageError(f"{where}: {value!r} asks for {text[4:]} blocks; the model has "
                             f"{n_layers} (use top:1 to top:{n_layers})")
        return tuple(range(n_layers - int(text[4:]), n_layers))
    blocks = ({int(x) for x in text.split(",")} if text is not None
              else set(value) if isinstance(value, Sequence) else {value})
    outside = sorted(b for b in blocks if b >= n_layers)
    if outside:
        raise UsageError(f"{where}: block(s) {outside} do not exist; the model has {n_layers} "
                         f"blocks, numbered 0 to {n_layers - 1}")
    return tuple(sorted(blocks))


def _is_set(value: Any) -> bool:
    """A split name, a list of source ids, or a selection of the shards (``TokenShards``)."""
    if isinstance(value, list | tuple):
        return all(isinstance(x, str | int) and not isinstance(x, bool) for x in value)
    return isinstance(value, str) or hasattr(value, "ids")


def _set_spec(text: Any) -> Any:
    """A split name stays a string; a comma-separated value is a list of source ids."""
    if text is None or (_is_set(text) and not isinstance(text, str)):
        return text
    if not isinstance(text, str):
        raise UsageError(f"{text!r} is not a set: give a split name, or source ids (a "
                         "comma-separated string or a list)")
    return [x.strip() for x in text.split(",") if x.strip()] if "," in text else text


@dataclass(frozen=True)
class UnlearnConfig:
    """The options of one unlearning run (``noencore.unlearn``; ``noencore unlearn``).

    forget / remain: a split name, a list of source ids or a selection of the shards
    (remain=None: every other item outside held-out splits). method: a name or a
    ``Method`` (options in ``method_options``).
    batch_size: global rows per optimizer step, ``forget_ratio`` of them from the forget
    set, split over the ranks and into ``accumulation`` micro-batches per rank (gradients
    add up over them; every mean is over the whole step's tokens, so the result equals
    one big batch); frames: window length (50 frames = 1 s at 32 kHz).
    checkpointing: recompute each transformer layer's activations in backward (less
    memory, about a third more compute; same gradients).
    out: run folder (config.json, metrics.jsonl, losses.png, checkpoints/, model/);
    checkpoints every ``checkpoint_every`` steps and at the end; ``resume`` continues
    from the newest valid checkpoint in ``out`` made with the same ``run`` options.
    Under a launcher the run folder must be on a filesystem every rank shares (checked
    before training).
    zero_stage / deepspeed (config dict or JSON path): train with DeepSpeed ZeRO in bf16;
    each rank runs on GPU ``LOCAL_RANK`` (or the CPU). The returned model is a plain fp32
    model on every rank (the master weights gathered from the partitions), usable as is.
    precision (one process): "fp32", or "bf16" (fp32 weights and optimizer, forward and
    backward under bf16 autocast, as audiocraft trains; much faster where bf16 matmuls are).
    log_every: the step's numbers stay on the device and are read every ``log_every``
    steps (and before every checkpoint, stop check or ``target_forget_nll`` check), so the
    host never waits for the device in between; metrics.jsonl still gets every step. A
    NaN/inf loss or gradient norm raises DivergenceError at that read, and no checkpoint
    is written after it.
    stop_nonmembers (tracks never trained on, like the forget set): stop once membership
    inference cannot tell the forget set from them (``stop_rule`` "auc": the LOSS
    attack's AUC <= ``stop_auc``, the weights between the last two checks bisected for
    the crossing; "nll": the forget mean NLL reaches theirs), checked every
    ``stop_every`` steps; the method follows each check (``Method.on_check``: a
    ``row_target`` follows their NLL; ``noencore.engine.stopping``); under a launcher
    every rank scores its share and the bisection works on each rank's partition of the
    weights. Keep the tracks a later evaluation scores out of this set.
    lora (``noencore.models.lora.LoraSpec`` or a dict of its fields: rank, alpha,
    targets): train only low-rank adapters of the targeted weights, the model frozen;
    the returned and saved model has them merged. save_adapter (transformers-format
    models): also write them as a PEFT adapter to ``out/adapter``.
    train_layers: "top:N", block indices (a list or "20,21,22,23") or "all" (None, the
    default: every parameter trains): only those transformer blocks, the output norm and
    the K codebook heads train; the code embeddings, the text-condition projection and the
    other blocks are frozen (no gradient, no optimizer state, no ZeRO partition of the
    optimizer; backward stops at the lowest trained block: ``noencore.models.train_layers``).
    A resumed run must select the same blocks. Not with ``lora`` (LoRA targets can name
    blocks: ``layers.22``).
    compile (``noencore.models.block``): every transformer layer computes through one
    function of its tensors (the same block: pre-norm self-attention with torch's
    scaled-dot-product attention, cross-attention, feed-forward), compiled once by
    ``torch.compile`` and reused by every layer, in one process and under ZeRO 1-3, with
    activation checkpointing; compiled before the first step (``UnlearnResult.compile``
    holds the seconds); a failed compile is named in a warning and the same function runs
    eager. audiocraft's forward is back on the returned model.
    A model loaded from a folder remembers the opt-outs it has served
    (``model.requests``, the folder's requests.json): a request whose forget set overlaps
    an earlier one's, or whose remain set holds an earlier one's forget items, is refused
    (``RequestConflict``) before training; a finished run appends its own request, which
    the saved model folder keeps (``noencore.engine.requests``).
    audit (``noencore.audit``; the public ``noencore.unlearn`` and the CLI): tracks like the forget set that the model never
    trained on and the run reads nowhere else (checked before training); after training
    the unlearned model is evaluated against the starting model on them (every attack's
    AUC, dataset inference, replay, remain change, the relearning probe), the report and
    its plots are written to ``out/report`` and the result's ``report`` holds it, with a
    one-line ``verdict``. Needs ``out`` and the starting model as a spec (hub id, folder).
    report_to (``noencore.trackers``): "tensorboard", "wandb", "csv" or several
    (comma-separated or a list); rank 0 reports every step's metrics, each stop-rule
    check, a summary table and the loss plot.
    """

    forget: Any = option(None, "forget set: a split name, or comma-separated source ids",
                         parse=_set_spec)
    remain: Any = option(None, "remain set: split name or comma-separated ids (default: all "
                               "other items outside held-out splits)", parse=_set_spec)
    method: Any = option("match", " | ".join(METHODS) + " (noencore.methods; README: which "
                                                         "to use). The default, match, needs "
                                                         "--stop-nonmembers")
    method_options: dict | None = option(None, "options of the method (--method-option "
                                               "KEY=VALUE, repeatable)", cli=False)
    steps: int = option(100, "maximum optimizer steps", parse=int)
    lr: float = option(1e-5, "AdamW learning rate", parse=float, run=True)
    weight_decay: float = option(0.0, "AdamW weight decay", parse=float, run=True)
    batch_size: int = option(8, "global rows per optimizer step (all ranks, all "
                                "micro-batches)", parse=int, run=True)
    accumulation: int = option(1, "micro-batches per optimizer step on each rank (gradient "
                                  "accumulation: the same step in less memory)", parse=int)
    forget_ratio: float = option(0.5, "fraction of each batch drawn from the forget set",
                                 parse=float, run=True)
    frames: int = option(500, "window length in codec frames (50 per second)", parse=int,
                         run=True)
    seed: int = option(0, "seed of the batch order and random labels", parse=int, run=True)
    out: Any = option(None, "run folder: metrics.jsonl, losses.png, checkpoints/, model/")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: only at the end)",
                                   parse=int)
    resume: bool = option(False, "continue from the newest complete checkpoint in --out")
    overwrite: bool = option(False, "replace an earlier run in --out (only the files this "
                                    "tool listed there are removed)")
    target_forget_nll: float | None = option(None, "stop when the forget token NLL reaches "
                                                   "this (nats)", parse=float)
    stop_nonmembers: Any = option(None, "stop when membership inference cannot tell the "
                                        "forget set from these never-trained tracks (split "
                                        "or comma-separated ids; not the tracks you evaluate "
                                        "on)", parse=_set_spec)
    anchor_unseen: Any = option(None, "the artist's unseen tracks (split or comma-separated "
                                      "ids, never the tracks you evaluate on): trained as "
                                      "remain rows held at the level the forget rows are sent "
                                      "to (the stop-rule non-members' mean NLL under the "
                                      "starting weights), so that unlearning the forget set "
                                      "does not push the artist's other music past it; needs a "
                                      "method that fits its targets to non-members",
                                parse=_set_spec, run=True)
    audit: Any = option(None, "after training, audit the unlearned model against the "
                              "starting model on these tracks (split or comma-separated ids): "
                              "music like the forget set that the model never trained on and "
                              "the run reads nowhere else; writes OUT/report (every attack's "
                              "AUC, dataset inference, replay, remain change, relearning, "
                              "plots) and prints the verdict", parse=_set_spec)
    stop_rule: str | None = option(None, "with --stop-nonmembers: auc (LOSS-attack AUC <= "
                                         "--stop-auc), nll (forget NLL reaches theirs) or "
                                         "original (the AUC against their NLLs under the "
                                         "starting model; the default for a method that fits "
                                         "its targets to them, match; auc for the others)")
    stop_auc: float | None = option(None, "with --stop-nonmembers: the AUC to stop at "
                                          "(default 0.5; 0 for a method that fits its targets "
                                          "to them, match: it stops only once the whole forget "
                                          "set went past where they were, a guard against "
                                          "over-unlearning, and else runs its --steps)",
                                    parse=float)
    stop_every: int = option(1, "with --stop-nonmembers: check every N steps", parse=int)
    stop_patience: int | None = option(None, "with --stop-nonmembers: stop once the rule "
                                             "holds at N checks in a row (default 1; 3 for "
                                             "the guard of a method that fits its targets, "
                                             "match: a row overshoots its target on the way "
                                             "and comes back)", parse=int)
    grad_clip: float | None = option(1.0, "gradient norm clip (0: none)", parse=float)
    log_every: int = option(10, "read the step numbers from the device every N steps "
                                "(metrics.jsonl still holds every step; NaN/inf is caught at "
                                "the read)", parse=int)
    conditions: Any = option(None, "text-condition cache folder (default: SHARDS/conditions)",
                             cli=False)
    allow_codec_mismatch: bool = option(False, "train although the shards record another "
                                               "codec than the model's (not advised)")
    backend: str = option("auto", "fused op backend: auto | triton | cpp | torch")
    zero_stage: int | None = option(None, "train with DeepSpeed ZeRO stage 1, 2 or 3 (bf16)",
                                    parse=int)
    deepspeed: Any = option(None, "DeepSpeed JSON config (checked against the flags)",
                            cli="deepspeed_config")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer state in CPU memory")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")
    precision: str = option("fp32", "one process: fp32, or bf16 (autocast on fp32 weights)")
    checkpointing: bool = option(False, "activation checkpointing per transformer layer "
                                        "(less memory, about a third more compute)")
    compile: bool = option(False, "run every transformer block as one function (torch's "
                                  "scaled-dot-product attention) compiled once with "
                                  "torch.compile and reused by each layer; the compile time "
                                  "is reported apart (a failed compile is named and the run "
                                  "goes on eager); not with LoRA")
    lora: Any = option(None, "train only LoRA adapters (a LoraSpec or a dict: rank, alpha, "
                             "targets); the saved model has them merged", cli=False)
    train_layers: str | list[int] | None = option(
        None, "train only these transformer blocks, plus the output norm and the codebook "
              "heads (the embeddings and the text projection freeze): top:N (the N highest "
              "blocks), comma-separated block indices (20,21,22,23) or all (the default: "
              "every parameter trains); not with LoRA", run=True)
    save_adapter: bool = option(False, "with --lora-rank, transformers-format models: also "
                                       "write the adapters as a PEFT adapter to OUT/adapter")
    save: bool = option(True, "save the unlearned model to OUT/model", cli=False)
    report_to: Any = option(None, "experiment trackers for the step metrics, the stop rule's "
                                  "checks and the loss plot: comma-separated tensorboard, "
                                  "wandb, csv (written to OUT/trackers; wandb follows its "
                                  "WANDB_* variables)", parse=trackers.parse)

    def check(self) -> None:
        """Each option's type and range (``_RANGES``): one line naming the option, its flag
        and what it takes; a number from a config file is a number, not a string."""
        for f in dataclasses.fields(self):
            value, parse = getattr(self, f.name), f.metadata["parse"]
            flag = "--" + str(f.metadata["cli"] if isinstance(f.metadata["cli"], str)
                              else f.name).replace("_", "-")
            if value is None and "None" in str(f.type):
                continue
            if parse is _set_spec and value is not None and not _is_set(value):
                raise UsageError(f"option {f.name} ({flag}): {value!r} is not a set: give a "
                                 "split name, or source ids (a comma-separated string or a "
                                 "list)")
            if parse in (int, float) or str(f.type) == "bool":
                want = {int: int, float: (int, float)}.get(parse, bool)
                if isinstance(value, bool) is not (want is bool) or not isinstance(value, want):
                    kind = {int: "a whole number", float: "a number"}.get(parse, "true or false")
                    raise UsageError(f"option {f.name} ({flag}): {value!r} is not {kind}")
                if parse is float and not math.isfinite(value):
                    raise UsageError(f"option {f.name} ({flag}): {value!r} is not a finite "
                                     "number")
            if f.name in _PATHS and value is not None and not isinstance(value, _PATHS[f.name]):
                raise UsageError(f"option {f.name} ({flag}): {value!r} is not a path")
            rule = _RANGES.get(f.name)
            if rule is not None and not rule[0](value):
                raise UsageError(f"option {f.name} ({flag}): {value!r}; it must be {rule[1]}")

    def replace(self, **overrides: Any) -> UnlearnConfig:
        """A copy with ``overrides``; an unknown name is refused with the known ones."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UsageError(f"unknown unlearn option(s) {unknown}; known: "
                             f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (a method instance as its description, a
        LoRA spec as its fields), as the run folder's config.json holds them."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "describe"):
                value = value.describe()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            elif isinstance(value, Sequence) and not isinstance(value, str):
                value = list(value)
            out[f.name] = value if isinstance(value, str | int | float | bool | list | dict
                                              | None) else str(value)
        return out


# the options that name a file or folder (a config given as a dict, or a condition cache
# object, where those are taken too), by what each takes
_PATHS: dict[str, tuple[type, ...]] = {"out": (str, os.PathLike),
                                       "deepspeed": (str, os.PathLike, dict)}

# the range of each numeric option that has one (its type is checked for every one; steps,
# batch_size, frames, accumulation and log_every get the trainer's own messages)
_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "a positive number"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "forget_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "target_forget_nll": (lambda v: v >= 0, "a number of nats >= 0"),
    "stop_auc": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "stop_every": (lambda v: v >= 1, ">= 1"),
    "stop_patience": (lambda v: v >= 1, ">= 1"),
    "grad_clip": (lambda v: v > 0, "positive (0 on the command line: no clipping)"),
    "zero_stage": (lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "train_layers": (_layers_form_ok, LAYER_FORMS),
}


def fields_for_run() -> list[str]:
    """The options a checkpoint must share with the run that resumes it."""
    return [f.name for f in dataclasses.fields(UnlearnConfig) if f.metadata["run"]]
