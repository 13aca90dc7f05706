"""Training modes as strategies: how a mode cuts its batch from the data and what state it keeps.

``for_config(cfg, model, mesh, steps)`` is the one place that reads ``train.seq_len`` and
``train.carry``; everything else asks the mode.  A mode provides:

* ``place(source, mesh)``: the training data as global arrays;
* ``initial(params, data)``: its own piece of training state at step 0 (``TrainState.mode_state``), laid
  out on the mesh as ``state_sharding(data)`` says;
* ``loss(params, α, data, mode_state, step)`` → ``(mse, Solution, 𝒩)``: the loss of one update, the solver's
  statistics and the Jacobian-norm estimate along the forced trajectory (no gradient);
* ``advance(mode_state, sol, ok)``: its state after the update (``ok``: the update was applied);
* ``fingerprinted``: whether that state decides the next step (then it is in ``state_sha256``).

The three modes and their state:

* ``WholeSeries`` (``seq_len: null``): one sequence of T steps, time-sharded over the mesh's ``"time"``
  axis from data to loss (slot layout of ``distdeer.mesh``, per-block loss ``distdeer.train.whole``).
  State: the Newton warm start ``WarmStart.states`` ``(n·P, M)`` (the previous solution, sharded like the
  data; it changes iterations, not results, so it is not fingerprinted).  With ``solver.kind: scan`` (an LRU at α = 1) the
  solve is the exact time-sharded scan (``whole.teacher_forced``) and the warm start goes unused.
* ``Windows``: ``train.batch`` windows of ``seq_len`` steps at start indices drawn from ``fold_in(seed,
  step)``, solved as a batch (``deer_batch``; sharded over a ``"data"`` axis), warm-started from the data.
  Each window starts from ``model.initial_state(x_s)`` — or, with ``train.burn_in`` = K > 0, from the end
  of a forced run over the K rows before it (``burn_in``; no gradient): the unforced units then start
  where the data drove them, not at the readout's guess from one observation.  State: none.
* ``CarriedWindows`` (``train.carry``, truncated BPTT): ``train.batch`` streams walk through the series
  one window of S = ``seq_len`` steps per update — stream b's window at step k starts at row
  ``S · ((k + ⌊b·n/B⌋) mod n)``, n = ⌊(T − 1)/S⌋ — and each window starts from the state its stream's
  previous window ended in instead of ``model.initial_state(x_0)``.  So units the data never forces
  carry what the data drove them to across window boundaries, as in a whole-series run; a stream
  restarts from ``initial_state`` at row 0 (each pass through the series), at step 0, and after a window
  whose solve did not converge.  State: ``StreamEnds.states`` ``(B, M)`` (fingerprinted).

Noise injection (``train.noise`` = σ > 0, any mode): the observations that *force* the model — the GTF
teacher signal and the initial state — are x + σ ε, the loss targets are not.  ε is drawn afresh every
step from key = ``fold_in(fold_in(seed, step), 1)``: over the batch ``(B, S+1, N)`` for windows, per
global row r from ``fold_in(key, r)`` for the whole series (so that the draw does not depend on the
device count).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from distdeer import mesh as mesh_mod
from distdeer.config import Config
from distdeer.gtf import AlphaInParams, ForcedStep, reduce_norms, spectral_norms
from distdeer.mesh import WholeSeries
from distdeer.models import Model
from distdeer.solver import Result, Solution, deer_batch, sequential
from distdeer.train import whole


class WarmStart(NamedTuple):
    states: jax.Array  # (n·P, M): the previous update's solution in the slot layout, sharded over "time"


class StreamEnds(NamedTuple):
    states: jax.Array  # (B, M): each stream's state at the end of its last window (NaN: restart)


class NoState(NamedTuple):
    """Random windows keep no state of their own (an empty pytree: nothing to save or donate)."""


def step_key(cfg: Config, step) -> jax.Array:
    """The randomness of update ``step``: window starts draw from it, the forcing noise from fold_in(·, 1)."""
    return jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)


class _Base:
    fingerprinted = False

    def __init__(self, cfg: Config, model: Model, mesh, steps: int):
        self.cfg, self.model, self.mesh, self.steps = cfg, model, mesh, steps
        self.mask = model.forced_mask()
        self.solver_kw = dict(jacobian=cfg.solver.jacobian, max_iter=cfg.solver.max_iter,
                              fallback=cfg.solver.fallback, adjoint=cfg.solver.adjoint, chunk=cfg.solver.chunk)
        # 𝒩 along the forced trajectory (adaptive α, and logged): not for an LRU, whose rule does not apply
        self.sample = None if model.kind == "lru" else cfg.gtf.sample

    def forced(self, alpha) -> ForcedStep:
        return ForcedStep(self.model.F, alpha, self.mask, self.model.jac, self.model.jac_diag)


class WholeSeriesMode(_Base):
    """The whole series, time-sharded (module docstring)."""

    name = "whole"

    def __init__(self, cfg, model, mesh, steps):
        super().__init__(cfg, model, mesh, steps)
        block = partial(whole.local_loss, model, AlphaInParams(model.F, self.mask, model.jac, model.jac_diag),
                        whole.solver(cfg.solver.kind, steps, self.solver_kw, model), steps, cfg.train.noise, self.sample)
        self._block = partial(block, None) if mesh is None else whole.sharded(block, mesh)

    def place(self, source, mesh) -> WholeSeries:
        return mesh_mod.whole_series(source, mesh)

    def state_sharding(self, data: WholeSeries) -> WarmStart:
        return WarmStart(data.rows.sharding)

    def initial(self, params, data: WholeSeries) -> WarmStart:
        """The first Newton guess: the forcing states of the targets, ẑ_{s+1} for slot s, per block."""
        model = self.model
        fn = lambda axis, p, rows, ends: model.forcing(p, whole.targets(rows, ends, axis))  # noqa: E731
        if self.mesh is None:
            return WarmStart(fn(None, params, data.rows, data.ends))
        rep, t = P(), P(whole.AXIS)
        return WarmStart(jax.shard_map(partial(fn, whole.AXIS), mesh=self.mesh, in_specs=(rep, t, rep),
                                       out_specs=t)(params, data.rows, data.ends))

    def loss(self, params, alpha, data: WholeSeries, mode_state: WarmStart, step):
        mse, (sol, sums) = self._block(params, alpha, data.rows, data.ends, mode_state.states,
                                       jax.random.fold_in(step_key(self.cfg, step), 1))
        return mse, sol, whole.norm_from_sums(sums, self.cfg.gtf.norm)

    def advance(self, mode_state: WarmStart, sol: Solution, ok) -> WarmStart:
        return WarmStart(jnp.where(ok, sol.states, mode_state.states))  # a failed update keeps the last solution


class WindowsMode(_Base):
    """Random windows of the series (module docstring)."""

    name = "windows"

    def place(self, source, mesh) -> jax.Array:
        return mesh_mod.series_array(source, mesh)

    def state_sharding(self, data) -> NoState:
        return NoState()

    def initial(self, params, data) -> NoState:
        return NoState()

    def _noisy(self, x, step, salt=1):
        if self.cfg.train.noise == 0:
            return x
        key = jax.random.fold_in(step_key(self.cfg, step), salt)
        return x + self.cfg.train.noise * jax.random.normal(key, x.shape, x.dtype)

    def _windows(self, data, starts, steps=None):
        """(B, steps+1, N) rows from each start; ``steps`` defaults to ``train.seq_len``."""
        n = (steps or self.cfg.train.seq_len) + 1
        return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, n))(starts)

    def burn_in(self, params, alpha, xb, step) -> jax.Array:
        """(B, M): the state each window starts from after its burn-in rows ``xb`` (B, K+1, N) — the
        forced recurrence z_k = F(z̃_{k−1}) for k = 1..K from z_0 = initial_state(x_0), at the update's α,
        with the parameters held constant (no gradient flows through it: the window's loss is truncated
        BPTT from a state the data drove the model to, as carried windows have).  The forcing
        observations carry the training noise (its own draw)."""
        model, fixed, forced = self.model, jax.lax.stop_gradient(params), self.forced(alpha)
        xf = self._noisy(xb, step, salt=2)

        def one(x):
            return sequential(forced, fixed["F"], model.initial_state(fixed, x[0]), model.forcing(fixed, x)[:-1])[-1]
        return jax.vmap(one)(xf)

    def windows_loss(self, params, alpha, xw, step, carried=None):
        """xw: (B, S+1, N) windows; ``carried``: None, or (B, M) states to start from where finite.
        Returns (mse, Solution, 𝒩)."""
        model, cfg = self.model, self.cfg
        xf = self._noisy(xw, step)
        zhat = jax.vmap(model.forcing, in_axes=(None, 0))(params, xf)
        z0 = jax.vmap(model.initial_state, in_axes=(None, 0))(params, xf[:, 0])
        if carried is not None:
            z0 = jnp.where(jnp.all(jnp.isfinite(carried), axis=-1, keepdims=True), carried, z0)
        forced = self.forced(alpha)
        if cfg.solver.kind == "sequential":
            sol = jax.vmap(whole.exact)(
                jax.vmap(sequential, in_axes=(None, None, 0, 0))(forced, params["F"], z0, zhat[:, :-1]))
        elif cfg.solver.kind == "scan":
            sol = jax.vmap(lambda z, zh: whole.teacher_forced(model, params["F"], z, zh, None))(z0, zhat[:, :-1])
        else:
            sol = deer_batch(forced, params["F"], z0, zhat[:, :-1], init=zhat[:, 1:], mesh=self.mesh,
                             throw=False, **self.solver_kw)
        pred = model.observe(params, sol.states)
        mse = jnp.mean((pred - xw[:, 1:]) ** 2)
        if self.sample is None:
            return mse, sol, jnp.asarray(jnp.nan, mse.dtype)  # 𝒩 not estimated (an LRU)
        zprev = jnp.concatenate([z0[:, None], sol.states[:, :-1]], axis=1)
        zt = jax.lax.stop_gradient(jax.vmap(forced.forced_state)(zprev, zhat[:, :-1]))
        norm = jacobian_norm(model, jax.lax.stop_gradient(params), zt, cfg.gtf.norm, self.sample)
        return mse, sol, norm

    def loss(self, params, alpha, data, mode_state, step):
        S, K = self.cfg.train.seq_len, self.cfg.train.burn_in
        starts = jax.random.randint(step_key(self.cfg, step), (self.cfg.train.batch,), 0, data.shape[0] - S - K)
        if K == 0:
            return self.windows_loss(params, alpha, self._windows(data, starts), step)
        xw = self._windows(data, starts, K + S)
        z_in = self.burn_in(params, alpha, xw[:, :K + 1], step)
        mse, sol, norm = self.windows_loss(params, alpha, xw[:, K:], step, z_in)
        # a burn-in that left float range fails its window's solve (the update is skipped and counted, the result
        # NONFINITE), rather than the window silently starting from initial_state
        finite = jnp.all(jnp.isfinite(z_in), axis=-1)
        return mse, sol._replace(converged=sol.converged & finite,
                                 result=jnp.where(finite, sol.result, jnp.int32(Result.NONFINITE))), norm

    def advance(self, mode_state, sol, ok):
        return mode_state


class CarriedWindowsMode(WindowsMode):
    """Streams of consecutive windows, each starting where the stream's last one ended (docstring)."""

    name = "carried"
    fingerprinted = True

    def state_sharding(self, data) -> StreamEnds:
        return StreamEnds(mesh_mod.replicated(self.mesh))

    def initial(self, params, data) -> StreamEnds:
        # replaced by initial_state at step 0 (every stream restarts there)
        return StreamEnds(jnp.zeros((self.cfg.train.batch, self.model.latent), jnp.float32))

    def loss(self, params, alpha, data, mode_state: StreamEnds, step):
        S, B = self.cfg.train.seq_len, self.cfg.train.batch
        n = (data.shape[0] - 1) // S
        j = (step + jnp.arange(B) * n // B) % n
        restart = (j == 0) | (step == 0)
        carried = jnp.where(restart[:, None], jnp.nan, jax.lax.stop_gradient(mode_state.states))
        return self.windows_loss(params, alpha, self._windows(data, j * S), step, carried)

    def advance(self, mode_state: StreamEnds, sol: Solution, ok) -> StreamEnds:
        # a window whose solve did not converge (or went non-finite) restarts its stream (NaN mode_state)
        end = jax.lax.stop_gradient(sol.states[:, -1])
        return StreamEnds(jnp.where(sol.converged[:, None], end, jnp.nan))


def jacobian_norm(model: Model, params, zt: jax.Array, kind: str, sample: int) -> jax.Array:
    """𝒩 over (a strided sample of) forced states ``zt`` (..., T, M); ``max`` takes the batch maximum
    of per-sequence geometric means."""
    stride = max(1, zt.shape[-2] // sample)
    z = zt[..., ::stride, :]
    norms = spectral_norms(jax.vmap(lambda v: model.jac(params["F"], v))(z.reshape(-1, z.shape[-1])))
    return reduce_norms(norms.reshape(z.shape[:-1]), kind)


def for_config(cfg: Config, model: Model, mesh=None, steps: int | None = None):
    """The mode ``train.seq_len`` / ``train.carry`` select; ``steps`` = T, the series' steps (whole series)."""
    if cfg.train.seq_len is None:
        if steps is None:
            raise ValueError("modes.for_config: whole-series training needs steps=T")
        return WholeSeriesMode(cfg, model, mesh, steps)
    if cfg.train.carry:
        return CarriedWindowsMode(cfg, model, mesh, steps)
    return WindowsMode(cfg, model, mesh, steps)
