"""The reference solver: the recurrence evaluated one step after another."""

from __future__ import annotations

import jax
from jax import lax


def sequential(step, params, z0: jax.Array, xs) -> jax.Array:
    """States of ``z_t = step(params, z_{t-1}, x_t)`` for t = 1..T; returns shape ``(T, M)``.

    ``xs`` is an array (or pytree of arrays) with leading time axis ``T``; ``z0`` has shape ``(M,)``.
    Differentiating through it is backpropagation through time (BPTT).
    """

    def body(z, x):
        z = step(params, z, x)
        return z, z

    _, states = lax.scan(body, z0, xs)
    return states
