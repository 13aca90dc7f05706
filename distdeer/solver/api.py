"""Public solver entry points: ``deer`` (one sequence), ``deer_batch`` (a batch, 2-D mesh) and
``deer_shard`` (the time-sharded kernel for use inside a caller's own ``shard_map``).

These functions validate inputs at trace time, pad the time axis to a multiple of the device count,
place the Newton kernel (``newton.solve_slice``) under ``shard_map`` when a mesh is given, and turn a
failed solve into an error when ``throw=True``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from distdeer.solver import chunks, scan
from distdeer.solver.newton import Dynamics, Options, Result, Solution, solve_slice

JACOBIANS = ("dense", "diagonal")
# Quasi-Newton (diagonal) converges linearly, Newton (dense) quadratically once near the solution.
DEFAULT_MAX_ITER = {"dense": 50, "diagonal": 200}
# The adjoint takes dense maps (one reverse scan) while they hold at most this many floats (256 MiB),
# else the matrix-free diagonal sweeps (O(T M) memory).  The sweeps converge linearly: measured at
# T = 10^5 (docs/benchmarks.md), 20–40 of them cost 2–15× the one dense scan at M = 3 and 16.
DENSE_ADJOINT_FLOATS = 2 ** 26


class SolverError(RuntimeError):
    """Raised (with ``throw=True``) when a DEER solve does not converge or goes non-finite."""


def default_tolerances(dtype) -> tuple[float, float]:
    """(atol, rtol): float32 1e-5/1e-5 — ten to a hundred times tighter than DEER's 1e-4/1e-3, which
    costs about one Newton iteration near quadratic convergence; float64 1e-10/1e-10."""
    return (1e-10, 1e-10) if jnp.dtype(dtype) == jnp.float64 else (1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# Validation (trace time; values only where concrete).

def _time_length(xs) -> int:
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("deer: xs must hold at least one array with a leading time axis")
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if None in lengths or len(lengths) != 1:
        raise ValueError(f"deer: every array in xs needs the same leading time axis; got lengths {lengths}")
    T = lengths.pop()
    if T < 1:
        raise ValueError("deer: xs has T=0 time steps; need T >= 1")
    return T


def _check_inputs(step, params, z0, xs, init, jacobian, mesh, axis_names, batch: bool):
    if jacobian not in JACOBIANS:
        raise ValueError(f"deer: jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    z0 = jnp.asarray(z0) if not isinstance(z0, jax.Array) else z0
    want = 2 if batch else 1
    if z0.ndim != want:
        raise ValueError(f"deer: z0 must have shape {'(B, M)' if batch else '(M,)'}, got {z0.shape}")
    if not jnp.issubdtype(z0.dtype, jnp.floating):
        raise ValueError(f"deer: z0 must be floating point, got {z0.dtype}")
    if batch:
        B = z0.shape[0]
        leaves = jax.tree.leaves(xs)
        if any(np.ndim(a) < 2 or np.shape(a)[0] != B for a in leaves):
            raise ValueError(f"deer_batch: xs arrays need shape (B={B}, T, ...)")
        T = _time_length(jax.tree.map(lambda a: a[0], xs))
        x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[2:], a.dtype), xs)
        z_one = jax.ShapeDtypeStruct(z0.shape[1:], z0.dtype)
    else:
        T = _time_length(xs)
        x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), xs)
        z_one = jax.ShapeDtypeStruct(z0.shape, z0.dtype)
    try:
        out = jax.eval_shape(step, params, z_one, x0)
    except Exception as e:  # the user's step failed on these shapes: say so in one line
        raise ValueError(f"deer: step(params, z, x) fails for z of shape {z_one.shape} and one "
                         f"time slice of xs: {type(e).__name__}: {e}") from e
    if getattr(out, "shape", None) != z_one.shape:
        raise ValueError(f"deer: step must return the state shape {z_one.shape}, got "
                         f"{getattr(out, 'shape', type(out))}")
    if init is not None:
        want_init = (z0.shape[0], T, z0.shape[1]) if batch else (T, z0.shape[0])
        if tuple(np.shape(init)) != want_init:
            raise ValueError(f"deer: init must have shape {want_init}, got {tuple(np.shape(init))}")
    if not isinstance(z0, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(z0))):
        raise ValueError("deer: z0 contains non-finite values")
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"deer: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        for name in axis_names:
            if name not in mesh.axis_names:
                raise ValueError(f"deer: mesh has axes {mesh.axis_names}, no axis named {name!r}")
    return z0, T


def _dynamics(step, jac, jac_diag) -> Dynamics:
    """The step with its analytic Jacobians: explicit arguments win over ``step.jac``/``step.jac_diag``.

    ``step`` may close over values that are not differentiated (a traced GTF α under jit, say);
    anything to be differentiated must be passed through ``params`` or ``xs`` (JAX raises a clear
    error for a custom-VJP function differentiated w.r.t. a closed-over value).
    """
    return Dynamics(step, jac if jac is not None else getattr(step, "jac", None),
                    jac_diag if jac_diag is not None else getattr(step, "jac_diag", None))


def _adjoint_kind(adjoint, jacobian: str, T: int, m: int) -> str:
    """The adjoint's maps: as given; by default dense after a dense solve (whose maps it holds anyway), and
    after a diagonal solve dense while T·M² ≤ ``DENSE_ADJOINT_FLOATS``."""
    if adjoint is None:
        return "dense" if jacobian == "dense" or T * m * m <= DENSE_ADJOINT_FLOATS else "diagonal"
    if adjoint not in JACOBIANS:
        raise ValueError(f"deer: adjoint must be one of {JACOBIANS} or None, got {adjoint!r}")
    return adjoint


def _options(T, z0, jacobian, max_iter, atol, rtol, method, block, axis_name, sync_axes, fallback,
             adjoint, adjoint_max_iter, chunk) -> Options:
    d_atol, d_rtol = default_tolerances(z0.dtype)
    method = method or scan.default_method()
    if method not in scan.METHODS:
        raise ValueError(f"deer: method must be one of {scan.METHODS}, got {method!r}")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[jacobian]
    if max_iter < 0:
        raise ValueError(f"deer: max_iter must be >= 0, got {max_iter}")
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"deer: chunk must be >= 1 steps (or None), got {chunk}")
    return Options(length=T, jacobian=jacobian, max_iter=int(max_iter),
                   atol=float(d_atol if atol is None else atol), rtol=float(d_rtol if rtol is None else rtol),
                   method=method, block=block, axis_name=axis_name, sync_axes=tuple(sync_axes),
                   fallback=bool(fallback), adjoint=_adjoint_kind(adjoint, jacobian, T, z0.shape[-1]),
                   adjoint_max_iter=int(adjoint_max_iter),
                   chunk=None if chunk is None else int(chunk))


SOLVER_OPTIONS = dict(jacobian="dense", max_iter=None, atol=None, rtol=None, jac=None, jac_diag=None,
                      fallback=False, method=None, block=None, adjoint=None, adjoint_max_iter=200,
                      chunk=chunks.DEFAULT_CHUNK)


def _solver_options(given: dict) -> dict:
    """The solver keywords of ``deer`` (same names and defaults) for ``deer_batch``/``deer_shard``."""
    unknown = sorted(set(given) - set(SOLVER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown solver option {unknown[0]!r}; options are those of deer: "
                        f"{', '.join(SOLVER_OPTIONS)}")
    return {**SOLVER_OPTIONS, **given}


def _prepare(step, params, z0, xs, init, *, batch, mesh, mesh_axes, time_axis, sync_axes, length,
             jacobian, max_iter, atol, rtol, jac, jac_diag, fallback, method, block, adjoint, adjoint_max_iter,
             chunk):
    """Shared prologue of the entry points: validate, build Dynamics and Options, default the guess.

    ``length``: the number of real steps (None: all of xs).  Returns (dyn, opts, z0, init)."""
    z0, T = _check_inputs(step, params, z0, xs, init, jacobian, mesh, mesh_axes, batch)
    opts = _options(T if length is None else int(length), z0, jacobian, max_iter, atol, rtol, method, block,
                    time_axis, sync_axes, fallback, adjoint, adjoint_max_iter, chunk)
    if init is None:
        lead = z0.shape[:-1] + (T,)
        init = jnp.broadcast_to(jnp.expand_dims(z0, -2), lead + z0.shape[-1:])
    return _dynamics(step, jac, jac_diag), opts, z0, jax.lax.stop_gradient(jnp.asarray(init, z0.dtype))


def _pad_time(tree, axis: int, total: int):
    """Pad the time axis to ``total`` by repeating the last step (padding is masked in the solver;
    repeating real inputs keeps the step's evaluation there finite)."""
    def pad(a):
        extra = total - a.shape[axis]
        if extra == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, extra)
        return jnp.pad(a, widths, mode="edge")

    return jax.tree.map(pad, tree)


def _place(tree, mesh: Mesh, spec):
    """Meshes from ``jax.make_mesh`` have Explicit axes: ``shard_map`` then wants inputs already laid
    out as its ``in_specs`` say.  Auto-axes meshes (``Mesh(...)``) reshard implicitly."""
    if AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return tree
    return jax.tree.map(lambda a: jax.reshard(a, NamedSharding(mesh, spec)), tree)


def _unpad(a, mesh: Mesh, keep: tuple):
    """Cut padding off the leading axes; an Explicit-axes array must be replicated first, since a
    sharded axis cannot be sliced to a length the devices do not divide (choose T divisible by the
    device count to keep the states sharded)."""
    if tuple(a.shape[:len(keep)]) == keep:
        return a
    if AxisType.Explicit in tuple(getattr(mesh, "axis_types", ())):
        a = jax.reshard(a, NamedSharding(mesh, P()))
    return a[tuple(slice(0, k) for k in keep)]


def _raise_if_failed(sol: Solution, where: str) -> Solution:
    def check(converged, iterations, residual, result):
        bad = ~np.asarray(converged, bool)
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            code = Result(int(np.asarray(result).ravel()[i]))
            raise SolverError(
                f"{where}: Newton solve failed ({code.name}) after {int(np.asarray(iterations).ravel()[i])} "
                f"iterations, residual {float(np.asarray(residual).ravel()[i]):.3e}"
                f"{f' ({int(bad.sum())} of {bad.size} sequences)' if bad.size > 1 else ''}; raise "
                "max_iter, force harder (GTF alpha), or pass throw=False and handle Solution.result")

    jax.debug.callback(check, sol.converged, sol.iterations, sol.residual, sol.result)
    return sol


# ---------------------------------------------------------------------------------------------

def deer(
    step: Callable,
    params: Any,
    z0: jax.Array,
    xs: Any,
    *,
    jacobian: str = "dense",
    max_iter: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    init: jax.Array | None = None,
    mesh: Mesh | None = None,
    axis_name: str = "time",
    throw: bool = True,
    jac: Callable | None = None,
    jac_diag: Callable | None = None,
    fallback: bool = False,
    method: str | None = None,
    block: int | None = None,
    adjoint: str | None = None,
    adjoint_max_iter: int = 200,
    chunk: int | None = chunks.DEFAULT_CHUNK,
) -> Solution:
    """Solve ``z_t = step(params, z_{t-1}, x_t)``, t = 1..T, by DEER Newton iterations.

    Args:
      step: one unbatched step ``(params, z (M,), x_t) -> z (M,)``.  It may carry attributes ``jac``
        / ``jac_diag`` (analytic Jacobians), as the steps of ``distdeer.gtf.forced_step`` do.
      params: pytree of parameters (replicated on every device).
      z0: initial state ``(M,)``.
      xs: inputs, an array or pytree of arrays with leading time axis ``T`` (may be sharded on time).
      jacobian: ``"dense"`` (Newton; ``O(T M³)`` per iteration) or ``"diagonal"`` (quasi-Newton:
        ``diag A_t`` only, ``O(T M)``; same fixed point; the gradient stays exact).
      max_iter, atol, rtol: stop when ``|Δz| ≤ atol + rtol |z|`` at every step, or after max_iter
        (default 50 dense, 200 diagonal).  Tolerances default by dtype (``default_tolerances``).
      init: initial guess ``(T, M)`` (warm start, or the data for GTF); default ``z0`` repeated.
        Receives no gradient.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``: solve and adjoint run time-sharded
        over it (any T: the time axis is padded internally and the padding masked).
      throw: raise ``SolverError`` (at run time, also under jit/vmap) when the solve fails.  With
        ``throw=False`` inspect ``Solution.result``; the gradient of a failed solve is NaN.
      jac, jac_diag: analytic ``∂step/∂z`` ``(params, z, x) -> (M, M)`` / ``(M,)``; default autodiff.
      fallback: when Newton fails, finish with sequential sweeps (exact states,
        ``result=FALLBACK``).  Under ``vmap`` both branches run, so the sequential cost is always paid.
      method, block: local scan method (``"sequential"`` | ``"blocked"`` | ``"associative"``; default
        sequential on CPU, associative on accelerators) and the blocked scan's block length.
      adjoint: how the gradient's reverse recurrence is solved, whatever ``jacobian`` is: ``"dense"`` (one
        reverse scan of the dense maps ``A_t``; T·M² floats) or ``"diagonal"`` (matrix-free VJP sweeps
        preconditioned by ``diag A_t``; T·M floats, iterated).  Both give the exact gradient.  Default:
        dense, except after a diagonal solve with T·M² > 2^26 (``DENSE_ADJOINT_FLOATS``).
      adjoint_max_iter: sweep limit of the diagonal adjoint.
      chunk: steps per chunk when evaluating the step, its Jacobians and VJPs over a device's slice
        (default 2^18): bounds the step's intermediates (e.g. hidden activations) alive at once to
        ``chunk`` steps instead of the whole slice; ``None``: the whole slice at once.

    Returns:
      ``Solution(states (T, M), iterations, converged, residual, result)``.

    Gradients of any function of ``states`` w.r.t. ``params``, ``z0`` and ``xs`` come from the
    implicit adjoint at the solution (never by differentiating the Newton loop) and equal BPTT's to
    solver tolerance.  Solve and adjoint, ``step`` included, use full float32 matrix products
    whatever ``jax.default_matmul_precision`` says (GPUs default to TF32, too coarse for Newton).
    """
    sharded = mesh is not None
    dyn, opts, z0, init = _prepare(
        step, params, z0, xs, init, batch=False, mesh=mesh, mesh_axes=(axis_name,),
        time_axis=axis_name if sharded else None, sync_axes=(axis_name,) if sharded else (), length=None,
        jacobian=jacobian, max_iter=max_iter, atol=atol, rtol=rtol, jac=jac, jac_diag=jac_diag,
        fallback=fallback, method=method, block=block, adjoint=adjoint, adjoint_max_iter=adjoint_max_iter,
        chunk=chunk)
    T, ext = opts.length, params
    if not sharded:
        sol = solve_slice(dyn, opts, False, ext, z0, xs, init)
    else:
        p = mesh.shape[axis_name]
        total = math.ceil(T / p) * p
        xs_p, init_p = _pad_time((xs, init), 0, total)
        t_spec, rep = P(axis_name), P()
        sharded = jax.shard_map(
            lambda e, z, x, i: solve_slice(dyn, opts, False, e, z, x, i), mesh=mesh,
            in_specs=(rep, rep, t_spec, t_spec), out_specs=Solution(t_spec, rep, rep, rep, rep))
        sol = sharded(_place(ext, mesh, rep), _place(z0, mesh, rep), _place(xs_p, mesh, t_spec),
                      _place(init_p, mesh, t_spec))
        sol = sol._replace(states=_unpad(sol.states, mesh, (T,)))
    return _raise_if_failed(sol, "deer") if throw else sol


def deer_batch(
    step: Callable,
    params: Any,
    z0: jax.Array,
    xs: Any,
    *,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    time_axis: str = "time",
    init: jax.Array | None = None,
    throw: bool = True,
    **options,
) -> Solution:
    """Solve a batch of independent sequences: ``z0`` ``(B, M)``, ``xs`` ``(B, T, …)``.

    With a mesh holding axes ``data_axis`` and ``time_axis`` the batch is sharded
    ``P(data_axis, time_axis)``: sequences spread over ``data``, each one time-sharded over ``time``.
    Every device runs the same number of Newton iterations (the loop is kept in lockstep over both
    axes); each sequence keeps its own ``iterations``/``converged``/``residual``.  Without a mesh this
    is ``jax.vmap`` of ``deer``.  Fields of the returned ``Solution`` gain a leading batch axis.
    ``options`` are ``deer``'s solver keywords (``jacobian``, ``max_iter``, ``atol``, ``rtol``, ``jac``,
    ``jac_diag``, ``fallback``, ``method``, ``block``, ``adjoint``, ``adjoint_max_iter``, ``chunk``), with the same
    defaults.
    """
    axes = (data_axis, time_axis)
    sharded = mesh is not None
    dyn, opts, z0, init = _prepare(
        step, params, z0, xs, init, batch=True, mesh=mesh, mesh_axes=axes,
        time_axis=time_axis if sharded else None, sync_axes=axes if sharded else (), length=None,
        **_solver_options(options))
    B, T, ext = z0.shape[0], opts.length, params
    solve_many = partial(solve_slice, dyn, opts, True)
    if not sharded:
        sol = solve_many(ext, z0, xs, init)
    else:
        pd, pt = mesh.shape[data_axis], mesh.shape[time_axis]
        total_t, total_b = math.ceil(T / pt) * pt, math.ceil(B / pd) * pd
        xs_p, init_p = _pad_time((xs, init), 1, total_t)
        z0_p, xs_p, init_p = _pad_time((z0, xs_p, init_p), 0, total_b)
        bt, b_, rep = P(data_axis, time_axis), P(data_axis), P()
        run = jax.shard_map(solve_many, mesh=mesh, in_specs=(rep, b_, bt, bt),
                            out_specs=Solution(bt, b_, b_, b_, b_))
        sol = run(_place(ext, mesh, rep), _place(z0_p, mesh, b_), _place(xs_p, mesh, bt),
                  _place(init_p, mesh, bt))
        sol = jax.tree.map(lambda a: _unpad(a, mesh, (B,)), sol._replace(states=_unpad(sol.states, mesh, (B, T))))
    return _raise_if_failed(sol, "deer_batch") if throw else sol


def deer_shard(
    step: Callable,
    params: Any,
    z0: jax.Array,
    xs: Any,
    *,
    axis_name: str = "time",
    length: int | None = None,
    sync_axes: tuple = (),
    init: jax.Array | None = None,
    throw: bool = False,
    **options,
) -> Solution:
    """The time-sharded DEER kernel, to call inside your own ``shard_map`` over ``axis_name``.

    ``xs`` (and ``init``) are this device's contiguous time slice, the same length on every device;
    ``z0`` must be identical on all devices.  ``length`` is the number of real global steps (default:
    all, i.e. local length × axis size); steps past it are treated as padding.  ``sync_axes`` lists
    further manual mesh axes whose devices must run in lockstep (e.g. a ``data`` axis when each data
    shard solves its own sequence).  Returns the local ``states`` and global statistics.  Gradients
    w.r.t. replicated ``params``/``z0`` are summed across devices as JAX's sharding rules require.
    ``options`` are ``deer``'s solver keywords, with the same defaults.
    """
    n = _time_length(xs)
    dyn, opts, z0, init = _prepare(
        step, params, z0, xs, init, batch=False, mesh=None, mesh_axes=(), time_axis=axis_name,
        sync_axes=tuple(dict.fromkeys((axis_name,) + tuple(sync_axes))),
        length=n * jax.lax.axis_size(axis_name) if length is None else length,
        **_solver_options(options))
    sol = solve_slice(dyn, opts, False, params, z0, xs, init)
    return _raise_if_failed(sol, "deer_shard") if throw else sol
