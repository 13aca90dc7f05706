"""The whole-series loss computed on time slices: every O(T) array stays sharded over ``"time"``.

Layout (the slot layout of ``distdeer.mesh``): the T steps t = 1..T of a series ``x_0 … x_T`` are cut
into P contiguous blocks of ``n = ⌈T/P⌉`` slots, one block per device of the ``"time"`` mesh axis (P = 1
without a mesh).  Slot s (global index, 0 ≤ s < n·P) is step t = s + 1: its input is row s (the forcing
state ẑ_s), its state z_{s+1} (the warm start), its target the next row x_{s+1}.  Slots s ≥ T are
padding, masked everywhere.

What each device holds and exchanges per training step:

* ``rows``: its n rows of the series, ``(n, N)`` (the global array ``(n·P, N)``; rows past x_T repeat it);
* ``ends``: ``(2, N)`` = (x_0, x_T), replicated — x_0 gives the initial state on every device, x_T the
  target of the last real step when it falls on a block boundary;
* ``warm``: its n slots of the Newton warm start / solution states ``(n, M)``;
* exchanged: one row of the series and one state from the right/left neighbour (halos), the
  solver's own O(P·M²) slice summaries, and a few scalars (sums of the loss, the Jacobian-norm sample
  and the solver's statistics).  Nothing whose size grows with T leaves a device.

Every quantity is a function of global indices (the noise of row r is drawn from ``fold_in(key, r)``,
the Jacobian-norm sample takes the rows r ≡ 0 mod stride), so results do not depend on P beyond the
order of floating-point sums.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from distdeer.gtf import AlphaInParams, spectral_norms
from distdeer.models import Model
from distdeer.solver import Result, Solution, deer, deer_shard, linear, sequential
from distdeer.solver.newton import from_left, from_right

AXIS = "time"


# -- collectives that are no-ops without a mesh axis ---------------------------------------------------

def _psum(x, axis):
    return x if axis is None else lax.psum(x, axis)


def _index(axis):
    return 0 if axis is None else lax.axis_index(axis)


# -- per-slice pieces ------------------------------------------------------------------------------------

def slot_index(n: int, axis) -> jax.Array:
    """Global slot (= input row) indices ``(n,)`` of this device's block."""
    return _index(axis) * n + jnp.arange(n)


def targets(rows: jax.Array, ends: jax.Array, axis) -> jax.Array:
    """``x_{s+1}`` for every slot of the block ``(n, N)`` (one halo row from the right)."""
    return jnp.concatenate([rows[1:], from_right(rows[0], ends[1], axis)[None]])


def row_noise(key: jax.Array, index: jax.Array, width: int, dtype) -> jax.Array:
    """Gaussian noise ``(len(index), width)`` for global rows ``index``: row r from ``fold_in(key, r)``, so
    the draw of a row does not depend on how the series is cut."""
    return jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), (width,), dtype))(index)


def norm_sums(jac, F_params, zt: jax.Array, index: jax.Array, steps: int, sample: int, axis) -> jax.Array:
    """Partial sums (Σ log‖J‖₂, Σ ‖J‖₂, count) over the sampled global rows r ≡ 0 (mod stride), r < T, of
    this block's forced states ``zt`` (n, M); stride = max(1, T // sample) as for one unsharded sequence.
    Summed over devices (3 floats)."""
    n = zt.shape[0]
    stride = max(1, steps // sample)
    first = (-index[0]) % stride  # position of the block's first sampled row
    pos = first + stride * jnp.arange(-(-n // stride))
    keep = (pos < n) & (index[0] + pos < steps)
    z = zt[jnp.minimum(pos, n - 1)]
    norms = spectral_norms(jax.vmap(lambda v: jac(F_params, v))(z))
    sums = jnp.stack([jnp.sum(jnp.where(keep, jnp.log(jnp.maximum(norms, 1e-30)), 0.0)),
                      jnp.sum(jnp.where(keep, norms, 0.0)), jnp.sum(keep).astype(norms.dtype)])
    return _psum(sums, axis)


def no_norm_sums(dtype) -> jax.Array:
    """The sums when 𝒩 is not estimated (an LRU: the rule does not apply): 𝒩 comes out NaN."""
    return jnp.array([jnp.nan, jnp.nan, 1.0], dtype)


def norm_from_sums(sums: jax.Array, kind: str) -> jax.Array:
    """𝒩 of one sequence from ``norm_sums``: the geometric mean (``max`` and ``geometric`` coincide for a
    single sequence) or the arithmetic mean (``mean``)."""
    if kind == "mean":
        return sums[1] / sums[2]
    return jnp.exp(sums[0] / sums[2])


def local_loss(model: Model, gtf_step: AlphaInParams, solve, steps: int, noise: float, sample: int, axis,
               params, alpha, rows, ends, warm, key):
    """This block's share of the whole-series loss.

    Args (per device): ``rows`` (n, N), ``ends`` (2, N), ``warm`` (n, M) Newton initial guess; ``key``
    the step's noise key (used when ``noise`` > 0); ``gtf_step`` is the GTF-forced step taking
    ``(F_params, α)`` and ``solve(step, params, z0, zhat, warm, axis)`` solves it on the block (``solver``).
    Returns ``(mse, (Solution with this block's states, norm_sums))``: the mean squared error over all T
    real steps and N dimensions (identical on every device), the solver's global statistics, and the
    Jacobian-norm partial sums of the forced states (computed without gradient; ``sample`` None: not
    estimated, ``no_norm_sums``).
    """
    n, N = rows.shape
    index = slot_index(n, axis)
    valid = index < steps
    x_next = targets(rows, ends, axis)
    xf, x0 = rows, ends[0]
    if noise > 0:  # only the forcing observations are perturbed, the targets stay clean
        xf = rows + noise * row_noise(key, index, N, rows.dtype)
        x0 = ends[0] + noise * row_noise(key, jnp.zeros((1,), jnp.int32), N, rows.dtype)[0]
    zhat = model.forcing(params, xf)
    z0 = model.initial_state(params, x0)
    sol = solve(gtf_step, (params["F"], alpha), z0, zhat, warm, axis)
    pred = model.observe(params, sol.states)
    sq = jnp.where(valid, jnp.sum((pred - x_next) ** 2, axis=-1), 0.0)
    mse = _psum(jnp.sum(sq), axis) / (steps * N)
    if sample is None:
        return mse, (sol, no_norm_sums(mse.dtype))
    states = lax.stop_gradient(sol.states)
    zprev = jnp.concatenate([from_left(states[-1], lax.stop_gradient(z0), axis)[None], states[:-1]])
    zt = gtf_step.at(alpha).forced_state(zprev, lax.stop_gradient(zhat))
    sums = norm_sums(model.jac, lax.stop_gradient(params["F"]), zt, index, steps, sample, axis)
    return mse, (sol, sums)


def exact(states: jax.Array) -> Solution:
    """The Solution of states computed sequentially (exact by construction: GTF-BPTT)."""
    return Solution(states, jnp.int32(0), jnp.bool_(True), jnp.zeros((), states.dtype), jnp.int32(Result.SUCCESS))


def teacher_forced(model: Model, F_params, z0, zhat, axis) -> Solution:
    """The states of an LRU at α = 1 on a block (``Model.teacher_forced``): one time-sharded scan per layer,
    exact (``solver.linear``)."""
    recurrence = lambda a, b, h0: linear.recurrence(a, b, h0, axis)  # noqa: E731
    return exact(model.teacher_forced(F_params, z0, zhat, recurrence))


def solver(kind: str, steps: int, solver_kw: dict, model: Model):
    """``solve(step, params, z0, zhat, warm, axis) -> Solution`` on one block: DEER (``deer`` on one
    device, ``deer_shard`` on a slice), the sequential GTF-BPTT baseline (one device only), or the exact
    scan of a teacher-forced LRU (``params`` = (F params, α), α = 1 by configuration)."""
    def solve(step, params, z0, zhat, warm, axis):
        if kind == "scan":
            return teacher_forced(model, params[0], z0, zhat, axis)
        if kind == "sequential":
            if axis is not None:
                raise ValueError("solver.kind=sequential runs on one device: set mesh.devices=1")
            return exact(sequential(step, params, z0, zhat))
        if axis is None:
            return deer(step, params, z0, zhat, init=warm, throw=False, **solver_kw)
        return deer_shard(step, params, z0, zhat, init=warm, axis_name=axis, length=steps, **solver_kw)

    return solve


def sharded(fn, mesh):
    """``fn(params, alpha, rows, ends, warm, key)`` run per block under ``shard_map`` over ``"time"``:
    rows and warm sharded, everything else replicated; the states come back sharded."""
    rep, t = P(), P(AXIS)
    sol_spec = Solution(t, rep, rep, rep, rep)
    return jax.shard_map(partial(fn, AXIS), mesh=mesh, in_specs=(rep, rep, t, rep, t, rep),
                         out_specs=(rep, (sol_spec, rep)))
