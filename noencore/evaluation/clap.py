"""CLAP (laion-clap) text and audio embeddings, loaded from local files only.

The text-to-music metrics use the music CLAP checkpoint audiocraft evaluates with
(``music_audioset_epoch_15_esc_90.14.pt``, audio tower HTSAT-base, text tower
RoBERTa-base). laion_clap's own ``CLAP_Module`` downloads roberta-base weights and
tokenizer from the hub when built; here the text tower is built from a config
*inferred from the checkpoint's own tensors* (the checkpoint holds every text-tower
weight, so the hub weights would be overwritten anyway) and the tokenizer comes from
a local folder or the Hugging Face cache. Nothing is downloaded.

For tests and demos, :func:`build_random_clap` writes a small random-weight CLAP
(HTSAT-tiny audio tower, a one-layer RoBERTa, a byte-level tokenizer) in the same
file format; it is marked as random, and :attr:`Clap.random_weights` says so, so that
reports can warn that its numbers mean nothing.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noencore.errors import NoencoreError, UntrustedFileError
from noencore.fileio import load_torch

#: CLAP works on 48 kHz audio, 10 s windows (laion_clap's ``max_len``).
CLAP_SAMPLE_RATE = 48000
CLAP_MAX_SAMPLES = 480000
#: laion_clap's text projection expects 768-wide RoBERTa pooler outputs.
_TEXT_WIDTH = 768
#: key written into random-weight checkpoints by build_random_clap.
RANDOM_MARKER = "noencore_random_weights"


def _read_checkpoint(path: Path, trust_pickle: bool = False
                     ) -> tuple[dict[str, torch.Tensor], bool]:
    if not path.is_file():
        raise NoencoreError(
            f"CLAP checkpoint {path} not found: give the path of a local laion-clap checkpoint "
            "(e.g. music_audioset_epoch_15_esc_90.14.pt, HTSAT-base)")
    try:
        # laion-clap checkpoints hold tensors, step counters and optimizer state (numpy
        # scalars among them): read without running code from the file
        ckpt = load_torch(path, what="CLAP checkpoint", trust_pickle=trust_pickle)
    except UntrustedFileError:
        raise
    except Exception as exc:
        raise NoencoreError(f"CLAP checkpoint {path} cannot be read ({exc}); "
                            "re-download or rebuild it") from exc
    random = bool(isinstance(ckpt, dict) and ckpt.get(RANDOM_MARKER, False))
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise NoencoreError(f"CLAP checkpoint {path} holds no state dict")
    # trained with DistributedDataParallel: names start with "module."
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    return sd, random


def _text_config(sd: dict[str, torch.Tensor], path: Path) -> Any:
    """A RobertaConfig matching the text-tower tensors in a CLAP state dict."""
    from transformers import RobertaConfig

    try:
        vocab, width = sd["text_branch.embeddings.word_embeddings.weight"].shape
        positions = sd["text_branch.embeddings.position_embeddings.weight"].shape[0]
        types = sd["text_branch.embeddings.token_type_embeddings.weight"].shape[0]
        inter = sd["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise NoencoreError(f"CLAP checkpoint {path} has no RoBERTa text tower ({exc} missing); "
                            "noencore supports laion-clap checkpoints with tmodel 'roberta'") from exc
    layers = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(r"text_branch\.encoder\.layer\.(\d+)\.", k)))
    if width != _TEXT_WIDTH:
        raise NoencoreError(f"CLAP checkpoint {path}: text width {width}, laion_clap needs {_TEXT_WIDTH}")
    return RobertaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=12, intermediate_size=inter,
                         max_position_embeddings=positions, type_vocab_size=types,
                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


@contextmanager
def _text_tower_from(config: Any):
    """laion_clap builds its text tower with RobertaModel.from_pretrained('roberta-base');
    within this block that call builds an untrained RobertaModel from ``config`` instead
    (the checkpoint then fills in every weight)."""
    import transformers

    clap_model = __import__("clap_module.model", fromlist=["RobertaModel"])

    class _FromConfig:
        @staticmethod
        def from_pretrained(*_args: Any, **_kwargs: Any) -> Any:
            return transformers.RobertaModel(config)

    saved = clap_model.RobertaModel
    clap_model.RobertaModel = _FromConfig
    try:
        yield
    finally:
        clap_model.RobertaModel = saved


@dataclass
class Clap:
    """A loaded CLAP model: L2-normalised text and audio embeddings, float32 numpy.

    Attributes:
        model: laion_clap's ``CLAP`` module (eval mode).
        tokenizer: a RoBERTa tokenizer whose vocabulary matches the text tower.
        checkpoint: where the weights came from.
        random_weights: True for a test model built by :func:`build_random_clap`.
    """

    model: Any
    tokenizer: Any
    audio_cfg: dict
    checkpoint: str
    random_weights: bool
    device: str = "cpu"

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [N, E] unit-norm embeddings of ``texts`` (N may be 0)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i:i + batch_size]), padding="max_length",
                                 truncation=True, max_length=77, return_tensors="pt")
            data = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
            out.append(self.model.get_text_embedding(data).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self._dim()), np.float32)

    @torch.no_grad()
    def audio_embeddings(self, wavs: list[torch.Tensor] | torch.Tensor, sample_rate: int,
                         batch_size: int = 16) -> np.ndarray:
        """float32 [N, E] unit-norm embeddings of mono clips.

        Args:
            wavs: a float tensor [N, S] or [N, 1, S], or a list of N 1-D float tensors
                (any lengths), at ``sample_rate`` Hz, values in [-1, 1].
            sample_rate: their rate; resampled to 48 kHz here.

        Clips longer than 10 s keep their first 10 s (laion_clap would crop at random,
        which would make the metric change between runs); shorter ones are repeated to
        10 s, as laion_clap does.
        """
        import julius

        from noencore.evaluation.clap_compat import import_laion_clap

        import_laion_clap()
        from laion_clap.training.data import get_audio_features

        if isinstance(wavs, torch.Tensor):
            if wavs.dim() == 3:
                wavs = wavs[:, 0]
            if wavs.dim() != 2:
                raise ValueError(f"wavs must be [N, S] or [N, 1, S]; got {tuple(wavs.shape)}")
            wavs = list(wavs)
        out = []
        for i in range(0, len(wavs), batch_size):
            feats = []
            for w in wavs[i:i + batch_size]:
                w = w.detach().float().cpu().reshape(-1)
                if w.numel() == 0:
                    raise ValueError("an audio clip is empty: nothing to embed")
                if sample_rate != CLAP_SAMPLE_RATE:
                    w = julius.resample_frac(w, sample_rate, CLAP_SAMPLE_RATE)
                w = w[:CLAP_MAX_SAMPLES]
                # laion_clap quantises to int16 before embedding; do the same
                w = torch.round(w.clamp(-1.0, 1.0) * 32767.0) / 32767.0
                feats.append(get_audio_features({}, w, CLAP_MAX_SAMPLES, "rand_trunc",
                                                "repeatpad", self.audio_cfg))
            emb = self.model.get_audio_embedding(feats)
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self._dim()), np.float32)

    def _dim(self) -> int:
        return int(self.model.text_projection[-1].out_features)


def load_clap(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike = "roberta-base",
              amodel: str = "HTSAT-base", device: str = "cpu", *,
              trust_pickle: bool = False) -> Clap:
    """Load a laion-clap checkpoint (non-fusion, RoBERTa text tower) without network access.

    Args:
        checkpoint: local ``.pt`` file (e.g. ``music_audioset_epoch_15_esc_90.14.pt``).
        tokenizer: a local tokenizer folder, or a hub id already in the local cache.
        amodel: laion_clap audio architecture (``HTSAT-base`` for the music checkpoint).
        device: torch device string.
        trust_pickle: read a checkpoint that only the full unpickler reads (it could run
            code); refused otherwise (``noencore.fileio.load_torch``).
    """
    from noencore.evaluation.clap_compat import import_laion_clap

    path = Path(checkpoint)
    sd, random = _read_checkpoint(path, trust_pickle)
    config = _text_config(sd, path)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:
        raise NoencoreError(f"CLAP tokenizer {tokenizer!r} cannot be loaded offline ({exc}); "
                            "give a local tokenizer folder (roberta-base's) with --clap-tokenizer"
                            ) from exc
    # transformers may hand back an empty tokenizer for an id it cannot find offline:
    # a vocabulary that does not match the checkpoint's embedding table would give
    # meaningless scores, so refuse it.
    if len(tok) != config.vocab_size:
        raise NoencoreError(
            f"CLAP tokenizer {tokenizer!r} has {len(tok)} tokens but the checkpoint {path} "
            f"expects {config.vocab_size}: give the tokenizer the checkpoint was trained with "
            "(roberta-base for laion-clap), as a local folder")
    import_laion_clap()
    from clap_module import create_model

    with _text_tower_from(config):
        try:
            model, model_cfg = create_model(amodel, "roberta", precision="fp32", device=device,
                                            enable_fusion=False)
        except RuntimeError as exc:
            raise NoencoreError(f"CLAP audio model {amodel!r} unknown to laion_clap ({exc})") from exc
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another architecture
        missing, unexpected = [str(exc).splitlines()[1].strip()], []
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise NoencoreError(
            f"CLAP checkpoint {path} does not fit audio model {amodel!r}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "pass the right --clap-model (HTSAT-base for the music checkpoint)")
    model.eval()
    return Clap(model=model, tokenizer=tok, audio_cfg=dict(model_cfg["audio_cfg"]),
                checkpoint=str(path), random_weights=random, device=device)


def _write_byte_tokenizer(folder: Path) -> Any:
    """A byte-level RoBERTa tokenizer with no merges (261 tokens), saved to ``folder``."""
    from transformers import RobertaTokenizer

    # byte-level BPE maps every byte to a printable character: printable Latin-1 bytes
    # stand for themselves, the others are shifted above 255
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = RobertaTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"))
    tok.save_pretrained(str(folder))
    return tok


def build_random_clap(folder: str | os.PathLike, amodel: str = "HTSAT-tiny",
                      seed: int = 0) -> tuple[Path, Path]:
    """Write a small random-weight CLAP (checkpoint + tokenizer folder) for tests.

    Returns ``(checkpoint_path, tokenizer_folder)``. The checkpoint has the layout of
    laion-clap's (``{"state_dict": {"module.<name>": tensor}}``) plus a marker that makes
    :func:`load_clap` report ``random_weights=True``.
    """
    from transformers import RobertaConfig

    from noencore.evaluation.clap_compat import import_laion_clap

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "tokenizer"
    tok = _write_byte_tokenizer(tok_dir)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=_TEXT_WIDTH, num_hidden_layers=1,
                           num_attention_heads=12, intermediate_size=64,
                           max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    import_laion_clap()
    from clap_module import create_model

    torch.manual_seed(seed)
    with _text_tower_from(config):
        model, _ = create_model(amodel, "roberta", precision="fp32", device="cpu",
                                enable_fusion=False)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = folder / f"random_clap_{amodel}.pt"
    tmp = ckpt.with_suffix(".pt.tmp")
    torch.save({"state_dict": sd, RANDOM_MARKER: True}, tmp)
    os.replace(tmp, ckpt)
    return ckpt, tok_dir
