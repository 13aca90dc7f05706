"""The user's path: ``distdeer.deer(step, params, z0, xs)`` with nothing else given (autodiff Jacobians,
the default initial guess, no forcing) against BPTT, value+grad of the mean squared states
(docs/benchmarks.md, "The user's path").

    taskset -c 1 python launch/analysis/user_path.py M [--rounds 7] [--peer DIR]

The problem: ``z_t = a ⊙ z_{t−1} + W1 relu(W2 z_{t−1} + h2) + x_t``, a = 0.5, W1 ~ 0.05 N(0, 1) (M × L),
W2 ~ 0.2 N(0, 1) (L × M), h2 ~ 0.1 N(0, 1), x_t ~ 0.01 N(0, 1), z_0 ~ N(0, 1), T = 10^5, L = 50 for M = 3
and 64 otherwise.  Timed in rounds, each method once per round in turn (interleaved), medians over the
rounds, programs compiled ahead of time.  ``--peer DIR``: also time another DEER implementation whose
``deer.seq1d(func, y0, xs, params)`` is importable from DIR (the published one, for a side-by-side).
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import distdeer

ap = argparse.ArgumentParser()
ap.add_argument("M", type=int)
ap.add_argument("--T", type=int, default=100_000)
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--peer", default=None)
args = ap.parse_args()
M, T = args.M, args.T
L = 50 if M == 3 else 64
k = jax.random.split(jax.random.PRNGKey(0), 5)
params = {"a": jnp.full((M,), 0.5), "W1": 0.05 * jax.random.normal(k[0], (M, L)),
          "W2": 0.2 * jax.random.normal(k[1], (L, M)), "h2": 0.1 * jax.random.normal(k[2], (L,))}
xs = 0.01 * jax.random.normal(k[3], (T, M))
z0 = jax.random.normal(k[4], (M,))


def step(p, z, x):
    return p["a"] * z + p["W1"] @ jax.nn.relu(p["W2"] @ z + p["h2"]) + x


def value_grad(states_of):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(states_of(p) ** 2)))


methods = {
    "BPTT": value_grad(lambda p: distdeer.sequential(step, p, z0, xs)),
    "distdeer dense": value_grad(lambda p: distdeer.deer(step, p, z0, xs).states),
    "distdeer diagonal": value_grad(lambda p: distdeer.deer(step, p, z0, xs, jacobian="diagonal").states),
}
if args.peer:
    sys.path.insert(0, args.peer)
    import deer as peer  # noqa: E402

    methods["peer DEER"] = value_grad(lambda p: peer.seq1d(lambda y, x, q: step(q, y, x), z0, xs, p).value)

compiled = {name: fn.lower(params).compile() for name, fn in methods.items()}
ref = jax.block_until_ready(compiled["BPTT"](params))
times = {name: [] for name in compiled}
for name, fn in compiled.items():  # one untimed run each, and the gradient against BPTT's
    v, g = jax.block_until_ready(fn(params))
    err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in
              zip(jax.tree.leaves(g), jax.tree.leaves(ref[1])))
    print(f"{name:20s} loss {float(v):.6g}  grad rel. err vs BPTT {err:.1e}")
for _ in range(args.rounds):
    for name, fn in compiled.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times[name].append(time.perf_counter() - t0)
bptt = float(np.median(times["BPTT"]))
print(f"T={T} M={M} L={L} rounds={args.rounds} backend={jax.default_backend()}")
for name, ts in times.items():
    med = float(np.median(ts))
    print(f"  {name:20s} median {1e3 * med:8.1f} ms  ({med / bptt:.2f}x BPTT)  min {1e3 * min(ts):.1f} max {1e3 * max(ts):.1f}")
