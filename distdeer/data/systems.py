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


def rossler_field(x: jax.Array, a: float = 0.2, b: float = 0.2, c: float = 5.7) -> jax.Array:
    """Rössler ``(−y−z, x+ay, b+z(x−c))``."""
    return jnp.stack([-x[1] - x[2], x[0] + a * x[1], b + x[2] * (x[0] - c)])


def lorenz96_field(x: jax.Array, forcing: float = 8.0) -> jax.Array:
    """Lorenz-96 ``dx_i = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F`` (cyclic)."""
    return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + forcing


SLOW_PERIOD = 200.0  # time units: ≥ 100× the fast Lorenz-63 time scale (one loop ≈ 0.7–1 time unit)


def slowfast_field(x: jax.Array, period: float = SLOW_PERIOD, depth: float = 10.0) -> jax.Array:
    """Slow–fast system: Lorenz-63 whose ρ is modulated by a slow harmonic oscillator ``(u, v)``,
    ``ρ = 28 + depth·u``, period ``period`` time units (200: ≥ 100× the fast time scale).  Only the
    three Lorenz variables are observed; the slow drive is hidden and must be learned."""
    w = 2.0 * jnp.pi / period
    rho = 28.0 + depth * x[3]
    fast = lorenz63_field(x[:3], rho=rho)
    return jnp.concatenate([fast, jnp.stack([-w * x[4], w * x[3]])])


HR_R = 0.005  # the slow adaptation rate: the slow variable moves 1/r = 200 times slower than the fast pair


def hindmarsh_rose_field(x: jax.Array, r: float = HR_R, current: float = 3.25) -> jax.Array:
    """Hindmarsh–Rose bursting neuron ``(ẋ, ẏ, ż) = (y − x³ + 3x² − z + I, 1 − 5x² − y, r(4(x + 1.6) − z))``:
    membrane potential x, fast recovery y, slow adaptation z (rate r = 0.005); at I = 3.25 the bursts
    are chaotic (irregular numbers of spikes per burst)."""
    return jnp.stack([x[1] - x[0] ** 3 + 3.0 * x[0] ** 2 - x[2] + current,
                      1.0 - 5.0 * x[0] ** 2 - x[1],
                      r * (4.0 * (x[0] + 1.6) - x[2])])


# name: (initial state, vector field, leading state variables observed, leading variables the seed perturbs).
# Plain tuples: a jax array built at import would start JAX's backend before jax.distributed.initialize.
SYSTEMS = {
    "lorenz63": ((1.0, 1.0, 20.0), lorenz63_field, 3, 3),
    "rossler": ((1.0, 1.0, 0.0), rossler_field, 3, 3),
    "slowfast": ((1.0, 1.0, 20.0, 1.0, 0.0), slowfast_field, 3, 3),
    # the same system with its drive u observed as a fourth channel (same seed: the same x, y, z)
    "slowfast_drive": ((1.0, 1.0, 20.0, 1.0, 0.0), slowfast_field, 4, 3),
    "hindmarsh_rose": ((-1.0, 0.0, 3.0), hindmarsh_rose_field, 3, 3),
}


def generate(system: str, steps: int, dt: float = 0.01, noise: float = 0.0, seed: int = 0,
             dim: int = 10, transient: int = 2000) -> jax.Array:
    """Observations ``(steps, N)`` of ``system`` sampled every ``dt`` after a transient, with Gaussian
    observation noise of ``noise`` × the per-dimension standard deviation; not standardised.  The initial
    state's observed variables get a seeded perturbation of 0.1 — a slow–fast drive none, observed or not: it
    always starts at u = 1, v = 0, its phase the same in every series."""
    key = jax.random.PRNGKey(seed)
    k0, kn = jax.random.split(key)
    if system == "lorenz96":
        if dim < 4:
            raise ValueError(f"lorenz96 needs dim >= 4, got {dim}")
        x0, field, observed, perturbed = jnp.full((dim,), 8.0).at[0].add(0.01), lorenz96_field, dim, dim
    elif system in SYSTEMS:
        x0, field, observed, perturbed = SYSTEMS[system]
        x0 = jnp.array(x0)
    else:
        raise ValueError(f"unknown system {system!r} ({', '.join(sorted([*SYSTEMS, 'lorenz96']))})")
    x0 = x0.at[:perturbed].add(0.1 * jax.random.normal(k0, (perturbed,)))
    x = integrate(field, x0, steps, dt, transient=transient)[:, :observed]
    if noise > 0:
        x = x + noise * x.std(0) * jax.random.normal(kn, x.shape)
    return x
