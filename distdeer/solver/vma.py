"""Bookkeeping for ``shard_map``'s varying-manual-axes (vma) types.

Inside ``shard_map`` each value is typed by the mesh axes along which it may differ between devices;
loop carries must keep one type, and a cotangent must vary over exactly the axes its primal does.
Outside ``shard_map`` every function here is the identity.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` varies (empty outside ``shard_map``)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", None) or ())


def of(tree) -> frozenset:
    """Union of the varying axes of every leaf."""
    out = frozenset()
    for leaf in jax.tree.leaves(tree):
        out |= varying_axes(leaf)
    return out


def vary(x, axes):
    """Mark ``x`` as varying over ``axes`` (those it already varies over are left alone)."""
    missing = tuple(sorted((a for a in axes if a not in varying_axes(x)), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x


def like(tree, *refs):
    """``tree`` with every leaf varying over all axes that the ``refs`` vary over."""
    axes = of(refs)
    return jax.tree.map(lambda a: vary(a, axes), tree)


def reduce_to(ct, primal):
    """Sum a cotangent over the axes along which it varies but its primal does not (the transpose of
    the implicit broadcast of a replicated value)."""
    extra = tuple(sorted(of(ct) - of(primal), key=str))
    return lax.psum(ct, extra) if extra else ct
