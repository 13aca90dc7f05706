"""float64: DEER and its adjoint reach the sequential answer to ~1e-9 (run with JAX_ENABLE_X64=1 on
4 simulated devices by tests/test_multidevice.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from distdeer import deer, default_tolerances
from problems import problem, rel_err, sequential_reference, solve_and_grads

T = 1001


def test_x64_and_devices():
    assert jax.config.jax_enable_x64 and len(jax.devices()) == 4
    assert default_tolerances(jnp.float64) == (1e-10, 1e-10)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name,jacobian", [("shplrnn", "dense"), ("clipped", "diagonal"), ("gru", "dense"),
                                           ("gru", "diagonal")])
def test_float64_states_and_gradients(n, name, jacobian):
    step, params, z0, xs = problem(name, T, dtype=jnp.float64)
    assert z0.dtype == jnp.float64
    mesh = None if n == 1 else Mesh(np.array(jax.devices()[:n]), ("time",))
    adjoint = "diagonal" if name == "clipped" else None  # the matrix-free adjoint once, else the default
    sol, g = solve_and_grads(lambda p, z, x: deer(step, p, z, x, jacobian=jacobian, mesh=mesh, adjoint=adjoint),
                             params, z0, xs)
    ref, g_ref = sequential_reference(name, T, jnp.float64)
    assert sol.states.dtype == jnp.float64
    np.testing.assert_allclose(sol.states, ref, atol=1e-8, rtol=1e-8)
    assert rel_err(g, g_ref) < 1e-8
