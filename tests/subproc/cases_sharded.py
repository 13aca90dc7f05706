"""Time-sharded DEER on 1, 2, 3, 4 and 8 simulated CPU devices against the single-device reference.

Run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (not collected by the main pytest run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distdeer import Result, deer, deer_batch, deer_shard, sequential
from problems import (euler_lorenz, loss_fn, loss_grads, noisy_lorenz, problem, rel_err, sequential_reference,
                      solve_and_grads)


def test_eight_devices_are_simulated():
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def mesh_of(n, kind="explicit", names=("time",), shape=None):
    shape = shape or (n,)
    if kind == "explicit":
        return jax.make_mesh(shape, names, devices=jax.devices()[:n])
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


# Every (model, Jacobian) pair on 8 devices and on at least one other count; every count with both
# Jacobians.  (All 25 combinations would cost minutes of compilation for no extra coverage.)
CASES = [(8, name, jac) for name, jac in (("shplrnn", "dense"), ("shplrnn", "diagonal"), ("clipped", "dense"),
                                          ("gru", "dense"), ("gru", "diagonal"))] + [
    (1, "shplrnn", "dense"), (1, "gru", "diagonal"),
    (2, "clipped", "dense"), (2, "shplrnn", "diagonal"),
    (3, "gru", "dense"), (3, "shplrnn", "diagonal"), (3, "clipped", "dense"),
    (4, "shplrnn", "dense"), (4, "gru", "diagonal")]
T_CASES = 4099  # odd: padding on every device count


def check_sharded(n, name, **options):
    """``deer`` on n devices with ``options`` against the sequential states and BPTT's gradients
    (T_CASES steps); returns the Solution."""
    step, params, z0, xs = problem(name, T_CASES)
    mesh = mesh_of(n, "explicit" if n % 2 == 0 else "auto")
    ref, g_ref = sequential_reference(name, T_CASES)
    sol, g = solve_and_grads(lambda p, z, x: deer(step, p, z, x, mesh=mesh, **options), params, z0, xs)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.states, ref, atol=5e-5, rtol=1e-4)
    assert rel_err(g, g_ref) < 1e-4
    return sol


def gru_batch(B, T):
    """(step, params, z0 (B, 4), xs (B, T, 2)): B independent GRU sequences."""
    step, params, _, _ = problem("gru", T)
    return (step, params, 0.1 * jax.random.normal(jax.random.PRNGKey(1), (B, 4)),
            jax.random.normal(jax.random.PRNGKey(2), (B, T, 2)))


@pytest.mark.parametrize("n,name,jacobian", CASES)
def test_sharded_states_and_gradients(n, name, jacobian):
    # The matrix-free diagonal adjoint on 3 and 8 devices; elsewhere the default (dense maps at this size).
    adjoint = "diagonal" if jacobian == "diagonal" and n in (3, 8) else None
    sol = check_sharded(n, name, jacobian=jacobian, adjoint=adjoint)
    assert sol.states.shape == (T_CASES, 4)


def test_iterations_do_not_depend_on_device_count():
    step, params, z0, xs = problem("clipped", 3001)
    # jit: an eager call dispatches the solver's set-up op by op, three times slower than compiling it.
    its = {int(jax.jit(lambda p, z, x, n=n: deer(step, p, z, x, mesh=mesh_of(n)).iterations)(params, z0, xs))
           for n in (1, 2, 4, 8)}
    assert len(its) == 1, its


@pytest.mark.parametrize("T,n", [(1, 3), (5, 8), (9, 4), (15, 8)])
def test_sequences_shorter_than_twice_the_devices(T, n):
    step, params, z0, xs = problem("gru", T)
    mesh = mesh_of(n)
    sol, g = solve_and_grads(lambda p, z, x: deer(step, p, z, x, mesh=mesh), params, z0, xs)
    np.testing.assert_allclose(sol.states, sequential(step, params, z0, xs), atol=2e-5)
    g_ref = loss_grads(lambda p, z, x: sequential(step, p, z, x), params, z0, xs)
    assert rel_err(g, g_ref) < 1e-4
    # padded steps get no gradient and produce none: the xs cotangent has exactly T rows
    assert g[2].shape == xs.shape


def test_inputs_already_sharded_along_time():
    T, n = 4096, 4
    step, params, z0, xs = problem("shplrnn", T)
    mesh = mesh_of(n)
    xs_sharded = jax.device_put(xs, NamedSharding(mesh, P("time")))
    sol = jax.jit(lambda x: deer(step, params, z0, x, mesh=mesh))(xs_sharded)
    assert sol.states.sharding.spec[0] == "time"
    np.testing.assert_allclose(sol.states, sequential(step, params, z0, xs), atol=5e-5)


@pytest.mark.parametrize("kind,shape", [("explicit", (2, 4)), ("auto", (4, 2))])
def test_batch_on_data_time_mesh(kind, shape):
    B, T = 3, 1001  # neither divisible by the mesh
    step, params, z0, xs = gru_batch(B, T)
    mesh = mesh_of(8, kind, ("data", "time"), shape)
    seq = jax.vmap(lambda p, z, x: sequential(step, p, z, x), in_axes=(None, 0, 0))
    sol, g = solve_and_grads(lambda p, z, x: deer_batch(step, p, z, x, mesh=mesh), params, z0, xs)
    assert sol.states.shape == (B, T, 4) and sol.iterations.shape == (B,)
    np.testing.assert_allclose(sol.states, seq(params, z0, xs), atol=1e-5)
    g_ref = loss_grads(seq, params, z0, xs)
    assert rel_err(g, g_ref) < 1e-4


def test_vmap_around_a_sharded_call():
    step, params, z0, xs = gru_batch(2, 640)
    mesh = mesh_of(4, "auto")
    f = jax.vmap(lambda p, z, x: deer(step, p, z, x, mesh=mesh).states, in_axes=(None, 0, 0))
    seq = jax.vmap(lambda p, z, x: sequential(step, p, z, x), in_axes=(None, 0, 0))
    np.testing.assert_allclose(jax.jit(f)(params, z0, xs), seq(params, z0, xs), atol=1e-5)
    g = loss_grads(f, params, z0, xs)
    g_ref = loss_grads(seq, params, z0, xs)
    assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("jacobian", ["dense", "diagonal"])
def test_kernel_inside_a_users_shard_map(jacobian):
    T, n = 2048, 4
    step, params, z0, xs = problem("clipped", T)
    mesh = mesh_of(n, "auto")

    def local_loss(p, z, x):
        sol = deer_shard(step, p, z, x, axis_name="time", jacobian=jacobian, adjoint=jacobian)
        return jax.lax.psum(loss_fn(sol.states), "time")

    sharded_loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), P(), P("time")), out_specs=P())
    value, g = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2)))(params, z0, xs)
    ref_value, g_ref = jax.value_and_grad(lambda p, z, x: loss_fn(sequential(step, p, z, x)),
                                          argnums=(0, 1, 2))(params, z0, xs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    assert rel_err(g, g_ref) < 1e-4


def test_sharded_failure_is_reported_and_fallback_is_exact():
    data = noisy_lorenz(3000)
    z0, xs = data[0], data[:-1]
    forced = {"alpha": jnp.float32(0.1), "dt": jnp.float32(0.01)}
    mesh = mesh_of(8)
    sol = jax.jit(lambda p: deer(euler_lorenz, p, z0, xs, mesh=mesh, max_iter=2, throw=False))(forced)
    assert not bool(sol.converged) and int(sol.result) == Result.MAX_ITER and int(sol.iterations) == 2
    g = jax.jit(jax.grad(lambda p: jnp.sum(
        deer(euler_lorenz, p, z0, xs, mesh=mesh, max_iter=2, throw=False).states)))(forced)
    assert all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree.leaves(g))
    fb = jax.jit(lambda p: deer(euler_lorenz, p, z0, xs, mesh=mesh, max_iter=2, fallback=True))(forced)
    assert int(fb.result) == Result.FALLBACK and bool(fb.converged)
    np.testing.assert_allclose(fb.states, sequential(euler_lorenz, forced, z0, xs), rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="Newton solve failed"):
        jax.block_until_ready(jax.jit(lambda p: deer(euler_lorenz, p, z0, xs, mesh=mesh, max_iter=2).states)(forced))


def test_gtf_on_chaotic_map_sharded():
    T = 10_000
    data = noisy_lorenz(T)
    z0, xs, init = data[0], data[:-1], data[1:]
    forced = {"alpha": jnp.float32(0.1), "dt": jnp.float32(0.01)}
    mesh = mesh_of(8)
    solve = jax.jit(lambda p, i: deer(euler_lorenz, p, z0, xs, mesh=mesh, init=i, max_iter=30))
    cold, warm = solve(forced, None), solve(forced, init)
    assert int(cold.iterations) <= 8 and int(warm.iterations) <= 4
    np.testing.assert_allclose(warm.states, sequential(euler_lorenz, forced, z0, xs), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n,name,jacobian,chunk", [(8, "clipped", "dense", 97), (3, "gru", "diagonal", 250),
                                                   (4, "shplrnn", "diagonal", 1025)])
def test_chunked_evaluation_sharded(n, name, jacobian, chunk):
    """Chunks smaller than a device's slice (4099 steps: 513 per device on 8, 1367 on 3; 1025 on 4 is one
    chunk plus one step), against the sequential states and BPTT's gradients."""
    check_sharded(n, name, jacobian=jacobian, adjoint=jacobian, chunk=chunk)


def test_chunked_batch_on_data_time_mesh():
    step, params, z0, xs = gru_batch(3, 1001)
    mesh = mesh_of(8, "explicit", names=("data", "time"), shape=(2, 4))
    f = lambda p, z, x: deer_batch(step, p, z, x, mesh=mesh, jacobian="diagonal", adjoint="diagonal",  # noqa: E731
                                   chunk=100).states
    seq = jax.vmap(lambda p, z, x: sequential(step, p, z, x), in_axes=(None, 0, 0))
    np.testing.assert_allclose(jax.jit(f)(params, z0, xs), seq(params, z0, xs), atol=5e-5)
    assert rel_err(loss_grads(f, params, z0, xs), loss_grads(seq, params, z0, xs)) < 1e-4


@pytest.mark.parametrize("method,n,jacobian", [("blocked", 4, "dense"), ("blocked", 3, "diagonal"),
                                               ("associative", 8, "dense"), ("associative", 2, "diagonal")])
def test_every_local_scan_method_sharded(method, n, jacobian):
    """The non-default local scans (the accelerators' associative scan, the blocked scan) across devices,
    forward and adjoint, against the sequential states and BPTT."""
    check_sharded(n, "clipped", jacobian=jacobian, method=method)
