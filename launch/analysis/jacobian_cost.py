"""What one evaluation of all T step Jacobians costs, by source (docs/benchmarks.md, "The user's path").

    taskset -c 1 python launch/analysis/jacobian_cost.py [T] [M] [L]

The GTF-forced clipped shPLRNN on random states: the step itself, the closed-form Jacobian, and five
autodiff routes to the same (T, M, M) Jacobians (jacfwd per step, linearize + vmap per step, jacrev per
step, M JVPs of the whole vectorised step, and its linearisation pushing M tangents), and one tangent
alone for comparison with the step.  Medians of 7 runs after compilation; checks that every
route gives the closed form.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import gtf
from distdeer.models import plrnn
from distdeer.solver import newton

T, M, L = (int(a) for a in (sys.argv[1:4] + ["100000", "3", "50"][len(sys.argv) - 1:]))
params = plrnn.init_shplrnn(jax.random.PRNGKey(0), M, L)
analytic = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M, jac=plrnn.clipped_shplrnn_jac)
plain = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M)  # no Jacobians: autodiff
z = jax.random.normal(jax.random.PRNGKey(1), (T, M))
x = jax.random.normal(jax.random.PRNGKey(2), (T, M))


def median_ms(fn, n=7):
    jax.block_until_ready(fn(params, z, x))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, z, x))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[n // 2]


def per_step(jac_of):
    return lambda p, zz, xx: jax.vmap(lambda zi, xi: jac_of(p, zi, xi))(zz, xx)


def linearized(p, zi, xi):
    _, jvp = jax.linearize(lambda v: plain(p, v, xi), zi)
    return jax.vmap(jvp, out_axes=1)(jnp.eye(M, dtype=zi.dtype))


def whole_trajectory_columns(p, zz, xx):
    f = lambda Z: jax.vmap(plain, in_axes=(None, 0, 0))(p, Z, xx)  # noqa: E731
    return jnp.stack([jax.jvp(f, (zz,), (jnp.broadcast_to(e, zz.shape),))[1] for e in jnp.eye(M)], axis=-1)


def linearized_trajectory_columns(p, zz, xx):
    """Linearise the vectorised step once, then push the M unit tangents through it."""
    _, jvp = jax.linearize(lambda Z: jax.vmap(plain, in_axes=(None, 0, 0))(p, Z, xx), zz)
    return jnp.stack([jvp(jnp.broadcast_to(e, zz.shape)) for e in jnp.eye(M, dtype=zz.dtype)], axis=-1)


def one_tangent(p, zz, xx):
    """One tangent (the first unit vector at every step) of the vectorised step: not a Jacobian, timed to
    compare a tangent's cost with the step's."""
    f = lambda Z: jax.vmap(plain, in_axes=(None, 0, 0))(p, Z, xx)  # noqa: E731
    return jax.jvp(f, (zz,), (jnp.broadcast_to(jnp.eye(M, dtype=zz.dtype)[0], zz.shape),))[1]


routes = {
    "step (no Jacobian)": lambda p, zz, xx: newton.steps(newton.Dynamics(analytic), p, zz, xx),
    "closed-form Jacobian": lambda p, zz, xx: newton.jacobians(newton.Dynamics(analytic, analytic.jac), False, p, zz, xx),
    "jacfwd per step (the solver's autodiff)": lambda p, zz, xx: newton.jacobians(newton.Dynamics(plain), False, p, zz, xx),
    "linearize + vmap per step": per_step(linearized),
    "jacrev per step": per_step(lambda p, zi, xi: jax.jacrev(lambda v: plain(p, v, xi))(zi)),
    "M JVPs of the whole trajectory": whole_trajectory_columns,
    "linearize once + M tangents": linearized_trajectory_columns,
    "one tangent only (not a Jacobian)": one_tangent,
}
exact = jax.jit(routes["closed-form Jacobian"])(params, z, x)
print(f"T={T} M={M} L={L} backend={jax.default_backend()}")
for name, fn in routes.items():
    fn = jax.jit(fn)
    if name not in ("step (no Jacobian)", "one tangent only (not a Jacobian)"):
        assert np.max(np.abs(fn(params, z, x) - exact)) < 1e-5, name
    print(f"  {name:42s} {median_ms(fn):8.1f} ms")
