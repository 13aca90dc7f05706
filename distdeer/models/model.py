"""A latent model with its readout, as configured: ``z_t = F_θ(z_{t-1})``, ``x̂_t = G(z_t)``.

Parameters are ``{"F": <model map params>, "readout": <readout params>}``.  Kind ``lru`` (``models.lru``) is
the same interface over its Markov state ``[x̂; Re h; Im h]`` (M = N + 2·layers·state, identity readout);
its forced recurrence at α = 1 is linear (``teacher_forced``).  Readouts (design §2.2):

* ``identity``: ``x̂ = z[:N]``; forcing ``ẑ_t = [x_t; 0]`` on the first N units only; initial state
  ``z_0 = [x_0; L x_0]`` with a learned ``L`` ((M−N) × N) for the unobserved units.
* ``affine``: ``x̂ = B z + b``; forcing ``ẑ_t = pinv(B)(x_t − b)`` on all units; ``z_0 = ẑ_0``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from distdeer.config import ModelConfig
from distdeer.models import custom as custom_mod
from distdeer.models import lru, plrnn


@dataclasses.dataclass(frozen=True)
class Model:
    kind: str
    latent: int  # M
    observed: int  # N
    hidden: int = 50
    nonlinear: int = 2
    readout: str = "identity"
    unforced_init: float = 1.0  # initial scale of the unforced units' weight rows (ModelConfig)
    factory: str | None = None  # kind "custom": package.module:function (models/custom.py)
    unforced_timescale: float | None = None  # the unforced units' a start at 1 − 1/τ, τ ≤ this (ModelConfig)
    unforced_decay: str = "linear"  # exp: the unforced units' a = exp(−exp ν), ν the parameter (ModelConfig)
    # kind "lru" (models/lru.py): complex units per layer, layers, ring of |λ| at initialisation, max arg λ,
    # position-wise block ("glu" or "mlp")
    state: int = 0
    layers: int = 0
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = math.pi
    block: str = "glu"

    @classmethod
    def from_config(cls, cfg: ModelConfig, observed: int) -> "Model":
        if cfg.kind == "lru":  # the state holds the prediction and every layer's complex units
            return cls("lru", observed + 2 * cfg.layers * cfg.state, observed, cfg.hidden, readout="identity",
                       state=cfg.state, layers=cfg.layers, r_min=cfg.r_min, r_max=cfg.r_max,
                       max_phase=cfg.max_phase, block=cfg.block)
        if cfg.readout == "identity" and cfg.latent < observed:
            raise ValueError(f"model.latent ({cfg.latent}) is smaller than the observed dimension "
                             f"({observed}); an identity readout needs latent >= observed")
        model = cls(cfg.kind, cfg.latent, observed, cfg.hidden, cfg.nonlinear, cfg.readout, cfg.unforced_init,
                    cfg.factory, unforced_timescale=cfg.unforced_timescale, unforced_decay=cfg.unforced_decay)
        if model.kind == "custom":
            model.custom()  # import and check it now: a bad factory is bad input, reported before training
        return model

    def custom(self) -> custom_mod.CustomMap:
        return custom_mod.load(self.factory, self.latent, self.hidden)

    # -- the map and its Jacobians -------------------------------------------------------------
    @property
    def _exp_decay(self) -> bool:
        return self.unforced_decay == "exp" and self.readout == "identity" and self.latent > self.observed

    def map_params(self, F_params: dict) -> dict:
        """The map's parameters as its functions (``models.plrnn``) take them: under ``unforced_decay: exp``
        ``a = [a_forced; exp(−exp ν)]`` (M,) from ``a`` (N,) and ``nu`` (M−N,); otherwise unchanged."""
        if not self._exp_decay:
            return F_params
        rest = {k: v for k, v in F_params.items() if k != "nu"}
        return {**rest, "a": jnp.concatenate([F_params["a"], jnp.exp(-jnp.exp(F_params["nu"]))])}

    def _fns(self) -> tuple[Callable, Callable, Callable]:
        fns = self._plain_fns()
        if not self._exp_decay:
            return fns
        # every use of the map (solver, GTF, free run, Jacobian norms, λ_max) goes through these
        return tuple(lambda p, z, f=f: f(self.map_params(p), z) for f in fns)

    def _plain_fns(self) -> tuple[Callable, Callable, Callable]:
        if self.kind == "shplrnn":
            return plrnn.shplrnn, plrnn.shplrnn_jac, plrnn.shplrnn_jac_diag
        if self.kind == "clipped_shplrnn":
            return plrnn.clipped_shplrnn, plrnn.clipped_shplrnn_jac, plrnn.clipped_shplrnn_jac_diag
        if self.kind == "alrnn":
            return tuple(partial(f, nonlinear=self.nonlinear)
                         for f in (plrnn.alrnn, plrnn.alrnn_jac, plrnn.alrnn_jac_diag))
        if self.kind == "plrnn":
            return plrnn.plrnn, plrnn.plrnn_jac, plrnn.plrnn_jac_diag
        if self.kind == "custom":
            c = self.custom()
            return c.step, c.jac, c.jac_diag
        if self.kind == "lru":
            step = partial(lru.step, layers=self.layers, state=self.state, block=self.block)
            # reverse mode: jit(vmap(jacfwd)) of this step was wrong past the 364th row (docs/repro)
            return (step, jax.jacrev(step, argnums=1),
                    partial(lru.step_jac_diag, layers=self.layers, state=self.state, block=self.block))
        raise ValueError(f"unknown model kind {self.kind!r}")

    @property
    def F(self) -> Callable:
        return self._fns()[0]

    @property
    def jac(self) -> Callable:
        return self._fns()[1]

    @property
    def jac_diag(self) -> Callable:
        return self._fns()[2]

    def init(self, key: jax.Array) -> dict:
        kf, kr = jax.random.split(key)
        M, N = self.latent, self.observed
        if self.kind in ("shplrnn", "clipped_shplrnn"):
            F = plrnn.init_shplrnn(kf, M, self.hidden)
        elif self.kind == "alrnn":
            F = plrnn.init_alrnn(kf, M)
        elif self.kind == "custom":
            F = self.custom().init(kf)
        elif self.kind == "lru":
            F = lru.init(kf, N, self.hidden, self.state, self.layers, self.r_min, self.r_max, self.max_phase,
                         self.block)
        else:
            F = plrnn.init_plrnn(kf, M)
        if self.readout == "identity" and M > N and self.unforced_init != 1.0 and self.kind not in ("custom", "lru"):
            # The unforced units' rows: their Jacobian block is diag(a) plus `unforced_init` times the
            # default coupling, so it starts contractive for a small factor (GTF does not damp these units).
            W = "W1" if "W1" in F else "W"
            F[W] = F[W].at[N:].multiply(self.unforced_init)
        if self.readout == "identity" and M > N and self.unforced_timescale is not None and "a" in F:
            # slow units: a = 1 − 1/τ with τ log-spaced over [10, unforced_timescale] (the slowest last)
            tau = jnp.geomspace(10.0, self.unforced_timescale, M - N)
            F["a"] = F["a"].at[N:].set((1.0 - 1.0 / tau).astype(F["a"].dtype))
        if self._exp_decay and "a" in F:  # the same initial a, held as ν = log(−log a)
            F["nu"] = jnp.log(-jnp.log(F["a"][N:]))
            F["a"] = F["a"][:N]
        if self.readout == "identity":
            readout = {"L": jnp.zeros((M - N, N))} if M > N else {}  # Orbax stores no empty arrays
        else:
            # Rows near-orthonormal: the pseudo-inverse is well conditioned at the start.
            B = jnp.linalg.qr(jax.random.normal(kr, (M, N)))[0].T
            readout = {"B": B, "b": jnp.zeros((N,))}
        return {"F": F, "readout": readout}

    def teacher_forced(self, F_params: dict, z0: jax.Array, zhat: jax.Array, recurrence: Callable) -> jax.Array:
        """Kind ``lru`` only: the states ``(n, M)`` of the forced recurrence at α = 1 — inputs ``zhat[:, :N]``
        (the data), z0 the state before the slice's sequence — solved exactly by one ``recurrence`` per layer
        (``lru.teacher_forced``).  Equal to what DEER or a sequential loop return for ``ForcedStep`` at α = 1."""
        if self.kind != "lru":
            raise ValueError(f"model kind {self.kind!r} has no linear forced recurrence (only lru)")
        N = self.observed
        _, h0_re, h0_im = lru.split_state(z0, N, self.layers, self.state)
        pred, h_re, h_im = lru.teacher_forced(F_params, zhat[:, :N], h0_re, h0_im, recurrence, layers=self.layers,
                                              block=self.block)
        return lru.join_state(pred, h_re, h_im)

    # -- readout and forcing ---------------------------------------------------------------------
    def forced_mask(self) -> jax.Array:
        if self.readout == "identity":
            return (jnp.arange(self.latent) < self.observed).astype(jnp.float32)
        return jnp.ones((self.latent,), jnp.float32)

    def observe(self, params: dict, z: jax.Array) -> jax.Array:
        """``G(z)`` for states ``(..., M)`` → ``(..., N)``."""
        if self.readout == "identity":
            return z[..., : self.observed]
        r = params["readout"]
        return z @ r["B"].T + r["b"]

    def forcing(self, params: dict, x: jax.Array) -> jax.Array:
        """Forcing states ``ẑ`` ``(T, M)`` from observations ``(T, N)`` by inverting the readout."""
        if self.readout == "identity":
            return jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (self.latent - self.observed,), x.dtype)], -1)
        r = params["readout"]
        return (x - r["b"]) @ jnp.linalg.pinv(r["B"]).T

    def initial_state(self, params: dict, x0: jax.Array) -> jax.Array:
        if self.readout == "identity":
            if self.latent == self.observed:
                return x0
            return jnp.concatenate([x0, params["readout"]["L"] @ x0])
        return self.forcing(params, x0[None])[0]

    def regulariser(self, params: dict, lam: float) -> jax.Array:
        """``λ (‖1 − a‖² + Σ ‖other map weights‖²)`` (pulls ``a`` towards 1; a custom map: ``λ Σ ‖weights‖²``;
        an LRU: ``λ Σ ‖weight matrices‖²``),
        plus for an affine readout ``λ ‖B Bᵀ − I‖²`` so that its pseudo-inverse stays well conditioned."""
        F = params["F"]
        if self.kind == "custom":  # its parameters are the user's pytree: plain weight decay on all of them
            reg = sum(jnp.sum(v ** 2) for v in jax.tree.leaves(F))
        elif self.kind == "lru":  # weight decay on the matrices; the eigenvalues and norms stay free
            reg = sum(jnp.sum(F[k] ** 2) for k in lru.MATRICES)
        else:
            F = self.map_params(F)
            reg = jnp.sum((1.0 - F["a"]) ** 2) + sum(jnp.sum(v ** 2) for k, v in F.items() if k != "a")
        if self.readout == "affine":
            B = params["readout"]["B"]
            reg = reg + jnp.sum((B @ B.T - jnp.eye(self.observed)) ** 2)
        return lam * reg
