"""The training series as the training program sees it: its shape before any read, and row ranges.

``open_source(cfg)`` learns the shape ``(T, N)`` and the normalisation without reading the series when
it is a zarr array (the shape and the mean/std are metadata), so a launcher can check a run before
any worker starts.  ``rows(start, stop)`` reads only the chunks that cover the range: in a
multi-process run each process asks for its own time slice (``distdeer.mesh.series_array``).
Files that must be standardised here (``.npy``/``.csv``) and generated systems are held in memory —
their statistics need the whole series anyway.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from distdeer.config import Config
from distdeer.data import reference, store, systems


@dataclasses.dataclass
class Source:
    """A standardised series of shape ``(T, N)``; ``rows(a, b)`` → float32 ``(b − a, N)``."""

    shape: tuple[int, int]
    info: dict  # mean/std in data units and where the series came from
    rows: Callable[[int, int], np.ndarray]

    def all(self) -> np.ndarray:
        return self.rows(0, self.shape[0])


def _in_memory(x: np.ndarray, info: dict) -> Source:
    return Source(tuple(x.shape), info, lambda a, b: x[a:b])


def open_source(cfg: Config) -> Source:
    """The configured series; raises ``store.DataError`` on unusable data."""
    path = reference.resolve(cfg.data.path)
    if path is None:
        raw = np.asarray(systems.generate(cfg.data.system, cfg.data.steps, cfg.data.dt, cfg.data.noise,
                                          cfg.data.seed), np.float64)
        z, mean, std = store.standardise(raw)
        return _in_memory(z, {"mean": mean.tolist(), "std": std.tolist(), "source": f"generated:{cfg.data.system}"})
    if not os.path.exists(path):
        raise store.DataError(f"data file {path} not found")
    if not path.rstrip("/").endswith(".zarr"):
        z, info = store.load(path)
        return _in_memory(z, info)
    arr = store.open_series(path)
    if len(arr.shape) != 2 or arr.shape[0] < 2:
        raise store.DataError(f"{path}: expected a 2-D array (time, dimension) of at least 2 steps, "
                              f"got shape {tuple(arr.shape)}")
    attrs = store.attributes(arr)

    def rows(a: int, b: int) -> np.ndarray:
        x = np.asarray(arr[a:b].read().result(), np.float32)
        if not np.isfinite(x).all():
            raise store.DataError(f"{path}: rows {a}:{b} contain NaN/inf values")
        return x

    return Source((int(arr.shape[0]), int(arr.shape[1])), {"mean": attrs.get("mean"), "std": attrs.get("std"),
                                                          "source": path}, rows)
