"""Generation-level metrics: batched text-to-music generation with classifier-free
guidance, CLAP text-audio scores, FAD on CLAP embeddings, and memorisation.

Generation goes through audiocraft's ``LMModel.generate`` (the same sampler, delay
pattern and CFG as ``MusicGen.generate``), many captions per call; codes are decoded
with the model's codec (the shards' codec: checked by the caller).

What an item generates does not depend on the batch it shares, nor, under a launcher,
on the rank that generates it: each item samples from its own random generator, seeded
from (seed, item index), and every batch's captions are padded to one fixed number of
T5 tokens (audiocraft's cross-attention has no mask, so a batch's padding would change
what each of its rows hears).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from noencore.errors import NoencoreError


@dataclass
class GenerationConfig:
    """How to sample: ``frames`` generated per caption (50 frames = 1 s for the 32 kHz
    codec), CFG coefficient, top-k sampling, seed; ``batch_size`` captions per call;
    at most ``max_items`` items per set; continuation: ``prompt_frames`` given,
    ``continuation_frames`` compared; free-generation replay: ``ngram``-grams of
    codebook 0."""

    frames: int = 250
    cfg_coef: float = 3.0
    top_k: int = 250
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    prompt_frames: int = 50
    continuation_frames: int = 50
    max_items: int = 64
    ngram: int = 4


def check_captions(model: Any, captions: Sequence[str], ids: Sequence[str] | None = None
                   ) -> None:
    """Generation here answers captions: a model without a text condition, or an item
    without a caption, would generate unconditioned music that says nothing about that
    item, so both are refused (``ids`` name the items in the error) before any work."""
    if getattr(model, "text_attribute", None) is None:
        raise NoencoreError(f"model {getattr(model, 'spec', model)!r} takes no text condition: "
                            "generation metrics generate from each item's caption; evaluate a "
                            "text-conditioned MusicGen or leave out the generation metrics")
    empty = [i for i, c in enumerate(captions) if not str(c).strip()]
    if empty:
        name = ids[empty[0]] if ids is not None else f"#{empty[0]}"
        raise NoencoreError(f"item {name!r} has no caption ({len(empty)} such item(s)): "
                            "generation metrics generate from the caption; give it one in the "
                            "manifest (and rerun `noencore condition`) or leave it out of the set")


def _attributes(model: Any, captions: list[str]) -> list[Any]:
    """audiocraft's conditioning of each caption; the callers have checked every caption
    with :func:`check_captions` before any work."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={model.text_attribute: c}) for c in captions]


def caption_tokens(model: Any, captions: Sequence[str]) -> int:
    """The most T5 tokens any of ``captions`` takes with the model's own tokenizer (>= 1)."""
    tok = model.lm.condition_provider.conditioners[model.text_attribute].t5_tokenizer
    return max([len(ids) for ids in tok(list(captions))["input_ids"]], default=1)


@contextmanager
def _padded_captions(model: Any, tokens: int) -> Iterator[None]:
    """Within this block the model's T5 conditioner pads every batch of captions to
    ``tokens`` tokens instead of to the batch's longest caption."""
    conditioner = model.lm.condition_provider.conditioners[model.text_attribute]
    tokenizer = conditioner.t5_tokenizer

    def fixed(entries: list[str], **kwargs: Any) -> Any:
        return tokenizer(entries, **{**kwargs, "padding": "max_length", "max_length": tokens})

    conditioner.t5_tokenizer = fixed
    try:
        yield
    finally:
        conditioner.t5_tokenizer = tokenizer


def item_seed(seed: int, item: int) -> int:
    """The seed of item ``item``'s generator: independent streams per (seed, item)."""
    return int(np.random.SeedSequence([seed, item]).generate_state(1, np.uint64)[0])


@contextmanager
def _per_row_sampling(generators: list[torch.Generator]) -> Iterator[None]:
    """Within this block, audiocraft's sampler draws row b of every batch from
    ``generators[b]``. Its top-k, top-p and plain sampling all end in
    ``audiocraft.utils.utils.multinomial`` over probs [B, K, card], drawn from the global
    RNG in one call: the rows' draws would then depend on each other's presence."""
    from audiocraft.utils import utils as ac_utils

    batch_draw = ac_utils.multinomial

    def row_draw(probs: torch.Tensor, num_samples: int, replacement: bool = False, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if probs.shape[0] != len(generators):
            raise RuntimeError(f"sampling {probs.shape[0]} rows with {len(generators)} "
                               "generators: audiocraft's sampler changed shape")
        return torch.stack([batch_draw(p, num_samples, replacement, generator=g)
                            for p, g in zip(probs, generators)])

    ac_utils.multinomial = row_draw
    try:
        yield
    finally:
        ac_utils.multinomial = batch_draw


@torch.no_grad()
def generate_codes(model: Any, captions: list[str], cfg: GenerationConfig,
                   progress: bool = True, desc: str = "generate",
                   items: Sequence[int] | None = None, text_tokens: int | None = None,
                   ids: Sequence[str] | None = None) -> torch.Tensor:
    """Sample codes long [N, K, cfg.frames] for ``captions`` with CFG, ``cfg.batch_size`` at a time.

    ``items`` (int [N], default 0..N-1): each caption's item index, which seeds its own
    generator (:func:`item_seed` of ``cfg.seed``). ``text_tokens``: T5 tokens every
    caption is padded to (default: the longest of ``captions``; give every part of a
    split set the same). Then the same item gives the same codes in any batch, on any
    rank (up to the float rounding of its batch's forward pass). ``ids`` name the items
    in errors.
    """
    from noencore.progress import progress as progress_bar

    items = list(range(len(captions))) if items is None else [int(i) for i in items]
    if len(items) != len(captions):
        raise ValueError(f"{len(items)} item indices for {len(captions)} captions")
    check_captions(model, captions, ids)
    text_tokens = text_tokens or caption_tokens(model, captions)
    out = []
    bar = progress_bar(total=len(captions), desc=desc, unit="clip", disable=not progress,
                       leave=False)
    for s in range(0, len(captions), cfg.batch_size):
        chunk = captions[s:s + cfg.batch_size]
        gens = [torch.Generator(device=model.device).manual_seed(item_seed(cfg.seed, i))
                for i in items[s:s + cfg.batch_size]]
        with _per_row_sampling(gens), _padded_captions(model, text_tokens):
            conditions = _attributes(model, chunk)
            codes = model.lm.generate(conditions=conditions, max_gen_len=cfg.frames,
                                      use_sampling=True, temp=cfg.temperature, top_k=cfg.top_k,
                                      cfg_coef=cfg.cfg_coef)
        out.append(codes.cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, model.n_q, cfg.frames, dtype=torch.long)


@torch.no_grad()
def continuation_match(model: Any, prompts: torch.Tensor, truth: torch.Tensor, captions: list[str],
                       cfg: GenerationConfig, text_tokens: int | None = None,
                       ids: Sequence[str] | None = None) -> np.ndarray:
    """Verbatim replay from a prompt: exact-token match rate float64 [N] of greedy
    continuations against the true ones (:func:`token_match`, every codebook).

    prompts: long [N, K, P] (first frames of items); truth: long [N, K, C] (the frames
    that follow). The model continues each prompt greedily (with CFG on its caption) for
    C frames; a memorised item is continued exactly (rate near 1), music the model never
    heard at about the rate its style alone predicts. ``text_tokens`` as in
    :func:`generate_codes`; ``ids`` name the items in errors.
    """
    n, k, p = prompts.shape
    c = truth.shape[-1]
    check_captions(model, captions, ids)
    text_tokens = text_tokens or caption_tokens(model, captions)
    rates = []
    for s in range(0, n, cfg.batch_size):
        chunk = slice(s, s + cfg.batch_size)
        with _padded_captions(model, text_tokens):
            codes = model.lm.generate(
                prompt=prompts[chunk].to(model.device),
                conditions=_attributes(model, captions[chunk]),
                max_gen_len=p + c, use_sampling=False, cfg_coef=cfg.cfg_coef)
        rates.append(token_match(codes[..., p:p + c].cpu(), truth[chunk]))
    return np.concatenate(rates) if rates else np.zeros(0)


def token_match(generated: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """float64 [N]: the share of positions, over every codebook and frame, where the
    generated code equals the true one (generated, truth: long [N, K, C]). A track
    against itself gives 1; two independent uniform tracks about 1 / card."""
    if generated.shape != truth.shape:
        raise ValueError(f"generated codes {tuple(generated.shape)} and true codes "
                         f"{tuple(truth.shape)} must have one shape")
    return (generated == truth).double().mean(dim=(1, 2)).numpy()


def ngram_overlap(generated: Sequence[np.ndarray], truth: Sequence[np.ndarray],
                  n: int = 4) -> np.ndarray:
    """float64 [N]: for each item, the share of the generation's n-grams (one per
    position) that occur anywhere in the item's true track: how much of what the model
    generates from the caption is copied from the track. ``generated[i]`` and
    ``truth[i]``: int code sequences of any lengths (one codebook, e.g. codebook 0); NaN
    where either is shorter than ``n``. A track against itself gives 1; a track
    against an unrelated one about (track's n-grams) / card**n, i.e. 0."""
    if len(generated) != len(truth):
        raise ValueError(f"{len(generated)} generations for {len(truth)} tracks")
    if n < 1:
        raise ValueError(f"n-grams need n >= 1, got {n}")
    out = np.full(len(generated), np.nan)
    for i, (g, t) in enumerate(zip(generated, truth)):
        g, t = np.asarray(g, np.int64), np.asarray(t, np.int64)
        if g.size < n or t.size < n:
            continue
        seen = {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(t, n)}
        grams = np.lib.stride_tricks.sliding_window_view(g, n)
        out[i] = np.mean([w.tobytes() in seen for w in grams])
    return out


def decode(model: Any, codes: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Waveforms float [N, 1, S] at ``model.sample_rate`` from codes long [N, K, T]."""
    if model.codec is None:
        raise NoencoreError(f"model {model.spec!r} has no codec: generation metrics need one "
                            "to decode audio")
    wavs = []
    with torch.no_grad():
        for s in range(0, codes.shape[0], batch_size):
            wavs.append(model.codec.decode(codes[s:s + batch_size].to(model.codec.device)).cpu())
    return torch.cat(wavs)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity float64 [N] of [N, E] arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def nearest_similarity(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the highest cosine similarity to any pool row and its index."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    p = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    sim = q.astype(np.float64) @ p.astype(np.float64).T
    idx = sim.argmax(1)
    return sim[np.arange(sim.shape[0]), idx], idx
