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


def lru_loop(p: dict, x_in, h0, layers: int, block: str, feedback: bool = False):
    """An LRU stack written out step by step in numpy float64 (an independent reference for
    ``distdeer.models.lru``; equations in its docstring).  ``x_in`` (T, N) the inputs, or with ``feedback``
    only x_in[0] is used and every later input is the previous prediction (free run).  ``h0`` (K, S)
    complex.  Returns predictions (T, N) and states (T, K, S)."""
    import numpy as np

    q = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lam = np.exp(-np.exp(q["nu"]) + 1j * np.exp(q["theta"]))
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = np.array(h0, np.complex128)
    preds, states = [], []
    x = np.asarray(x_in[0], np.float64)
    for t in range(len(x_in)):
        if not feedback:
            x = np.asarray(x_in[t], np.float64)
        u = q["W_e"] @ x + q["b_e"]
        for k in range(layers):
            mu, var = u.mean(), ((u - u.mean()) ** 2).mean()
            v = (u - mu) / np.sqrt(var + 1e-5) * q["norm_scale"][k] + q["norm_bias"][k]
            h[k] = lam[k] * h[k] + np.exp(q["gamma_log"][k]) * ((q["B_re"][k] + 1j * q["B_im"][k]) @ v)
            y = ((q["C_re"][k] + 1j * q["C_im"][k]) @ h[k]).real + q["D"][k] * v
            if block == "glu":
                g = gelu(y)
                out = (q["W1"][k] @ g + q["b1"][k]) * sigmoid(q["W2"][k] @ g + q["b2"][k])
            else:
                out = q["W2"][k] @ gelu(q["W1"][k] @ y + q["b1"][k]) + q["b2"][k]
            u = u + out
        x = q["W_o"] @ u + q["b_o"]
        preds.append(x)
        states.append(h.copy())
    return np.array(preds), np.array(states)


def lru_problem(T: int, layers: int = 2, block: str = "glu", seed: int = 0, dtype=jnp.float32, scale: float = 0.3):
    """(model, params with every weight non-zero, x (T + 1, 3)): an LRU stack on a noisy Lorenz series
    (standardised); ``scale``: the size of the block matrices (large: an expansive, wild free run).
    The zero-initialised block matrix is filled in so that every path of the stack is exercised."""
    from distdeer import config as config_mod
    from distdeer.models import Model

    cfg = config_mod.load(None, ["model.kind=lru", "gtf.mode=constant", "model.hidden=6", "model.state=3",
                                 f"model.layers={layers}", f"model.block={block}", "model.max_phase=1.0"])
    model = Model.from_config(cfg.model, 3)
    params = model.init(jax.random.PRNGKey(seed))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
    F = dict(params["F"])
    F["W1"] = scale * jax.random.normal(keys[0], F["W1"].shape)
    F["W2"] = scale * jax.random.normal(keys[1], F["W2"].shape)
    F["b_o"] = 0.1 * jax.random.normal(keys[2], F["b_o"].shape)
    params = {"F": F, "readout": {"L": 0.2 * jax.random.normal(keys[3], params["readout"]["L"].shape)}}
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = noisy_lorenz(T, seed=seed)
    return model, params, ((x - x.mean(0)) / x.std(0)).astype(dtype)


def logged_losses(run_dir) -> dict:
    """{step: loss} from a run directory's metrics.jsonl."""
    import json
    import os

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def train_on_devices(run_dir, devices: int, *overrides):
    """``distdeer train configs/lorenz63.yaml OVERRIDES run.dir=RUN_DIR`` in a subprocess that sees
    ``devices`` simulated CPU devices (from the repository root)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "distdeer.cli", "train", "configs/lorenz63.yaml", *overrides,
                           f"run.dir={run_dir}"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
