"""One solve of the linear step z_t = A_t z_{t−1} + b_t by each local scan method (docs/benchmarks.md,
"Local scan").

    taskset -c 0 python launch/analysis/scan_cost.py [T]

Random contracting maps at T = 10^5 steps: dense M = 3 and 16, diagonal M = 16; the three methods of
``distdeer.solver.scan`` on one device (no summary needed: the sequential method's summary scans are
dropped by XLA), and the sequential method's summary (composite map and outgoing state) alone, which a
mesh adds.  Medians of 9 runs after compilation, in ms; every method checked against the sequential one.
"""

import sys
import time

import jax
import jax.numpy as jnp

from distdeer.solver import scan

T = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000


def median_ms(fn, *args, n=9):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[n // 2]


print(f"T={T} backend={jax.default_backend()}")
for m, diagonal in ((3, False), (16, False), (16, True)):
    shape = (T, m) if diagonal else (T, m, m)
    A = 0.9 * jax.random.uniform(jax.random.PRNGKey(0), shape) / (1 if diagonal else m)
    b = jax.random.normal(jax.random.PRNGKey(1), (T, m))
    h0 = jnp.zeros(m)
    ref = scan.solve(A, b, h0, diagonal=diagonal, method="sequential")[0]
    for method in scan.METHODS:
        def solve(A, b, method=method):
            return scan.solve(A, b, h0, diagonal=diagonal, method=method)[0]
        err = float(jnp.max(jnp.abs(jax.jit(solve)(A, b) - ref)))
        assert err < 1e-3, (method, err)
        print(f"  M={m:2d} {'diagonal' if diagonal else 'dense':8s} {method:11s} {median_ms(solve, A, b):8.2f} ms")

    def summary(A, b):
        return scan.local_pass(A, b, diagonal=diagonal, method="sequential")[0]

    print(f"  M={m:2d} {'diagonal' if diagonal else 'dense':8s} {'summary':11s} {median_ms(summary, A, b):8.2f} ms"
          "  (sequential method, on a mesh only)")
