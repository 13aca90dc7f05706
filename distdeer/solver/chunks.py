"""Per-step work over a time slice in consecutive chunks, to bound memory.

Evaluating the step, its Jacobians or its VJPs on all ``n`` steps of a slice at once makes XLA hold
the step's intermediates for every step together: for the shPLRNN the hidden activations are ``n × L``
floats, 4 GiB at n = 2^24, L = 64 — more than the states themselves (``n × M``).  ``over_time`` runs
the same per-step computation on chunks of ``chunk`` steps in a loop, so only ``chunk × L`` of them
are alive at once.  Its results are the same up to float summation order (the parameter cotangent is
summed chunk by chunk).  A slice no longer than one chunk takes the direct path, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from distdeer.solver import vma

# Steps per chunk when the caller does not choose: 2^18 steps keep a 64-wide hidden layer at 64 MiB per
# intermediate while each chunk is still one large vectorised kernel (at T = 10^5 on one device
# nothing is chunked, so the common sizes run exactly as without chunking).
DEFAULT_CHUNK = 2 ** 18


class Shifted(NamedTuple):
    """The sequence ``x`` moved by one step, with ``h`` filling the vacated end, never formed whole.

    ``lag = 1`` (delayed): rows ``(h, x_0, …, x_{n−2})`` — the states entering each step, ``z_{t−1}``.
    ``lag = −1`` (ahead): rows ``(x_1, …, x_{n−1}, h)`` — the adjoint's ``μ_{t+1}``.
    ``over_time`` cuts it chunk by chunk, so the shifted copy (n × M floats) exists one chunk at a time.
    """

    x: jax.Array  # (n, M)
    h: jax.Array  # (M,)
    lag: int  # static: 1 or -1


def _is_seq(a) -> bool:
    return isinstance(a, Shifted)


def _cut(a, start, size: int):
    """Rows ``start … start+size−1`` of an array or a ``Shifted`` (``start`` may be traced)."""
    if not isinstance(a, Shifted):
        return lax.dynamic_slice_in_dim(a, start, size)
    n, lag = a.x.shape[0], int(a.lag)
    if lag == 1:
        at_end, spliced = start == 0, lambda rows: jnp.concatenate([a.h[None], rows[:-1]])
    else:
        at_end, spliced = start + size == n, lambda rows: jnp.concatenate([rows[1:], a.h[None]])
    if isinstance(at_end, bool):  # a static start: cut exactly
        if not at_end:
            return lax.dynamic_slice_in_dim(a.x, start - lag, size)
        return spliced(lax.dynamic_slice_in_dim(a.x, start, size))
    # A traced start: dynamic_slice clamps a start past either end, which yields the rows the shift
    # needs apart from the vacated one; splice h in where that happened.
    rows = lax.dynamic_slice_in_dim(a.x, start - lag, size)
    return jnp.where(at_end, spliced(rows), rows)


def whole(a) -> jax.Array:
    """An array or ``Shifted`` as one (n, …) array."""
    return _cut(a, 0, length(a))


def cut(seqs, start, size: int):
    """Rows ``start … start+size−1`` of every sequence (array or ``Shifted``) in the pytree ``seqs``."""
    return jax.tree.map(lambda a: _cut(a, start, size), seqs, is_leaf=_is_seq)


def length(seqs) -> int:
    """The leading (time) length shared by the sequences of ``seqs``."""
    first = jax.tree.leaves(seqs, is_leaf=_is_seq)[0]
    return (first.x if _is_seq(first) else first).shape[0]


def over_time(fn: Callable[[Any], tuple[Any, Any]], seqs: Any, chunk: int | None) -> tuple[Any, Any]:
    """``fn(part) -> (total, rows)`` over consecutive time chunks of ``seqs``.

    ``seqs``: pytree of arrays (or ``Shifted``) with leading time axis ``n``; ``fn`` receives the same
    pytree cut to a chunk of ``k`` steps and returns ``total`` (a pytree summed over chunks, e.g. a parameter
    cotangent) and ``rows`` (a pytree of arrays with leading axis ``k``, put together over chunks back
    to ``n``).  Full chunks run in a ``lax.fori_loop``, the remainder (odd n) in one more call.
    """
    n = length(seqs)
    if chunk is None or n <= chunk:
        return fn(jax.tree.map(whole, seqs, is_leaf=_is_seq))
    full, rest = divmod(n, chunk)
    # The first chunk runs outside the loop: its results give the types (shapes and varying mesh axes)
    # of the loop's carry.  Rows are written into one preallocated buffer in place: collecting them
    # and concatenating would hold a second copy (4 GiB of dense Jacobians at n = 2^22, M = 16).
    total, first = fn(cut(seqs, 0, chunk))
    out = jax.tree.map(lambda r: lax.dynamic_update_slice_in_dim(
        vma.like(jnp.zeros((n,) + r.shape[1:], r.dtype), r), r, 0, 0), first)

    def write(out, rows, start):
        return jax.tree.map(lambda o, r: lax.dynamic_update_slice_in_dim(o, vma.like(r, o), start, 0), out, rows)

    def body(i, carry):
        acc, out = carry
        t, rows = fn(cut(seqs, i * chunk, chunk))
        return jax.tree.map(jnp.add, acc, vma.like(t, acc)), write(out, rows, i * chunk)

    total, out = lax.fori_loop(1, full, body, (total, out))
    if rest:
        t, tail = fn(cut(seqs, full * chunk, rest))
        total, out = jax.tree.map(jnp.add, total, t), write(out, tail, full * chunk)
    return total, out


def rows_over_time(fn: Callable[[Any], Any], seqs: Any, chunk: int | None) -> Any:
    """``over_time`` for a per-step function with nothing to sum: ``fn(part) -> rows``."""
    return over_time(lambda s: ((), fn(s)), seqs, chunk)[1]
