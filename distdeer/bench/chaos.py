"""``distdeer bench gtf``: Newton iterations of GTF-DEER on a chaotic map as T grows.

The map is explicit-Euler Lorenz-63 (dt = 0.01), GTF-forced with strength α towards accurately
integrated Lorenz-63 data (RK4, 10 sub-steps) with 5 % observation noise — so the data are not the
map's own trajectory and not its fixed point.  Reported per T: iterations from the default guess and
from the data as ``init``, convergence, residual, and the same for plain DEER (α = 0).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from distdeer.data import systems
from distdeer.solver import deer


def euler_lorenz(p, z, zhat):
    """Explicit-Euler Lorenz-63 map, forced: ``z̃ = ẑ + (1 − α)(z − ẑ)``, ``z ← z̃ + dt·f(z̃)``."""
    zt = zhat + (1.0 - p["alpha"]) * (z - zhat)
    return zt + p["dt"] * systems.lorenz63_field(zt)


def noisy_lorenz(T: int, noise: float = 0.05, seed: int = 0) -> jax.Array:
    """(T+1, 3) Lorenz-63 samples (dt 0.01) with Gaussian observation noise of ``noise`` × std."""
    x = systems.lorenz63(T + 1, dt=0.01, seed=seed)
    return x + noise * x.std(0) * jax.random.normal(jax.random.PRNGKey(seed + 100), x.shape)


def run(lengths, alpha: float = 0.1, max_iter: int = 50, seed: int = 0) -> list[dict]:
    rows = []
    for T in lengths:
        data = noisy_lorenz(T, seed=seed)
        z0, xs, init = data[0], data[:-1], data[1:]
        solve = jax.jit(lambda p, i: deer(euler_lorenz, p, z0, xs, init=i, max_iter=max_iter, throw=False))
        row = {"T": T, "alpha": alpha, "max_iter": max_iter}
        for label, a in (("gtf", alpha), ("plain", 0.0)):
            p = {"alpha": jnp.float32(a), "dt": jnp.float32(0.01)}
            for guess, i in (("default", jnp.broadcast_to(z0, init.shape)), ("data", init)):
                jax.block_until_ready(solve(p, i))
                t0 = time.perf_counter()
                sol = jax.block_until_ready(solve(p, i))
                row[f"{label}_{guess}"] = {"iterations": int(sol.iterations), "converged": bool(sol.converged),
                                           "residual": float(sol.residual), "seconds": time.perf_counter() - t0}
        rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'T':>9} | {'GTF default':>16} | {'GTF data init':>16} | {'plain default':>16} | {'plain data':>16}"]
    for r in rows:
        cells = [f"{r[k]['iterations']:>3} it {'ok' if r[k]['converged'] else 'FAIL':>4} {r[k]['seconds']:6.2f}s"
                 for k in ("gtf_default", "gtf_data", "plain_default", "plain_data")]
        lines.append(f"{r['T']:>9} | " + " | ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
