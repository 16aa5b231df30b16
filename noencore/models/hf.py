"""MusicGen in the Hugging Face transformers format, in and out of the engine.

A transformers ``MusicgenForConditionalGeneration`` is converted, weight for weight, to
the audiocraft ``LMModel`` the engine drives, so that nothing above the model stage
learns which format it got; ``save_hf`` converts back. The two libraries compute the
same function up to one convention (checked by ``tests/test_models_hf.py``):

- the same decoder: one embedding table per codebook (card + 1 rows, row ``card`` the
  special token), sinusoidal positions from 0 ([cos, sin], period 10000, unscaled:
  transformers' ``embed_scale`` is never applied), pre-norm layers (self-attention,
  cross-attention, feed-forward; no biases), a final LayerNorm, K bias-free heads; the
  text projection (``enc_to_dec_proj``) is audiocraft's ``output_proj``, and both zero
  the projected padding positions;
- the same delay pattern: transformers' ``decoder_start_token_id`` and ``pad_token_id``
  must be the special token ``card``, as audiocraft's pattern fills with it; a
  transformers training sequence is audiocraft's pattern sequence without its last step;
- one difference no weight can absorb: transformers masks padded caption positions in
  cross-attention, audiocraft attends to them (as zero vectors, logit 0). A converted
  model keeps transformers' convention (``mask_text_padding``), so that the engine
  unlearns the function the user's transformers stack runs. For captions without
  padding (one caption, or equal lengths) both libraries agree; an audiocraft checkpoint
  converted from transformers attends to padding again, as audiocraft does.

Dropout of a transformers config is not applied while unlearning (audiocraft trains
MusicGen without dropout; reference NLLs and the stop rule assume a deterministic
forward); the saved config keeps the original values.

The T5 inside the checkpoint becomes a local T5 folder in the noencore cache, named by a
hash of its weights, config and tokenizer (``text_encoder_folder``): the condition cache
is built from it and fingerprinted as any local encoder, so a cache from another encoder
is refused, and the unlearned model (same T5) finds the same folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noencore.errors import NoencoreError
from noencore.hfhub import (
    MUSICGEN_TYPE,
    is_musicgen,
    load_part,
    quiet_transformers,
    read_config,
    read_json,
    snapshot,
)
from noencore.thirdparty import quiet_audiocraft

with quiet_audiocraft():
    from audiocraft.modules.conditioners import ConditionFuser
    from audiocraft.modules.transformer import StreamingMultiheadAttention

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "added_tokens.json")
# transformers' activation names whose function audiocraft computes identically, under
# the same name
ACTIVATIONS = ("gelu", "relu")
_DEC = "decoder.model.decoder."


@dataclass
class HFOrigin:
    """Where an HF-format model came from: its folder (a hub snapshot or the user's) and
    its ``config.json``, written back unchanged by ``save_hf``."""

    folder: Path
    config: dict[str, Any]


def resolve(spec: str) -> Path:
    """The local folder of an HF-format MusicGen: ``spec`` itself, or a hub snapshot."""
    local = Path(spec)
    if local.exists():
        if not is_musicgen(local):
            raise NoencoreError(f"{local}: no transformers MusicGen here (config.json missing "
                                f"or its model_type is not {MUSICGEN_TYPE!r})")
        return local
    folder = snapshot(spec)
    if not is_musicgen(folder):
        raise NoencoreError(f"model {spec!r}: the hub repo is not a transformers MusicGen")
    return folder


def check_config(config: dict[str, Any], where: Path) -> None:
    """Refuse what the engine cannot represent exactly, naming the file and the value."""
    path = where / "config.json"
    dec, audio, text = config.get("decoder") or {}, config.get("audio_encoder") or {}, \
        config.get("text_encoder") or {}
    card, n_q = int(dec.get("vocab_size", 2048)), int(dec.get("num_codebooks", 4))
    problems = []
    # The start and pad tokens may be set in the decoder config, the composite config or
    # generation_config.json (transformers' own conversions set them only there); every
    # one that is set must be the special token audiocraft's pattern starts and fills with.
    gen = where / "generation_config.json"
    generation = read_json(gen) if gen.is_file() else {}
    for key in ("decoder_start_token_id", "pad_token_id"):
        for name, value in ((f"decoder.{key}", dec.get(key)), (key, config.get(key)),
                            (f"{gen.name}: {key}", generation.get(key))):
            if value is not None and value != card:
                problems.append(f"{name} is {value}, not the special token {card} "
                                "(= decoder.vocab_size) that MusicGen's delay pattern fills "
                                f"with; set it to {card}")
    if int(dec.get("audio_channels", 1)) != 1:
        problems.append(f"decoder.audio_channels is {dec.get('audio_channels')}: stereo "
                        "MusicGen is not supported (the engine's shards are mono)")
    if dec.get("activation_function", "gelu") not in ACTIVATIONS:
        problems.append(f"decoder.activation_function {dec.get('activation_function')!r} is "
                        f"not one of {ACTIVATIONS}")
    if dec.get("cross_attention_hidden_size") is not None or \
            text.get("d_model", text.get("hidden_size")) == dec.get("hidden_size"):
        problems.append("the text encoder feeds the decoder without enc_to_dec_proj "
                        "(cross_attention_hidden_size set, or equal widths); the engine "
                        "needs the projection (audiocraft's output_proj)")
    ffn, dim = int(dec.get("ffn_dim", 4096)), int(dec.get("hidden_size", 1024))
    if int(ffn / dim * dim) != ffn:
        problems.append(f"decoder.ffn_dim {ffn} is not a multiple audiocraft can express of "
                        f"hidden_size {dim}")
    if audio.get("codebook_size", card) != card:
        problems.append(f"decoder.vocab_size {card} differs from the EnCodec's codebook_size "
                        f"{audio.get('codebook_size')}")
    codec_n_q = _encodec_codebooks(audio)
    if codec_n_q is not None and codec_n_q != n_q:
        problems.append(f"decoder.num_codebooks {n_q} differs from the EnCodec's "
                        f"{codec_n_q} codebooks (at its largest target bandwidth)")
    if problems:
        raise NoencoreError(f"{path}: " + "; ".join(problems))


def _encodec_codebooks(audio: dict[str, Any]) -> int | None:
    """The codebook count transformers' EnCodec uses at its largest bandwidth (as
    audiocraft's ``HFEncodecCompressionModel`` picks it), or None if the config lacks it."""
    import math

    from transformers import EncodecConfig

    try:
        cfg = EncodecConfig.from_dict(audio)
    except (TypeError, ValueError):
        return None
    bits = math.log2(cfg.codebook_size)
    return int(round(max(cfg.target_bandwidths) * 1000 / (cfg.frame_rate * bits)))


def weight_map(n_layers: int, n_q: int, attribute: str = "description"
               ) -> list[tuple[str, tuple[str, ...]]]:
    """(audiocraft ``LMModel`` key, the transformers keys it is made of), for every weight.

    audiocraft keys are written without the ``.mha`` of its ``torch.nn.MultiheadAttention``
    (``custom=False``) attention, as audiocraft's own loader accepts them. A key with three
    transformers names is audiocraft's fused input projection, rows ``[q; k; v]``.
    """
    out: list[tuple[str, tuple[str, ...]]] = []
    for k in range(n_q):
        out.append((f"emb.{k}.weight", (f"{_DEC}embed_tokens.{k}.weight",)))
        out.append((f"linears.{k}.weight", (f"decoder.lm_heads.{k}.weight",)))
    for i in range(n_layers):
        ours, theirs = f"transformer.layers.{i}.", f"{_DEC}layers.{i}."
        for a, h in (("self_attn", "self_attn"), ("cross_attention", "encoder_attn")):
            out.append((f"{ours}{a}.in_proj_weight",
                        tuple(f"{theirs}{h}.{x}_proj.weight" for x in "qkv")))
            out.append((f"{ours}{a}.out_proj.weight", (f"{theirs}{h}.out_proj.weight",)))
        for a, h in (("norm1", "self_attn_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"),
                     ("norm2", "final_layer_norm")):
            out += [(f"{ours}{a}.{p}", (f"{theirs}{h}.{p}",)) for p in ("weight", "bias")]
        out.append((f"{ours}linear1.weight", (f"{theirs}fc1.weight",)))
        out.append((f"{ours}linear2.weight", (f"{theirs}fc2.weight",)))
    for p in ("weight", "bias"):
        out.append((f"out_norm.{p}", (f"{_DEC}layer_norm.{p}",)))
        out.append((f"condition_provider.conditioners.{attribute}.output_proj.{p}",
                    (f"enc_to_dec_proj.{p}",)))
    return out


def plain_key(key: str) -> str:
    """An audiocraft LM key without the ``.mha`` level of non-custom attention."""
    return key.replace(".mha.", ".")


def lm_state_from_hf(hf_state: dict[str, torch.Tensor], n_layers: int, n_q: int,
                     attribute: str = "description") -> dict[str, torch.Tensor]:
    """audiocraft LM state dict from a transformers MusicGen state dict (exact copies;
    q, k, v stacked into audiocraft's fused projection)."""
    out = {}
    for ours, theirs in weight_map(n_layers, n_q, attribute):
        missing = [k for k in theirs if k not in hf_state]
        if missing:
            raise NoencoreError(f"transformers MusicGen state has no {missing[0]!r}")
        out[ours] = torch.cat([hf_state[k] for k in theirs]) if len(theirs) > 1 \
            else hf_state[theirs[0]]
    return out


def hf_state_from_lm(lm_state: dict[str, torch.Tensor], n_layers: int, n_q: int,
                     attribute: str = "description") -> dict[str, torch.Tensor]:
    """transformers MusicGen decoder + ``enc_to_dec_proj`` state from an audiocraft LM
    state dict (the inverse of ``lm_state_from_hf``)."""
    state = {plain_key(k): v for k, v in lm_state.items()}
    out = {}
    for ours, theirs in weight_map(n_layers, n_q, attribute):
        out.update(zip(theirs, state[ours].chunk(len(theirs))))
    return out


def text_encoder_folder(t5: nn.Module, tokenizer_dir: Path,
                        root: str | os.PathLike | None = None) -> Path:
    """A local T5 folder (config, weights, tokenizer) holding ``t5``, in the noencore cache
    (``root``, default ``$NOENCORE_CACHE`` or ``~/.cache/noencore``).

    Named by a sha256 of the weights, the config (without version fields) and the
    tokenizer files copied from ``tokenizer_dir``, so the same encoder always gets the
    same folder and fingerprint. Written in a temporary sibling and renamed.
    """
    config = {k: v for k, v in t5.config.to_dict().items()
              if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(t5.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    files = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not files:
        raise NoencoreError(
            f"{tokenizer_dir}: no T5 tokenizer files ({', '.join(TOKENIZER_FILES[:1])} or "
            "spiece.model); the captions cannot be encoded without them: save the base "
            "model's processor into this folder (AutoProcessor.from_pretrained(BASE)"
            ".save_pretrained(FOLDER))")
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    base = Path(root or os.environ.get("NOENCORE_CACHE") or Path.home() / ".cache" / "noencore")
    folder = base / "hf-text-encoders" / h.hexdigest()[:32]
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with quiet_transformers():
            t5.save_pretrained(tmp)
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process's identical copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def hf_text_encoder(spec: str) -> str:
    """The local T5 folder of an HF-format MusicGen, without building its LM."""
    from transformers import T5EncoderModel

    folder = resolve(spec)
    return str(text_encoder_folder(load_part(T5EncoderModel, folder, "text_encoder"), folder))


def _lm_config(config: dict[str, Any], t5_folder: Path, guidance: float) -> dict[str, Any]:
    """The audiocraft config of the LM equivalent to a transformers MusicGen config."""
    from noencore.models.lm import BASE_CFG, merge_config

    dec = config["decoder"]
    dim = int(dec["hidden_size"])
    cfg = merge_config(BASE_CFG, {
        "transformer_lm": {
            "n_q": int(dec["num_codebooks"]), "card": int(dec["vocab_size"]), "dim": dim,
            "num_heads": int(dec["num_attention_heads"]),
            "num_layers": int(dec["num_hidden_layers"]),
            "hidden_scale": int(dec["ffn_dim"]) / dim,
            "activation": dec.get("activation_function", "gelu")},
        "codebooks_pattern": {"delay": {"delays": list(range(int(dec["num_codebooks"])))}},
        "classifier_free_guidance": {"inference_coef": guidance},
    })
    cfg["conditioners"]["description"]["t5"]["name"] = str(t5_folder)
    return cfg


def load_hf(location: str, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, *, with_codec: bool = True,
            spec: str | None = None) -> Any:
    """An HF-format MusicGen (hub id or folder ``location``) as a ``MusicGenModel`` whose
    ``lm`` is the equivalent audiocraft LM (float32 unless ``dtype``) and ``hf`` its
    ``HFOrigin``; ``spec`` (default ``location``) is what the model says it was loaded
    from."""
    spec = spec or location
    from transformers import MusicgenForConditionalGeneration

    from noencore.data.codec import hf_codec
    from noencore.models.lm import MusicGenModel, build_lm

    folder = resolve(location)
    config = read_config(folder)
    check_config(config, folder)
    try:
        with quiet_transformers():
            hf = MusicgenForConditionalGeneration.from_pretrained(str(folder),
                                                                  dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise NoencoreError(f"{folder}: transformers cannot load this MusicGen ({exc}); "
                            "it needs config.json and safetensors weights") from exc
    t5_folder = text_encoder_folder(hf.text_encoder, folder)
    guidance = hf.generation_config.guidance_scale or 3.0
    cfg = _lm_config(config, t5_folder, float(guidance))
    with quiet_audiocraft(), quiet_transformers():
        lm = build_lm(cfg)
    n_layers, n_q = cfg["transformer_lm"]["num_layers"], cfg["transformer_lm"]["n_q"]
    lm.load_state_dict(lm_state_from_hf(hf.state_dict(), n_layers, n_q))
    mask_text_padding(lm)
    codec = hf_codec(hf.audio_encoder, spec, device) if with_codec else None
    audio = hf.audio_encoder.config
    del hf
    lm = lm.to(device=device, dtype=dtype or torch.float32).eval()
    model = MusicGenModel(lm, cfg, codec=codec, spec=spec, frame_rate=audio.frame_rate,
                          sample_rate=audio.sampling_rate)
    model.hf = HFOrigin(folder=folder, config=config)
    return model


def hf_config(model: Any) -> Any:
    """The ``MusicgenConfig`` of ``model``: its own for an HF-format model; built from the
    audiocraft config otherwise, after checking that transformers computes the same
    function (every setting that differs is named)."""
    from transformers import MusicgenConfig, MusicgenDecoderConfig

    if model.hf is not None:
        return MusicgenConfig.from_dict(model.hf.config)
    cfg, lm = model.cfg, model.lm
    t = cfg["transformer_lm"]
    pattern = cfg.get("codebooks_pattern") or {}
    delay = pattern.get("delay") or {}
    fuser = cfg.get("fuser") or {}
    want = {
        "codebooks_pattern.modeling": (pattern.get("modeling"), "delay"),
        "codebooks_pattern.delay.delays": (list(delay.get("delays") or []),
                                           list(range(model.n_q))),
        "codebooks_pattern.delay.flatten_first": (delay.get("flatten_first", 0), 0),
        "codebooks_pattern.delay.empty_initial": (delay.get("empty_initial", 0), 0),
        "transformer_lm.norm_first": (t.get("norm_first"), True),
        "transformer_lm.norm": (t.get("norm", "layer_norm"), "layer_norm"),
        "transformer_lm.bias_ff": (t.get("bias_ff"), False),
        "transformer_lm.bias_attn": (t.get("bias_attn"), False),
        "transformer_lm.bias_proj": (t.get("bias_proj"), False),
        "transformer_lm.layer_scale": (t.get("layer_scale"), None),
        "transformer_lm.positional_embedding": (t.get("positional_embedding", "sin"), "sin"),
        "transformer_lm.positional_scale": (t.get("positional_scale", 1.0), 1.0),
        "transformer_lm.max_period": (t.get("max_period", 10_000), 10_000),
        "transformer_lm.past_context": (t.get("past_context"), None),
        "transformer_lm.qk_layer_norm": (t.get("qk_layer_norm", False), False),
        "transformer_lm.qk_layer_norm_cross": (t.get("qk_layer_norm_cross", False), False),
        "transformer_lm.kv_repeat": (t.get("kv_repeat", 1), 1),
        "fuser.cross": (list(fuser.get("cross") or []), [model.text_attribute]),
        "fuser.prepend + sum + input_interpolate": (
            [*(fuser.get("prepend") or []), *(fuser.get("sum") or []),
             *(fuser.get("input_interpolate") or [])], []),
        "fuser.cross_attention_pos_emb": (bool(fuser.get("cross_attention_pos_emb")), False),
    }
    bad = [f"{k} is {got!r} (transformers: {need!r})" for k, (got, need) in want.items()
           if got != need]
    act = t.get("activation", "gelu")
    if act not in ACTIVATIONS:
        bad.append(f"transformer_lm.activation is {act!r} (transformers: one of "
                   f"{ACTIVATIONS})")
    if bad:
        raise NoencoreError(f"model {model.spec!r} has no transformers equivalent: "
                            + "; ".join(bad))
    encodec = _hf_encodec(model)
    cond = lm.condition_provider.conditioners[model.text_attribute]
    dim = int(lm.dim)
    decoder = MusicgenDecoderConfig(
        vocab_size=model.card, num_codebooks=model.n_q, hidden_size=dim,
        num_hidden_layers=len(lm.transformer.layers),
        num_attention_heads=int(t["num_heads"]),
        ffn_dim=int(lm.transformer.layers[0].linear1.out_features),
        activation_function=act, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=model.card, bos_token_id=model.card, decoder_start_token_id=model.card)
    return MusicgenConfig(text_encoder=cond.t5.config, audio_encoder=encodec.config,
                          decoder=decoder)


def _hf_encodec(model: Any) -> nn.Module:
    """The transformers ``EncodecModel`` of ``model``'s codec (loaded from the model's own
    checkpoint when it was loaded without one)."""
    from transformers import EncodecModel

    if model.codec is None and model.hf is not None:
        return load_part(EncodecModel, model.hf.folder, "audio_encoder")
    inner = model.codec.transformers_model if model.codec is not None else None
    if not isinstance(inner, EncodecModel):
        raise NoencoreError(
            f"model {model.spec!r}: its codec ({getattr(model.codec, 'spec', None)!r}) is not a "
            "transformers EncodecModel, which transformers' MusicGen needs; give one with the "
            "same codebooks (e.g. `noencore convert ... --codec facebook/encodec_32khz` or a "
            "local EnCodec folder)")
    return inner


def save_hf(model: Any, folder: str | os.PathLike,
            state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder`` so that ``MusicgenForConditionalGeneration.from_pretrained(folder)``
    loads it: config.json, generation_config.json, model.safetensors (float32), the T5
    tokenizer and the feature extractor. The decoder comes from ``model.lm`` (or
    ``state_dict``), the T5 from its text conditioner, the EnCodec from its codec; an
    HF-format model keeps its own config, generation config and feature extractor. Every
    file is written under a temporary name and renamed into place."""
    from transformers import (
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenForCausalLM,
        MusicgenForConditionalGeneration,
    )
    from transformers.initialization import no_init_weights

    config = hf_config(model)
    cond = model.lm.condition_provider.conditioners[model.text_attribute]
    encodec = _hf_encodec(model)
    sd = state_dict if state_dict is not None else model.lm.state_dict()
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}
    n_layers = len(model.lm.transformer.layers)
    state = hf_state_from_lm(sd, n_layers, model.n_q, model.text_attribute)
    # no initialisation: the composite would re-initialise the parts it is handed (the
    # EnCodec's biases, for one), and the decoder and projection are overwritten below
    with quiet_transformers(), no_init_weights():
        decoder = MusicgenForCausalLM(config.decoder)
        hf = MusicgenForConditionalGeneration(config=config, text_encoder=cond.t5,
                                              audio_encoder=encodec, decoder=decoder)
    dec_sd = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    hf.decoder.load_state_dict(dec_sd)
    hf.enc_to_dec_proj.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in state.items()
                                        if k.startswith("enc_to_dec_proj.")})
    hf = hf.float()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".hf."))
    try:
        with quiet_transformers():
            hf.save_pretrained(tmp)
            # the tokenizer's own files when the T5 is a local folder (re-serialising them
            # would change the bytes, hence the T5 folder's hash and the cache fingerprint)
            local = [Path(model.text_encoder) / f for f in TOKENIZER_FILES
                     if (Path(model.text_encoder) / f).is_file()]
            for f in local:
                shutil.copyfile(f, tmp / f.name)
            if not local:
                cond.t5_tokenizer.save_pretrained(tmp)
            source = model.hf.folder if model.hf is not None else None
            for name in ("generation_config.json", "preprocessor_config.json"):
                if source is not None and (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            if not (tmp / "preprocessor_config.json").is_file():
                EncodecFeatureExtractor(feature_size=1, sampling_rate=model.sample_rate
                                        ).save_pretrained(tmp)
            if source is None:
                # audiocraft's sampling defaults: top-k 250, guidance = its cfg_coef
                GenerationConfig(decoder_start_token_id=model.card, pad_token_id=model.card,
                                 bos_token_id=model.card, do_sample=True, top_k=250,
                                 guidance_scale=float(model.lm.cfg_coef),
                                 max_length=30 * model.frame_rate).save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_hf_codec_beside(model: Any, folder: Path) -> dict[str, str]:
    """For an audiocraft checkpoint of a model whose codec is a transformers EnCodec: the
    EnCodec saved as ``folder/encodec`` and the ``compression_state_dict.bin`` content that
    names it (audiocraft's MusicGen checkpoints name their codec the same way; a relative
    name is read beside the checkpoint by ``noencore.data.codec``)."""
    target = folder / "encodec"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".encodec."))
    try:
        with quiet_transformers():
            _hf_encodec(model).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"pretrained": "encodec", "version": "noencore"}


class TextMaskingFuser(ConditionFuser):
    """audiocraft's fuser whose cross-attention input is ``(memory [B, L, D], mask bool or
    long [B, L])``: the text mask travels with the text (see ``mask_text_padding``)."""

    def forward(self, input: torch.Tensor, conditions: dict) -> tuple[torch.Tensor, Any]:
        out, cross = super().forward(input, conditions)
        if cross is None:
            return out, cross
        masks = [mask for name, (_, mask) in conditions.items() if self.cond2fuse[name] == "cross"]
        return out, (cross, torch.cat(masks, dim=1))


class MaskedCrossAttention(StreamingMultiheadAttention):
    """audiocraft's cross-attention that, given ``(memory, mask)``, ignores padded
    positions, as transformers does. A row with no text at all (an empty caption, the
    unconditional half of guidance) attends to its all-zero memory, which gives 0, as
    transformers' finite mask bias does."""

    def forward(self, query: torch.Tensor, key: Any, value: Any, **kwargs: Any) -> Any:
        if not isinstance(key, tuple):
            return super().forward(query, key, value, **kwargs)
        memory, mask = key
        keep = mask.bool()
        keep = keep | ~keep.any(dim=1, keepdim=True)
        return super().forward(query, memory, memory, key_padding_mask=~keep, **kwargs)


def mask_text_padding(lm: nn.Module) -> None:
    """Give ``lm`` transformers' cross-attention convention (padded caption positions are
    masked), in place.

    The fuser passes the text mask with the text to every layer (through the layer call,
    so activation checkpointing recomputes with it) and each cross-attention turns it into
    ``torch.nn.MultiheadAttention``'s key padding mask. The modules change class to a
    subclass that adds only that forward (as ``torch.nn.utils.parametrize`` does), so
    weights, state dict keys and audiocraft's generation are untouched.
    """
    if type(lm.fuser) is ConditionFuser:
        lm.fuser.__class__ = TextMaskingFuser
    for layer in lm.transformer.layers:
        attn = layer.cross_attention
        if attn.custom:  # audiocraft's own attention path takes no key padding mask
            raise NoencoreError("masking text padding needs audiocraft's custom=False "
                                "cross-attention (torch.nn.MultiheadAttention)")
        if type(attn) is StreamingMultiheadAttention:
            attn.__class__ = MaskedCrossAttention
