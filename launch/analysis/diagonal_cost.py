"""One pass of each piece of a DEER iteration and of the adjoint, diagonal vs dense (docs/benchmarks.md,
"Diagonal (quasi-DEER) mode").

    taskset -c 0 python launch/analysis/diagonal_cost.py M L

At T = 10^5 on random states, the GTF-forced clipped shPLRNN (α = 0.45) with closed-form Jacobians:
the step, the diagonal and the dense Jacobian, the diagonal and the dense scan, and the step's VJP in the
state (once linearised, as the diagonal adjoint's sweeps reuse it, and with its linearisation).
Medians of 7 runs after compilation, in ms.
"""
import sys
import time

import jax
import jax.numpy as jnp

from distdeer import gtf
from distdeer.models import plrnn
from distdeer.solver import newton, scan
T, M, L = 100000, int(sys.argv[1]), int(sys.argv[2])
params = plrnn.init_shplrnn(jax.random.PRNGKey(0), M, L)
step = gtf.forced_step(plrnn.clipped_shplrnn, 0.45, None, latent=M, jac=plrnn.clipped_shplrnn_jac, jac_diag=plrnn.clipped_shplrnn_jac_diag)
dyn = newton.Dynamics(step, step.jac, step.jac_diag)
z = jax.random.normal(jax.random.PRNGKey(1), (T, M)); x = jax.random.normal(jax.random.PRNGKey(2), (T, M))
def med(fn, *a, n=7):
    fn = jax.jit(fn); jax.block_until_ready(fn(*a)); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter()-t0)
    return 1e3*sorted(ts)[n//2]
Ad = newton.jacobians(dyn, True, params, z, x); A = newton.jacobians(dyn, False, params, z, x)
_, pull = jax.vjp(lambda zp: newton.steps(dyn, params, zp, x), z)
print(f"T={T} M={M} L={L}")
print("step", med(lambda p, z, x: newton.steps(dyn, p, z, x), params, z, x))
print("jac_diag", med(lambda p, z, x: newton.jacobians(dyn, True, p, z, x), params, z, x))
print("jac dense", med(lambda p, z, x: newton.jacobians(dyn, False, p, z, x), params, z, x))
print("diag scan", med(lambda A, b: scan.solve(A, b, jnp.zeros(M), diagonal=True)[0], Ad, z))
print("dense scan", med(lambda A, b: scan.solve(A, b, jnp.zeros(M), diagonal=False)[0], A, z))
print("state vjp (linearised once)", med(lambda l: pull(l)[0], z))
print("state vjp (with linearisation)", med(lambda p, z, x, l: jax.vjp(lambda zp: newton.steps(dyn, p, zp, x), z)[1](l)[0], params, z, x, z))
