"""Delay embedding: one observed variable turned into a state-space series a model can train on.

    y_t = (s_t, s_{t−τ}, s_{t−2τ}, …, s_{t−(m−1)τ}),   t = (m−1)τ … T−1,   y: (T − (m−1)τ, m)

The lag τ and dimension m are chosen by the two standard rules (Kantz & Schreiber, *Nonlinear Time
Series Analysis*, ch. 3 and 9), their parameters fixed here:

* **τ: the first minimum of the average mutual information** I(τ) between s_t and s_{t+τ} (histograms
  of ``MI_BINS`` equal-width bins) — the first τ with I(τ) lowest within ±⌈τ/2⌉ lags — searched over
  τ ≤ ``max_lag``; if there is none, the first τ where I falls below I(1)/e.
* **m: the smallest dimension whose false-nearest-neighbour fraction f(m) is below ``FNN_THRESHOLD``, or
  after which it no longer falls by ``FNN_PLATEAU`` of its value** (f(m+1) ≥ 0.8 f(m): the plateau that
  noise and the slow drift of a finite series leave; Kennel, Brown & Abarbanel 1992).  A nearest
  neighbour in dimension m (points within τ·m steps in time excluded) is false when the (m+1)-th
  coordinate stretches the pair's distance more than ``FNN_RTOL``-fold; counted on ``FNN_POINTS`` evenly
  spaced points.  (Kennel's second test, distance beyond 2 standard deviations, is left out: on bursting
  data it flags the sparse spike tips at every dimension.)
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

MI_BINS = 32
FNN_THRESHOLD = 0.01
FNN_PLATEAU = 0.2
FNN_RTOL = 10.0
FNN_POINTS = 4000


def delay_embed(s: np.ndarray, lag: int, dim: int) -> np.ndarray:
    """``(T − (dim−1)·lag, dim)``: row t is (s_t, s_{t−lag}, …, s_{t−(dim−1)·lag}) for the later t."""
    s = np.asarray(s, np.float64).ravel()
    span = (dim - 1) * lag
    if lag < 1 or dim < 1:
        raise ValueError(f"delay embedding needs lag >= 1 and dim >= 1, got lag {lag}, dim {dim}")
    if len(s) <= span + 1:
        raise ValueError(f"a series of {len(s)} steps is too short for dim {dim} at lag {lag}")
    return np.stack([s[span - k * lag: len(s) - k * lag] for k in range(dim)], axis=1)


def mutual_information(s: np.ndarray, lag: int, bins: int = MI_BINS) -> float:
    """Average mutual information (nats) between s_t and s_{t+lag}, from a bins × bins histogram."""
    s = np.asarray(s, np.float64).ravel()
    joint, _, _ = np.histogram2d(s[:-lag], s[lag:], bins=bins, range=[[s.min(), s.max()]] * 2)
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))


def choose_lag(s: np.ndarray, max_lag: int = 600) -> tuple[int, list[float]]:
    """τ by the first minimum of the average mutual information (module docstring); returns τ and
    I(1 … max_lag).  A minimum must be the lowest value within ±⌈τ/2⌉ lags: histogram estimates ripple
    from lag to lag (a sampled sine's by ~5 %), and a strict first dip would pick a ripple."""
    curve = [mutual_information(s, lag) for lag in range(1, max_lag + 1)]
    for lag in range(2, max_lag + 1):
        w = -(-lag // 2)
        if lag + w > max_lag:
            break
        if curve[lag - 1] <= min(curve[lag - 1 - w: lag + w]):
            return lag, curve
    below = [i + 1 for i, v in enumerate(curve) if v < curve[0] / np.e]  # curve[0] is I(1)
    if not below:
        raise ValueError(f"the mutual information has no minimum and does not decay below 1/e within "
                         f"{max_lag} steps; pass --lag")
    return below[0], curve


def false_neighbour_fraction(s: np.ndarray, lag: int, dim: int, points: int = FNN_POINTS) -> float:
    """Fraction of false nearest neighbours of the dimension-``dim`` embedding (module docstring)."""
    s = np.asarray(s, np.float64).ravel()
    y = delay_embed(s, lag, dim + 1)  # last column: the (dim+1)-th coordinate
    base, extra = y[:, :dim], y[:, dim]
    theiler = lag * dim
    tree = cKDTree(base)
    idx = np.linspace(0, len(y) - 1, min(points, len(y))).astype(int)
    dist, nb = tree.query(base[idx], k=2 * theiler + 2)
    false = 0
    for row, i in enumerate(idx):
        ok = np.abs(nb[row] - i) > theiler
        if not ok.any():
            continue
        j, d = nb[row][ok][0], max(dist[row][ok][0], 1e-12)
        false += abs(extra[i] - extra[j]) / d > FNN_RTOL
    return false / len(idx)


def choose_dim(s: np.ndarray, lag: int, max_dim: int = 10) -> tuple[int, list[float]]:
    """m by the false-neighbour rule (module docstring); returns m and the fractions f(1), f(2), … as
    computed (one past m when the plateau decided)."""
    fractions = [false_neighbour_fraction(s, lag, 1)]
    for dim in range(1, max_dim + 1):
        if fractions[-1] < FNN_THRESHOLD:
            return dim, fractions
        fractions.append(false_neighbour_fraction(s, lag, dim + 1))
        if dim >= 2 and fractions[-1] >= (1.0 - FNN_PLATEAU) * fractions[-2]:
            return dim, fractions
    raise ValueError(f"false neighbours keep falling up to dimension {max_dim} (last {fractions[-1]:.1%}); "
                     f"pass --dim")
