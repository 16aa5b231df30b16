"""Train only some transformer blocks: the rest of the LM frozen.

``train_layers`` (``noencore.engine.config``, which reads the option's value into block
indices: ``select_blocks``) names the blocks of ``lm.transformer.layers`` an unlearning run
updates. With a selection, the selected blocks, the output norm (``out_norm``) and the K
codebook heads (``linears``) train; the code embeddings, the text-condition projection and every other block are frozen
(``requires_grad_(False)``): they get no gradient and no optimizer state. The heads train
because every method's loss is read through them; the norm because it sits between the top
block and the heads.

Backward then stops at the lowest trained block: the embeddings' output and the condition
tensors do not require gradients, nor does anything a frozen block below computes from
them, so autograd builds no graph there (activation checkpointing included: audiocraft
uses torch's non-reentrant checkpoint, which handles inputs without gradients).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# what trains beside the selected blocks (parameter-name prefixes of audiocraft's LMModel)
ALWAYS_TRAINED = ("out_norm.", "linears.")


def is_trained(name: str, blocks: Sequence[int]) -> bool:
    """Whether the LM parameter ``name`` trains when ``blocks`` are selected."""
    return name.startswith(ALWAYS_TRAINED) or any(
        name.startswith(f"transformer.layers.{b}.") for b in blocks)


@dataclass
class FrozenLayers:
    """What ``freeze_outside`` did to a model: the ``blocks`` that train, the parameter
    counts (``trained``, ``frozen``) and the ``requires_grad`` flags from before, which
    ``restore`` puts back. Parameters are looked up by name at each use, since DeepSpeed
    replaces the parameter objects."""

    lm: nn.Module
    blocks: tuple[int, ...]
    trained: int
    frozen: int
    trainable_before: dict[str, bool] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "trained_params": self.trained,
                "frozen_params": self.frozen}

    def restore(self) -> None:
        for name, p in self.lm.named_parameters():
            p.requires_grad_(self.trainable_before.get(name, p.requires_grad))


def freeze_outside(lm: nn.Module, blocks: Sequence[int]) -> FrozenLayers:
    """Freeze every parameter of ``lm`` but those of ``blocks``, ``out_norm`` and the
    codebook heads (``is_trained``)."""
    before = {name: p.requires_grad for name, p in lm.named_parameters()}
    counts = [0, 0]
    for name, p in lm.named_parameters():
        keep = before[name] and is_trained(name, blocks)
        p.requires_grad_(keep)
        counts[0 if keep else 1] += p.numel()
    return FrozenLayers(lm, tuple(blocks), counts[0], counts[1], before)
