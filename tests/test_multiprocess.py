"""Two real JAX processes (jax.distributed over gloo on localhost, one CPU device each) give the same
states and gradients as one process."""

import os
import subprocess
import sys

import jax
import numpy as np

from distdeer import deer, distributed, sequential
from problems import loss_fn, problem

HERE = os.path.dirname(os.path.abspath(__file__))


free_port = distributed.free_port  # the other test files import it from here


def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "subproc", "distributed_worker.py"),
                               coordinator, "2", str(i), str(tmp_path / f"out{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    step, params, z0, xs = problem("clipped", 1001)
    ref = sequential(step, params, z0, xs)
    g_ref = jax.tree.leaves(jax.grad(lambda p, z, x: loss_fn(sequential(step, p, z, x)),
                                     argnums=(0, 1, 2))(params, z0, xs))
    one = {}
    for jacobian in ("dense", "diagonal"):
        solve = lambda p, z, x: deer(step, p, z, x, jacobian=jacobian)  # noqa: E731
        one[jacobian] = (solve(params, z0, xs), jax.tree.leaves(
            jax.grad(lambda p, z, x: loss_fn(solve(p, z, x).states), argnums=(0, 1, 2))(params, z0, xs)))
        for rank in range(2):
            got = np.load(tmp_path / f"out{rank}-{jacobian}.npz")
            np.testing.assert_allclose(got[f"{jacobian}/states"], ref, atol=5e-5)
            np.testing.assert_allclose(got[f"{jacobian}/states"], one[jacobian][0].states, atol=1e-5)
            assert int(np.ravel(got[f"{jacobian}/iterations"])[0]) == int(one[jacobian][0].iterations)
            for i, (g1, g2) in enumerate(zip(g_ref, one[jacobian][1])):
                g = got[f"{jacobian}/g{i}"]
                assert np.max(np.abs(g - g1)) <= 1e-4 * (np.max(np.abs(g1)) + 1e-12)
                assert np.max(np.abs(g - g2)) <= 1e-5 * (np.max(np.abs(g2)) + 1e-12)


def test_two_processes_of_two_devices_train_like_one_device_at_T_2e4():
    """2 processes × 2 simulated CPU devices, whole-series training at T = 2·10^4: the same losses as one
    device.  This layout used to hang in its first step: each device's batched SVD (the Jacobian-norm
    sample, 1 250 matrices per block) waited for chunks jaxlib had queued on the thread pool that every one
    of them occupied (``gtf.spectral_norms``)."""
    from distdeer.bench import train as bench

    four = bench.in_processes(2, False, 20_000, 4, 3, 3, 8, [], False, timeout=300)
    one = bench.sharded(20_000, 1, 3, 3, 8)
    assert (four["devices"], four["processes"]) == (4, 2)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    assert 0 < four["collective_bytes_per_step"] < 4096  # a few halos and sums, nothing of size T
