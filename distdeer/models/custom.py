"""A user's own latent map, named in the config: ``model.kind: custom``, ``model.factory: pkg.mod:fn``.

``fn(latent=M, hidden=L)`` returns a dict (or any object with these attributes):

* ``init(key) -> params`` — a pytree of arrays, the map's parameters;
* ``step(params, z) -> z_next`` — one unbatched step, ``(M,) → (M,)``, written with ``jax.numpy``;
* optionally ``jac(params, z) -> (M, M)`` and ``jac_diag(params, z) -> (M,)``, the analytic Jacobian
  ``∂step/∂z`` and its diagonal.  Without them the solver differentiates ``step`` (``jax.jacfwd``): the
  dense mode then costs M forward-mode passes per step, and the diagonal mode saves the scan, not the
  Jacobian.

The module is imported from the working directory (as ``python -m`` would) or the installed
environment.  ``load`` checks everything it can before any training starts: import, call, shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CustomMap:
    init: Callable
    step: Callable
    jac: Callable
    jac_diag: Callable


def _get(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


@functools.lru_cache(maxsize=None)  # one set of functions per spec: jit caches key on their identity
def load(spec: str, latent: int, hidden: int) -> CustomMap:
    """The map ``spec`` names, checked on a zero state; ``ValueError`` (one line) when it is unusable."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"model.factory: expected package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.factory {spec}: cannot import ({type(e).__name__}: {e})") from None
    try:
        made = fn(latent=latent, hidden=hidden)
    except Exception as e:  # the user's code: any failure is a bad factory
        raise ValueError(f"model.factory {spec}: calling it failed ({type(e).__name__}: {e})") from None
    init, step = _get(made, "init"), _get(made, "step")
    if not callable(init) or not callable(step):
        raise ValueError(f"model.factory {spec}: must return init and step functions")
    jac = _get(made, "jac") or jax.jacfwd(step, argnums=1)
    given_diag = _get(made, "jac_diag")
    jac_diag = given_diag or (lambda p, z: jnp.diagonal(jac(p, z)))
    z = jax.ShapeDtypeStruct((latent,), jnp.float32)
    try:
        params = jax.eval_shape(init, jax.random.PRNGKey(0))
        shapes = {"step": (jax.eval_shape(step, params, z), (latent,)),
                  "jac": (jax.eval_shape(jac, params, z), (latent, latent)),
                  "jac_diag": (jax.eval_shape(jac_diag, params, z), (latent,))}
    except Exception as e:
        raise ValueError(f"model.factory {spec}: evaluating it on a state of shape ({latent},) failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for name, (got, want) in shapes.items():
        if not hasattr(got, "shape") or tuple(got.shape) != want:
            raise ValueError(f"model.factory {spec}: {name} returns shape "
                             f"{getattr(got, 'shape', type(got).__name__)}, expected {want}")
    return CustomMap(init, step, jac, jac_diag)
