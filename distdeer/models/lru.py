"""A stack of Linear Recurrent Units (LRU, Orvieto et al. 2023) that predicts the next observation.

Shapes: N observed dimensions, H = ``hidden`` (the width of the residual stream and of each layer's
position-wise block), S = ``state`` complex units per layer, K = ``layers``.

Input u¹_t = W_e x_{t−1} + b_e (the previous observation, H).  Layer k = 1..K:

    v_t     = LayerNorm(u^k_t) ⊙ s + β                                  (pre-normalisation)
    h^k_t   = λ ⊙ h^k_{t−1} + γ ⊙ (B v_t),   λ = exp(−exp(ν) + i exp(θ)),   γ = exp(γ_log)    (S, complex)
    y_t     = Re(C h^k_t) + D ⊙ v_t                                       (H)
    u^{k+1}_t = u^k_t + block(y_t)                                        (residual)

with block = GLU, ``(W1 g + b1) ⊙ σ(W2 g + b2)`` with ``g = GELU(y)``, or MLP, ``W2 GELU(W1 y + b1) + b2``
(both H → H).  Prediction x̂_t = W_o u^{K+1}_t + b_o.  Ring initialisation: |λ| uniform on the annulus
r_min ≤ |λ| ≤ r_max (by area), arg λ uniform in [0, max_phase], γ = √(1 − |λ|²) (unit-variance states
for white input).

**As a recurrent model of the distdeer kind** (``Model``, identity readout): the Markov state is
``z_t = [x̂_t; Re h_t; Im h_t]`` of M = N + 2 K S real units (h_t all layers' states, layer-major), and
``F(z_{t−1}) = z_t`` takes its input from the first N units.  So the forcing of GTF on those units is the
forcing of the *input*: at α = 1 the input is the data (teacher forcing) and the recurrence in h is
linear — ``teacher_forced`` solves it exactly with one parallel scan per layer; at α < 1 the input is
α x_{t−1} + (1 − α) x̂_{t−1} and the recurrence is nonlinear (DEER); in free run (α = 0) the model feeds
its own predictions back.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

# The weight matrices (weight decay applies to these; the recurrence's ν, θ, γ_log and the norms are free).
MATRICES = ("W_e", "B_re", "B_im", "C_re", "C_im", "W1", "W2", "W_o")


def init(key: jax.Array, observed: int, hidden: int, state: int, layers: int, r_min: float, r_max: float,
         max_phase: float, block: str, dtype=jnp.float32) -> dict:
    """Parameters; per-layer arrays stacked on a leading axis of length K."""
    N, H, S, K = observed, hidden, state, layers
    k = jax.random.split(key, 10)
    u1 = jax.random.uniform(k[0], (K, S), dtype)
    u2 = jax.random.uniform(k[1], (K, S), dtype)
    # |λ| = r with r² uniform in [r_min², r_max²]; ν = log(−log r).
    nu = jnp.log(-0.5 * jnp.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
    theta = jnp.log(max_phase * u2 + 1e-8)
    r = jnp.exp(-jnp.exp(nu))
    normal = lambda kk, shape, scale: scale * jax.random.normal(kk, shape, dtype)  # noqa: E731
    W_e = normal(k[2], (H, N), 1 / math.sqrt(N))
    return {
        "W_e": W_e, "b_e": jnp.zeros((H,), dtype),
        "nu": nu, "theta": theta, "gamma_log": 0.5 * jnp.log(1 - r ** 2),
        "B_re": normal(k[3], (K, S, H), 1 / math.sqrt(2 * H)), "B_im": normal(k[4], (K, S, H), 1 / math.sqrt(2 * H)),
        "C_re": normal(k[5], (K, H, S), 1 / math.sqrt(S)), "C_im": normal(k[6], (K, H, S), 1 / math.sqrt(S)),
        "D": normal(k[7], (K, H), 1.0),
        "norm_scale": jnp.ones((K, H), dtype), "norm_bias": jnp.zeros((K, H), dtype),
        # The block's output matrix (GLU: W1, the value path; MLP: W2) starts at zero and W_o = pinv(W_e): the
        # untrained stack predicts x̂_t = x_{t−1} (persistence), and its free run neither grows nor decays.
        "W1": normal(k[8], (K, H, H), 1 / math.sqrt(H)) * (block == "mlp"), "b1": jnp.zeros((K, H), dtype),
        "W2": normal(k[9], (K, H, H), 1 / math.sqrt(H)) * (block == "glu"), "b2": jnp.zeros((K, H), dtype),
        "W_o": jnp.linalg.pinv(W_e),
        "b_o": jnp.zeros((N,), dtype),
    }


def eigenvalues(p: dict) -> jax.Array:
    """λ ``(K, S)`` complex: modulus exp(−exp(ν)) ∈ (0, 1), phase exp(θ)."""
    return jnp.exp(-jnp.exp(p["nu"]) + 1j * jnp.exp(p["theta"]))


def _layer_norm(u, scale, bias):
    mu = jnp.mean(u, axis=-1, keepdims=True)
    var = jnp.mean((u - mu) ** 2, axis=-1, keepdims=True)
    return (u - mu) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _block(p, k, y, kind):
    if kind == "glu":
        g = jax.nn.gelu(y)
        return (g @ p["W1"][k].T + p["b1"][k]) * jax.nn.sigmoid(g @ p["W2"][k].T + p["b2"][k])
    return jax.nn.gelu(y @ p["W1"][k].T + p["b1"][k]) @ p["W2"][k].T + p["b2"][k]


def layer_input(p: dict, k: int, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Layer k's normalised input v ``(..., H)`` and the recurrence's drive ``γ ⊙ (B v)`` ``(..., S)`` complex."""
    v = _layer_norm(u, p["norm_scale"][k], p["norm_bias"][k])
    drive = (v @ p["B_re"][k].T + 1j * (v @ p["B_im"][k].T)) * jnp.exp(p["gamma_log"][k])
    return v, drive


def layer_output(p: dict, k: int, u: jax.Array, v: jax.Array, h: jax.Array, kind: str) -> jax.Array:
    """The residual stream after layer k, ``u + block(Re(C h) + D ⊙ v)`` ``(..., H)``."""
    y = h.real @ p["C_re"][k].T - h.imag @ p["C_im"][k].T + p["D"][k] * v
    return u + _block(p, k, y, kind)


def encode(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["W_e"].T + p["b_e"]


def decode(p: dict, u: jax.Array) -> jax.Array:
    return u @ p["W_o"].T + p["b_o"]


def split_state(z: jax.Array, observed: int, layers: int, state: int) -> tuple[jax.Array, jax.Array]:
    """``z (..., M)`` → (x̂ ``(..., N)``, h ``(..., K, S)`` complex)."""
    KS = layers * state
    h = z[..., observed: observed + KS] + 1j * z[..., observed + KS:]
    return z[..., :observed], h.reshape(h.shape[:-1] + (layers, state))


def join_state(x: jax.Array, h: jax.Array) -> jax.Array:
    """Inverse of ``split_state``: ``[x̂; Re h; Im h]`` with h flattened layer-major."""
    flat = h.reshape(h.shape[:-2] + (-1,))
    return jnp.concatenate([x, flat.real.astype(x.dtype), flat.imag.astype(x.dtype)], axis=-1)


def step(p: dict, z: jax.Array, *, layers: int, state: int, block: str) -> jax.Array:
    """One step of the Markov map ``z_t = F(z_{t−1})`` ``(M,) → (M,)``: the input is ``z``'s first N units."""
    N = p["W_o"].shape[0]
    x_in, h = split_state(z, N, layers, state)
    lam = eigenvalues(p)
    u = encode(p, x_in)
    new = []
    for k in range(layers):
        v, drive = layer_input(p, k, u)
        hk = lam[k] * h[k] + drive
        u = layer_output(p, k, u, v, hk, block)
        new.append(hk)
    return join_state(decode(p, u), jnp.stack(new))


def step_jac_diag(p: dict, z: jax.Array, *, layers: int, state: int, block: str) -> jax.Array:
    """``diag ∂F/∂z`` ``(M,)``: Re λ for both parts of every h unit (their self-map is the rotation-scaling by
    λ: nothing else feeds a unit's own previous state back), and for x̂ the diagonal of ∂x̂_t/∂x_in (N JVPs)."""
    N = p["W_o"].shape[0]
    f = lambda x: step(p, z.at[:N].set(x), layers=layers, state=state, block=block)[:N]  # noqa: E731
    jx = jax.jacfwd(f)(z[:N])
    lam_re = eigenvalues(p).real.reshape(-1).astype(z.dtype)
    return jnp.concatenate([jnp.diagonal(jx), lam_re, lam_re])


def teacher_forced(p: dict, x_in: jax.Array, h0: jax.Array, recurrence: Callable, *, layers: int,
                   block: str) -> tuple[jax.Array, jax.Array]:
    """Predictions and states under teacher forcing, all steps at once.

    ``x_in`` ``(n, N)`` the inputs x_{t−1} of this slice, ``h0`` ``(K, S)`` complex the states entering the
    sequence; ``recurrence(a, b, h0)`` solves ``h_t = a ⊙ h_{t−1} + b_t`` for a slice (``solver.linear``,
    time-sharded when the caller binds a mesh axis).  Returns x̂ ``(n, N)`` and h ``(n, K, S)``.
    """
    lam = eigenvalues(p)
    u = encode(p, x_in)
    hs = []
    for k in range(layers):
        v, drive = layer_input(p, k, u)
        hk = recurrence(lam[k], drive, h0[k])
        u = layer_output(p, k, u, v, hk, block)
        hs.append(hk)
    return decode(p, u), jnp.stack(hs, axis=1)
