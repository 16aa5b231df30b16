"""LoRA: unlearn by training low-rank updates of chosen weights, the model frozen.

Each targeted weight ``W [out, in]`` is read as ``W + (alpha / rank) B A`` (``A [rank, in]``
random, ``B [out, rank]`` zero, so the model starts unchanged) through a
``torch.nn.utils.parametrize`` parametrization: every reader of the weight sees the sum
and autograd carries its gradient to ``A`` and ``B``. That is what the engine needs,
because its weights are read as tensors, not through module calls:
``torch.nn.MultiheadAttention`` reads its fused q/k/v projection and its output
projection directly, and the fused op reads the codebook heads' weights
(``noencore.models.adapter.head_weight``), so the op sees ``W + s B A`` with no change.
PEFT's ``lora.Linear`` adds ``B A x`` to a module call's output (never made for those
weights), and its ``lora.MultiheadAttention`` merges the update into the frozen weight
before every forward and subtracts it after, replacing the Parameter each time: the
frozen weight drifts by rounding (measured: 1e-3 in bf16 after 20 steps) and ZeRO-3's
partitioned parameters are replaced. PEFT is used for the adapter's file format.

Targets name weights by dotted components of their path in the audiocraft LM (``.mha``
left out): ``linear1``, ``self_attn.out_proj``, ``layers.0``, ``linears.2``, or an alias
(``ALIASES``). Only ``torch.nn.Linear`` weights and attention input projections
(``in_proj_weight``) can be targeted. ``merge()`` folds the updates into the weights (the
saved model is a plain one); ``save_adapter`` writes them as a PEFT adapter of the
transformers model, which ``peft.PeftModel.from_pretrained`` loads.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from noencore.errors import UsageError

ALIASES: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn", "cross_attention"),  # q/k/v and output projections
    "self_attention": ("self_attn",),
    "ffn": ("linear1", "linear2"),
    "heads": ("linears",),                          # the K codebook heads
    "text_projection": ("output_proj",),            # T5 -> decoder width (enc_to_dec_proj)
}
DEFAULT_TARGETS = ("attention", "heads")


@dataclass(frozen=True)
class LoraSpec:
    """rank r; alpha (default: rank, a scale of 1); targets (aliases or dotted paths)."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha if self.alpha is not None else self.rank,
                "targets": list(self.targets)}


class LoraDelta(nn.Module):
    """The parametrization ``W -> W + scale * B @ A``; ``A`` float32 [rank, in] drawn from
    ``generator`` (PEFT's default: Kaiming-uniform), ``B`` float32 [out, rank] zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float,
                 generator: torch.Generator, device: torch.device):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5))
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def weight_path(module_path: str, param: str) -> str:
    """The path a target is matched against: ``transformer.layers.0.self_attn.in_proj``,
    ``linears.2`` (no ``.weight`` / ``_weight``, no ``.mha``)."""
    name = f"{module_path}.{param}" if module_path else param
    name = name.replace(".mha.", ".")
    return name[: -len("_weight")] if name.endswith("_weight") else name.removesuffix(".weight")


def _eligible(lm: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module path, parameter name, module) of every weight LoRA can adapt."""
    out = []
    for path, mod in lm.named_modules():
        if isinstance(mod, nn.Linear):
            out.append((path, "weight", mod))
        elif isinstance(getattr(mod, "in_proj_weight", None), nn.Parameter):
            out.append((path, "in_proj_weight", mod))
    return out


def _matches(path: str, target: str) -> bool:
    """Whether ``target``'s dotted components appear, in a row, among ``path``'s."""
    p, t = path.split("."), target.split(".")
    return any(p[i: i + len(t)] == t for i in range(len(p) - len(t) + 1))


@dataclass
class LoraAdapters:
    """The adapters ``apply_lora`` put on a model: ``paths`` (weight path -> (module path,
    parameter name)), and the model's ``requires_grad`` flags from before, restored by
    ``merge``. Modules are looked up by path at each use, since DeepSpeed replaces the
    parameter objects."""

    model: Any
    spec: LoraSpec
    paths: dict[str, tuple[str, str]]
    trainable_before: dict[str, bool] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**self.spec.describe(), "weights": len(self.paths)}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """weight path -> (A float32 [rank, in], B float32 [out, rank]), on the CPU."""
        out = {}
        for wp, (mod_path, param) in self.paths.items():
            delta = self.model.lm.get_submodule(mod_path).parametrizations[param][0]
            out[wp] = (delta.lora_A.detach().float().cpu(), delta.lora_B.detach().float().cpu())
        return out

    def merge(self) -> None:
        """Fold every update into its weight (``W <- W + s B A``) and drop the adapters;
        the model's parameters are trainable again as they were before ``apply_lora``."""
        lm = self.model.lm
        for mod_path, param in self.paths.values():
            parametrize.remove_parametrizations(lm.get_submodule(mod_path), param,
                                                leave_parametrized=True)
        for name, p in lm.named_parameters():
            p.requires_grad_(self.trainable_before.get(name, p.requires_grad))

    def save_adapter(self, folder: str | os.PathLike) -> Path:
        """Write the adapters as a PEFT LoRA adapter of the transformers model
        (``adapter_config.json`` + ``adapter_model.safetensors``): audiocraft's fused q/k/v
        update becomes three updates sharing ``A``, one per transformers projection."""
        import peft
        from safetensors.torch import save_file

        from noencore.models.hf import weight_map

        model = self.model
        if model.format != "hf":
            raise UsageError(_AUDIOCRAFT_ADAPTER)
        names = dict(weight_map(len(model.lm.transformer.layers), model.n_q,
                                model.text_attribute))
        tensors, modules = {}, []
        for wp, (a, b) in self.factors().items():
            keys = names[wp + ("_weight" if wp.endswith("in_proj") else ".weight")]
            for key, b_part in zip(keys, b.chunk(len(keys))):
                module = key.removesuffix(".weight")
                modules.append(module)
                # a copy per projection: safetensors refuses tensors sharing memory
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b_part.contiguous()
        config = peft.LoraConfig(r=self.spec.rank, lora_alpha=self.spec.describe()["alpha"],
                                 target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                                 base_model_name_or_path=str(model.spec))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".adapter."))
        try:  # both files written aside, then renamed into place
            config.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            for f in sorted(tmp.iterdir()):
                os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


_AUDIOCRAFT_ADAPTER = ("an adapter is saved for transformers-format models only (PEFT loads "
                       "it onto MusicgenForConditionalGeneration); audiocraft has no adapter "
                       "format: leave out --save-adapter to save the merged model")


def apply_lora(model: Any, spec: LoraSpec | dict, *, seed: int = 0,
               save_adapter: bool = False) -> LoraAdapters:
    """Freeze ``model.lm`` and put LoRA adapters on the weights ``spec.targets`` name.

    ``A`` is drawn from a generator seeded with ``seed``, so every rank of a launched run
    builds the same adapters. Raises ``UsageError`` naming a target that matches no
    weight (with the aliases and example paths), and before any change when
    ``save_adapter`` is asked of an audiocraft-format model.
    """
    spec = LoraSpec(**spec) if isinstance(spec, dict) else spec
    if spec.rank < 1:
        raise UsageError(f"LoRA rank must be >= 1, got {spec.rank}")
    if save_adapter and model.format != "hf":
        raise UsageError(_AUDIOCRAFT_ADAPTER)
    lm = model.lm
    eligible = {weight_path(path, param): (path, param, mod)
                for path, param, mod in _eligible(lm)}
    chosen: dict[str, tuple[str, str, nn.Module]] = {}
    for target in spec.targets:
        parts = ALIASES.get(target, (target,))
        found = {wp: v for wp, v in eligible.items() if any(_matches(wp, t) for t in parts)}
        if not found:
            examples = ", ".join(sorted(eligible)[:3])
            raise UsageError(f"LoRA target {target!r} matches no weight of model "
                             f"{model.spec!r}; use an alias ({', '.join(ALIASES)}) or "
                             f"dotted components of a weight's path (e.g. {examples})")
        chosen.update(found)
    adapters = LoraAdapters(model=model, spec=spec,
                            paths={wp: (path, param) for wp, (path, param, _) in
                                   sorted(chosen.items())},
                            trainable_before={n: p.requires_grad
                                              for n, p in lm.named_parameters()})
    for p in lm.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    for _, (_, param, mod) in sorted(chosen.items()):
        weight = getattr(mod, param)
        delta = LoraDelta(weight.shape[0], weight.shape[1], spec.rank, spec.scale, gen,
                          weight.device)
        parametrize.register_parametrization(mod, param, delta)
    return adapters
