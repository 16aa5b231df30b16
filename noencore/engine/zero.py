"""DeepSpeed ZeRO 1/2/3 (bf16) for the unlearning loop; the only module that knows DeepSpeed.

The same code runs on GPUs (nccl) and on CPU (gloo), with a launcher (``deepspeed``,
``torchrun``) or as one process. The optimizer is a torch AdamW handed to DeepSpeed (no
FusedAdam build); with ``offload_optimizer`` its state lives in CPU memory. DeepSpeed's
FusedAdam would only run from an ``optimizer`` section of the config, which
``build_config`` refuses; on GPUs the torch AdamW runs its multi-tensor (foreach) update
over ZeRO's flat fp32 partitions, torch's default for CUDA tensors. Frozen parameters
(LoRA's base weights, the blocks ``train_layers`` leaves out) are not in the optimizer, so
not in its partitions; ZeRO-3 still partitions and gathers them for the forward pass.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from noencore.errors import UsageError


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world_size).

    ``device`` is this rank's own device (``cuda:LOCAL_RANK`` on a GPU node): it becomes
    the current CUDA device before NCCL starts, so that collectives and any tensor created
    on "cuda" land on this rank's GPU, not on GPU 0. Without a launcher the variables of a
    one-process group are set, since DeepSpeed would otherwise try MPI discovery.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; the warning asks
    # the user to change code that is not theirs
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_config(user: dict | str | os.PathLike | None, *, zero_stage: int | None,
                 micro_batch: int, world_size: int, grad_clip: float | None,
                 offload_optimizer: bool, accumulation: int = 1) -> dict:
    """The DeepSpeed config: the user's (dict or JSON file), checked against the flags, or
    one generated from them. Contradictions are refused before any training."""
    if user is None:
        cfg: dict[str, Any] = {}
    elif isinstance(user, dict):
        cfg = json.loads(json.dumps(user))
    else:
        try:
            cfg = json.loads(Path(user).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{user}: unreadable DeepSpeed config ({exc})") from exc
    where = ("the DeepSpeed config" if user is None
             else f"DeepSpeed config {'(dict)' if isinstance(user, dict) else user}")
    zo = cfg.setdefault("zero_optimization", {})
    if zero_stage is not None:
        if "stage" in zo and int(zo["stage"]) != int(zero_stage):
            raise UsageError(f"{where} sets ZeRO stage {zo['stage']} but --zero-stage is "
                             f"{zero_stage}; make them agree")
        zo["stage"] = int(zero_stage)
    zo.setdefault("stage", 2)
    if int(zo["stage"]) not in (0, 1, 2, 3):
        raise UsageError(f"{where}: ZeRO stage must be 0-3, got {zo['stage']}")
    if "optimizer" in cfg:
        raise UsageError(f"{where} has an 'optimizer' section; remove it: the engine passes "
                         "its own AdamW (set --lr / --weight-decay)")
    gas = cfg.get("gradient_accumulation_steps")
    if gas is not None and int(gas) != accumulation:
        raise UsageError(f"{where} sets gradient_accumulation_steps={gas} but --accumulation is "
                         f"{accumulation}; make them agree")
    mb = cfg.get("train_micro_batch_size_per_gpu")
    if mb is not None and int(mb) != micro_batch:
        raise UsageError(f"{where} sets train_micro_batch_size_per_gpu={mb} but batch size / "
                         f"ranks gives {micro_batch}; make them agree")
    tb = cfg.get("train_batch_size")
    if tb is not None and int(tb) != micro_batch * world_size * accumulation:
        raise UsageError(f"{where} sets train_batch_size={tb} but the run uses "
                         f"{micro_batch * world_size * accumulation} ({micro_batch} x "
                         f"{world_size} ranks x {accumulation} micro-batches)")
    if cfg.get("fp16", {}).get("enabled"):
        raise UsageError(f"{where} enables fp16; the engine trains in bf16 (or fp32)")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["train_batch_size"] = micro_batch * world_size * accumulation
    cfg["gradient_accumulation_steps"] = accumulation
    cfg.setdefault("bf16", {"enabled": True})
    if grad_clip is not None:
        cfg.setdefault("gradient_clipping", float(grad_clip))
    if offload_optimizer:
        zo.setdefault("offload_optimizer", {"device": "cpu"})
    if "offload_optimizer" in zo:
        cfg["zero_force_ds_cpu_optimizer"] = False  # a torch optimizer on offloaded state
    cfg["zero_allow_untested_optimizer"] = True
    zo["stage3_gather_16bit_weights_on_model_save"] = True
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def initialize(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """``deepspeed.initialize`` for the objective module (ZeRO-3: the heads' own parameters
    registered as external parameters, since the fused op reads them outside the heads'
    forward; a head weight under a LoRA parametrization is computed by its
    parametrization modules, whose own hooks gather it)."""
    import deepspeed

    if int(config["zero_optimization"]["stage"]) == 3:
        from deepspeed.runtime.zero import register_external_parameter
        from deepspeed.utils import set_z3_leaf_module
        from torch.nn.utils import parametrize

        for lin in objective.model.lm.linears:
            for p in lin.parameters(recurse=False):
                register_external_parameter(objective, p)
        # ZeRO-3's module hooks hand every module a new tensor for each tensor argument, so
        # self-attention called as attn(x, x, x) receives three different tensors, and
        # audiocraft's memory-efficient attention (every released MusicGen) asserts that
        # query, key and value are one. Hooks on whole transformer layers (each layer's
        # parameters gathered at once, as the planner counts them) leave the calls inside
        # a layer as the model makes them.
        # A layer holding LoRA parametrizations keeps per-module hooks: as one leaf, its
        # adapters' partitions are released before backward reads them.
        for layer in objective.model.lm.transformer.layers:
            if not any(parametrize.is_parametrized(m) for m in layer.modules()):
                set_z3_leaf_module(layer, True)
                layer.register_forward_pre_hook(_input_requires_grad)
            elif getattr(layer.self_attn, "memory_efficient", False):
                raise UsageError("LoRA under ZeRO-3 needs plain attention, and this model "
                                 "uses audiocraft's memory-efficient attention; use "
                                 "--zero-stage 1 or 2 with LoRA (its trained state is small)")
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    return engine


def _input_requires_grad(layer: torch.nn.Module, args: tuple) -> tuple | None:
    """A ZeRO-3 leaf layer that trains gets an input that requires gradients.

    ZeRO-3 reduces a leaf module's gradients from a full backward hook, and such a hook
    fires as soon as the output's gradient arrives when no input requires gradients: before
    the layer's own backward, which then adds its weight gradients to released partitions.
    That is the lowest trained block under ``train_layers`` (frozen below it); its input
    becomes a new leaf that requires gradients, which costs the input gradient of that one
    block and reaches nothing below it."""
    x = args[0] if args else None
    if (not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.requires_grad
            or not any(p.requires_grad for p in layer.parameters())):
        return None
    return (x.detach().requires_grad_(), *args[1:])


def frozen_copies(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of ``lm``'s frozen parameters (LoRA's base weights), taken before
    DeepSpeed casts the module to bf16: a frozen parameter has no fp32 master in the
    optimizer, and ``release_fp32_model`` restores it from these instead of from its
    bf16-rounded copy. Empty when every parameter trains."""
    return {name: p.detach().to("cpu", torch.float32, copy=True)
            for name, p in lm.named_parameters() if not p.requires_grad}


def release_fp32_model(engine: Any, lm: torch.nn.Module, device: torch.device,
                       frozen: dict[str, torch.Tensor] | None = None) -> None:
    """Turn ``lm`` back into a plain fp32 module on ``device``, on every rank, and release
    the engine.

    Under DeepSpeed the module holds bf16 copies (ZeRO 1/2) or empty partitions (ZeRO-3)
    of its parameters; the fp32 master weights live in the optimizer. Each parameter is
    assembled from them (a collective under ZeRO-3: every rank calls this, in the same
    order), the engine's hooks are removed, and the parameters are replaced by plain
    ones, so the model ``unlearn`` returns can be evaluated, saved or trained again.
    Frozen parameters come back from ``frozen`` (``frozen_copies``) where given.
    """
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    frozen = frozen or {}
    full: dict[str, torch.Tensor] = {}
    for name, p in lm.named_parameters():
        if name in frozen:
            full[name] = frozen[name].to(device)
            continue
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:  # a frozen parameter has no master copy: gather the module's
            with zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                value = p.detach()
                full[name] = value.to(device, torch.float32, copy=True)
            continue
        full[name] = value.detach().to(device, torch.float32, copy=True)
    engine.destroy()
    for name, value in full.items():
        owner, _, attr = name.rpartition(".")
        mod = lm.get_submodule(owner)
        mod._parameters[attr] = torch.nn.Parameter(
            value, requires_grad=mod._parameters[attr].requires_grad)
    for mod in lm.modules():
        for key, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[key] = buf.to(device, torch.float32 if buf.is_floating_point()
                                           else buf.dtype)


class MasterWeights:
    """This rank's fp32 master weights under DeepSpeed, as flat partitions, for the stop
    rule's bisection between two checks.

    The interpolation ``before + a (after - before)`` is element-wise, so each rank works
    on its own partition alone; ``assign`` then refreshes the bf16 compute weights the
    forward pass reads (ZeRO 0-2: the optimizer's own refresh, an all-gather, so every
    rank calls it; ZeRO-3: each rank copies into its bf16 partition, then the small
    "persistent" parameters every rank keeps whole are all-gathered, as the optimizer's
    own step does). DeepSpeed keeps these partitions in optimizer attributes that are
    not public API (hence the pin on deepspeed 0.19 in requirements.txt); they are
    looked up once here, and a DeepSpeed without them is refused with a clear message.
    """

    def __init__(self, engine: Any):
        opt = engine.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                     "fp32_groups_flat_partition"):  # ZeRO-3, ZeRO-1/2, bf16 at ZeRO-0
            if isinstance(getattr(opt, attr, None), list):
                self._flat = getattr(opt, attr)
                break
        else:
            import deepspeed

            raise UsageError(f"the stop rule under DeepSpeed {deepspeed.__version__} cannot "
                             f"reach the fp32 master weights of {type(opt).__name__}; use "
                             "deepspeed 0.19 or stop on --steps")
        self._opt, self._stage3 = opt, attr == "fp32_partitioned_groups_flat"

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._flat]

    def assign(self, before: list[torch.Tensor], after: list[torch.Tensor], a: float) -> None:
        with torch.no_grad():
            for t, b, e in zip(self._flat, before, after):
                t.copy_(b + a * (e - b))
            if self._stage3:  # what the ZeRO-3 optimizer's own step does after its update
                opt = self._opt
                opt._partition_all_parameters()  # drop copies a measurement left gathered
                for i in range(len(self._flat)):
                    opt._reassign_or_swap_out_partitioned_parameters(i)
                if opt.persistent_parameters:  # small parameters every rank keeps whole
                    opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
                opt.invalidate_secondary_tensor()
            else:
                self._opt.update_lp_params()
