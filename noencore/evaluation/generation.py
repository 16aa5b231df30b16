"""Generation-level metrics: batched text-to-music generation with classifier-free
guidance, CLAP text-audio scores, FAD on CLAP embeddings, and memorisation.

Generation goes through audiocraft's ``LMModel.generate`` (the same sampler, delay
pattern and CFG as ``MusicGen.generate``), many captions per call; codes are decoded
with the model's codec (the shards' codec: checked by the caller).
"""
from __future__ import annotations

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
    ``continuation_frames`` compared."""

    frames: int = 250
    cfg_coef: float = 3.0
    top_k: int = 250
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    prompt_frames: int = 50
    continuation_frames: int = 50
    max_items: int = 64


def _attributes(model: Any, captions: list[str]) -> list[Any]:
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={model.text_attribute: c}) for c in captions]


@torch.no_grad()
def generate_codes(model: Any, captions: list[str], cfg: GenerationConfig,
                   progress: bool = True, desc: str = "generate") -> torch.Tensor:
    """Sample codes long [N, K, cfg.frames] for ``captions`` with CFG, ``cfg.batch_size`` at a time.

    Deterministic for ``cfg.seed`` (the global torch RNG is restored afterwards).
    """
    from tqdm import tqdm

    out = []
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        starts = range(0, len(captions), cfg.batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            chunk = captions[s:s + cfg.batch_size]
            codes = model.lm.generate(conditions=_attributes(model, chunk), max_gen_len=cfg.frames,
                                      use_sampling=True, temp=cfg.temperature, top_k=cfg.top_k,
                                      cfg_coef=cfg.cfg_coef)
            out.append(codes.cpu())
    return torch.cat(out) if out else torch.zeros(0, model.n_q, cfg.frames, dtype=torch.long)


@torch.no_grad()
def continuation_match(model: Any, prompts: torch.Tensor, truth: torch.Tensor, captions: list[str],
                       cfg: GenerationConfig) -> np.ndarray:
    """Exact-token match rate float64 [N] of greedy continuations against the true ones.

    prompts: long [N, K, P] (first frames of items); truth: long [N, K, C] (the frames
    that follow). The model continues each prompt greedily (with CFG on its caption) for
    C frames; a memorised item is continued exactly (rate near 1).
    """
    n, k, p = prompts.shape
    c = truth.shape[-1]
    rates = []
    for s in range(0, n, cfg.batch_size):
        codes = model.lm.generate(prompt=prompts[s:s + cfg.batch_size].to(model.device),
                                  conditions=_attributes(model, captions[s:s + cfg.batch_size]),
                                  max_gen_len=p + c, use_sampling=False, cfg_coef=cfg.cfg_coef)
        gen = codes[..., p:p + c].cpu()
        rates.append((gen == truth[s:s + cfg.batch_size]).float().mean(dim=(1, 2)).double().numpy())
    return np.concatenate(rates) if rates else np.zeros(0)


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
