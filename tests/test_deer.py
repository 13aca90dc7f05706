"""DEER on one device against the sequential recurrence and BPTT (``jax.grad`` through it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distdeer
from distdeer import Result, SolverError, deer, deer_batch, gtf, sequential
from distdeer.models import plrnn
from problems import (euler_lorenz, loss_fn, loss_grads, noisy_lorenz, problem, rel_err, sequential_reference,
                      solve_and_grads)


@pytest.mark.parametrize("name", ["shplrnn", "clipped", "gru"])
@pytest.mark.parametrize("jacobian,adjoint", [("dense", None), ("diagonal", None), ("diagonal", "diagonal")])
def test_states_and_gradients_match_sequential(name, jacobian, adjoint):
    T = 4099  # odd, not a multiple of the block length
    step, params, z0, xs = problem(name, T)
    ref, g_ref = sequential_reference(name, T)
    sol, g = solve_and_grads(lambda p, z, x: deer(step, p, z, x, jacobian=jacobian, adjoint=adjoint), params,
                             z0, xs)
    assert bool(sol.converged) and int(sol.result) == Result.SUCCESS
    assert 1 <= int(sol.iterations) <= (20 if jacobian == "dense" else 200)
    np.testing.assert_allclose(sol.states, ref, atol=5e-5, rtol=1e-4)
    assert float(sol.residual) < 1e-4
    assert rel_err(g, g_ref) < 1e-4


def test_autodiff_jacobian_equals_analytic():
    step, params, z0, xs = problem("shplrnn", 300)
    plain = lambda p, z, x: step(p, z, x)  # noqa: E731  (no .jac attribute: autodiff path)
    a = deer(step, params, z0, xs)
    b = deer(plain, params, z0, xs)
    np.testing.assert_allclose(a.states, b.states, atol=1e-6)
    ga = loss_grads(lambda p, z, x: deer(step, p, z, x).states, params, z0, xs)
    gb = loss_grads(lambda p, z, x: deer(plain, p, z, x).states, params, z0, xs)
    assert rel_err(ga, gb) < 1e-5


def test_short_sequences_and_warm_start():
    for T in (1, 2, 5):
        step, params, z0, xs = problem("gru", T)
        np.testing.assert_allclose(deer(step, params, z0, xs).states, sequential(step, params, z0, xs),
                                   atol=1e-6)
    step, params, z0, xs = problem("clipped", 2000)
    ref = sequential(step, params, z0, xs)
    sol = deer(step, params, z0, xs, init=ref)
    assert int(sol.iterations) == 0  # started at the solution: its residual is within tolerance
    # init receives no gradient
    g = jax.grad(lambda i: jnp.sum(deer(step, params, z0, xs, init=i).states))(ref)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_vmap_over_deer_and_deer_batch():
    B, T = 3, 257
    step, params, _, _ = problem("gru", T)
    z0 = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (B, 4))
    xs = jax.random.normal(jax.random.PRNGKey(6), (B, T, 2))
    ref = jax.vmap(lambda z, x: sequential(step, params, z, x))(z0, xs)
    sol = jax.vmap(lambda z, x: deer(step, params, z, x))(z0, xs)
    np.testing.assert_allclose(sol.states, ref, atol=1e-5)
    assert sol.iterations.shape == (B,)
    sol_b = deer_batch(step, params, z0, xs)
    np.testing.assert_allclose(sol_b.states, ref, atol=1e-5)
    g_ref = jax.grad(lambda p: loss_fn(jax.vmap(lambda z, x: sequential(step, p, z, x))(z0, xs)))(params)
    g = jax.grad(lambda p: loss_fn(deer_batch(step, p, z0, xs).states))(params)
    assert rel_err(g, g_ref) < 1e-4


def test_gtf_converges_on_chaotic_map_where_plain_deer_does_not():
    """Explicit-Euler Lorenz-63 forced by noisy RK4 data (not its own trajectory)."""
    for T in (10_000, 100_000):
        data = noisy_lorenz(T)
        z0, xs, init = data[0], data[:-1], data[1:]
        forced = {"alpha": jnp.float32(0.1), "dt": jnp.float32(0.01)}
        free = {"alpha": jnp.float32(0.0), "dt": jnp.float32(0.01)}
        run = jax.jit(lambda p, i: deer(euler_lorenz, p, z0, xs, init=i, max_iter=30, throw=False))
        cold = run(forced, jnp.broadcast_to(z0, init.shape))
        warm = run(forced, init)
        plain = run(free, init)
        assert bool(cold.converged) and int(cold.iterations) <= 8, (T, int(cold.iterations))
        assert bool(warm.converged) and int(warm.iterations) <= 4, (T, int(warm.iterations))
        # α = 0 (plain DEER) on a chaotic map: no convergence (its linear steps overflow, or max_iter)
        assert not bool(plain.converged) and int(plain.result) in (Result.MAX_ITER, Result.NONFINITE)
        ref = sequential(euler_lorenz, forced, z0, xs)
        np.testing.assert_allclose(warm.states, ref, atol=1e-3, rtol=1e-4)


def test_nonconvergence_is_reported_and_poisons_the_gradient():
    data = noisy_lorenz(2000)
    forced = {"alpha": jnp.float32(0.1), "dt": jnp.float32(0.01)}
    z0, xs = data[0], data[:-1]
    sol = deer(euler_lorenz, forced, z0, xs, max_iter=2, throw=False)
    assert not bool(sol.converged) and int(sol.result) == Result.MAX_ITER and int(sol.iterations) == 2
    assert float(sol.residual) > 1e-3
    g = jax.grad(lambda p: jnp.sum(deer(euler_lorenz, p, z0, xs, max_iter=2, throw=False).states))(forced)
    assert all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree.leaves(g))
    with pytest.raises(Exception, match="Newton solve failed"):
        jax.block_until_ready(jax.jit(lambda p: deer(euler_lorenz, p, z0, xs, max_iter=2).states)(forced))


def test_fallback_finishes_sequentially():
    data = noisy_lorenz(500)
    free = {"alpha": jnp.float32(0.0), "dt": jnp.float32(0.01)}
    z0, xs = data[0], data[:-1]
    sol = deer(euler_lorenz, free, z0, xs, max_iter=2, fallback=True)
    assert bool(sol.converged) and int(sol.result) == Result.FALLBACK
    np.testing.assert_allclose(sol.states, sequential(euler_lorenz, free, z0, xs), rtol=1e-6, atol=1e-5)
    g = jax.grad(lambda p: loss_fn(deer(euler_lorenz, p, z0, xs, max_iter=2, fallback=True).states))(free)
    g_ref = jax.grad(lambda p: loss_fn(sequential(euler_lorenz, p, z0, xs)))(free)
    assert rel_err(g, g_ref) < 1e-3


def test_nonfinite_iterate_is_reported():
    def blowup(p, z, x):
        return jnp.exp(p * z) + x  # overflows within a few steps

    sol = deer(blowup, jnp.float32(30.0), jnp.ones(2), jnp.ones((200, 2)), throw=False)
    assert not bool(sol.converged)
    assert int(sol.result) in (Result.NONFINITE, Result.MAX_ITER)
    assert bool(jnp.all(jnp.isfinite(sol.states)))  # the non-finite iterate is not returned


@pytest.mark.parametrize("bad,match", [
    (dict(z0=jnp.ones(3)), "step.* fails for z of shape"),
    (dict(step=lambda p, z, x: jnp.concatenate([z, z])), "must return the state shape"),
    (dict(z0=jnp.ones((2, 4))), "z0 must have shape"),
    (dict(z0=jnp.array([0.0, jnp.nan, 0.0, 0.0])), "non-finite"),
    (dict(xs=jnp.ones((0, 4))), "T=0"),
    (dict(xs=(jnp.ones((10, 4)), jnp.ones((11, 4)))), "same leading time axis"),
    (dict(init=jnp.ones((9, 4))), "init must have shape"),
    (dict(jacobian="full"), "jacobian must be one of"),
    (dict(mesh=jax.make_mesh((1,), ("data",))), "no axis named 'time'"),
])
def test_bad_inputs_raise_before_compute(bad, match):
    step, params, z0, xs = problem("shplrnn", 10)
    args = dict(z0=z0, xs=xs)
    kwargs = {}
    for k, v in bad.items():
        (args if k in ("z0", "xs") else kwargs)[k] = v
    if isinstance(args["xs"], tuple):
        step = lambda p, z, x: z + x[0]  # noqa: E731
    step = kwargs.pop("step", step)
    with pytest.raises(ValueError, match=match):
        deer(step, params, args["z0"], args["xs"], **kwargs)


def test_public_api_names():
    for name in ("sequential", "deer", "deer_batch", "deer_shard", "Solution", "Result", "SolverError"):
        assert hasattr(distdeer, name)
    assert distdeer.Solution._fields == ("states", "iterations", "converged", "residual", "result")
    assert issubclass(SolverError, RuntimeError)


def test_import_does_not_load_ray():
    import subprocess
    import sys
    code = "import sys, distdeer, distdeer.bench.solver; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general in a jaxpr, its sub-jaxprs (loops, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr → Jaxpr
                if hasattr(inner, "eqns"):
                    found += _dot_precisions(inner)
    return found


@pytest.mark.parametrize("name", ["gru", "clipped"])
def test_solver_traces_float32_matmuls(name):
    """With JAX's GPU default for float32 products (TF32), Newton stalled at a residual of ~1e-3 on an
    H200; the forward solve and the adjoint, the user's step inside them included, must trace every
    matrix product at full precision whatever the default."""
    step, params, z0, xs = problem(name, 64)

    def loss(p):
        return jnp.sum(deer(step, p, z0, xs, throw=False).states ** 2)

    with jax.default_matmul_precision("tensorfloat32"):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
    precisions = _dot_precisions(jaxpr)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert len(precisions) >= 4, precisions  # step, Jacobians, scan, adjoint products
    assert all(p == highest for p in precisions), precisions


def test_training_and_evaluation_run_with_float32_matmuls():
    """Training (both solvers) and evaluation's free runs trace under the same full-precision setting as
    the solver, so a GPU computes the recurrence a CPU computes."""
    from distdeer import eval as eval_mod
    from distdeer.precision import float32_matmuls
    from distdeer.train import loop

    for fn in (loop.run, eval_mod.evaluate):  # wrappers made by float32_matmuls share one code object
        assert fn.__code__ is float32_matmuls(len).__code__, fn
    traced = float32_matmuls(lambda a: a @ a)
    with jax.default_matmul_precision("tensorfloat32"):
        precisions = _dot_precisions(jax.make_jaxpr(traced)(jnp.eye(3)).jaxpr)
    assert precisions == [(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]


@pytest.mark.parametrize("wrong_jacobian", [False, True])
def test_success_is_only_reported_when_the_residual_test_passes(wrong_jacobian):
    """Quasi-Newton (diagonal) converges linearly, so a small Newton step does not make a solution: a
    SUCCESS is reported only for states whose per-step residual ‖z_t − f(z_{t−1})‖∞ is within
    atol + rtol ‖z_t‖∞ (checked here independently of the solver), and the diagonal adjoint is accepted
    only when its own residual test passes — its gradient then matches BPTT's.  Strongly coupled 3-unit
    maps (off-diagonal Jacobian entries up to 10, so the residual can exceed the step by that factor),
    with the exact diagonal and with a supplied inexact one (0.5 × the diagonal: slower convergence)."""
    rng = np.random.default_rng(1)
    step = lambda p, z, x: jnp.tanh(p @ z) + x  # noqa: E731
    exact = lambda p, z, x: (1 - jnp.tanh(p @ z) ** 2) * jnp.diagonal(p)  # noqa: E731
    jd = (lambda p, z, x: 0.5 * exact(p, z, x)) if wrong_jacobian else exact  # noqa: E731
    # jitted once: every trial has the same shapes (a fresh trace per trial would cost most of the test)
    solve = jax.jit(lambda A, xs: deer(step, A, jnp.zeros(3), xs, jacobian="diagonal", throw=False, jac_diag=jd,
                                       max_iter=400, adjoint="diagonal"))
    grad = jax.jit(jax.grad(lambda A, xs: loss_fn(solve(A, xs).states)))
    grad_ref = jax.jit(jax.grad(lambda A, xs: loss_fn(sequential(step, A, jnp.zeros(3), xs))))
    successes = 0
    for trial in range(12):
        A = rng.standard_normal((3, 3)) * (1, 3, 10)[trial % 3]
        np.fill_diagonal(A, rng.uniform(-0.9, 0.9, 3))
        A = jnp.asarray(A, jnp.float32)
        xs = jnp.asarray(rng.standard_normal((150, 3)) * (0.01, 0.1, 1.0)[trial % 3], jnp.float32)
        sol = solve(A, xs)
        Z = np.asarray(sol.states, np.float64)
        zprev = np.concatenate([np.zeros((1, 3)), Z[:-1]])
        residual = np.max(np.abs(Z - (np.tanh(zprev @ np.asarray(A, np.float64).T) + np.asarray(xs))), -1)
        excess = residual - (1e-5 + 1e-5 * np.max(np.abs(Z), -1))
        if int(sol.result) != Result.SUCCESS:
            continue
        successes += 1
        assert excess.max() <= 1e-6, (trial, excess.max())  # float32 evaluation of f vs float64 here
        g, g_ref = grad(A, xs), grad_ref(A, xs)
        if np.all(np.isfinite(np.asarray(g))):  # a NaN gradient is the adjoint's reported failure
            assert rel_err(g, g_ref) < 1e-3, trial
    assert successes >= 6


# Chunked evaluation (chunks.over_time): a chunk that divides T, one that leaves a remainder, one step.
@pytest.mark.parametrize("name,jacobian,chunk", [("clipped", "dense", 1000), ("clipped", "diagonal", 613),
                                                 ("gru", "diagonal", 1000), ("gru", "dense", 613),
                                                 ("shplrnn", "dense", 1)])
def test_chunked_evaluation_matches_sequential(name, jacobian, chunk):
    T = 4000 if chunk != 1 else 37
    step, params, z0, xs = problem(name, T)
    ref, g_ref = sequential_reference(name, T)
    sol, g = solve_and_grads(lambda p, z, x: deer(step, p, z, x, jacobian=jacobian, adjoint=jacobian, chunk=chunk),
                             params, z0, xs)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.states, ref, atol=5e-5, rtol=1e-4)
    assert rel_err(g, g_ref) < 1e-4  # params, z0 and xs


def test_chunking_bounds_the_compiled_memory_of_value_and_grad():
    """The step's hidden activations (T × L floats) dominate an unchunked value+grad; chunks of 2^12
    steps must cut the compiled temporaries at least fourfold (here T·L = 2^24 floats vs T·M = 2^18)."""
    T, M, L = 2 ** 16, 4, 256
    params = jax.eval_shape(lambda: plrnn.init_shplrnn(jax.random.PRNGKey(0), M, L))
    step = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M)
    S = jax.ShapeDtypeStruct

    def temp_bytes(chunk, jacobian):
        def vg(p, z0, xs):
            return jax.value_and_grad(lambda q: loss_fn(deer(step, q, z0, xs, throw=False, jacobian=jacobian,
                                                             chunk=chunk).states))(p)
        compiled = jax.jit(vg).lower(params, S((M,), jnp.float32), S((T, M), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for jacobian in ("dense", "diagonal"):
        whole, chunked = temp_bytes(None, jacobian), temp_bytes(2 ** 12, jacobian)
        assert chunked * 4 < whole, (jacobian, chunked, whole)


def test_bad_chunk_and_adjoint_are_rejected():
    step, params, z0, xs = problem("clipped", 10)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        deer(step, params, z0, xs, chunk=0)
    with pytest.raises(ValueError, match="adjoint must be one of"):
        deer(step, params, z0, xs, adjoint="sweeps")


def test_default_adjoint_follows_the_size_of_the_dense_maps():
    """After a diagonal solve the adjoint takes dense maps while T·M² ≤ 2^26 floats, matrix-free sweeps
    beyond (both exact); after a dense solve always dense maps."""
    from distdeer.solver import api
    z0 = jnp.zeros(16)
    opts = lambda jac, T: api._options(T, z0, jac, None, None, None, None, None, None, (), False, None, 200, None)  # noqa: E731
    assert opts("diagonal", 2 ** 18).adjoint == "dense"          # 2^26 floats
    assert opts("diagonal", 2 ** 18 + 1).adjoint == "diagonal"
    assert opts("dense", 2 ** 24).adjoint == "dense"
