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
    re, im = eigen_parts(p)
    return re + 1j * im


def eigen_parts(p: dict) -> tuple[jax.Array, jax.Array]:
    """(Re λ, Im λ) ``(K, S)`` computed in real arithmetic (see ``step``)."""
    r, phase = jnp.exp(-jnp.exp(p["nu"])), jnp.exp(p["theta"])
    return r * jnp.cos(phase), r * jnp.sin(phase)


def _layer_norm(u, scale, bias):
    mu = jnp.mean(u, axis=-1, keepdims=True)
    var = jnp.mean((u - mu) ** 2, axis=-1, keepdims=True)
    return (u - mu) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _block(p, k, y, kind):
    if kind == "glu":
        g = jax.nn.gelu(y)
        return (g @ p["W1"][k].T + p["b1"][k]) * jax.nn.sigmoid(g @ p["W2"][k].T + p["b2"][k])
    return jax.nn.gelu(y @ p["W1"][k].T + p["b1"][k]) @ p["W2"][k].T + p["b2"][k]


def layer_input(p: dict, k: int, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Layer k's normalised input v ``(..., H)`` and the real and imaginary parts of the recurrence's drive
    ``γ ⊙ (B v)`` ``(..., S)``."""
    v = _layer_norm(u, p["norm_scale"][k], p["norm_bias"][k])
    gamma = jnp.exp(p["gamma_log"][k])
    return v, (v @ p["B_re"][k].T) * gamma, (v @ p["B_im"][k].T) * gamma


def layer_output(p: dict, k: int, u: jax.Array, v: jax.Array, h_re: jax.Array, h_im: jax.Array,
                 kind: str) -> jax.Array:
    """The residual stream after layer k, ``u + block(Re(C h) + D ⊙ v)`` ``(..., H)``."""
    y = h_re @ p["C_re"][k].T - h_im @ p["C_im"][k].T + p["D"][k] * v
    return u + _block(p, k, y, kind)


def encode(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["W_e"].T + p["b_e"]


def decode(p: dict, u: jax.Array) -> jax.Array:
    return u @ p["W_o"].T + p["b_o"]


def split_state(z: jax.Array, observed: int, layers: int, state: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``z (..., M)`` → (x̂ ``(..., N)``, Re h, Im h ``(..., K, S)``)."""
    KS = layers * state
    shape = z.shape[:-1] + (layers, state)
    return (z[..., :observed], z[..., observed: observed + KS].reshape(shape),
            z[..., observed + KS:].reshape(shape))


def join_state(x: jax.Array, h_re: jax.Array, h_im: jax.Array) -> jax.Array:
    """Inverse of ``split_state``: ``[x̂; Re h; Im h]`` with h flattened layer-major."""
    flat = lambda h: h.reshape(h.shape[:-2] + (-1,)).astype(x.dtype)  # noqa: E731
    return jnp.concatenate([x, flat(h_re), flat(h_im)], axis=-1)


def step(p: dict, z: jax.Array, *, layers: int, state: int, block: str) -> jax.Array:
    """One step of the Markov map ``z_t = F(z_{t−1})`` ``(M,) → (M,)``: the input is ``z``'s first N units.

    Real arithmetic throughout: λ h as the 2 × 2 rotation-scaling of (Re h, Im h).  Its Jacobians are taken
    in reverse mode: on CPU (jax 0.10.2) ``jit(vmap(jacfwd(step)))`` returned wrong rows past the 364th of a
    batch while ``jacrev`` and the eager call agree (docs/repro/lru_jacfwd_rows.py)."""
    N = p["W_o"].shape[0]
    x_in, h_re, h_im = split_state(z, N, layers, state)
    l_re, l_im = eigen_parts(p)
    u = encode(p, x_in)
    new_re, new_im = [], []
    for k in range(layers):
        v, d_re, d_im = layer_input(p, k, u)
        hr = l_re[k] * h_re[k] - l_im[k] * h_im[k] + d_re
        hi = l_re[k] * h_im[k] + l_im[k] * h_re[k] + d_im
        u = layer_output(p, k, u, v, hr, hi, block)
        new_re.append(hr)
        new_im.append(hi)
    return join_state(decode(p, u), jnp.stack(new_re), jnp.stack(new_im))


def step_jac_diag(p: dict, z: jax.Array, *, layers: int, state: int, block: str) -> jax.Array:
    """``diag ∂F/∂z`` ``(M,)``: Re λ for both parts of every h unit (their self-map is the rotation-scaling by
    λ: nothing else feeds a unit's own previous state back), and for x̂ the diagonal of ∂x̂_t/∂x_in (N JVPs)."""
    N = p["W_o"].shape[0]
    f = lambda x: step(p, z.at[:N].set(x), layers=layers, state=state, block=block)[:N]  # noqa: E731
    jx = jax.jacrev(f)(z[:N])
    lam_re = eigen_parts(p)[0].reshape(-1).astype(z.dtype)
    return jnp.concatenate([jnp.diagonal(jx), lam_re, lam_re])


def teacher_forced(p: dict, x_in: jax.Array, h0_re: jax.Array, h0_im: jax.Array, recurrence: Callable, *,
                   layers: int, block: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Predictions and states under teacher forcing, all steps at once.

    ``x_in`` ``(n, N)`` the inputs x_{t−1} of this slice, ``h0_re``, ``h0_im`` ``(K, S)`` the states entering
    the sequence; ``recurrence(a, b, h0)`` solves the complex ``h_t = a ⊙ h_{t−1} + b_t`` for a slice
    (``solver.linear``, time-sharded when the caller binds a mesh axis).  Returns x̂ ``(n, N)`` and
    Re h, Im h ``(n, K, S)``.
    """
    lam = eigenvalues(p)
    u = encode(p, x_in)
    hs_re, hs_im = [], []
    for k in range(layers):
        v, d_re, d_im = layer_input(p, k, u)
        hk = recurrence(lam[k], d_re + 1j * d_im, h0_re[k] + 1j * h0_im[k])
        u = layer_output(p, k, u, v, hk.real, hk.imag, block)
        hs_re.append(hk.real)
        hs_im.append(hk.imag)
    return decode(p, u), jnp.stack(hs_re, axis=1), jnp.stack(hs_im, axis=1)
