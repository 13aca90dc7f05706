"""One row of a scaling study: GTF-DEER on all devices of this process group, with a time breakdown.

Run by ``launch/scaling.py`` in a fresh process (or in each of N ``jax.distributed`` processes) per
device count.  The totals come from ``distdeer.bench.solver.run`` (forward, value+grad, Newton
iterations, BPTT on one device).  The breakdown of one Newton iteration is measured piece by piece on
the slice one device owns (``n = ⌈T/P⌉`` steps), each piece jitted and timed alone:

* ``jacobian_s``: the step and its Jacobians at n states (``newton.steps`` + ``newton.jacobians``);
* ``local_scan_s``: the local scan of n affine maps (``scan.local_pass`` + ``finish``);
* ``cross_device_s``: the collectives of one iteration on the real mesh — halo ``ppermute`` of one
  state, all-gather of the P slice summaries (M² + M values each), the ``pmax`` of the stop test —
  timed as 200 iterations of a ``fori_loop`` / 200;
* ``other_s`` = per-iteration time − the three (the residual evaluation, masks, loop overhead).

``collective_bytes`` is read from the compiled DEER forward program (HLO): the summed result sizes of
the solver's own collectives (all-gather of the slice summaries, halo ppermute, pmax of the stop
tests) — what crosses devices per Newton iteration (they sit in the loop body, plus one final
residual test).  It must not grow with T.  ``resharding_bytes``: the partitioner's collectives that
lay the (replicated) inputs and outputs of the benchmark out over time — O(T), once per solve.
"""

from __future__ import annotations

import os
import resource

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from distdeer import gtf
from distdeer.bench import hlo as hlo_mod
from distdeer.bench import solver as solver_bench
from distdeer.models import plrnn
from distdeer.precision import float32_matmuls
from distdeer.solver import newton, scan

# The solver's own collectives come from JAX primitives in its shard_map body (all_gather, ppermute,
# pmax, ...: underscore names); the SPMD partitioner's resharding of inputs/outputs (once per solve,
# O(T)) gets hyphenated names (all-gather, collective-permute, all-reduce).
_PRIMITIVE = ("all_gather", "ppermute", "pmax", "pmin", "psum")


def collective_bytes(hlo: str) -> tuple[int, int]:
    """(bytes of the solver's own collectives, bytes of resharding collectives) in an HLO module:
    the summed result sizes of its collectives, split by the instruction's name."""
    own = reshard = 0
    for name, _, size in hlo_mod.collectives(hlo):
        if name.startswith(_PRIMITIVE):
            own += size
        else:
            reshard += size
    return own, reshard


def _best(fn, args, repeats: int) -> float:
    return solver_bench._time(fn, args, repeats)[0]


@float32_matmuls  # as inside the solver
def breakdown(T: int, M: int, L: int, jacobian: str, repeats: int = 3) -> dict:
    """Per-iteration pieces on one device's slice, and the collectives on the whole mesh."""
    Pn = len(jax.devices())
    n = -(-T // Pn)
    diagonal = jacobian == "diagonal"
    params = plrnn.init_shplrnn(jax.random.PRNGKey(0), M, L)
    step = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M, jac=plrnn.clipped_shplrnn_jac,
                           jac_diag=plrnn.clipped_shplrnn_jac_diag)
    dyn = newton.Dynamics(step, step.jac, step.jac_diag)
    local = jax.local_devices()[0]
    key = jax.random.PRNGKey(1)
    zprev, xs = jax.device_put((jax.random.normal(key, (n, M)), jax.random.normal(key, (n, M))), local)
    params = jax.device_put(params, local)

    def jac_eval(p, z, x):
        return newton.steps(dyn, p, z, x), newton.jacobians(dyn, diagonal, p, z, x)

    jac_fn = jax.jit(jac_eval)
    f, A = jac_fn(params, zprev, xs)

    def local_scan(A, b):
        summary, finish = scan.local_pass(A, b, diagonal=diagonal, method=scan.default_method())
        return finish(summary.s)

    out = {"slice_steps": n, "jacobian_s": _best(jac_fn, (params, zprev, xs), repeats),
           "local_scan_s": _best(jax.jit(local_scan), (A, f), repeats), "cross_device_s": 0.0}
    if Pn > 1:
        mesh = jax.make_mesh((Pn,), ("time",))
        reps = 200
        summary_S = jnp.zeros((Pn, M) if diagonal else (Pn, M, M), jnp.float32)
        summary_s = jnp.zeros((Pn, M), jnp.float32)

        def per_device(S, s):
            def body(_, c):
                S_, s_ = c
                halo = jax.lax.ppermute(s_[0], "time", [(i, (i + 1) % Pn) for i in range(Pn)])
                S_all = jax.lax.all_gather(S_[0], "time")
                s_all = jax.lax.all_gather(s_[0], "time")
                stop = jax.lax.pmax(jnp.max(halo), "time")
                return (S_ + 1e-9 * jnp.sum(S_all) * stop, s_ + 1e-9 * jnp.sum(s_all))
            return jax.lax.fori_loop(0, reps, body, (S, s))

        fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("time"), P("time")),
                                   out_specs=(P("time"), P("time"))))
        args = jax.device_put((summary_S, summary_s), jax.sharding.NamedSharding(mesh, P("time")))
        out["cross_device_s"] = _best(fn, args, repeats) / reps
    return out


def measure(T: int, M: int, L: int, jacobian: str = "dense", repeats: int = 3, baseline: bool = True) -> dict:
    """A full row: totals, breakdown, collective bytes, peak memory of this process."""
    Pn = len(jax.devices())
    res = solver_bench.run(solver_bench.SolverBench(T=T, latent=M, hidden=L, devices=Pn, jacobian=jacobian,
                                                    repeats=repeats, skip_sequential=not baseline))
    row = {"devices": Pn, "processes": jax.process_count(), "T": T, "M": M, "L": L, "jacobian": jacobian,
           "newton_iterations": res["newton_iterations"], "per_iteration_s": res["per_iteration_s"],
           "forward_s": res["deer_forward_s"], "value_grad_s": res["deer_value_grad_s"],
           "value_grad_warm_s": res["deer_value_grad_warm_s"],
           "bptt_value_grad_s": res.get("bptt_value_grad_s"), "converged": res["converged"],
           "loss": res["deer_loss"], "newton_iterations_warm": res["newton_iterations_warm"]}
    row.update(breakdown(T, M, L, jacobian, repeats))
    row["other_s"] = row["per_iteration_s"] - row["jacobian_s"] - row["local_scan_s"] - row["cross_device_s"]
    row["collective_bytes"], row["resharding_bytes"] = _forward_collective_bytes(T, M, L, jacobian, Pn)
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["backend"] = jax.default_backend()
    # The cores this run's devices share (simulated CPU devices are not extra hardware).
    row["cores"] = len(os.sched_getaffinity(0)) * jax.process_count() if row["backend"] == "cpu" else None
    return row


def _forward_collective_bytes(T: int, M: int, L: int, jacobian: str, Pn: int) -> tuple[int, int]:
    if Pn == 1:
        return 0, 0
    from distdeer.solver import deer

    mesh = jax.make_mesh((Pn,), ("time",))
    step = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M, jac=plrnn.clipped_shplrnn_jac,
                           jac_diag=plrnn.clipped_shplrnn_jac_diag)
    params = jax.eval_shape(lambda: plrnn.init_shplrnn(jax.random.PRNGKey(0), M, L))
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    fn = jax.jit(lambda p, z0, xs: deer(step, p, z0, xs, mesh=mesh, jacobian=jacobian, throw=False).states)
    return collective_bytes(fn.lower(params, S(M), S(T, M)).compile().as_text())


@float32_matmuls  # as inside the solver
def scan_bandwidth(T: int, M: int, method: str | None = None, repeats: int = 3) -> dict:
    """Achieved memory bandwidth of the local affine scan on one device: time of ``local_pass`` +
    ``finish`` over T dense maps, against the least traffic it must move (read T (M² + M) inputs, write
    T M states, float32) — a lower bound on the bytes, so the bandwidth is a lower bound too."""
    method = method or scan.default_method()
    key = jax.random.PRNGKey(0)
    A = 0.5 * jax.random.normal(key, (T, M, M), jnp.float32) / np.sqrt(M)
    b = jax.random.normal(key, (T, M), jnp.float32)

    def run(A, b):
        summary, finish = scan.local_pass(A, b, diagonal=False, method=method)
        return finish(jnp.zeros((M,), b.dtype))

    t = _best(jax.jit(run), (A, b), repeats)
    moved = 4 * T * (M * M + M + M)
    return {"T": T, "M": M, "method": method, "seconds": t, "bytes_min": moved, "GB_per_s": moved / t / 1e9,
            "device_kind": jax.devices()[0].device_kind}


def measure_in_group(coordinator: str | None, hosts: int, rank: int, timeout_s: int, *, T: int, M: int, L: int,
                     jacobian: str = "dense", repeats: int = 3, baseline: bool = True) -> dict | None:
    """``measure`` as rank ``rank`` of ``hosts`` ``jax.distributed`` processes (one process: no group);
    the row on process 0, None on the others.  The BPTT baseline runs only in one-process rows."""
    from distdeer import distributed

    if hosts > 1:
        distributed.initialize(coordinator, hosts, rank, timeout_s)
    row = measure(T, M, L, jacobian, repeats, baseline=baseline and hosts == 1)
    if hosts > 1:
        distributed.shutdown()
    return row if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    """``python -m distdeer.bench.scaling --T … --latent M --hidden L --out ROW.json`` — one row; with
    ``--coordinator HOST:PORT --hosts N --rank R`` one process of an N-process group (rank 0 writes)."""
    import argparse

    from distdeer.config import CHOICES
    import json

    ap = argparse.ArgumentParser(prog="python -m distdeer.bench.scaling")
    ap.add_argument("--T", type=int, required=True)
    ap.add_argument("--latent", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--jacobian", default="dense", choices=CHOICES["solver.jacobian"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--coordinator")
    ap.add_argument("--hosts", type=int, default=1)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    row = measure_in_group(a.coordinator, a.hosts, a.rank, 300, T=a.T, M=a.latent, L=a.hidden, jacobian=a.jacobian,
                           repeats=a.repeats, baseline=not a.no_baseline)
    if row is not None:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
