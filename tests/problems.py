"""Test problems shared by the in-process and the multi-device (subprocess) tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distdeer import gtf, sequential
from distdeer.bench.chaos import euler_lorenz, noisy_lorenz  # noqa: F401  (shared test problems)
from distdeer.models import plrnn


def gru_params(key, m: int, n_in: int, dtype=jnp.float32) -> dict:
    ks = jax.random.split(key, 6)
    s = 0.5 / jnp.sqrt(m)
    return {
        "Wz": s * jax.random.normal(ks[0], (m, m), dtype), "Uz": s * jax.random.normal(ks[1], (m, n_in), dtype),
        "Wh": s * jax.random.normal(ks[2], (m, m), dtype), "Uh": s * jax.random.normal(ks[3], (m, n_in), dtype),
        "bz": 0.1 * jax.random.normal(ks[4], (m,), dtype), "bh": 0.1 * jax.random.normal(ks[5], (m,), dtype),
    }


def gru_step(p, z, x):
    """A smooth GRU-like step: z ← (1−u) z + u tanh(Wh z + Uh x + bh), u = σ(Wz z + Uz x + bz)."""
    u = jax.nn.sigmoid(p["Wz"] @ z + p["Uz"] @ x + p["bz"])
    return (1 - u) * z + u * jnp.tanh(p["Wh"] @ z + p["Uh"] @ x + p["bh"])


def plrnn_problem(kind: str, T: int, M: int = 4, L: int = 16, alpha: float = 0.3, seed: int = 0,
                  dtype=jnp.float32):
    """(step, params, z0, xs): a GTF-forced (clipped) shPLRNN driven by a random forcing signal."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = plrnn.init_shplrnn(k1, M, L, dtype)
    # Keep the linearisations mildly contracting under forcing so that a cold start cannot overflow.
    params["W1"] = 0.5 * params["W1"]
    F, J, Jd = {
        "shplrnn": (plrnn.shplrnn, plrnn.shplrnn_jac, plrnn.shplrnn_jac_diag),
        "clipped": (plrnn.clipped_shplrnn, plrnn.clipped_shplrnn_jac, plrnn.clipped_shplrnn_jac_diag),
    }[kind]
    step = gtf.forced_step(F, alpha, None, latent=M, jac=J, jac_diag=Jd)
    xs = jax.random.normal(k2, (T, M), dtype)
    z0 = 0.1 * jax.random.normal(k3, (M,), dtype)
    return step, params, z0, xs


def gru_problem(T: int, M: int = 4, n_in: int = 2, seed: int = 0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return gru_step, gru_params(k1, M, n_in, dtype), 0.1 * jax.random.normal(k3, (M,), dtype), \
        jax.random.normal(k2, (T, n_in), dtype)


def problem(name: str, T: int, dtype=jnp.float32, seed: int = 0):
    if name == "gru":
        return gru_problem(T, dtype=dtype, seed=seed)
    return plrnn_problem(name, T, dtype=dtype, seed=seed)


def loss_fn(states):
    """A non-trivial scalar function of the states."""
    return jnp.sum(jnp.sin(states) * jnp.linspace(0.5, 1.5, states.shape[-1]))


def loss_grads(states_fn, params, z0, xs):
    """Gradients of ``loss_fn(states_fn(params, z0, xs))`` w.r.t. all three (compiled)."""
    return jax.jit(jax.grad(lambda p, z, x: loss_fn(states_fn(p, z, x)), argnums=(0, 1, 2)))(params, z0, xs)


def solve_and_grads(solve, params, z0, xs):
    """``solve(params, z0, xs) -> Solution`` and the gradients of ``loss_fn(states)`` w.r.t. all three,
    from one compiled program (one compilation instead of two: the tests are compile-bound)."""
    def loss(p, z, x):
        sol = solve(p, z, x)
        return loss_fn(sol.states), sol
    (_, sol), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, z0, xs)
    return sol, g


@functools.cache
def sequential_reference(name: str, T: int, dtype=jnp.float32):
    """States and BPTT gradients (of ``loss_fn``) of ``problem(name, T, dtype)`` by the plain
    sequential recurrence; cached, since every device count and Jacobian mode is checked against it."""
    step, params, z0, xs = problem(name, T, dtype=dtype)
    seq = lambda p, z, x: sequential(step, p, z, x)  # noqa: E731
    return jax.jit(seq)(params, z0, xs), loss_grads(seq, params, z0, xs)


def rel_err(a, b):
    """Max over leaves of max|a − b| / max|b|."""
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)
    return max(jax.tree.leaves(errs))
