"""Figures of a run: the training curves and the free-running attractor against the data."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
# Agg draws a path of one piece unless told to split it; a long free run that jitters at float resolution (a
# model resting on a fixed point, its axes autoscaled down to 1e-8) then exceeds Agg's cell limit and the
# figure raises OverflowError, ending the run's evaluation.  Pieces of 10 000 vertices draw it.
matplotlib.rcParams["agg.path.chunksize"] = 10_000
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_figure(metrics_path: str, out: str) -> None:
    """Training MSE (log scale) and GTF α with Newton iterations, from metrics.jsonl."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    ax[0].semilogy(steps, [r["mse"] for r in rows])
    ax[0].set(xlabel="step", ylabel="MSE (standardised units)", title="training loss")
    ax[1].plot(steps, [r["alpha"] for r in rows], label="α")
    top = max(1, max(r["newton_iterations"] for r in rows))
    ax[1].plot(steps, [r["newton_iterations"] / top for r in rows], label=f"Newton iterations / {top}", alpha=0.6)
    ax[1].set(xlabel="step", title="GTF α and Newton iterations")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def attractor_figure(data: np.ndarray, generated: np.ndarray, out: str, title: str = "") -> None:
    """True vs free-running trajectories: 3-D for N ≥ 3 (first three dims), the plane for N = 2, and a
    delay embedding (x_t, x_{t+10}) for a scalar series."""
    fig = plt.figure(figsize=(10, 4.5))
    for i, (x, name) in enumerate(((data, "data"), (generated, "model, free-running"))):
        finite = x[np.all(np.isfinite(x), axis=1)]
        if x.shape[1] >= 3:
            ax = fig.add_subplot(1, 2, i + 1, projection="3d")
            ax.plot(finite[:, 0], finite[:, 1], finite[:, 2], lw=0.3)
        elif x.shape[1] == 2:
            ax = fig.add_subplot(1, 2, i + 1)
            ax.plot(finite[:, 0], finite[:, 1], lw=0.3)
        else:
            ax = fig.add_subplot(1, 2, i + 1)
            ax.plot(finite[:-10, 0], finite[10:, 0], lw=0.3)
            ax.set(xlabel="x(t)", ylabel="x(t+10)")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def spectrum_figure(p_true: np.ndarray, p_gen: np.ndarray, out: str) -> None:
    """Smoothed normalised power spectra per dimension (``metrics.smoothed_spectra``), true vs model."""
    n = p_true.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for d, ax in enumerate(axes[0]):
        k = max(8, int(0.1 * p_true.shape[1]))  # the informative low-frequency part
        ax.semilogy(p_true[d, :k], label="data")
        ax.semilogy(p_gen[d, :k], label="model", alpha=0.8)
        ax.set(title=f"dim {d}", xlabel="frequency bin")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def timeseries_figure(x_true: np.ndarray, x_gen: np.ndarray, out: str, steps: int = 3000) -> None:
    """The first ``steps`` of each dimension, data above model."""
    n = x_true.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.6 * n), sharex=True, squeeze=False)
    for d in range(n):
        axes[d][0].plot(x_true[:steps, d], lw=0.8, label="data")
        axes[d][0].plot(x_gen[:steps, d], lw=0.8, label="model (free-running)", alpha=0.8)
        axes[d][0].set_ylabel(f"x{d}")
    axes[0][0].legend(loc="upper right")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("the compared series (the model's starts after its dropped transient: not time-aligned)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def envelope_figure(f_true: np.ndarray, f_gen: np.ndarray, block: int, out: str) -> None:
    """The slow envelope over the whole compared series (``metrics.block_features``: per block of ``block``
    steps each dimension's mean, then its spread), data above model: what D_slow compares."""
    n = f_true.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.3 * n), sharex=True, squeeze=False)
    t = np.arange(len(f_true)) * block
    for d in range(n):
        kind, dim = ("mean", d) if d < n // 2 else ("spread", d - n // 2)
        axes[d][0].plot(t, f_true[:, d], lw=0.8, label="data")
        axes[d][0].plot(t, f_gen[:, d], lw=0.8, label="model (free-running)", alpha=0.8)
        axes[d][0].set_ylabel(f"x{dim} {kind}", fontsize=8)
    axes[0][0].legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.suptitle(f"slow envelope: block mean and standard deviation over blocks of {block} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
