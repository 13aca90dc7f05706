"""One process of a 2-process jax.distributed run (CPU, gloo, one device per process).

Usage: python distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz
Solves a problem time-sharded over the devices of all processes and saves states and gradients.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

coordinator, nproc, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc, process_id=pid,
                           initialization_timeout=120)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from distdeer import deer  # noqa: E402
from problems import loss_fn, problem  # noqa: E402

assert jax.process_count() == nproc and len(jax.devices()) == nproc, (jax.process_count(), jax.devices())
mesh = jax.make_mesh((nproc,), ("time",))
for jacobian in ("dense", "diagonal"):
    step, params, z0, xs = problem("clipped", 1001)
    rep = NamedSharding(mesh, P())
    params, z0, xs = jax.device_put((params, z0, xs), rep)
    solve = lambda p, z, x: deer(step, p, z, x, mesh=mesh, jacobian=jacobian)  # noqa: E731
    sol = jax.jit(solve)(params, z0, xs)
    g = jax.jit(jax.grad(lambda p, z, x: loss_fn(solve(p, z, x).states), argnums=(0, 1, 2)))(params, z0, xs)
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))  # noqa: E731
    flat = {f"{jacobian}/g{i}": gather(leaf) for i, leaf in enumerate(jax.tree.leaves(g))}
    flat[f"{jacobian}/states"] = gather(sol.states)
    flat[f"{jacobian}/iterations"] = np.asarray(gather(sol.iterations))
    np.savez(out.replace(".npz", f"-{jacobian}.npz"), **flat)
jax.distributed.shutdown()
