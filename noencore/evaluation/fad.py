"""Fréchet Audio Distance on embeddings (here: CLAP audio embeddings).

FAD fits a Gaussian to each set of embeddings and takes the Fréchet (2-Wasserstein)
distance between the two Gaussians:

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

Tr((S_a S_b)^{1/2}) is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2} (same spectrum as S_a S_b), in float64:
this stays real and exact for identical sets (FD = 0 up to rounding), where the
general-matrix square root used by some tools returns small imaginary parts.
"""
from __future__ import annotations

import numpy as np

from noencore.evaluation.mia import TooFewItems


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean float64 [D] and unbiased covariance float64 [D, D] of embeddings [N, D], N >= 2."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D]; got shape {x.shape}")
    if x.shape[0] < 2:
        raise TooFewItems(f"FAD needs at least 2 embeddings per set; got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray,
                     mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b) (float64, >= 0)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched Gaussian shapes: mu {mu_a.shape} vs {mu_b.shape}, "
                         f"cov {cov_a.shape} vs {cov_b.shape}")
    # symmetrise: np.cov output is symmetric only up to rounding
    cov_a, cov_b = (cov_a + cov_a.T) / 2, (cov_b + cov_b.T) / 2
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))


def fad(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> float:
    """FAD between two sets of embeddings [N_a, D] and [N_b, D] (float64 result)."""
    a, b = np.asarray(embeddings_a), np.asarray(embeddings_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with the same D; got {a.shape} and {b.shape}")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
