"""Hugging Face transformers checkpoints: finding them and reading one part of them.

A transformers MusicGen (``MusicgenForConditionalGeneration``) is one composite model
saved as ``config.json`` + safetensors: a T5 text encoder (``text_encoder.*``), an
EnCodec (``audio_encoder.*``), the decoder LM (``decoder.*``) and the text projection
(``enc_to_dec_proj.*``). The data stage needs only its EnCodec and the condition cache
only its T5, so they are read here, as transformers itself reads them (any key renames
of older checkpoints, sharded files), without building the rest. Shared by
``noencore.data.codec`` and ``noencore.models.hf``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError

MUSICGEN_TYPE = "musicgen"
# What a MusicGen repo needs besides its weights: the configs, the T5 tokenizer, the
# feature extractor. Pickled weights (pytorch_model.bin) are never fetched.
SNAPSHOT_FILES = ["*.json", "*.safetensors", "spiece.model", "*.txt"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading report (one line per checkpoint key a part does not
    use: the other parts' keys), its progress bars and its notes on MusicGen's special
    token ids, which sit one past the codebook on purpose; errors still raise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def snapshot(repo_id: str) -> Path:
    """The local folder of hub repo ``repo_id`` (downloaded into the Hugging Face cache, or
    found there when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=SNAPSHOT_FILES))
    except Exception as exc:  # offline, unknown repo, no access: one clear line
        raise NoencoreError(
            f"model {repo_id!r}: cannot fetch it from the Hugging Face hub "
            f"({type(exc).__name__}); download it where the hub is reachable and pass its "
            "local folder") from exc


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A transformers JSON file (config, generation config) as a dict; an error naming the
    file if it is not readable JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NoencoreError(f"{path}: not a readable transformers config ({exc})") from exc


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` as a dict."""
    return read_json(Path(folder) / "config.json")


def is_musicgen(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a transformers MusicGen (its config.json says so)."""
    path = Path(folder) / "config.json"
    return path.is_file() and read_config(folder).get("model_type") == MUSICGEN_TYPE


def load_part(cls: Any, folder: str | os.PathLike, part: str) -> Any:
    """Part ``part`` ("text_encoder", "audio_encoder" or "decoder") of the MusicGen saved in
    ``folder``, as a ``cls`` (e.g. ``T5EncoderModel``) in float32, eval mode.

    transformers' own loader reads the checkpoint with the part's prefix stripped
    (``key_mapping``), so sharded files and renamed keys load as in
    ``MusicgenForConditionalGeneration.from_pretrained``; the other parts' keys are skipped.
    The weights are then moved into a model built from the config, since a model loaded
    with a key mapping would put the prefix back when saved.
    """
    import torch
    from transformers import MusicgenConfig
    from transformers.initialization import no_init_weights

    with quiet_transformers():
        config = getattr(MusicgenConfig.from_pretrained(str(folder)), part)
        loaded = cls.from_pretrained(str(folder), config=config, dtype=torch.float32,
                                     key_mapping={rf"^{part}\.": ""})
        with no_init_weights():  # every weight is overwritten just below
            model = cls(loaded.config)
    model.load_state_dict(loaded.state_dict())
    return model.float().eval()
