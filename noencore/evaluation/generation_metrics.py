"""Generation-level metrics for a set of models (after / before unlearning).

For the forget and remain sets (at most ``cfg.max_items`` items each): generate from
each item's caption (batched, CFG), decode, embed with CLAP, and compare with the
caption (CLAP score), with the set's own audio (FAD on CLAP embeddings) and, for
memorisation, with the item's own clip and its nearest neighbour in the set. The
set's "own audio" is its codes decoded by the same codec, so codec artefacts cancel.

Verbatim replay needs no CLAP, and is measured on the holdout too (music of the same
kind the model never trained on: the level a model that never saw the forget set
replays at):

- "continuation": the share of the true track's tokens (every codebook) a greedy
  continuation of its first ``cfg.prompt_frames`` frames reproduces over the next
  ``cfg.continuation_frames``;
- "ngram": the share of the codebook-0 ``cfg.ngram``-grams of a free generation from
  the item's caption (sampled, the item's own seed, ``cfg.frames`` frames) that occur in
  the track.

Two steps: :func:`collect_generation` computes per-item results (under a launcher each
rank takes its share of the items, each item seeded by its index, and rank 0 gathers
them); :func:`generation_report` turns them into the report's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from noencore.distributed import gather_items, rank, rank_share
from noencore.errors import NoencoreError, UsageError
from noencore.evaluation import fad as fadm
from noencore.evaluation.generation import (
    GenerationConfig,
    caption_tokens,
    check_captions,
    continuation_match,
    cosine_rows,
    decode,
    generate_codes,
    nearest_similarity,
    ngram_overlap,
)
from noencore.evaluation.mia import TooFewItems

_CLAP_METRICS = ("clap", "fad", "memorization")


@dataclass
class GenerationItems:
    """Per-item generation results of every model, for all items (on rank 0).

    continuation: {role: {set: float64 [n] exact-token match rates, or None when no item
        of the set is long enough}}; notes: why a set has none.
    ngram: {role: {set: float64 [n] n-gram overlap of a free generation with the track}}.
    clap: the CLAP block's header (checkpoint, random weights, config); empty when no
        CLAP metric was asked.
    real: {set: float32 [n, E]} CLAP embeddings of the set's own audio; text: {set:
        float32 [n, E]} of its captions; generated: {role: {set: float32 [n, E]}} of the
        model's generations from those captions.
    """

    continuation: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)
    ngram: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clap: dict[str, Any] = field(default_factory=dict)
    real: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, np.ndarray] = field(default_factory=dict)
    generated: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _embed_decoded(clap: Any, model: Any, codes: list[torch.Tensor]) -> np.ndarray:
    """float32 [N, E] CLAP embeddings of N code tensors long [K, T_i] (N may be 0),
    decoded by ``model``'s codec: in batches when they have one length, else one by one."""
    lengths = {c.shape[-1] for c in codes}
    if len(lengths) == 1:
        wavs = list(decode(model, torch.stack(codes))[:, 0])
    else:
        wavs = [decode(model, c[None])[0, 0] for c in codes]
    return clap.audio_embeddings(wavs, model.sample_rate)


def collect_generation(models: dict[str, Any], sets: dict[str, Any], metrics: list[str], *,
                       clap: Any, clap_tokenizer: str, clap_model: str, cfg: GenerationConfig,
                       progress: bool) -> GenerationItems | None:
    """Generate, decode and embed for every model and set; every rank must call it.

    Under a process group each rank handles items ``rank, rank + world, ...`` of each
    set and rank 0 receives the whole arrays (the others get None). An item's sampling
    is seeded by its index (``generate_codes``), so the split changes no generation.
    """
    wants_clap = [m for m in metrics if m in _CLAP_METRICS]
    if wants_clap and clap is None:
        raise UsageError(f"metrics {wants_clap} need a CLAP checkpoint: pass clap=PATH "
                         "(--clap PATH), e.g. music_audioset_epoch_15_esc_90.14.pt")
    for model in models.values():  # a model without a text condition, before any work
        check_captions(model, [])
    out = GenerationItems()
    targets = [s for s in ("forget", "remain") if s in sets]
    replayed = [s for s in ("forget", "remain", "holdout") if s in sets]
    if "continuation" in metrics:
        need = cfg.prompt_frames + cfg.continuation_frames
        out.continuation = {role: {} for role in models}
        for s in replayed:
            sh = sets[s]
            idx = [i for i in range(len(sh)) if sh.frames[i] >= need][:cfg.max_items]
            if not idx:
                out.notes.append(f"{s}: no item has {need} frames for a continuation check")
                for role in models:
                    out.continuation[role][s] = None
                continue
            mine = rank_share(len(idx))
            codes = torch.zeros(len(mine), sh.header.n_q, need, dtype=torch.long)
            for row, j in enumerate(mine):
                codes[row] = sh.codes(idx[j])[:, :need]
            caps = [sh.captions[idx[j]] for j in mine]
            ids = [sh.ids[idx[j]] for j in mine]
            for role, model in models.items():
                rates = continuation_match(model, codes[..., :cfg.prompt_frames],
                                           codes[..., cfg.prompt_frames:], caps, cfg,
                                           caption_tokens(model, [sh.captions[i] for i in idx]),
                                           ids=ids)
                out.continuation[role][s] = gather_items(rates, mine, len(idx))
    if "ngram" in metrics:
        out.ngram = {role: {} for role in models}
        for s in replayed:
            sh = sets[s]
            n = min(len(sh), cfg.max_items)
            mine = rank_share(n)
            caps, ids = [sh.captions[j] for j in mine], [sh.ids[j] for j in mine]
            tracks = [sh.codes(int(j))[0].numpy() for j in mine]  # codebook 0
            for role, model in models.items():
                codes = generate_codes(model, caps, cfg, progress=progress,
                                       desc=f"{role} {s} (free)", items=mine, ids=ids,
                                       text_tokens=caption_tokens(model, sh.captions[:n]))
                overlap = ngram_overlap(codes[:, 0].numpy(), tracks, cfg.ngram)
                out.ngram[role][s] = gather_items(overlap, mine, n)
    if wants_clap:
        from noencore.evaluation.clap import load_clap

        any_model = next(iter(models.values()))
        if isinstance(clap, str) or hasattr(clap, "__fspath__"):
            clap = load_clap(clap, clap_tokenizer, amodel=clap_model,
                             device=str(any_model.device))
        out.clap = {"clap_checkpoint": clap.checkpoint, "random_clap": bool(clap.random_weights),
                    "config": vars(cfg).copy()}
        for model in models.values():
            if model.codec is None:
                raise NoencoreError(f"model {model.spec!r} has no codec to decode generations")
        out.generated = {role: {} for role in models}
        for s in targets:
            sh = sets[s]
            n = min(len(sh), cfg.max_items)
            mine = rank_share(n)
            caps = [sh.captions[j] for j in mine]
            real = [sh.codes(int(j))[:, :cfg.frames].long() for j in mine]
            out.real[s] = gather_items(_embed_decoded(clap, any_model, real), mine, n)
            out.text[s] = gather_items(clap.text_embeddings(caps), mine, n)
            for role, model in models.items():
                codes = generate_codes(model, caps, cfg, progress=progress, desc=f"{role} {s}",
                                       items=mine,
                                       text_tokens=caption_tokens(model, sh.captions[:n]))
                out.generated[role][s] = gather_items(
                    _embed_decoded(clap, model, list(codes)), mine, n)
    return out if rank() == 0 else None


def generation_report(items: GenerationItems, metrics: list[str]) -> dict[str, dict[str, Any]]:
    """The report blocks "generation" (CLAP score, FAD, memorisation), "continuation"
    and, when asked, "ngram" (set means), each keyed by role then set."""
    cont: dict[str, Any] = {
        role: {s: None if r is None else float(r.mean()) for s, r in per_set.items()}
        for role, per_set in items.continuation.items()}
    if items.notes:
        cont["notes"] = list(items.notes)

    gen: dict[str, Any] = dict(items.clap)
    for role, per_set in items.generated.items():
        block: dict[str, Any] = {"clap_score": {}, "fad": {}, "memorization": {}}
        for s, g_emb in per_set.items():
            real = items.real[s]
            if "clap" in metrics:
                block["clap_score"][s] = float(cosine_rows(items.text[s], g_emb).mean())
            if "fad" in metrics:
                try:
                    block["fad"][s] = fadm.fad(g_emb, real)
                except TooFewItems as exc:
                    block["fad"][s] = None
                    block.setdefault("notes", []).append(f"FAD {s}: {exc}")
            if "memorization" in metrics:
                near, _ = nearest_similarity(g_emb, real)
                block["memorization"][s] = {"clip": float(cosine_rows(g_emb, real).mean()),
                                            "nearest": float(near.mean())}
        gen[role] = block
    blocks = {"generation": gen, "continuation": cont}
    if "ngram" in metrics:
        blocks["ngram"] = {role: {s: float(np.nanmean(r)) if np.isfinite(r).any() else None
                                  for s, r in per_set.items()}
                           for role, per_set in items.ngram.items()}
    return blocks
