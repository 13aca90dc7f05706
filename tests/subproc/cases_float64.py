"""float64: DEER and its adjoint reach the sequential answer to ~1e-9 (run with JAX_ENABLE_X64=1 on
4 simulated devices by tests/test_multidevice.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from distdeer import deer, default_tolerances, sequential
from problems import loss_fn, problem, rel_err


def test_x64_and_devices():
    assert jax.config.jax_enable_x64 and len(jax.devices()) == 4
    assert default_tolerances(jnp.float64) == (1e-10, 1e-10)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name,jacobian", [("shplrnn", "dense"), ("clipped", "diagonal"), ("gru", "dense"),
                                           ("gru", "diagonal")])
def test_float64_states_and_gradients(n, name, jacobian):
    T = 1001
    step, params, z0, xs = problem(name, T, dtype=jnp.float64)
    assert z0.dtype == jnp.float64
    mesh = None if n == 1 else Mesh(np.array(jax.devices()[:n]), ("time",))
    solve = lambda p, z, x: deer(step, p, z, x, jacobian=jacobian, mesh=mesh).states  # noqa: E731
    states = jax.jit(solve)(params, z0, xs)
    assert states.dtype == jnp.float64
    np.testing.assert_allclose(states, sequential(step, params, z0, xs), atol=1e-8, rtol=1e-8)
    g = jax.jit(jax.grad(lambda p, z, x: loss_fn(solve(p, z, x)), argnums=(0, 1, 2)))(params, z0, xs)
    g_ref = jax.grad(lambda p, z, x: loss_fn(sequential(step, p, z, x)), argnums=(0, 1, 2))(params, z0, xs)
    assert rel_err(g, g_ref) < 1e-8
