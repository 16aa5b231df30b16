"""Generation-level metrics for a set of models (after / before unlearning).

For the forget and remain sets (at most ``cfg.max_items`` items each): generate from
each item's caption (batched, CFG), decode, embed with CLAP, and compare with the
caption (CLAP score), with the set's own audio (FAD on CLAP embeddings) and, for
memorisation, with the item's own clip and its nearest neighbour in the set. The
set's "own audio" is its codes decoded by the same codec, so codec artefacts cancel.
The exact-token continuation match needs no CLAP.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from noencore.errors import NoencoreError, UsageError
from noencore.evaluation import fad as fadm
from noencore.evaluation.generation import (
    GenerationConfig,
    continuation_match,
    cosine_rows,
    decode,
    generate_codes,
    nearest_similarity,
)
from noencore.evaluation.mia import TooFewItems

_CLAP_METRICS = ("clap", "fad", "memorization")


def _set_audio_embeddings(clap: Any, model: Any, shards: Any, n: int, max_frames: int) -> np.ndarray:
    embs = []
    for i in range(n):
        codes = shards.codes(i)[:, :max_frames].long()[None]
        wav = decode(model, codes)[0, 0]
        embs.append(clap.audio_embeddings([wav], model.sample_rate))
    return np.concatenate(embs)


def run_generation_metrics(models: dict[str, Any], sets: dict[str, Any], metrics: list[str], *,
                           clap: Any, clap_tokenizer: str, clap_model: str, cfg: GenerationConfig,
                           progress: bool, explicit: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(generation, continuation)`` report blocks, keyed by role then set."""
    gen: dict[str, Any] = {}
    cont: dict[str, Any] = {}
    wants_clap = [m for m in metrics if m in _CLAP_METRICS]
    targets = [s for s in ("forget", "remain") if s in sets]
    if "continuation" in metrics:
        need = cfg.prompt_frames + cfg.continuation_frames
        for role, model in models.items():
            cont[role] = {}
            for s in targets:
                sh = sets[s]
                idx = [i for i in range(len(sh)) if sh.frames[i] >= need][:cfg.max_items]
                if not idx:
                    cont[role][s] = None
                    cont.setdefault("notes", []).append(
                        f"{s}: no item has {need} frames for a continuation check")
                    continue
                codes = torch.stack([sh.codes(i)[:, :need].long() for i in idx])
                caps = [sh.captions[i] for i in idx]
                rates = continuation_match(model, codes[..., :cfg.prompt_frames],
                                           codes[..., cfg.prompt_frames:], caps, cfg)
                cont[role][s] = float(rates.mean())
    if not wants_clap:
        return gen, cont
    if clap is None:
        if explicit:
            raise UsageError(f"metrics {wants_clap} need a CLAP checkpoint: pass clap=PATH "
                             "(--clap PATH), e.g. music_audioset_epoch_15_esc_90.14.pt")
        return {"skipped": "no CLAP checkpoint given"}, cont
    if isinstance(clap, str) or hasattr(clap, "__fspath__"):
        from noencore.evaluation.clap import load_clap

        clap = load_clap(clap, clap_tokenizer, amodel=clap_model)
    gen["clap_checkpoint"] = clap.checkpoint
    gen["random_clap"] = bool(clap.random_weights)
    gen["config"] = vars(cfg).copy()
    any_model = next(iter(models.values()))
    real = {}
    for s in targets:
        n = min(len(sets[s]), cfg.max_items)
        real[s] = _set_audio_embeddings(clap, any_model, sets[s], n, cfg.frames)
    for role, model in models.items():
        if model.codec is None:
            raise NoencoreError(f"model {model.spec!r} has no codec to decode generations")
        block: dict[str, Any] = {"clap_score": {}, "fad": {}, "memorization": {}}
        for s in targets:
            n = real[s].shape[0]
            caps = sets[s].captions[:n]
            codes = generate_codes(model, caps, cfg, progress=progress, desc=f"{role} {s}")
            g_emb = clap.audio_embeddings(decode(model, codes)[:, 0], model.sample_rate)
            if "clap" in metrics:
                block["clap_score"][s] = float(cosine_rows(clap.text_embeddings(caps), g_emb).mean())
            if "fad" in metrics:
                try:
                    block["fad"][s] = fadm.fad(g_emb, real[s])
                except TooFewItems as exc:
                    block["fad"][s] = None
                    block.setdefault("notes", []).append(f"FAD {s}: {exc}")
            if "memorization" in metrics:
                near, _ = nearest_similarity(g_emb, real[s])
                block["memorization"][s] = {"clip": float(cosine_rows(g_emb, real[s]).mean()),
                                            "nearest": float(near.mean())}
        gen[role] = block
    return gen, cont
