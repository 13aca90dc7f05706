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


def _compare(solve_for, alphas, z0, init, T: int, max_iter: int) -> dict:
    """Iterations, convergence, residual and time of ``solve_for(α)(guess)`` for each (label, α), from
    the default guess (z0 repeated) and from the data."""
    row = {"T": T, "max_iter": max_iter}
    for label, a in alphas:
        solve = solve_for(a)
        row[f"{label}_alpha"] = float(a)
        for guess, i in (("default", jnp.broadcast_to(z0, init.shape)), ("data", init)):
            jax.block_until_ready(solve(i))
            t0 = time.perf_counter()
            sol = jax.block_until_ready(solve(i))
            row[f"{label}_{guess}"] = {"iterations": int(sol.iterations), "converged": bool(sol.converged),
                                       "residual": float(sol.residual), "seconds": time.perf_counter() - t0}
    return row


def run(lengths, alpha: float = 0.1, max_iter: int = 50, seed: int = 0) -> list[dict]:
    rows = []
    for T in lengths:
        data = noisy_lorenz(T, seed=seed)
        z0, xs, init = data[0], data[:-1], data[1:]
        solve = jax.jit(lambda p, i: deer(euler_lorenz, p, z0, xs, init=i, max_iter=max_iter, throw=False))

        def solve_for(a):
            p = {"alpha": jnp.float32(a), "dt": jnp.float32(0.01)}
            return lambda i: solve(p, i)

        rows.append({**_compare(solve_for, (("gtf", alpha), ("plain", 0.0)), z0, init, T, max_iter), "alpha": alpha})
    return rows


def run_trained(run_dir: str, lengths, max_iter: int = 100) -> list[dict]:
    """The same comparison for a trained model of a generated system (its ``distdeer train`` run):
    GTF-DEER with the adaptive estimate α = max(0, 1 − 1/𝒩) on the data vs plain DEER (α = 0), forced
    by fresh data of the run's system (standardised with the run's normalisation)."""
    from distdeer.eval import load_run
    from distdeer.gtf import ForcedStep, alpha_from_norm, jacobian_norm

    cfg, model, params, norm, _ = load_run(run_dir)
    if cfg.data.path is not None:
        raise ValueError(f"{run_dir}: bench gtf --run needs a run on a generated system (data.path is null)")
    raw = systems.generate(cfg.data.system, max(lengths) + 1, cfg.data.dt, cfg.data.noise, cfg.data.seed + 7)
    series = (raw - jnp.asarray(norm["mean"], raw.dtype)) / jnp.asarray(norm["std"], raw.dtype)
    rows = []
    for T in lengths:
        x = series[: T + 1]
        zhat = model.forcing(params, x)
        z0, xs, init = model.initial_state(params, x[0]), zhat[:-1], zhat[1:]
        estimate = float(alpha_from_norm(jacobian_norm(model.jac, params["F"], xs[:: max(1, T // 10_000)])))

        def solve_for(a):
            step = ForcedStep(model.F, jnp.float32(a), model.forced_mask(), model.jac, model.jac_diag)
            return jax.jit(lambda i: deer(step, params["F"], z0, xs, init=i, max_iter=max_iter, throw=False))

        rows.append({**_compare(solve_for, (("gtf", estimate), ("plain", 0.0)), z0, init, T, max_iter),
                     "alpha": estimate, "run": run_dir})
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'T':>9} | {'GTF default':>16} | {'GTF data init':>16} | {'plain default':>16} | {'plain data':>16}"]
    for r in rows:
        cells = [f"{r[k]['iterations']:>3} it {'ok' if r[k]['converged'] else 'FAIL':>4} {r[k]['seconds']:6.2f}s"
                 for k in ("gtf_default", "gtf_data", "plain_default", "plain_data")]
        lines.append(f"{r['T']:>9} | " + " | ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
