"""Linear (affine) recurrences ``z_t = A_t z_{t-1} + b_t`` solved in parallel over time.

This is the linear step of every DEER Newton iteration and of the implicit adjoint.

Shapes (``n`` local time steps, ``M`` state units):

* ``A``: ``(n, M, M)`` dense maps, or ``(n, M)`` diagonal maps (``diagonal=True``);
* ``b``: ``(n, M)`` offsets; ``h``: ``(M,)`` the state entering the slice.

Options shared by all functions:

* ``transpose=True`` applies ``A_tᵀ`` instead of ``A_t`` (the adjoint recurrence), without
  materialising the transposed maps;
* ``reverse=True`` runs the recurrence backwards in time: the state enters after the last step and
  ``z_t = A_t z_{t+1} + b_t``.

A slice is solved in two stages so that the same code runs on one device and time-sharded:

1. ``local_pass`` summarises the slice by the composite affine map ``h ↦ S h + s`` from its incoming
   state to its outgoing state, and returns a ``finish(h)`` closure that produces every state once ``h``
   is known;
2. on a mesh, ``incoming_state`` exchanges the per-device summaries (all-gather of ``P`` maps) and folds
   the global initial state through those of the devices before this one (exclusive prefix).

Three local methods:

* ``"sequential"``: one loop over the slice's steps, ``z_t = A_t z_{t−1} + b_t``: work ``n M²``
  (matrix–vector products), no stored prefixes.  On a mesh the summary adds the composite map (a second
  loop of ``n`` M×M products) and the outgoing state from a zero incoming one (a third); on one device
  XLA drops both.  Fastest on CPU, where a device runs its slice on one core anyway: 18 ms vs 100 ms
  for the blocked scan per dense M = 16 solve at n = 10^5 (docs/benchmarks.md, "Local scan").
* ``"blocked"``: cut the slice into ``B`` contiguous blocks of ``K`` steps; a ``K``-step sequential
  scan vectorised over blocks composes each block's map, a ``B``-step scan passes the state from block
  to block, and a second ``K``-step vectorised scan writes the states.  Sequential depth ``2K + 2B``
  (``K = B = √n``), work ``n (M³ + 2M²)``, and no per-step prefix maps stored.
* ``"associative"``: ``lax.associative_scan`` over the elements ``(A_t, b_t)`` with
  ``(A_i, b_i) • (A_j, b_j) = (A_j A_i, A_j b_i + b_j)``; keeps the inclusive prefixes
  ``(Â_t, b̂_t)`` and finishes with ``z_t = Â_t h + b̂_t``.  Depth ``O(log n)``; for accelerators.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from distdeer.solver import vma

HIGHEST = lax.Precision.HIGHEST
METHODS = ("sequential", "blocked", "associative")


class Summary(NamedTuple):
    """Composite affine map of a slice: outgoing state ``= S @ h + s`` (``S`` diagonal if the maps are)."""

    S: jax.Array
    s: jax.Array


def apply(A: jax.Array, v: jax.Array, *, diagonal: bool, transpose: bool = False) -> jax.Array:
    """Batched ``A v`` (or ``Aᵀ v``) over any leading axes."""
    if diagonal:
        return A * v
    spec = "...ji,...j->...i" if transpose else "...ij,...j->...i"
    return jnp.einsum(spec, A, v, precision=HIGHEST)


def compose(A: jax.Array, S: jax.Array, *, diagonal: bool, transpose: bool = False) -> jax.Array:
    """Batched ``A S`` (or ``Aᵀ S``): the map ``S`` followed by the step map ``A``."""
    if diagonal:
        return A * S
    spec = "...ji,...jk->...ik" if transpose else "...ij,...jk->...ik"
    return jnp.einsum(spec, A, S, precision=HIGHEST)


def identity(batch: tuple[int, ...], m: int, dtype, *, diagonal: bool) -> jax.Array:
    """Identity maps of shape ``batch + (M,)`` (diagonal) or ``batch + (M, M)`` (dense)."""
    if diagonal:
        return jnp.ones(batch + (m,), dtype)
    return jnp.broadcast_to(jnp.eye(m, dtype=dtype), batch + (m, m))


def default_method() -> str:
    """``sequential`` on CPU (measured faster, docs/benchmarks.md), ``associative`` on accelerators."""
    return "sequential" if jax.default_backend() == "cpu" else "associative"


def default_block(n: int) -> int:
    """Block length ``K ≈ √n`` balances the ``2K`` in-block steps against the ``2B`` block steps."""
    return max(1, int(math.isqrt(max(n, 1))))


def local_pass(
    A: jax.Array,
    b: jax.Array,
    *,
    diagonal: bool,
    transpose: bool = False,
    reverse: bool = False,
    method: str = "sequential",
    block: int | None = None,
) -> tuple[Summary, Callable[[jax.Array], jax.Array]]:
    """Summarise one slice and return ``(summary, finish)``; ``finish(h)`` gives all ``n`` states."""
    if method == "sequential":
        return _sequential_pass(A, b, diagonal, transpose, reverse)
    if method == "blocked":
        return _blocked_pass(A, b, diagonal, transpose, reverse, block or default_block(b.shape[0]))
    if method == "associative":
        return _associative_pass(A, b, diagonal, transpose, reverse)
    raise ValueError(f"unknown scan method {method!r}; expected one of {METHODS}")


def _sequential_pass(A, b, diagonal, transpose, reverse):
    n, m = b.shape

    def position(k):
        return n - 1 - k if reverse else k

    def advance(k, z, offsets):
        a = lax.dynamic_index_in_dim(A, position(k), keepdims=False)
        c = lax.dynamic_index_in_dim(offsets, position(k), keepdims=False)
        return apply(a, z, diagonal=diagonal, transpose=transpose) + c

    # The states overwrite the offsets they are computed from, step by step, in the carried buffer:
    # where the caller no longer needs b, XLA reuses its memory (as in the blocked scan).
    def finish(h):
        def one(k, carry):
            z, out = carry
            z = advance(k, z, out)
            return z, lax.dynamic_update_index_in_dim(out, z, position(k), 0)

        return lax.fori_loop(0, n, one, vma.like((h, b), A, b))[1]

    # The summary is only used on a mesh (incoming_state); on one device XLA drops both loops.
    def compose_one(k, S):
        a = lax.dynamic_index_in_dim(A, position(k), keepdims=False)
        return compose(a, S, diagonal=diagonal, transpose=transpose)

    S = lax.fori_loop(0, n, compose_one, vma.like(identity((), m, A.dtype, diagonal=diagonal), A))
    s = lax.fori_loop(0, n, lambda k, z: advance(k, z, b), vma.like(jnp.zeros((m,), b.dtype), A, b))
    return Summary(S, s), finish


def _blocked_pass(A, b, diagonal, transpose, reverse, K):
    n, m = b.shape
    B = -(-n // K)
    pad = B * K - n
    if pad:
        # Identity maps with zero offset pass the state through unchanged, wherever they stand.
        A = jnp.concatenate([A, identity((pad,), m, A.dtype, diagonal=diagonal)])
        b = jnp.concatenate([b, jnp.zeros((pad, m), b.dtype)])
    # (B, K, …) views: block j holds steps j·K … j·K+K−1.  The in-block loops index position k of
    # every block at once (a strided read) instead of transposing to (K, B, …): a transposed copy of
    # the maps would cost another n·M² floats (1 GiB at T = 2^20, M = 16).
    Ab = A.reshape((B, K) + A.shape[1:])
    bb = b.reshape(B, K, m)

    def position(k):
        return K - 1 - k if reverse else k

    def block_maps(k, carry):
        S, s = carry
        a = lax.dynamic_index_in_dim(Ab, position(k), axis=1, keepdims=False)
        c = lax.dynamic_index_in_dim(bb, position(k), axis=1, keepdims=False)
        return (compose(a, S, diagonal=diagonal, transpose=transpose),
                apply(a, s, diagonal=diagonal, transpose=transpose) + c)

    init = vma.like((identity((B,), m, A.dtype, diagonal=diagonal), jnp.zeros((B, m), b.dtype)), A, b)
    Sb, sb = lax.fori_loop(0, K, block_maps, init)

    # The block maps Sb are explicit matrices: apply them untransposed from here on.
    def slice_map(carry, blk):
        S, s = carry
        Sj, sj = blk
        return (compose(Sj, S, diagonal=diagonal), apply(Sj, s, diagonal=diagonal) + sj), None

    init = vma.like((identity((), m, A.dtype, diagonal=diagonal), jnp.zeros((m,), b.dtype)), Sb, sb)
    (S, s), _ = lax.scan(slice_map, init, (Sb, sb), reverse=reverse)

    def finish(h):
        def into_blocks(hc, blk):
            return apply(blk[0], hc, diagonal=diagonal) + blk[1], hc

        _, h_blocks = lax.scan(into_blocks, vma.like(h, Sb, sb), (Sb, sb), reverse=reverse)

        # The states overwrite the offsets they are computed from, position by position, in the carried
        # buffer: where the caller no longer needs b, XLA reuses its memory for the states (one n × M
        # array less at the peak: 1 GiB at n = 2^24, M = 16).
        def states(k, carry):
            z, out = carry
            j = position(k)
            a = lax.dynamic_index_in_dim(Ab, j, axis=1, keepdims=False)
            c = lax.dynamic_index_in_dim(out, j, axis=1, keepdims=False)
            z = apply(a, z, diagonal=diagonal, transpose=transpose) + c
            return z, lax.dynamic_update_index_in_dim(out, z, j, axis=1)

        init = vma.like((h_blocks, bb), Ab, bb)
        _, out = lax.fori_loop(0, K, states, init)
        return out.reshape(B * K, m)[:n]

    return Summary(S, s), finish


def _associative_pass(A, b, diagonal, transpose, reverse):
    if transpose and not diagonal:
        A = jnp.swapaxes(A, -1, -2)
    if reverse:
        A, b = jnp.flip(A, 0), jnp.flip(b, 0)

    def combine(earlier, later):
        Ai, bi = earlier
        Aj, bj = later
        return compose(Aj, Ai, diagonal=diagonal), apply(Aj, bi, diagonal=diagonal) + bj

    Ahat, bhat = lax.associative_scan(combine, (A, b))

    def finish(h):
        z = apply(Ahat, h, diagonal=diagonal) + bhat
        return jnp.flip(z, 0) if reverse else z

    return Summary(Ahat[-1], bhat[-1]), finish


def incoming_state(summary: Summary, h0: jax.Array, axis_name, *, diagonal: bool,
                   reverse: bool = False) -> jax.Array:
    """Exclusive prefix over the devices of ``axis_name``: the state entering this device's slice.

    All-gathers the ``P`` slice summaries (``P (M² + M)`` values) and folds ``h0`` through those of
    the devices before this one (after it, if ``reverse``): ``O(P M²)`` work, depth 1 collective.
    """
    S_all = lax.all_gather(summary.S, axis_name)
    s_all = lax.all_gather(summary.s, axis_name)

    def fold(h, blk):
        return apply(blk[0], h, diagonal=diagonal) + blk[1], h

    _, h_in = lax.scan(fold, vma.like(h0, S_all, s_all), (S_all, s_all), reverse=reverse)
    return h_in[lax.axis_index(axis_name)]


def solve(
    A: jax.Array,
    b: jax.Array,
    h0: jax.Array,
    *,
    diagonal: bool,
    transpose: bool = False,
    reverse: bool = False,
    axis_name=None,
    method: str = "sequential",
    block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Solve the recurrence on this slice; returns ``(states (n, M), incoming state (M,))``.

    ``h0`` is the state entering the whole sequence (before step 1, or after step T if ``reverse``).
    With ``axis_name`` the time axis is sharded over that mesh axis (call inside ``shard_map``) and
    ``h0`` must be the same on every device.
    """
    summary, finish = local_pass(A, b, diagonal=diagonal, transpose=transpose, reverse=reverse,
                                 method=method, block=block)
    if axis_name is None:
        h = h0
    else:
        h = incoming_state(summary, h0, axis_name, diagonal=diagonal, reverse=reverse)
    return finish(h), h
