"""The LRU's exact parallel scan in float64 on 1, 2, 3, 4 and 8 simulated CPU devices against step-by-step
references: the linear recurrence and its gradient against ``lax.scan`` and ``jax.grad`` through it, the
teacher-forced stack against a numpy loop of its equations, its loss gradient against BPTT.

Run by tests/test_multidevice.py in a subprocess with JAX_ENABLE_X64=1 and
XLA_FLAGS=--xla_force_host_platform_device_count=8 (not collected by the main pytest run).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from distdeer import sequential
from distdeer.gtf import ForcedStep
from distdeer.models import lru
from distdeer.solver import linear
from distdeer.train import whole
from problems import lru_loop, lru_problem, rel_err

T = 1003  # not a multiple of any device count above 1: the last slice is padded


def test_x64_and_devices():
    assert jax.config.jax_enable_x64 and len(jax.devices()) == 8


def pad_to(x, n, value=0.0):
    return jnp.concatenate([x, jnp.full((n - x.shape[0],) + x.shape[1:], value, x.dtype)])


def sharded(fn, n, specs, out_spec):
    """``fn`` under shard_map over ``n`` devices (``None``: called as is)."""
    if n == 1:
        return partial(fn, None)
    mesh = Mesh(np.array(jax.devices()[:n]), ("time",))
    return jax.jit(jax.shard_map(partial(fn, "time"), mesh=mesh, in_specs=specs, out_specs=out_spec))


def scan_loss(states):
    """A real loss of complex states that weighs real and imaginary parts differently."""
    w = jnp.cos(jnp.arange(states.shape[0]))[:, None]
    return jnp.sum(w * jnp.real(states) ** 2) + jnp.sum(jnp.sin(w) * jnp.imag(states))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("per_step", [False, True])
def test_recurrence_and_gradient_match_lax_scan(n, per_step):
    k = jax.random.split(jax.random.PRNGKey(n), 5)
    S = 4
    a = 0.97 * jnp.exp(1j * jax.random.uniform(k[0], (S,)))
    if per_step:
        a = a * jnp.exp(0.01 * (jax.random.normal(k[1], (T, S)) + 1j * jax.random.normal(k[2], (T, S))))
    b = jax.random.normal(k[3], (T, S)) + 1j * jax.random.normal(k[4], (T, S))
    h0 = jnp.arange(S) * (1 - 0.5j)

    def reference(a, b, h0):
        def f(h, ab):
            h = ab[0] * h + ab[1]
            return h, h
        return jax.lax.scan(f, h0, (jnp.broadcast_to(a, b.shape), b))[1]

    L = -(-T // n) * n
    a_spec = P("time") if per_step else P()
    run = sharded(lambda axis, a, b, h0: linear.recurrence(a, b, h0, axis), n, (a_spec, P("time"), P()), P("time"))
    a_pad = pad_to(a, L, 1.0) if per_step else a
    states = run(a_pad, pad_to(b, L), h0)[:T]
    np.testing.assert_allclose(states, reference(a, b, h0), rtol=1e-11, atol=1e-11)
    g_ref = jax.grad(lambda *args: scan_loss(reference(*args)), argnums=(0, 1, 2))(a, b, h0)
    g = jax.grad(lambda a, b, h0: scan_loss(run(a, b, h0)[:T]), argnums=(0, 1, 2))(a_pad, pad_to(b, L), h0)
    g = (g[0][:T] if per_step else g[0], g[1][:T], g[2])
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def teacher_forced_states(model, n, params, x):
    """States (T, M) of the teacher-forced stack on n devices (the whole-series slot layout: slot s has
    input row s; padded slots repeat the last row)."""
    L = -(-T // n) * n
    rows = pad_to(x[:-1], L).at[T:].set(x[-2])
    z0 = model.initial_state(params, x[0])

    def block(axis, F, z0, rows):
        return whole.teacher_forced(model, F, z0, model.forcing(params, rows), axis).states

    run = sharded(block, n, (P(), P(), P("time")), P("time"))
    return run(params["F"], z0, rows)[:T]


@pytest.mark.parametrize("n,layers,block", [(1, 2, "glu"), (2, 1, "mlp"), (3, 2, "glu"), (4, 2, "mlp"),
                                            (8, 2, "glu")])
def test_teacher_forced_stack_matches_a_loop_and_its_gradient_bptt(n, layers, block):
    model, params, x = lru_problem(T, layers, block, seed=n, dtype=jnp.float64)
    states = teacher_forced_states(model, n, params, x)
    # the numpy loop of the equations, from the same h_0 = L x_0
    _, h0_re, h0_im = lru.split_state(model.initial_state(params, x[0]), 3, layers, model.state)
    pred, h = lru_loop(params["F"], np.asarray(x[:-1]), np.asarray(h0_re) + 1j * np.asarray(h0_im), layers, block)
    x_hat, h_re, h_im = lru.split_state(states, 3, layers, model.state)
    np.testing.assert_allclose(x_hat, pred, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h_re, h.real, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h_im, h.imag, rtol=1e-10, atol=1e-10)

    # gradient of the one-step loss against BPTT through lax.scan of the forced step at α = 1
    forced = ForcedStep(model.F, jnp.float64(1.0), model.forced_mask())

    def loss(states_of, p):
        return jnp.mean((model.observe(p, states_of(p)) - x[1:]) ** 2)

    bptt = lambda p: sequential(forced, p["F"], model.initial_state(p, x[0]), model.forcing(p, x[:-1]))  # noqa: E731
    g_ref = jax.grad(partial(loss, bptt))(params)
    g = jax.grad(partial(loss, lambda p: teacher_forced_states(model, n, p, x)))(params)
    assert rel_err(g, g_ref) < 1e-9
