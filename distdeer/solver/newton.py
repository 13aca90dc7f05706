"""DEER Newton iterations on one time slice and their implicit adjoint (design §2.3–2.5).

Everything here is written from the point of view of one device holding ``n`` consecutive steps of
a (padded) sequence.  With ``opts.axis_name = None`` the slice is the whole sequence; otherwise the
functions must run inside ``shard_map`` over that mesh axis and exchange halos, slice summaries and
convergence flags with the other devices.  ``solve_slice`` is the differentiable entry point.

Conventions: ``z_t = f_t(z_{t-1}) = step(params, z_{t-1}, x_t)`` for t = 1..T; ``zprev`` is the
array of ``z_{t-1}`` aligned with ``x_t``; padded steps (global index ≥ ``opts.length``) carry the last
state through unchanged (identity map) and are excluded from every test and from the adjoint.
"""

from __future__ import annotations

import dataclasses
import enum
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from distdeer.precision import float32_matmuls
from distdeer.solver import chunks, scan, vma


class Result(enum.IntEnum):
    """Outcome of a solve, stored as an int in ``Solution.result``."""

    SUCCESS = 0  # Newton converged: ‖z_t − f_t(z_{t−1})‖ ≤ atol + rtol ‖z_t‖ at every step (residual test)
    MAX_ITER = 1  # max_iter reached without convergence
    NONFINITE = 2  # an iterate became non-finite; the last finite iterate is returned
    FALLBACK = 3  # Newton failed, the sequential fallback produced the states


class Solution(NamedTuple):
    """Result of ``deer``.  Only ``states`` carries gradients; the other fields are statistics."""

    states: jax.Array  # (T, M)
    iterations: jax.Array  # int32: Newton iterations run
    converged: jax.Array  # bool: states solve the recurrence to tolerance (Newton or fallback)
    residual: jax.Array  # max_t ‖z_t − step(params, z_{t−1}, x_t)‖_∞ at the returned states
    result: jax.Array  # int32 code of ``Result``


class Dynamics(NamedTuple):
    """The step and, optionally, its analytic Jacobian w.r.t. the state (dense or diagonal)."""

    step: Callable
    jac: Callable | None = None  # (params, z, x) -> (M, M)
    jac_diag: Callable | None = None  # (params, z, x) -> (M,)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static solver settings (hashable: they select the compiled program).  No defaults here: the public
    API (``api.options``) fills every field, from its own defaults and the backend's."""

    length: int  # valid global steps T; the rest of the slices is padding
    jacobian: str  # "dense" or "diagonal"
    max_iter: int
    atol: float
    rtol: float
    method: str  # local scan: "sequential", "blocked" or "associative" (scan.METHODS)
    block: int | None  # block length of the blocked scan; None: ≈ √n
    axis_name: Any  # mesh axis sharding time, or None
    sync_axes: tuple  # every manual mesh axis: loops run in lockstep over all of them
    fallback: bool
    adjoint: str  # "dense": one reverse scan of dense maps; "diagonal": matrix-free sweeps (O(n M) memory)
    adjoint_max_iter: int  # diagonal adjoint only: its sweeps
    chunk: int | None  # steps per chunk of step/Jacobian/VJP evaluations (chunks.over_time); None: all at once

    @property
    def diagonal(self) -> bool:
        return self.jacobian == "diagonal"


# ---------------------------------------------------------------------------------------------
def _pmax(x, axes):
    return lax.pmax(x, axes) if axes else x


# ---------------------------------------------------------------------------------------------
# Step evaluation on a slice.

def _valid(n: int, opts: Options) -> jax.Array:
    """Mask (n,) of real (unpadded) steps in this slice."""
    start = 0 if opts.axis_name is None else lax.axis_index(opts.axis_name) * n
    return (start + jnp.arange(n)) < opts.length


def from_left(last, z0, axis_name):
    """State before this slice's first step: z0 on device 0, else the left neighbour's last state."""
    if axis_name is None:
        return z0
    p = lax.axis_size(axis_name)
    recv = lax.ppermute(last, axis_name, [(i, i + 1) for i in range(p - 1)])
    return jnp.where(lax.axis_index(axis_name) == 0, z0, recv)


def from_right(first, last_fill, axis_name):
    """Row after this slice's last step: the right neighbour's first row, ``last_fill`` on the last device."""
    if axis_name is None:
        return last_fill
    p = lax.axis_size(axis_name)
    recv = lax.ppermute(first, axis_name, [(i + 1, i) for i in range(p - 1)])
    return jnp.where(lax.axis_index(axis_name) == p - 1, last_fill, recv)


def _previous(Z, z0, axis_name) -> chunks.Shifted:
    """``zprev_t = z_{t-1}`` for every step of the slice (one halo exchange), as a shifted view of ``Z``
    that the chunked evaluations cut piece by piece (no second n × M array)."""
    return chunks.Shifted(Z, from_left(Z[-1], z0, axis_name), 1)


def steps(dyn: Dynamics, params, zprev, xs, chunk: int | None = None):
    """``f_t(z_{t-1})`` for every step of a slice (n, M), ``chunk`` steps at a time; ``zprev`` an (n, M)
    array or ``chunks.Shifted``.  Public with ``jacobians``: benchmarks time the per-iteration work of
    the Newton loop through these two."""
    one = jax.vmap(dyn.step, in_axes=(None, 0, 0))
    return chunks.rows_over_time(lambda s: one(params, *s), (zprev, xs), chunk)


def jacobians(dyn: Dynamics, diagonal: bool, params, zprev, xs, chunk: int | None = None):
    """``A_t = ∂step/∂z (z_{t-1})``: (n, M, M) dense or (n, M) diagonal; analytic when supplied."""
    if diagonal:
        if dyn.jac_diag is not None:
            fn = dyn.jac_diag
        else:
            dense = dyn.jac or jax.jacfwd(dyn.step, argnums=1)
            fn = lambda p, z, x: jnp.diagonal(dense(p, z, x))  # noqa: E731
    else:
        fn = dyn.jac or jax.jacfwd(dyn.step, argnums=1)
    one = jax.vmap(fn, in_axes=(None, 0, 0))
    return chunks.rows_over_time(lambda s: one(params, *s), (zprev, xs), chunk)


def _linearisation(dyn: Dynamics, diagonal: bool, params, zprev, xs, f, chunk):
    """The Newton step's affine maps ``z_t ≈ A_t z_{t−1} + b_t`` at the current iterate:
    ``A_t = ∂f_t/∂z (z_{t−1})``, ``b_t = f_t(z_{t−1}) − A_t z_{t−1}`` (``f`` given), in one chunked pass."""
    def part(s):
        zp, x, fp = s
        A = jacobians(dyn, diagonal, params, zp, x)
        return A, fp - scan.apply(A, zp, diagonal=diagonal)

    return chunks.rows_over_time(part, (zprev, xs, f), chunk)


def _has_padding(n: int, opts: Options) -> bool:
    """Static: does this slice layout hold padded steps at all?"""
    size = 1 if opts.axis_name is None else lax.axis_size(opts.axis_name)
    return n * size > opts.length


def _keep_valid(x, valid, fill, padded: bool):
    """``x`` with padded rows replaced by ``fill``; without padding, ``x`` itself (no copy of
    n·M² Jacobians where nothing needs masking)."""
    if not padded:
        return x
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x, fill)


def _max_over_slice(values, valid, axes, fill):
    """Max over the valid rows of this slice, then over the devices of ``axes``."""
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    return _pmax(jnp.max(jnp.where(mask, values, fill)), axes)


def _excess(new, old, opts):
    """Per step ``‖Δz_t‖_∞ − (atol + rtol ‖z_t‖_∞)``: converged where ≤ 0.  The relative part scales with
    the step's whole state, not per unit, so that a unit passing near zero in a state of size 40 is
    not held to a tolerance below float32 round-off of the others (seen: Newton idling at the
    round-off floor for 5 iterations on Lorenz-63 at T=1e5)."""
    return (jnp.max(jnp.abs(new - old), axis=-1)
            - (opts.atol + opts.rtol * jnp.max(jnp.abs(new), axis=-1)))


def _time_axes(opts):
    return () if opts.axis_name is None else (opts.axis_name,)


# ---------------------------------------------------------------------------------------------
# Forward: Newton iterations.

def _newton(dyn: Dynamics, opts: Options, params, z0, xs, init):
    n, m = init.shape
    diagonal = opts.diagonal
    valid = _valid(n, opts)
    time = _time_axes(opts)
    # Per-sequence scalars vary over the batch-like mesh axes only; states also over time.
    seq_axes = tuple(a for a in vma.of((params, z0, xs, init)) if a not in time)
    scal = partial(vma.vary, axes=seq_axes)
    padded = _has_padding(n, opts)
    eye = scan.identity((n,), m, init.dtype, diagonal=diagonal)

    def residual_excess(Z, f):
        """Backward-error test: per step ``‖z_t − f_t(z_{t−1})‖_∞ − (atol + rtol ‖z_t‖_∞)``, max."""
        return _max_over_slice(_excess(Z, f, opts), valid, time, -jnp.inf)

    def newton_step(Z, zprev, f):
        A, b = _linearisation(dyn, diagonal, params, zprev, xs, f, opts.chunk)
        Znew, _ = scan.solve(A=_keep_valid(A, valid, eye, padded), b=_keep_valid(b, valid, 0.0, padded),
                             h0=z0, diagonal=diagonal, axis_name=opts.axis_name, method=opts.method,
                             block=opts.block)
        finite = jnp.where(valid[:, None], jnp.isfinite(Znew), True)
        nonfinite = _pmax(jnp.any(~finite).astype(jnp.int32), time) > 0
        return Znew, nonfinite

    def keep_going(c):
        _, it, done, bad = c
        go = (~done) & (~bad) & (it < opts.max_iter)
        # Every device must run the same number of iterations, or collectives deadlock.
        return _pmax(go.astype(jnp.int32), opts.sync_axes) > 0

    def iterate(c):
        Z, it, done, bad = c
        zprev = _previous(Z, z0, opts.axis_name)
        f = steps(dyn, params, zprev, xs, opts.chunk)
        active = (~done) & (~bad) & (it < opts.max_iter)
        # An iterate whose residual is already within tolerance is a solution: stop without a linear
        # solve.  Near-marginal linearisations (GTF α at its estimate, long T) amplify float round-off
        # so that |Δz| can stall above tolerance while the residual sits at round-off level.
        solved = residual_excess(Z, f) <= 0
        need = _pmax((active & ~solved).astype(jnp.int32), opts.sync_axes) > 0
        skip = lambda: (Z, scal(jnp.bool_(False)))  # noqa: E731
        Znew, nonfinite = lax.cond(need, lambda: newton_step(Z, zprev, f), skip)
        step = active & ~solved
        Z = jnp.where(step & ~nonfinite, Znew, Z)
        it = it + step.astype(jnp.int32)
        # Only the residual test ends the loop: a small Newton step alone does not (quasi-Newton converges
        # linearly, so |Δz| can be small while the residual is still far above tolerance).  Each new
        # iterate is tested at the top of the next pass, where f is evaluated anyway.
        done = done | (active & solved)
        bad = bad | (step & nonfinite)
        return Z, it, done, bad

    state_axes = seq_axes + time
    carry = (vma.vary(init, state_axes), scal(jnp.int32(0)), scal(jnp.bool_(False)),
             scal(jnp.bool_(False)))
    Z, it, done, bad = lax.while_loop(keep_going, iterate, carry)
    f = steps(dyn, params, _previous(Z, z0, opts.axis_name), xs, opts.chunk)
    # The states count as a solution only when their residual is within tolerance (checked here also
    # after the last iteration).
    newton_ok = ~bad & (residual_excess(Z, f) <= 0)
    result = jnp.where(newton_ok, Result.SUCCESS, jnp.where(bad, Result.NONFINITE, Result.MAX_ITER))
    converged = newton_ok
    if opts.fallback:
        Z = lax.cond(newton_ok, lambda Z: Z, partial(_sequential_sweeps, dyn, opts, params, z0, xs, valid), Z)
        f = steps(dyn, params, _previous(Z, z0, opts.axis_name), xs, opts.chunk)
    residual = _max_over_slice(jnp.abs(Z - f), valid, time, 0.0)
    if opts.fallback:
        rescued = ~newton_ok & jnp.isfinite(residual)
        result = jnp.where(rescued, Result.FALLBACK, result)
        converged = newton_ok | rescued
    return Solution(Z, it, converged, residual, result.astype(jnp.int32))


def _sequential_sweeps(dyn, opts, params, z0, xs, valid, Z):
    """Exact states by sequential evaluation: P sweeps of local scans, each from the left halo.

    After sweep p the first p+1 slices are exact, so P sweeps (one without sharding) suffice.
    """
    sweeps = 1 if opts.axis_name is None else lax.axis_size(opts.axis_name)

    def sweep(_, Z):
        def one(z, xv):
            x, v = xv
            z = jnp.where(v, dyn.step(params, z, x), z)
            return z, z

        return lax.scan(one, from_left(Z[-1], z0, opts.axis_name), (xs, valid))[1]

    return lax.fori_loop(0, sweeps, sweep, Z)


# ---------------------------------------------------------------------------------------------
# Backward: the implicit adjoint at the converged trajectory.

def _cotangent_rows(part, padded: bool):
    """``λ_t = g_t + μ_{t+1}`` on a chunk ``(g, μ_{t+1}, valid)``, zero on padded steps."""
    g, ahead, valid = part
    return _keep_valid(g + ahead, valid, 0.0, padded)


def _state_vjp(dyn: Dynamics, params, zprev, xs, chunk):
    """``(zp, x, λ) ↦ ((∂f_t/∂z)ᵀ λ_t)_t`` on one chunk ``(zp, x)`` of the slice, called once per chunk per
    sweep of the diagonal adjoint.  A slice of one chunk is linearised once and every sweep reuses
    that (the chunk is then the whole slice); a longer slice is linearised chunk by chunk on every
    sweep, trading one step evaluation per sweep for never holding all n steps' intermediates."""
    if chunk is None or chunks.length(xs) <= chunk:
        _, pull = jax.vjp(lambda zp: steps(dyn, params, zp, xs), chunks.whole(zprev))
        return lambda zp, x, lam: pull(lam)[0]
    return lambda zp, x, lam: jax.vjp(lambda z: steps(dyn, params, z, x), zp)[1](lam)[0]


def _adjoint(dyn: Dynamics, opts: Options, params, z0, xs, Z, usable, g):
    """Cotangents (params, z0, xs) for the cotangent ``g`` (n, M) of the states.

    With ``μ_t = A_tᵀ λ_t`` (design §2.4): ``μ_t = A_tᵀ (g_t + μ_{t+1})`` is a reverse-time affine
    recurrence using only local Jacobians, ``λ_t = g_t + μ_{t+1}``, and one pass of the step's VJP
    gives ``∂ℓ/∂θ = Σ_t (∂f_t/∂θ)ᵀ λ_t``, ``∂ℓ/∂x_t``, and ``∂ℓ/∂z_0 = μ_1``.  The dense adjoint
    (``opts.adjoint``, whatever the forward's maps were) solves that recurrence by one reverse scan.  The
    diagonal adjoint never forms ``A_t``: ``μ`` is found by the exact splitting ``A = D + (A − D)``, iterating
    ``μ^{k+1}_t = D_t μ^{k+1}_{t+1} + (A_tᵀ λ^k_t − D_t μ^k_{t+1})`` (VJPs, diagonal scans).  Memory: the
    step's VJPs run chunk by chunk (``opts.chunk``) and λ is formed only a chunk at a time.
    """
    n, m = Z.shape
    valid = _valid(n, opts)
    time = _time_axes(opts)
    ax = opts.axis_name
    zprev = _previous(Z, z0, ax)
    padded = _has_padding(n, opts)
    g = _keep_valid(g, valid, 0.0, padded)
    # The adjoint is linear in g: solve for g / max|g| so that the stopping test (diagonal mode) does
    # not depend on the loss's scale (a mean over 10^5 steps has cotangents ~1e-5, below any atol).
    scale = _pmax(jnp.max(jnp.abs(g)), time)
    scale = jnp.where(scale > 0, scale, 1.0)
    g = g / scale
    zero = vma.vary(jnp.zeros((m,), Z.dtype), vma.of(z0))
    reverse_solve = partial(scan.solve, h0=zero, reverse=True, axis_name=ax, method=opts.method,
                            block=opts.block)
    sweeps = opts.adjoint == "diagonal"
    A = jacobians(dyn, sweeps, params, zprev, xs, opts.chunk)
    A = _keep_valid(A, valid, 0.0, padded)
    adjoint_ok = jnp.bool_(True)
    if not sweeps:
        mu, mu_in = reverse_solve(A, scan.apply(A, g, diagonal=False, transpose=True),
                                  diagonal=False, transpose=True)
    else:
        vjp_z = _state_vjp(dyn, params, zprev, xs, opts.chunk)

        def terms(part):
            """On a chunk: the update's offsets ``A_tᵀ λ_t − D_t μ_{t+1}`` (= D_t g_t + (A_t − D_t)ᵀ λ_t,
            λ = g + μ_{t+1}; zero on padded steps, where A_tᵀ λ_t and D_t are) and the residual test of
            μ, ``‖A_tᵀ λ_t − μ_t‖`` against the tolerance.  Per chunk, so that A_tᵀ λ_t and λ are never
            whole slices (memory)."""
            zp, x, g_c, ahead_c, valid_c, A_c, mu_c = part
            atl = vjp_z(zp, x, _cotangent_rows((g_c, ahead_c, valid_c), padded))
            return atl - A_c * ahead_c, _excess(mu_c, atl, opts)

        def sweep(c):
            """Test the current μ by its residual (from the VJP the update needs anyway); keep it where
            the test passes, so the loop ends on a μ that passed.  The scan's states take the place of
            its offsets; no lax.cond around the solve (its operands would be copied, 1 GiB each at
            n = 2^24, M = 16): the price is one diagonal scan more on the last sweep."""
            mu, mu_in, it, _ = c
            rhs, exc = chunks.rows_over_time(terms, (zprev, xs, g, chunks.Shifted(mu, mu_in, -1), valid, A, mu),
                                             opts.chunk)
            excess = _max_over_slice(exc, valid, time, -jnp.inf)
            ok = excess <= 0
            upd, upd_in = reverse_solve(A, rhs, diagonal=True)
            return (jnp.where(ok, mu, upd), jnp.where(ok, mu_in, upd_in), it + (~ok).astype(jnp.int32),
                    excess)

        def unfinished(c):
            _, _, it, excess = c
            go = (it < opts.adjoint_max_iter) & ~(excess <= 0)
            return _pmax(go.astype(jnp.int32), opts.sync_axes) > 0

        seq_axes = tuple(a for a in vma.of((params, z0, xs, Z)) if a not in time)
        c0 = (vma.vary(jnp.zeros_like(Z), seq_axes + time), vma.vary(zero, seq_axes + time),
              vma.vary(jnp.int32(0), seq_axes), vma.vary(jnp.asarray(jnp.inf, Z.dtype), seq_axes))
        mu, mu_in, _, excess = lax.while_loop(unfinished, sweep, c0)
        # Success needs the residual test of the returned μ, not a small last update (linear convergence).
        adjoint_ok = excess <= 0
    # Differentiate w.r.t. a copy of params marked varying like λ: the VJP then returns this device's
    # partial sums, and _solve_bwd sums them over devices (and batch) exactly once, explicitly.
    # (A VJP w.r.t. replicated params would psum implicitly, and under vmap its type would hide it.)
    params_v = vma.like(params, g, mu, Z)

    def pull_back(part):
        zp, x, rest = part
        _, vjp_all = jax.vjp(lambda p, u: steps(dyn, p, zp, u), params_v, x)
        return vjp_all(scale * _cotangent_rows(rest, padded))

    # Chunk by chunk: the step's intermediates that the VJP needs live for one chunk at a time, and
    # the parameter cotangent Σ_t (∂f_t/∂θ)ᵀ λ_t is summed as the chunks go.
    seqs = (zprev, xs, (g, chunks.Shifted(mu, mu_in, -1), valid))
    d_params, d_xs = chunks.over_time(pull_back, seqs, opts.chunk)
    # ∂ℓ/∂z_0 = (∂f_1/∂z_0)ᵀ λ_1 needs the first step only (not a VJP w.r.t. all n states).
    zp1, x1, rest1 = chunks.cut(seqs, 0, 1)
    d_z0 = jax.vjp(lambda z: steps(dyn, params, z, x1), zp1)[1](scale * _cotangent_rows(rest1, padded))[0][0]
    if ax is not None:
        d_z0 = jnp.where(lax.axis_index(ax) == 0, d_z0, 0.0)
    # An unconverged forward (or adjoint) solve must not yield a usable gradient.
    poison = jnp.where(usable & adjoint_ok, 1.0, jnp.nan)
    spoil = lambda t: t * poison.astype(t.dtype) if jnp.issubdtype(t.dtype, jnp.inexact) else t  # noqa: E731
    return jax.tree.map(spoil, (d_params, d_z0, d_xs))


# ---------------------------------------------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def solve_slice(dyn: Dynamics, opts: Options, batched: bool, params, z0, xs, init) -> Solution:
    """Solve the recurrence on this slice by DEER; differentiable in params, z0 and xs (implicitly).

    ``batched=True``: ``z0``, ``xs``, ``init`` carry a leading batch axis of independent sequences
    sharing ``params``.  The batch is mapped here, inside the custom VJP, so that the parameter
    cotangent is summed over the batch and then over devices exactly once (mapping a custom VJP with
    ``jax.vmap`` inside ``shard_map`` summed it once per ``data`` shard too many).
    """
    return _forward(dyn, opts, batched, params, z0, xs, init)


@float32_matmuls
def _forward(dyn, opts, batched, params, z0, xs, init):
    if batched:
        return jax.vmap(partial(_newton, dyn, opts), in_axes=(None, 0, 0, 0))(params, z0, xs, init)
    return _newton(dyn, opts, params, z0, xs, init)


def _solve_fwd(dyn, opts, batched, params, z0, xs, init):
    sol = _forward(dyn, opts, batched, params, z0, xs, init)
    return sol, (params, z0, xs, sol.states, sol.converged, init)


@float32_matmuls
def _solve_bwd(dyn, opts, batched, res, ct):
    params, z0, xs, Z, usable, init = res
    adjoint = partial(_adjoint, dyn, opts)
    if batched:
        d_params, d_z0, d_xs = jax.vmap(adjoint, in_axes=(None, 0, 0, 0, 0, 0))(
            params, z0, xs, Z, usable, ct.states)
        d_params = jax.tree.map(lambda c: jnp.sum(c, axis=0), d_params)
    else:
        d_params, d_z0, d_xs = adjoint(params, z0, xs, Z, usable, ct.states)
    # Replicated inputs (params everywhere, z0 across the time axis) get cotangents summed over the
    # devices that used them.
    d_params = jax.tree.map(vma.reduce_to, d_params, params)
    d_z0 = vma.reduce_to(d_z0, z0)
    return d_params, d_z0, d_xs, jnp.zeros_like(init)


solve_slice.defvjp(_solve_fwd, _solve_bwd)
