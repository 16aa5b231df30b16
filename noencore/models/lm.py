"""The MusicGen language model as the engine sees it, and how it is built.

``MusicGenModel`` wraps audiocraft's ``LMModel`` (the only trainable part) with what the
stages above it need: the codec's shape, the text conditioner, the hidden-state adapter.
``BASE_CFG`` / ``NAMED_CONFIGS`` are the audiocraft configs it is built from and
``build_lm`` builds one. Both checkpoint formats (``noencore.models.musicgen`` for
audiocraft's, ``noencore.models.hf`` for transformers') load into this one class.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noencore.errors import NoencoreError
from noencore.models.adapter import CodebookRows, codebook_rows
from noencore.models.text import register_t5
from noencore.thirdparty import quiet_audiocraft

# The parts of audiocraft's MusicGen training config that ``builders.get_lm_model`` reads
# (values of audiocraft's musicgen LM config; the transformer sizes differ per model).
BASE_CFG: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "lm_model": "transformer_lm",
    "dataset": {"segment_duration": 30.0},
    "codebooks_pattern": {"modeling": "delay",
                          "delay": {"delays": [0, 1, 2, 3], "flatten_first": 0,
                                    "empty_initial": 0}},
    "transformer_lm": {
        "n_q": 4, "card": 2048, "dim": 64, "num_heads": 4, "num_layers": 2, "hidden_scale": 4,
        "dropout": 0.0, "activation": "gelu", "norm": "layer_norm", "norm_first": True,
        "bias_ff": False, "bias_attn": False, "bias_proj": False, "causal": True,
        "past_context": None, "custom": False, "memory_efficient": False,
        "attention_as_float32": False, "layer_scale": None, "positional_embedding": "sin",
        "xpos": False, "checkpointing": "none", "weight_init": "gaussian",
        "depthwise_init": "current", "zero_bias_init": True, "emb_lr": None,
        "cross_attention": False, "qk_layer_norm": False, "qk_layer_norm_cross": False,
        "attention_dropout": None, "kv_repeat": 1, "two_step_cfg": False,
    },
    "classifier_free_guidance": {"training_dropout": 0.1, "inference_coef": 3.0},
    "attribute_dropout": {},
    "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
              "sum": [], "prepend": [], "cross": ["description"], "input_interpolate": []},
    "conditioners": {"description": {"model": "t5",
                                     "t5": {"name": "t5-base", "finetune": False,
                                            "word_dropout": 0.0, "normalize_text": False}}},
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "num_heads": 4, "num_layers": 2},
    "small-width": {"dim": 1024, "num_heads": 16, "num_layers": 2},
    # MusicGen-medium's width (audiocraft's scale "medium": 1536, 24 heads; 48 layers as
    # released), few layers unless a benchmark asks for more
    "medium-width": {"dim": 1536, "num_heads": 24, "num_layers": 2},
    # MusicGen-small as released (audiocraft's musicgen LM config at model scale "small":
    # 24 layers of width 1024, 16 heads, memory-efficient attention), random weights. The
    # name says so: "musicgen-small" alone would read as the pretrained model.
    "musicgen-small-random": {"dim": 1024, "num_heads": 16, "num_layers": 24,
                              "memory_efficient": True},
}
# The random text encoder (a key of ``noencore.models.text.RANDOM_T5``) and codec
# (``noencore.data.codec``) of a named config; the others use the tiny ones.
NAMED_PARTS: dict[str, tuple[str, str]] = {
    "musicgen-small-random": ("base-width", "musicgen-32khz"),
}


def named_parts(name: str) -> tuple[str, str]:
    return NAMED_PARTS.get(name, ("tiny", "tiny"))


def merge_config(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class MusicGenModel(nn.Module):
    """A MusicGen LM ready for unlearning.

    Attributes: ``lm`` (audiocraft ``LMModel``, the only trainable part), ``codec``
    (``noencore.data.codec.Codec`` or None), ``cfg`` (the audiocraft config, a dict),
    ``n_q``, ``card``, ``frame_rate``, ``sample_rate``, ``text_encoder`` (the T5 name or
    folder whose outputs the condition cache must hold), ``spec``, ``requests`` (the
    opt-out requests the weights have served, oldest first: ``noencore.models.requests``),
    ``hf`` (for a model loaded from the transformers format, its
    ``noencore.models.hf.HFOrigin``; else None) and ``format`` ("audiocraft" or "hf", what
    ``save_musicgen`` writes by default). ``frame_rate`` / ``sample_rate`` come from the
    codec, else from the arguments, else MusicGen's 50 frames/s at 32 kHz.
    """

    def __init__(self, lm: nn.Module, cfg: dict, codec: Any = None, spec: str = "",
                 requests: list[dict] | None = None, *, frame_rate: int | None = None,
                 sample_rate: int | None = None):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        self.__dict__["codec"] = codec  # not a submodule: never trained nor saved with the LM
        self.spec = spec
        self.hf: Any = None
        self.requests = list(requests or [])
        self.n_q = int(lm.num_codebooks)
        self.card = int(lm.card)
        self.frame_rate = int(codec.frame_rate if codec is not None else frame_rate or 50)
        self.sample_rate = int(codec.sample_rate if codec is not None else sample_rate or 32000)
        self.text_attribute, self.text_encoder = self.text_conditioner

    @property
    def format(self) -> str:
        return "hf" if self.hf is not None else "audiocraft"

    def use_codec(self, codec: Any) -> None:
        """Pair the LM with ``codec`` (a ``noencore.data.codec.Codec``), refusing one whose
        codebooks the LM does not model."""
        if (codec.n_q, codec.card) != (self.n_q, self.card):
            raise NoencoreError(f"codec {codec.spec!r} has {codec.n_q} codebooks of "
                                f"{codec.card}; model {self.spec!r} models {self.n_q} of "
                                f"{self.card}")
        self.__dict__["codec"] = codec
        self.frame_rate, self.sample_rate = int(codec.frame_rate), int(codec.sample_rate)

    @property
    def text_conditioner(self) -> tuple[str, str]:
        """(attribute name, T5 name) of the model's only text conditioner."""
        from audiocraft.modules.conditioners import T5Conditioner

        conds = self.lm.condition_provider.conditioners
        names = [(k, c.name) for k, c in conds.items() if isinstance(c, T5Conditioner)]
        if len(names) != 1 or len(conds) != 1:
            raise NoencoreError(
                f"model {self.spec!r}: expected one T5 text conditioner, found "
                f"{list(conds)}; melody/chroma conditioning is not supported by the engine")
        return names[0]

    def condition_tensors(self, embeds: torch.Tensor, mask: torch.Tensor
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Apply the trainable projection to cached T5 outputs.

        embeds: float [B, L, D_t5], mask: bool [B, L]  ->  {attribute: (cond [B, L, dim],
        mask long [B, L])}, as ``T5Conditioner.forward`` computes it after T5.
        """
        proj = self.lm.condition_provider.conditioners[self.text_attribute].output_proj
        m = mask.to(embeds.device).long()
        cond = proj(embeds.to(proj.weight)) * m.unsqueeze(-1)
        return {self.text_attribute: (cond, m)}

    def codebook_rows(self, batch: Any, conditions: tuple[torch.Tensor, torch.Tensor]
                      ) -> list[CodebookRows]:
        """Per-codebook rows of a ``Batch`` (codes long [B, K, T], mask bool [B, K, T]).

        ``conditions`` = cached T5 ``(embeds float [B, L, D_t5], mask bool [B, L])``.
        Only positions valid under the delay pattern *and* the batch mask are returned.
        """
        codes = batch.codes.to(self.device).long()
        mask = batch.mask.to(self.device) if getattr(batch, "mask", None) is not None else None
        return codebook_rows(self.lm, codes, mask, self.condition_tensors(*conditions))

    def activation_checkpointing(self, on: bool) -> None:
        """Recompute each transformer layer's activations in the backward pass instead of
        keeping them (audiocraft's per-layer ``checkpointing='torch'``, non-reentrant
        ``torch.utils.checkpoint``): activation memory of one layer instead of all, for
        about one more forward pass. A training-time switch; the saved config keeps the
        model's own setting."""
        self.lm.transformer.checkpointing = "torch" if on else \
            self.cfg["transformer_lm"].get("checkpointing", "none")

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def forward(self, *args, **kwargs):  # pragma: no cover - use codebook_rows
        raise NoencoreError("MusicGenModel is not called directly: use codebook_rows()")


def build_lm(cfg: dict) -> nn.Module:
    from omegaconf import OmegaConf

    with quiet_audiocraft():
        from audiocraft.models import builders

    t5 = cfg.get("conditioners", {}).get("description", {}).get("t5", {}).get("name")
    if t5 and os.path.isdir(t5):
        conf = json.loads((Path(t5) / "config.json").read_text())
        register_t5(t5, conf["d_model"])
    from noencore.hfhub import quiet_transformers

    with quiet_transformers():  # the T5 conditioner's loading bar and report
        return builders.get_lm_model(OmegaConf.create(cfg))
