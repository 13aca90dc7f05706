"""Trajectories on disk: tensorstore zarr v3 arrays (time × dimension) with their normalisation.

Written with explicit codecs and a time chunk (unchunked writes were ~100× slower, design §4); the
mean and standard deviation used to standardise the series are kept in the array's attributes so
results can be shown in data units.  Readers ask for a time slice and read only the chunks it touches.
"""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

TIME_CHUNK = 65_536


class DataError(ValueError):
    """Unusable data: wrong shape, non-finite values, too short, unreadable file."""


def _spec(path: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}


def check_series(x: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{source}: expected a 2-D array (time, dimension), got shape {x.shape}")
    if x.shape[0] < 2:
        raise DataError(f"{source}: needs at least 2 time steps, got {x.shape[0]}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: expected numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x)
    if bad.any():
        t = int(np.argwhere(bad)[0][0])
        raise DataError(f"{source}: contains {int(bad.sum())} NaN/inf values (first at time step {t})")
    std = x.std(0)
    if (std == 0).any():
        raise DataError(f"{source}: dimension {int(np.argmin(std))} is constant and cannot be standardised")
    return x


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x − mean) / std`` per dimension (std with ddof 0); returns (z, mean, std)."""
    mean, std = x.mean(0), x.std(0)
    return ((x - mean) / std).astype(np.float32), mean.astype(np.float64), std.astype(np.float64)


def write(path: str, x: np.ndarray, *, mean, std, attrs: dict | None = None) -> None:
    """Write standardised ``x`` (T, N) float32 to a new zarr3 array at ``path``."""
    if os.path.exists(path):
        raise DataError(f"{path} already exists; remove it or choose another --out")
    T, N = x.shape
    meta = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], **(attrs or {})}
    spec = {**_spec(path), "metadata": {
        "shape": [T, N], "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [min(TIME_CHUNK, T), N]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": 3}}],
        "attributes": meta}}
    arr = ts.open(spec, create=True).result()
    arr.write(np.asarray(x, np.float32)).result()


def open_series(path: str):
    try:
        return ts.open(_spec(path), open=True).result()
    except Exception as e:  # tensorstore raises ValueError with a long status text
        raise DataError(f"{path}: not a readable zarr3 array ({str(e).splitlines()[0][:120]})") from None


def attributes(arr) -> dict:
    """The user attributes (mean, std, …) of an open series."""
    return dict(arr.spec().to_json().get("metadata", {}).get("attributes", {}))


def read(path: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, dict]:
    """Rows ``start:stop`` of a stored series (reads only those chunks) and its attributes."""
    arr = open_series(path)
    return np.asarray(arr[start:stop].read().result()), attributes(arr)


def load(path: str) -> tuple[np.ndarray, dict]:
    """A training series from ``.zarr`` (stored standardised) or ``.npy``/``.csv`` (standardised here).

    Returns (x float32 (T, N), info) with info holding ``mean``/``std`` in data units."""
    if not os.path.exists(path):
        raise DataError(f"data file {path} not found")
    if path.rstrip("/").endswith(".zarr"):
        x, attrs = read(path)
        check_series(x, path)
        return x.astype(np.float32), {"mean": attrs.get("mean"), "std": attrs.get("std"), "source": path}
    raw = read_raw(path)
    z, mean, std = standardise(raw)
    return z, {"mean": mean.tolist(), "std": std.tolist(), "source": path}


def read_data_units(path: str) -> np.ndarray:
    """A series of any supported file in its own units, float64 (T, N): a ``.zarr`` (stored standardised)
    un-standardised with its recorded mean/std, a ``.npy``/``.csv`` as :func:`read_raw` reads it."""
    if path.rstrip("/").endswith(".zarr"):
        z, attrs = read(path)
        return z * np.asarray(attrs["std"]) + np.asarray(attrs["mean"])
    return read_raw(path)


def read_raw(path: str) -> np.ndarray:
    """A user file (.npy or .csv, time × dimension), validated."""
    try:
        if path.endswith(".npy"):
            x = np.load(path, allow_pickle=False)
        elif path.endswith(".csv"):
            x = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise DataError(f"{path}: unsupported file type (use .npy, .csv or .zarr)")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return check_series(x, path).astype(np.float64)
