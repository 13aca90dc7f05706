"""Piecewise-linear RNNs of the Durstewitz-lab family with closed-form Jacobians (design §2.1).

Parameters are dicts of arrays; every map is ``F(params, z) -> z`` on one unbatched state ``z``
of shape ``(M,)`` with hidden width ``L``.  Jacobians are exact inside each ReLU region, so Newton's
method on these models has converged once the activation pattern stops changing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_shplrnn(key: jax.Array, latent: int, hidden: int, dtype=jnp.float32) -> dict:
    """Reference-style initialisation: ``a`` near 1 (slow linear part), random W1, W2 scaled by fan-in,
    thresholds ``h2`` uniform in [−1, 1] (the clipped model needs them non-zero to be non-linear)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "a": jnp.full((latent,), 0.9, dtype) + 0.05 * jax.random.uniform(k3, (latent,), dtype, -1, 1),
        "W1": jax.random.normal(k1, (latent, hidden), dtype) / jnp.sqrt(hidden).astype(dtype),
        "W2": jax.random.normal(k2, (hidden, latent), dtype) / jnp.sqrt(latent).astype(dtype),
        "h1": jnp.zeros((latent,), dtype),
        "h2": jax.random.uniform(k4, (hidden,), dtype, -1.0, 1.0),
    }


def shplrnn(params: dict, z: jax.Array) -> jax.Array:
    """``F(z) = a ⊙ z + W1 relu(W2 z + h2) + h1``."""
    return params["a"] * z + params["W1"] @ jax.nn.relu(params["W2"] @ z + params["h2"]) + params["h1"]


def _gate(params, z):
    return (params["W2"] @ z + params["h2"] > 0).astype(z.dtype)


def _gated_outer(params, gate):
    """``W1 diag(gate) W2 = Σ_l gate_l W1[:, l] W2[l, :]``, as one (L,)·(L, M²) product: under ``vmap``
    over time this is a single (T, L)·(L, M²) matrix product instead of T small ones (8× faster on
    CPU at M=3, measured)."""
    W1, W2 = params["W1"], params["W2"]
    m = W1.shape[0]
    outer = (W1.T[:, :, None] * W2[:, None, :]).reshape(W2.shape[0], m * m)
    return (gate @ outer).reshape(m, m)


def shplrnn_jac(params: dict, z: jax.Array) -> jax.Array:
    """``J(z) = diag(a) + W1 diag(1[W2 z + h2 > 0]) W2`` (M, M)."""
    return jnp.diag(params["a"]) + _gated_outer(params, _gate(params, z))


def shplrnn_jac_diag(params: dict, z: jax.Array) -> jax.Array:
    """``diag J(z) = a + (W1 ⊙ W2ᵀ) 1[W2 z + h2 > 0]`` (M,), in O(M L)."""
    return params["a"] + (params["W1"] * params["W2"].T) @ _gate(params, z)


def clipped_shplrnn(params: dict, z: jax.Array) -> jax.Array:
    """``F(z) = a ⊙ z + W1 (relu(W2 z + h2) − relu(W2 z)) + h1`` (bounded orbits for |a| < 1)."""
    u = params["W2"] @ z
    return params["a"] * z + params["W1"] @ (jax.nn.relu(u + params["h2"]) - jax.nn.relu(u)) + params["h1"]


def _clipped_gate(params, z):
    u = params["W2"] @ z
    return (u + params["h2"] > 0).astype(z.dtype) - (u > 0).astype(z.dtype)


def clipped_shplrnn_jac(params: dict, z: jax.Array) -> jax.Array:
    """``J(z) = diag(a) + W1 diag(1[W2 z + h2 > 0] − 1[W2 z > 0]) W2``."""
    return jnp.diag(params["a"]) + _gated_outer(params, _clipped_gate(params, z))


def clipped_shplrnn_jac_diag(params: dict, z: jax.Array) -> jax.Array:
    return params["a"] + (params["W1"] * params["W2"].T) @ _clipped_gate(params, z)


def init_alrnn(key: jax.Array, latent: int, dtype=jnp.float32) -> dict:
    """ALRNN: diagonal ``a`` near 0.9, coupling ``W`` (M, M) of scale 0.1/√M, bias ``h``.

    The small coupling keeps the unforced units contracting at the start: with partial forcing
    (N < M) α does not damp them, and at scale 0.25/√M the free part of a random M = 20 model already
    diverged (sequentially as well as under Newton)."""
    k1, k2 = jax.random.split(key)
    return {
        "a": jnp.full((latent,), 0.9, dtype) + 0.05 * jax.random.uniform(k1, (latent,), dtype, -1, 1),
        "W": 0.1 * jax.random.normal(k2, (latent, latent), dtype) / jnp.sqrt(latent).astype(dtype),
        "h": jnp.zeros((latent,), dtype),
    }


def _alrnn_gate(z, nonlinear: int):
    """φ'(z): 1 on the first M−P (linear) units, 1[z > 0] on the last P."""
    linear = jnp.arange(z.shape[0]) < z.shape[0] - nonlinear
    return jnp.where(linear, 1.0, (z > 0)).astype(z.dtype)


def alrnn(params: dict, z: jax.Array, nonlinear: int) -> jax.Array:
    """``F(z) = a ⊙ z + W φ(z) + h``, ``φ`` the identity on the first M−P units and ReLU on the last
    P = ``nonlinear`` (static)."""
    return params["a"] * z + params["W"] @ (_alrnn_gate(z, nonlinear) * z) + params["h"]


def alrnn_jac(params: dict, z: jax.Array, nonlinear: int) -> jax.Array:
    """``J(z) = diag(a) + W diag(φ'(z))``."""
    return jnp.diag(params["a"]) + params["W"] * _alrnn_gate(z, nonlinear)[None, :]


def alrnn_jac_diag(params: dict, z: jax.Array, nonlinear: int) -> jax.Array:
    return params["a"] + jnp.diagonal(params["W"]) * _alrnn_gate(z, nonlinear)


def init_plrnn(key: jax.Array, latent: int, dtype=jnp.float32) -> dict:
    """PLRNN: diagonal ``A`` (stored as the vector ``a``), off-diagonal ``W`` (scale 0.1/√M, see
    ``init_alrnn``), bias ``h``."""
    k1, k2 = jax.random.split(key)
    W = 0.1 * jax.random.normal(k2, (latent, latent), dtype) / jnp.sqrt(latent).astype(dtype)
    return {"a": jnp.full((latent,), 0.9, dtype) + 0.05 * jax.random.uniform(k1, (latent,), dtype, -1, 1),
            "W": W * (1 - jnp.eye(latent, dtype=dtype)), "h": jnp.zeros((latent,), dtype)}


def plrnn(params: dict, z: jax.Array) -> jax.Array:
    """``F(z) = A z + W relu(z) + h`` with ``A = diag(a)``."""
    return params["a"] * z + params["W"] @ jax.nn.relu(z) + params["h"]


def plrnn_jac(params: dict, z: jax.Array) -> jax.Array:
    """``J(z) = diag(a) + W diag(1[z > 0])``."""
    return jnp.diag(params["a"]) + params["W"] * (z > 0).astype(z.dtype)[None, :]


def plrnn_jac_diag(params: dict, z: jax.Array) -> jax.Array:
    return params["a"] + jnp.diagonal(params["W"]) * (z > 0).astype(z.dtype)
