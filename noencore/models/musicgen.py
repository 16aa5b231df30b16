"""Load and save MusicGen language models (audiocraft ``LMModel``) for unlearning.

``load_musicgen(spec)`` accepts:

- a hub id (``facebook/musicgen-small|medium|large``): the same ``state_dict.bin`` and
  ``compression_state_dict.bin`` audiocraft downloads, through the Hugging Face cache; a
  hub repo in the transformers format only (a fine-tuned ``MusicgenForConditionalGeneration``)
  is read as such;
- a local folder holding those two files (what ``save_musicgen`` writes);
- a local transformers MusicGen folder (``config.json`` + safetensors), converted to the
  equivalent audiocraft LM (``noencore.models.hf``);
- ``hf:SPEC`` or ``audiocraft:SPEC``: that format, for hub repos that hold both;
- a named config with fixed-seed random weights: ``"tiny"`` (tests, demo),
  ``"small-width"`` (MusicGen-small's width 1024 / 16 heads with few layers, benchmarks) or
  ``"musicgen-small-random"`` (MusicGen-small's LM with every real dimension, a T5-base-wide
  text encoder and the full-size 32 kHz EnCodec, for rehearsals at real shapes).

Whatever the format, the engine sees the same ``MusicGenModel``; ``save_musicgen`` writes
it back in the format it came in (or the one asked for).

Checkpoints are read with ``noencore.fileio.load_torch`` (the restricted unpickler, numpy's
plain types allowed): the audiocraft format holds only a config string and tensors, so
no pickled code is ever executed; a file that needs more is refused unless trusted.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from noencore.errors import NoencoreError
from noencore.fileio import load_torch
from noencore.models.lm import (
    BASE_CFG,
    NAMED_CONFIGS,
    MusicGenModel,
    build_lm,
    merge_config,
    named_parts,
)
from noencore.models.text import random_t5_folder

FORMATS = ("audiocraft", "hf")
HUB_IDS = ("facebook/musicgen-small", "facebook/musicgen-medium", "facebook/musicgen-large",
           "facebook/musicgen-melody")


def _load_codec(spec: str):
    from noencore.data.codec import load_codec

    return load_codec(spec)


def _named_cfg(name: str, overrides: dict | None) -> dict:
    cfg = merge_config(BASE_CFG, {"transformer_lm": NAMED_CONFIGS[name]})
    cfg["conditioners"]["description"]["t5"]["name"] = str(random_t5_folder(named_parts(name)[0]))
    return merge_config(cfg, overrides or {})


def _read_checkpoint(spec: str, filename: str) -> Path:
    local = Path(spec)
    if local.is_dir():
        path = local / filename
        if not path.exists():
            raise NoencoreError(f"{local}: no {filename}; a MusicGen folder holds state_dict.bin "
                                "and compression_state_dict.bin (as written by save_musicgen)")
        return path
    if local.is_file():
        return local
    if spec.count("/") != 1:
        raise NoencoreError(f"model {spec!r}: not a folder, a file, a hub id or one of "
                            f"{sorted(NAMED_CONFIGS)}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=spec, filename=filename,
                                    cache_dir=os.environ.get("AUDIOCRAFT_CACHE_DIR"),
                                    library_name="audiocraft"))
    except Exception as exc:
        raise NoencoreError(f"model {spec!r}: could not fetch {filename} ({exc}); check the hub "
                            "id, the network, or pass a local folder") from exc


def _read_lm_pkg(path: Path, *, mmap: bool = False, trust_pickle: bool = False) -> dict:
    """An audiocraft LM checkpoint (``state_dict.bin``), read without running code from it
    (``noencore.fileio.load_torch``): a dict with ``xp.cfg`` and ``best_state``."""
    pkg = load_torch(path, what="audiocraft LM checkpoint", mmap=mmap, trust_pickle=trust_pickle)
    if not isinstance(pkg, dict) or "xp.cfg" not in pkg or "best_state" not in pkg:
        raise NoencoreError(f"{path}: not an audiocraft LM checkpoint (no 'xp.cfg' and "
                            "'best_state'); pass a folder written by audiocraft or save_musicgen")
    return pkg


def model_format(spec: str) -> tuple[str, str]:
    """``(format, location)`` of a model spec: "audiocraft" or "hf", and the spec without
    a ``hf:`` / ``audiocraft:`` prefix. A local folder is told by its files, a hub repo by
    whether it holds audiocraft's ``state_dict.bin`` (else it is read as transformers)."""
    for fmt in FORMATS:
        if spec.startswith(fmt + ":"):
            return fmt, spec[len(fmt) + 1:]
    local = Path(spec)
    if spec in NAMED_CONFIGS or local.is_file():
        return "audiocraft", spec
    if local.is_dir():
        from noencore.hfhub import is_musicgen, read_config

        if (local / "state_dict.bin").is_file():
            return "audiocraft", spec
        if (local / "config.json").is_file():
            if is_musicgen(local):
                return "hf", spec
            raise NoencoreError(
                f"{local / 'config.json'}: model_type {read_config(local).get('model_type')!r} "
                "is not a transformers MusicGen ('musicgen'); pass a MusicGen folder")
        raise NoencoreError(f"{local}: neither an audiocraft MusicGen (no state_dict.bin) nor a "
                            "transformers MusicGen (no config.json); pass a folder written by "
                            "save_musicgen, audiocraft or transformers' save_pretrained")
    if spec.count("/") != 1:
        raise NoencoreError(f"model {spec!r}: not a folder, a file, a hub id or one of "
                            f"{sorted(NAMED_CONFIGS)}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id=spec, filename="state_dict.bin",
                        cache_dir=os.environ.get("AUDIOCRAFT_CACHE_DIR"),
                        library_name="audiocraft")
    except LocalEntryNotFoundError:  # offline or unreachable: say so when reading it
        return "audiocraft", spec
    except EntryNotFoundError:
        return "hf", spec
    except Exception:  # unknown repo, no access: reported by the loader with the hub's words
        return "audiocraft", spec
    return "audiocraft", spec


def text_encoder_name(spec: str) -> str:
    """The T5 name or folder a model's text conditioner uses, without building the model
    (reads the checkpoint's config through a memory map; for the transformers format, the
    local T5 folder extracted from the checkpoint)."""
    if spec in NAMED_CONFIGS:
        return str(random_t5_folder(named_parts(spec)[0]))
    fmt, spec = model_format(spec)
    if fmt == "hf":
        from noencore.models.hf import hf_text_encoder

        return hf_text_encoder(spec)
    path = _read_checkpoint(spec, "state_dict.bin")
    pkg = _read_lm_pkg(path, mmap=True)
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]), resolve=True)
    for cond in (cfg.get("conditioners") or {}).values():
        if isinstance(cond, dict) and cond.get("model") == "t5":
            return str(cond["t5"]["name"])
    raise NoencoreError(f"{path}: the model has no T5 text conditioner")


def load_musicgen(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  *, seed: int = 0, overrides: dict | None = None,
                  with_codec: bool = True, trust_pickle: bool = False) -> MusicGenModel:
    """Load a MusicGen LM (and its codec) from a hub id, a local folder (audiocraft or
    transformers format) or a named config.

    Files are read without running code from them (``noencore.fileio.load_torch``); a
    codec checkpoint that needs the full unpickler is refused unless ``trust_pickle``.

    ``overrides`` (named configs only) is merged into the audiocraft config, e.g.
    ``{"transformer_lm": {"num_layers": 4}}``. ``dtype`` casts the LM (default float32).
    A folder's ``requests.json`` (the opt-outs it has served) becomes ``model.requests``.
    """
    from noencore.models.requests import read_requests

    if trust_pickle:
        from noencore.fileio import trusting

        with trusting():
            return load_musicgen(spec, device, dtype, seed=seed, overrides=overrides,
                                 with_codec=with_codec)
    fmt, location = model_format(spec)
    if fmt == "hf":
        if overrides:
            raise NoencoreError("overrides apply to named configs only, not to checkpoints")
        from noencore.models.hf import load_hf

        model = load_hf(location, device, dtype, with_codec=with_codec, spec=spec)
        if Path(location).is_dir():
            model.requests = read_requests(location)
        return model
    spec = location
    requests: list[dict] = []
    if spec in NAMED_CONFIGS:
        cfg = _named_cfg(spec, overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = build_lm(cfg)
        codec = _load_codec(named_parts(spec)[1]) if with_codec else None
    else:
        if overrides:
            raise NoencoreError("overrides apply to named configs only, not to checkpoints")
        path = _read_checkpoint(spec, "state_dict.bin")
        pkg = _read_lm_pkg(path, trust_pickle=trust_pickle)
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]), resolve=True)
        cfg["device"], cfg["dtype"] = "cpu", "float32"
        if Path(spec).exists():  # a local folder or file: its folder's history
            requests = read_requests(path.parent)
        lm = build_lm(cfg)
        lm.load_state_dict(pkg["best_state"])
        codec = None
        if with_codec:
            codec = _load_codec(str(Path(spec)) if Path(spec).exists() else spec)
    lm = lm.to(device=device, dtype=dtype or torch.float32)
    lm.eval()
    return MusicGenModel(lm, cfg, codec=codec, spec=spec, requests=requests)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_musicgen(model: MusicGenModel, folder: str | os.PathLike,
                  state_dict: dict[str, torch.Tensor] | None = None, *,
                  format: str | None = None) -> Path:
    """Write the model to ``folder`` in ``format`` ("audiocraft" or "hf"; default: the
    format it was loaded from, ``model.format``).

    audiocraft, so that ``audiocraft.models.MusicGen.get_pretrained(folder)`` loads it:
    ``state_dict.bin`` ({'xp.cfg': yaml, 'best_state': LM state dict}),
    ``compression_state_dict.bin`` (the codec, audiocraft's format; a transformers EnCodec
    is saved as ``folder/encodec`` and named there) and ``model.safetensors`` (the same LM
    weights, loadable without pickle). Weights are saved in float32, as audiocraft's own
    checkpoints. A local T5 folder named in the config must be registered
    (``noencore.models.text.register_t5``) before audiocraft builds the model; hub T5
    names need nothing.

    hf: a folder ``transformers.MusicgenForConditionalGeneration.from_pretrained`` loads
    (``noencore.models.hf.save_hf``).

    Both write ``requests.json`` (``model.requests``, the opt-outs served).
    ``state_dict`` overrides the LM's own (e.g. gathered from DeepSpeed ZeRO-3 partitions).
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from noencore.models.requests import write_requests

    format = format or model.format
    if format not in FORMATS:
        raise NoencoreError(f"save format must be one of {FORMATS}, got {format!r}")
    if format == "hf":
        from noencore.models.hf import save_hf

        out = save_hf(model, folder, state_dict)
        write_requests(out, getattr(model, "requests", []))
        return out
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.lm.state_dict()
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    _atomic_torch_save({"xp.cfg": OmegaConf.to_yaml(OmegaConf.create(model.cfg)),
                        "best_state": sd, "version": "noencore"}, folder / "state_dict.bin")
    if model.hf is not None or (model.codec is not None and model.codec.transformers_model is not None):
        from noencore.models.hf import save_hf_codec_beside

        _atomic_torch_save(save_hf_codec_beside(model, folder),
                           folder / "compression_state_dict.bin")
    elif model.codec is not None:
        tmp_dir = Path(tempfile.mkdtemp(dir=folder, prefix=".codec."))
        try:
            model.codec.save_audiocraft(tmp_dir / "compression_state_dict.bin")
            os.replace(tmp_dir / "compression_state_dict.bin", folder / "compression_state_dict.bin")
        finally:
            import shutil

            shutil.rmtree(tmp_dir, ignore_errors=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.safetensors.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt", "spec": model.spec})
        os.replace(tmp, folder / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_requests(folder, getattr(model, "requests", []))
    return folder
