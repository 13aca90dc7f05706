"""Affine scans against a plain sequential loop (an independent reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer.solver import scan


def reference(A, b, h, diagonal, transpose, reverse):
    A, b, h = np.asarray(A, np.float64), np.asarray(b, np.float64), np.asarray(h, np.float64)
    n = b.shape[0]
    z = np.zeros_like(b)
    order = range(n - 1, -1, -1) if reverse else range(n)
    for t in order:
        a = A[t]
        if diagonal:
            h = a * h + b[t]
        else:
            h = (a.T if transpose else a) @ h + b[t]
        z[t] = h
    return z


@pytest.mark.parametrize("method,block", [("sequential", None), ("blocked", None), ("blocked", 7), ("blocked", 1),
                                          ("blocked", 500), ("associative", None)])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("transpose,reverse", [(False, False), (True, True), (False, True)])
def test_solve_matches_loop(method, block, diagonal, transpose, reverse):
    n, m = 103, 4
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    shape = (n, m) if diagonal else (n, m, m)
    A = 0.6 * jax.random.normal(k1, shape) / (1 if diagonal else np.sqrt(m))
    b = jax.random.normal(k2, (n, m))
    h = jax.random.normal(k3, (m,))
    z, h_in = scan.solve(A, b, h, diagonal=diagonal, transpose=transpose, reverse=reverse,
                         method=method, block=block)
    ref = reference(A, b, h, diagonal, transpose, reverse)
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h_in, h)


@pytest.mark.parametrize("diagonal,transpose,reverse", [(False, False, False), (False, True, True), (True, False, True)])
def test_summary_is_the_slice_map(diagonal, transpose, reverse):
    """The slice summary maps the incoming state to the outgoing one (the last state, or the first when
    the recurrence runs backwards), for every method."""
    n, m = 50, 3
    A = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (n, m) if diagonal else (n, m, m))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, m))
    h = jax.random.normal(jax.random.PRNGKey(2), (m,))
    for method in scan.METHODS:
        summary, finish = scan.local_pass(A, b, diagonal=diagonal, transpose=transpose, reverse=reverse,
                                          method=method, block=8)
        out = finish(h)[0 if reverse else -1]
        np.testing.assert_allclose(scan.apply(summary.S, h, diagonal=diagonal) + summary.s, out, rtol=1e-5,
                                   atol=1e-6)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown scan method"):
        scan.local_pass(jnp.ones((3, 2)), jnp.ones((3, 2)), diagonal=True, method="nope")
