"""Full float32 matrix products for everything distdeer traces.

JAX's default float32 matmul on GPUs is TF32 (a 10-bit mantissa).  Measured on an H200 (2026-11-30,
docs/benchmarks.md): a float32 DEER solve then stalled at a residual of ~1e-3 for 200 Newton iterations
(T = 10^5, M = 3) where the CPU converges in ~11 — the scan's products of Jacobians and the residual
must be accurate to the working dtype.  Training and evaluation run under the same setting so that a
model trained or free-run on a GPU computes the recurrence a CPU computes.  On CPUs and for float64
the setting changes nothing.
"""

from __future__ import annotations

from functools import wraps

import jax


def float32_matmuls(fn):
    """``fn`` traced under ``jax.default_matmul_precision("float32")`` (thread-local, at trace time:
    it covers everything traced inside ``fn``, user code such as a model step included)."""

    @wraps(fn)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision("float32"):
            return fn(*args, **kwargs)

    return traced
