"""Dynamical-systems-reconstruction measures, exactly the GTF reference definitions (design §5).

* ``state_space_divergence`` (D_stsp, binning; for N < 6): KL(p_true ‖ p_gen) of Laplace-smoothed
  histograms on the true data's box.
* ``state_space_divergence_gmm`` (D_stsp, GMM; for N ≥ 6): Monte-Carlo KL between isotropic Gaussian
  mixtures centred on the points of each series.
* ``power_spectrum_distance`` (D_H): mean over dimensions of the Hellinger distance between smoothed,
  normalised power spectra.
* ``prediction_error`` (PE(n)): mean squared n-step-ahead error from every test point.
* ``slow_scale_distance`` (D_slow): D_H of the block-averaged series and of its block-wise spread — the
  power spectra of the slow envelope, blind to the fast dynamics and to the slow phase.

All take arrays of shape (T, N); the two series must have equal lengths (D_stsp depends strongly on the
sample size), which is checked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import logsumexp


def _pair(x_true, x_gen, name: str) -> tuple[np.ndarray, np.ndarray]:
    x_true, x_gen = np.asarray(x_true, np.float64), np.asarray(x_gen, np.float64)
    if x_true.ndim != 2 or x_gen.ndim != 2:
        raise ValueError(f"{name}: expected 2-D arrays (time, dimension), got {x_true.shape} and {x_gen.shape}")
    if x_true.shape != x_gen.shape:
        raise ValueError(f"{name}: series must have equal shapes (time, dimension), got {x_true.shape} "
                         f"and {x_gen.shape}; compare equal lengths")
    return x_true, x_gen


def state_space_divergence(x_true, x_gen, n_bins: int = 30) -> float:
    """D_stsp by binning: per dimension the box ``[min − 0.1σ, max + 0.1σ]`` of the *true* data (σ with
    ddof=1), ``n_bins`` bins per dimension; generated points outside the box are dropped; both histograms
    are smoothed ``(h + 1e-5)/(Σh + 1e-5·n_bins^N)``; returns ``Σ p_true log(p_true/p_gen)`` over all
    cells, or NaN if no generated point falls inside the box."""
    x_true, x_gen = _pair(x_true, x_gen, "state_space_divergence")
    N = x_true.shape[1]
    sigma = x_true.std(0, ddof=1)
    lo, hi = x_true.min(0) - 0.1 * sigma, x_true.max(0) + 0.1 * sigma
    edges = [np.linspace(lo[d], hi[d], n_bins + 1) for d in range(N)]
    inside = np.all((x_gen >= lo) & (x_gen <= hi), axis=1)
    if not inside.any():
        return float("nan")
    h_true, _ = np.histogramdd(x_true, bins=edges)
    h_gen, _ = np.histogramdd(x_gen[inside], bins=edges)
    eps, cells = 1e-5, float(n_bins) ** N
    p = (h_true + eps) / (h_true.sum() + eps * cells)
    q = (h_gen + eps) / (h_gen.sum() + eps * cells)
    return float(np.sum(p * np.log(p / q)))


def _mixture_logpdf(points: np.ndarray, centres: np.ndarray, scaling: float) -> np.ndarray:
    """log of the equal-weight mixture of N(centre, scaling·I) at each point."""
    d = centres.shape[1]
    sq = (np.sum(points ** 2, 1)[:, None] - 2 * points @ centres.T + np.sum(centres ** 2, 1)[None, :])
    log_k = -0.5 * sq / scaling - 0.5 * d * np.log(2 * np.pi * scaling)
    return logsumexp(log_k, axis=1) - np.log(len(centres))


def state_space_divergence_gmm(x_true, x_gen, scaling: float = 1.0, max_t: int = 10_000,
                               mc_samples: int = 1000, seed: int = 0) -> float:
    """D_stsp with Gaussian mixtures: the first ≤ ``max_t`` points of each series are the centres of
    isotropic Gaussians of variance ``scaling``; ``mc_samples`` samples are drawn from the true mixture
    (seeded); returns ``mean(log p_true − log p_gen)`` over the samples where both are finite."""
    x_true, x_gen = _pair(x_true, x_gen, "state_space_divergence_gmm")
    a, b = x_true[:max_t], x_gen[:max_t]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(a), mc_samples)
    samples = a[pick] + np.sqrt(scaling) * rng.standard_normal((mc_samples, a.shape[1]))
    lp, lq = _mixture_logpdf(samples, a, scaling), _mixture_logpdf(samples, b, scaling)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(np.mean(lp[ok] - lq[ok])) if ok.any() else float("nan")


def smoothed_spectra(x, sigma: float = 20.0) -> np.ndarray:
    """Per-dimension spectra ``(N, T//2+1)``: z-score, ``|rfft|²`` (no window), Gaussian smoothing
    (σ bins, truncate 4, reflect), clipped at 0, normalised to sum 1.

    A constant dimension (a model that settled exactly on a fixed point) cannot be z-scored; it gets the
    flat spectrum, the limit of vanishing white noise around the point, so that a fixed point scores the
    reference floor (Lorenz-63 vs a fixed point: D_H 0.876; design §5 quotes 0.877) instead of NaN."""
    x = np.asarray(x, np.float64)
    std = x.std(0)
    constant = std == 0
    z = (x - x.mean(0)) / np.where(constant, 1.0, std)
    power = np.abs(np.fft.rfft(z, axis=0)) ** 2
    power[:, constant] = 1.0
    smooth = np.clip(gaussian_filter1d(power, sigma, axis=0, mode="reflect", truncate=4.0), 0.0, None)
    return (smooth / smooth.sum(0)).T


def power_spectrum_distance(x_true, x_gen, sigma: float = 20.0) -> float:
    """D_H: mean over dimensions of the Hellinger distance ``‖√p − √q‖₂ / √2`` between smoothed spectra
    (this form cannot turn NaN by round-off, unlike ``sqrt(1 − Σ√(pq))``)."""
    x_true, x_gen = _pair(x_true, x_gen, "power_spectrum_distance")
    if not np.all(np.isfinite(x_gen)):
        return float("nan")
    p, q = smoothed_spectra(x_true, sigma), smoothed_spectra(x_gen, sigma)
    return float(np.mean(np.linalg.norm(np.sqrt(p) - np.sqrt(q), axis=1) / np.sqrt(2.0)))


def prediction_error(predict: Callable[[np.ndarray, int], np.ndarray], x_test, n: int = 20) -> float:
    """PE(n): ``predict(x_starts (K, N), n) -> (K, N)`` runs the model n steps from states inferred
    from each test point; mean squared error against ``x_{t+n}`` over every start t = 0 … T−n−1."""
    x = np.asarray(x_test, np.float64)
    if x.ndim != 2 or len(x) <= n:
        raise ValueError(f"prediction_error: need a (T, N) test series with T > n = {n}, got {x.shape}")
    pred = np.asarray(predict(x[:-n], n), np.float64)
    return float(np.mean((pred - x[n:]) ** 2))


MIN_BLOCKS = 8  # fewer blocks leave the envelope spectrum a handful of frequencies


def block_features(x, block: int) -> np.ndarray:
    """The slow envelope of a series (T, N): per block of ``block`` steps each dimension's mean and
    standard deviation, (T // block, 2N) — the mean carries slow drifts of the level (a burst, a drive),
    the spread slow changes of the fast oscillation's amplitude (a breathing attractor).  A trailing
    partial block is dropped."""
    x = np.asarray(x, np.float64)
    K = len(x) // block
    if K < MIN_BLOCKS:
        raise ValueError(f"block_features: {len(x)} steps hold {K} blocks of {block}; need at least {MIN_BLOCKS}")
    b = x[:K * block].reshape(K, block, x.shape[1])
    return np.concatenate([b.mean(1), b.std(1)], axis=1)


def slow_scale_distance(x_true, x_gen, block: int, sigma: float = 1.0) -> float:
    """D_slow: :func:`power_spectrum_distance` between the :func:`block_features` of the two series,
    spectra smoothed by ``sigma`` frequency bins.  Phase-invariant (power spectra); a model whose slow
    variable is frozen gives a flat envelope spectrum, one with the wrong slow period a peak elsewhere.
    Frequency resolution is 1 / (series length): the series should hold ≥ 10 slow periods."""
    x_true, x_gen = _pair(x_true, x_gen, "slow_scale_distance")
    if not np.all(np.isfinite(x_gen)):
        return float("nan")
    return power_spectrum_distance(block_features(x_true, block), block_features(x_gen, block), sigma)
