"""A jaxlib (0.10) CPU deadlock, reproduced without distdeer: one process, two simulated CPU devices.

    python docs/repro/lapack_pool_deadlock.py 2000     # hangs on a 2-core machine (kill it)
    python docs/repro/lapack_pool_deadlock.py 700      # finishes

jaxlib's CPU LAPACK kernels cut a batch whose estimated cost reaches 2·10^5 FLOP (SVD: 10·m·n·min(m, n)
per matrix, 270 for 3×3, so from 741 matrices on) into chunks queued on XLA's intra-op thread pool, and
block their own thread until the chunks have run.  Here each device first runs a while loop whose body
has independent work, so XLA's thunk executor uses the pool and the program continues on a pool thread;
then each device calls a batched SVD there.  With as many devices per process as pool threads (= cores),
every pool thread ends up waiting for chunks that no free thread is left to run.  gdb shows both
``tf_XLAEigen`` threads in ``jax::ParallelBatchMap`` → ``absl::BlockingCounter::Wait`` under
``lapack_sgesdd_ffi``.  The collectives (gloo across processes) are not involved: they only make the
devices reach the SVD together.  distdeer avoids it in ``distdeer.gtf.spectral_norms``.
"""

import os
import sys

B = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((2,), ("d",))


def per_device(a, u, v):  # a (B, 3, 3); u, v (256, 256)
    def body(c):
        u, v, i = c
        return jnp.tanh(u @ u), jnp.tanh(v @ v), i + 1  # two independent pieces of work per iteration

    u, v, _ = jax.lax.while_loop(lambda c: c[2] < 4, body, (u, v, 0))
    return jax.lax.psum(jnp.sum(jnp.linalg.norm(a + u[0, 0] + v[0, 0], 2, axis=(1, 2))), "d")


f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"),) * 3, out_specs=P()))
sharded = NamedSharding(mesh, P("d"))
a = jax.device_put(jax.random.normal(jax.random.key(0), (2 * B, 3, 3)), sharded)
u = jax.device_put(jax.random.normal(jax.random.key(1), (512, 256)) / 16, sharded)
v = jax.device_put(jax.random.normal(jax.random.key(2), (512, 256)) / 16, sharded)
for _ in range(20):
    result = float(f(a, u, v))
print(f"finished: B={B}, {len(os.sched_getaffinity(0))} CPUs, result {result:.3f}")
