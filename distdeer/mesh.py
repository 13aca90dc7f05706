"""The device mesh of a run and host data placed on it as global arrays.

One code path serves 1 device, N local devices and N processes: the mesh spans ``jax.devices()`` (all
devices of all processes), parameters and optimizer state are replicated global arrays, and the
whole-series training data is a global array sharded over ``"time"`` whose every shard is read by the
process that owns it (``Source.rows`` on that shard's rows only).

Whole-series slot layout: the T steps of a series ``x_0 … x_T`` (T + 1 rows) are cut into P blocks of
``n = ⌈T/P⌉`` slots, one per device; slot s is step s + 1, with input row s and target row s + 1.
``WholeSeries.rows`` holds rows 0 … n·P − 1 (repeating x_T past the end), ``ends`` the rows x_0 and x_T
(replicated: every device needs the initial state, and x_T is the last target when T = n·P).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import math
from typing import NamedTuple

from distdeer.config import Config, ConfigError
from distdeer.data.loader import Source


class WholeSeries(NamedTuple):
    """The whole-series training data in the slot layout (module docstring)."""

    rows: jax.Array  # (n·P, N), sharded over "time"
    ends: jax.Array  # (2, N): x_0 and x_T, replicated


def block(steps: int, devices: int) -> int:
    """Slots per device, ``n = ⌈T/P⌉``: n·P ≥ T is the smallest multiple of P."""
    return math.ceil(steps / devices)


def build(cfg: Config, series_len: int) -> Mesh | None:
    """``("time",)`` mesh (whole series) or ``("data", "time")`` mesh (windows); None for one device."""
    devices = jax.devices()
    n = cfg.mesh.devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"mesh.devices={n} but only {len(devices)} devices are available")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"mesh.devices={n}: a multi-process run uses all {len(devices)} devices of its "
                          f"{jax.process_count()} processes")
    if n == 1:
        return None
    if cfg.train.seq_len is not None:
        return Mesh(np.array(devices[:n]).reshape(n, 1), ("data", "time"))
    if series_len - 1 < n:
        raise ConfigError(f"series of {series_len} steps is shorter than the {n} devices it is sharded over")
    return Mesh(np.array(devices[:n]), ("time",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh | None):
    """Host values (identical on every process) → replicated global arrays on ``mesh``."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)

    def place(leaf):
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def series_array(source: Source, mesh: Mesh | None) -> jax.Array:
    """The training series for window training: the whole series on every device (windows start
    anywhere), read whole by every process."""
    T, N = source.shape
    if mesh is None:
        return jax.numpy.asarray(source.all())
    full = source.all()
    return jax.make_array_from_callback((T, N), replicated(mesh), lambda index: full[index])


def whole_series_of(x) -> WholeSeries:
    """A series ``(T+1, N)`` already in memory, in the slot layout on one device."""
    x = jax.numpy.asarray(x)
    return WholeSeries(x[:-1], jax.numpy.stack([x[0], x[-1]]))


def whole_series(source: Source, mesh: Mesh | None) -> WholeSeries:
    """The whole-series training data in the slot layout, sharded over ``mesh``'s ``"time"`` axis;
    each process reads only the rows of its own shards (and the two ends)."""
    R, N = source.shape
    if mesh is None:
        return whole_series_of(source.all())
    steps = R - 1
    last = source.rows(R - 1, R)
    ends = np.concatenate([source.rows(0, 1), last]).astype(np.float32)
    total = block(steps, mesh.size) * mesh.size
    cache: dict[tuple[int, int], np.ndarray] = {}

    def shard(index) -> np.ndarray:
        rows = index[0]
        a, b = rows.start or 0, total if rows.stop is None else rows.stop
        if (a, b) not in cache:
            x = source.rows(min(a, R), min(b, R))
            if b > R:
                x = np.concatenate([x, np.repeat(last, b - max(a, R), axis=0)])
            cache[(a, b)] = x
        return cache[(a, b)][:, index[1]]

    rows = jax.make_array_from_callback((total, N), NamedSharding(mesh, P("time")), shard)
    return WholeSeries(rows, jax.make_array_from_callback((2, N), replicated(mesh), lambda index: ends[index]))
