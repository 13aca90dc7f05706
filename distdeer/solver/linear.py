"""Exact parallel solve of an elementwise linear recurrence, with its exact gradient.

``h_t = a_t ⊙ h_{t−1} + b_t`` for t = 1..n on one slice, ``h_0`` given; ``a``, ``b`` and ``h`` real or
complex, shapes ``a`` ``(n, S)`` or ``(S,)`` (time-invariant), ``b`` ``(n, S)``, ``h_0`` ``(S,)``.  This is the
diagonal case of the affine-map scan behind DEER's linear step (``scan.solve``): the same local pass per
device and cross-device prefix over ``axis_name``, run once — no Newton iterations, the states are exact.

Gradient (``custom_vjp``; a real loss ℓ).  With ``g_t = ∂ℓ/∂Re h_t + i ∂ℓ/∂Im h_t`` the adjoint runs
backwards, ``λ_t = g_t + conj(a_{t+1}) ⊙ λ_{t+1}`` (λ_{n+1} = 0), one reverse scan of the same kind; then
``∂ℓ/∂b_t = λ_t``, ``∂ℓ/∂a_t = conj(h_{t−1}) ⊙ λ_t`` and ``∂ℓ/∂h_0 = conj(a_1) ⊙ λ_1`` (for real arrays
conj is the identity).  JAX passes complex cotangents conjugated (``ct = conj(g)``), so the rule works on
``conj(ct)`` and returns conjugates.  Memory: the states and λ, O(n S) — nothing per step of the scan
is kept for the backward pass, unlike autodiff through the local loop.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from distdeer.solver import scan, vma
from distdeer.solver.newton import from_left, from_right


def _per_step(a, b):
    return vma.like(jnp.broadcast_to(a, b.shape), b)


def _solve(a, b, h0, axis_name, method, reverse=False):
    return scan.solve(_per_step(a, b), b, h0, diagonal=True, reverse=reverse, axis_name=axis_name,
                      method=method or scan.default_method())[0]


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def recurrence(a, b, h0, axis_name=None, method: str | None = None) -> jax.Array:
    """States ``h_1 … h_n`` ``(n, S)`` of this slice (module docstring).  ``axis_name``: the mesh axis
    sharding time (inside ``shard_map``; ``h0`` the same on every device); ``method``: the local scan
    (``scan.METHODS``; None: the backend's default)."""
    return _solve(a, b, h0, axis_name, method)


def _fwd(a, b, h0, axis_name, method):
    h = _solve(a, b, h0, axis_name, method)
    return h, (a, h, h0)


def _bwd(axis_name, method, res, ct):
    a, h, h0 = res
    g = jnp.conj(ct)
    if a.ndim == 1:  # time-invariant: a_{t+1} = a (beyond the end λ = 0, so any value serves there)
        a_first = a_next = a
    else:  # the next step's a here, the right neighbour's first at the end of the slice (0 after the last)
        a_first = a[0]
        a_next = jnp.concatenate([a[1:], from_right(a[0], jnp.zeros_like(a[0]), axis_name)[None]])
    lam = _solve(jnp.conj(a_next), g, vma.like(jnp.zeros_like(h0), g), axis_name, method, reverse=True)
    h_prev = jnp.concatenate([from_left(h[-1], vma.like(h0, h), axis_name)[None], h[:-1]])
    d_a = jnp.conj(h_prev) * lam
    if a.ndim == 1:
        d_a = jnp.sum(d_a, axis=0)
    # ∂ℓ/∂h_0 = conj(a_1) λ_1 lives on the first device; the others hold no part of it.
    first = lax.axis_index(axis_name) == 0 if axis_name is not None else True
    d_h0 = jnp.where(first, jnp.conj(a_first) * lam[0], 0)
    return (vma.reduce_to(jnp.conj(d_a), a), jnp.conj(lam), vma.reduce_to(jnp.conj(d_h0), h0))


recurrence.defvjp(_fwd, _bwd)
