"""Generalized teacher forcing (GTF): the forced step that makes DEER converge on chaotic models.

With forcing states ``ẑ_t`` (the data mapped into state space) and the projection ``P`` onto the forced
units (a 0/1 mask ``p``), training runs ``z_t = F(z̃_{t-1})`` with ``z̃ = z − α p ⊙ (z − ẑ)``.  In the
solver's convention the forced step is ``f(params, z_{t-1}, ẑ_{t-1})``: its input at step t is the
*previous* forcing state, so GTF-DEER is ``deer(forced_step(F, α, p), params, z0, zhat[:-1])``.
Its Jacobian is ``J_F(z̃)(I − αP)``: α shrinks every linear map of the Newton step (design §2.2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def forced_mask(forced, latent: int, dtype=jnp.float32) -> jax.Array:
    """0/1 mask (M,) of forced units from ``None`` (all), an int N (the first N) or a boolean mask."""
    if forced is None:
        return jnp.ones((latent,), dtype)
    if isinstance(forced, int):
        if not 0 <= forced <= latent:
            raise ValueError(f"gtf: cannot force {forced} of {latent} units")
        return (jnp.arange(latent) < forced).astype(dtype)
    mask = jnp.asarray(forced)
    if mask.shape != (latent,):
        raise ValueError(f"gtf: forced mask must have shape ({latent},), got {mask.shape}")
    return mask.astype(dtype)


class ForcedStep:
    """The GTF-forced step ``(params, z_{t-1}, ẑ_{t-1}) -> z_t`` with analytic Jacobians when the model
    supplies them (``jac``/``jac_diag`` attributes are read by ``distdeer.deer``).

    ``alpha`` is a scalar (it may be traced, e.g. an adaptive α inside a jitted train step); it is a
    forcing strength, not a parameter, and receives no gradient.
    """

    def __init__(self, F: Callable, alpha, mask: jax.Array, jac: Callable | None = None,
                 jac_diag: Callable | None = None):
        self.F, self.alpha, self.mask = F, alpha, mask
        self.jac = self._jac if jac is not None else None
        self.jac_diag = self._jac_diag if (jac_diag is not None or jac is not None) else None
        self._model_jac, self._model_jac_diag = jac, jac_diag

    def _damping(self, dtype):
        return 1.0 - lax.stop_gradient(jnp.asarray(self.alpha, dtype)) * self.mask.astype(dtype)

    def forced_state(self, z, zhat):
        """``z̃ = (I − αP) z + αP ẑ``."""
        return zhat + self._damping(z.dtype) * (z - zhat)

    def __call__(self, params, z, zhat):
        return self.F(params, self.forced_state(z, zhat))

    def _jac(self, params, z, zhat):
        return self._model_jac(params, self.forced_state(z, zhat)) * self._damping(z.dtype)[None, :]

    def _jac_diag(self, params, z, zhat):
        zt = self.forced_state(z, zhat)
        d = self._model_jac_diag(params, zt) if self._model_jac_diag else jnp.diagonal(self._model_jac(params, zt))
        return d * self._damping(z.dtype)


def forced_step(F: Callable, alpha, forced=None, *, latent: int | None = None, jac: Callable | None = None,
                jac_diag: Callable | None = None) -> ForcedStep:
    """Build the GTF step for the model map ``F(params, z)``.

    ``forced``: ``None`` forces every unit (affine readout, ``P = I``); an int ``N`` forces the first N
    (identity readout); or a 0/1 mask.  ``latent`` (M) is needed unless ``forced`` is a mask.
    ``jac``/``jac_diag``: the model's analytic ``J_F(z)`` (M, M) / its diagonal (M,).
    """
    if latent is None:
        if forced is None or isinstance(forced, int):
            raise ValueError("gtf.forced_step: pass latent=M (or a mask) to say how many units there are")
        latent = int(jnp.shape(forced)[0])
    return ForcedStep(F, alpha, forced_mask(forced, latent), jac, jac_diag)


# jaxlib's CPU LAPACK kernels (0.10.2 and 0.11.0, ``ParallelBatchMap``) cut a batch whose estimated cost
# reaches 2·10^5 FLOP (SVD: 10·m·n·min(m, n) per matrix) into chunks that they queue on XLA's intra-op thread pool, then block their
# own thread until the chunks are done.  When the call itself runs on a pool thread (as it does after a
# while loop that used the pool, e.g. the Newton loop) and every pool thread holds such a call (one per
# simulated device of a process, as many devices as cores), nothing is left to run the chunks and the step
# hangs forever: 2 processes × 2 CPU devices on a 2-core machine at T = 2·10^4.  On CPU the norms are
# therefore taken in batches of half that cost, which the kernel runs inline on its own thread.  Without
# distdeer: docs/repro/lapack_pool_deadlock.py.
_LAPACK_SPLIT_FLOP = 200_000


def spectral_norms(mats: jax.Array) -> jax.Array:
    """``‖A_k‖₂`` (largest singular value) of a batch ``mats`` (K, m, n) → (K,).

    One batched SVD on accelerators; on CPU a ``lax.map`` over batches small enough that jaxlib never hands
    part of one to its thread pool (see ``_LAPACK_SPLIT_FLOP``), with the same result.
    """
    K, m, n = mats.shape
    one = lambda a: jnp.linalg.norm(a, 2)  # noqa: E731
    chunk = max(1, _LAPACK_SPLIT_FLOP // (2 * 10 * m * n * min(m, n)))

    def cpu(a):
        return jax.vmap(one)(a) if K <= chunk else lax.map(one, a, batch_size=chunk)

    return lax.platform_dependent(mats, cpu=cpu, default=jax.vmap(one))


def jacobian_norm(jac: Callable, params, states: jax.Array, *, kind: str = "geometric") -> jax.Array:
    """Estimate 𝒩 of the Jacobian norm along a (forced) trajectory ``states`` (T, M).

    ``kind="geometric"`` (default; the product upper bound): ``exp(mean_t log ‖J(z_t)‖₂)``, the growth
    rate per step that bounds ``‖J_T ⋯ J_1‖``; ``"mean"``: arithmetic mean of ``‖J(z_t)‖₂``.
    """
    return reduce_norms(spectral_norms(jax.vmap(lambda z: jac(params, z))(states)), kind)


def reduce_norms(norms: jax.Array, kind: str) -> jax.Array:
    """𝒩 from per-step spectral norms ``(..., T)``: ``max`` (per sequence the geometric mean over time — the
    growth rate that bounds its Jacobian product — then the maximum over sequences: the reference product
    upper bound), ``geometric`` (one geometric mean over every step of every sequence; equal to ``max`` for a
    single sequence) or ``mean`` (arithmetic)."""
    logs = jnp.log(jnp.maximum(norms, 1e-30))
    if kind == "geometric":
        return jnp.exp(jnp.mean(logs))
    if kind == "mean":
        return jnp.mean(norms)
    if kind == "max":
        return jnp.max(jnp.exp(jnp.mean(logs, axis=-1)))
    raise ValueError(f"gtf: unknown Jacobian-norm estimate {kind!r}")


def alpha_from_norm(norm: jax.Array) -> jax.Array:
    """GTF's forcing strength ``α = max(0, 1 − 1/𝒩)``: then ``(1 − α) 𝒩 ≤ 1``."""
    return jnp.maximum(0.0, 1.0 - 1.0 / norm)


class AlphaInParams:
    """The GTF-forced step with α passed in the parameters: ``step((F_params, α), z_{t-1}, ẑ_{t-1})``.

    Equivalent to ``ForcedStep(F, α, mask)``; for solves inside a caller's ``shard_map`` with a traced α.
    There α must not be closed over: the solver's custom VJP traces its backward pass later, where a
    closed-over value of the forward trace is out of scope.  α receives a zero cotangent (it is
    stop-gradiented in the damping).
    """

    def __init__(self, F: Callable, mask: jax.Array, jac: Callable | None = None, jac_diag: Callable | None = None):
        self.F, self.mask, self._jac_fn, self._jac_diag_fn = F, mask, jac, jac_diag
        self.jac = self._jac if jac is not None else None
        self.jac_diag = self._jac_diag if (jac_diag is not None or jac is not None) else None

    def at(self, alpha) -> ForcedStep:
        return ForcedStep(self.F, alpha, self.mask, self._jac_fn, self._jac_diag_fn)

    def __call__(self, params, z, zhat):
        F_params, alpha = params
        return self.at(alpha)(F_params, z, zhat)

    def _jac(self, params, z, zhat):
        F_params, alpha = params
        return self.at(alpha).jac(F_params, z, zhat)

    def _jac_diag(self, params, z, zhat):
        F_params, alpha = params
        return self.at(alpha).jac_diag(F_params, z, zhat)
