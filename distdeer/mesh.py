"""The device mesh of a run and host data placed on it as global arrays.

One code path serves 1 device, N local devices and N processes: the mesh spans ``jax.devices()`` (all
devices of all processes), parameters and optimizer state are replicated global arrays, and the
whole-series training data is a global array sharded over ``"time"`` whose every shard is read by the
process that owns it (``Source.rows`` on that shard's rows only).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distdeer.config import Config, ConfigError
from distdeer.data.loader import Source


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
    """The training series as one (global) array.

    No mesh: the whole series on the default device.  ``("time",)`` mesh: sharded over time, padded at
    the end with copies of the last row to a multiple of the device count (the training step cuts the
    padding off, ``make_train_step(length=T)``); each process reads only the rows of its own shards.
    ``("data", "time")`` mesh (windows start anywhere): every process reads the whole series.
    """
    T, N = source.shape
    if mesh is None:
        return jax.numpy.asarray(source.all())
    if "data" in mesh.axis_names:
        full = source.all()
        return jax.make_array_from_callback((T, N), replicated(mesh), lambda index: full[index])
    n = mesh.size
    padded = -(-T // n) * n
    cache: dict[tuple[int, int], np.ndarray] = {}

    def shard(index) -> np.ndarray:
        rows = index[0]
        a, b = rows.start or 0, padded if rows.stop is None else rows.stop
        if (a, b) not in cache:
            x = source.rows(min(a, T), min(b, T))
            if b > T:
                x = np.concatenate([x, np.repeat(source.rows(T - 1, T), b - max(a, T), axis=0)])
            cache[(a, b)] = x
        return cache[(a, b)][:, index[1]]

    return jax.make_array_from_callback((padded, N), NamedSharding(mesh, P("time")), shard)
