"""Reference dynamical systems, integrated accurately in JAX (classic RK4 with sub-steps).

Each generator returns ``(T, N)`` observations sampled every ``dt`` after dropping a transient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def lorenz63_field(x: jax.Array, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0) -> jax.Array:
    """Lorenz-63 vector field ``(σ(y−x), x(ρ−z)−y, xy−βz)``."""
    return jnp.stack([sigma * (x[1] - x[0]), x[0] * (rho - x[2]) - x[1], x[0] * x[1] - beta * x[2]])


def rk4(field: Callable, x: jax.Array, h: float) -> jax.Array:
    """One classic Runge–Kutta step of size ``h``."""
    k1 = field(x)
    k2 = field(x + 0.5 * h * k1)
    k3 = field(x + 0.5 * h * k2)
    k4 = field(x + h * k3)
    return x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate(field: Callable, x0: jax.Array, steps: int, dt: float, substeps: int = 10,
              transient: int = 0) -> jax.Array:
    """Sample ``steps`` states every ``dt`` (RK4 with ``substeps`` per sample), after ``transient``."""
    h = dt / substeps

    def sample(x, _):
        x = lax.fori_loop(0, substeps, lambda _, y: rk4(field, y, h), x)
        return x, x

    x, _ = lax.scan(sample, x0, None, length=transient) if transient else (x0, None)
    return lax.scan(sample, x, None, length=steps)[1]


def lorenz63(steps: int, dt: float = 0.01, seed: int = 0, transient: int = 1000) -> jax.Array:
    """Lorenz-63 (σ=10, ρ=28, β=8/3) observations (T, 3), unstandardised."""
    x0 = jnp.array([1.0, 1.0, 20.0]) + jax.random.normal(jax.random.PRNGKey(seed), (3,))
    return integrate(lorenz63_field, x0, steps, dt, transient=transient)


def standardise(x: jax.Array) -> jax.Array:
    """Zero mean, unit variance per dimension."""
    return (x - x.mean(0)) / x.std(0)
