"""One GTF-DEER training step: forcing → forced step → DEER solve → loss → implicit adjoint → optax.

Two modes, chosen by ``train.seq_len``:

* whole series (``null``): one sequence of T steps, time-sharded over the mesh's ``"time"`` axis from
  data to loss (slot layout of ``distdeer.mesh``: each device holds n = ⌈T/P⌉ slots; nothing of size O(T) is
  gathered); Newton is warm-started from the previous step's solution, kept in the state sharded the
  same way (``(n·P, M)``, padding slots at the end);
* windows: ``train.batch`` windows of ``seq_len`` steps at start indices drawn from ``fold_in(seed,
  step)``, solved as a batch (``deer_batch``; sharded over a ``"data"`` axis), warm-started from the data;
* carried windows (``train.carry``, truncated BPTT): ``train.batch`` streams walk through the series one
  window of S = ``seq_len`` steps per update — stream b's window at step k starts at row
  ``S · ((k + ⌊b·n/B⌋) mod n)``, n = ⌊(T − 1)/S⌋ — and each window starts from the state its stream's
  previous window ended in (``z_S`` of the forced run, kept in the state, no gradient through it) instead
  of ``model.initial_state(x_0)``.  So units the data never forces carry what the data drove them to
  across window boundaries, as in a whole-series run; a stream restarts from ``initial_state`` at row 0
  (each pass through the series), at step 0 and when its carried state is not finite.

Noise injection (``train.noise`` = σ > 0, any mode): the observations that *force* the model — the GTF
teacher signal ẑ_t = forcing(x_t + σ ε_t) and the initial state from x_0 + σ ε_0, ε ~ N(0, I) drawn afresh
every step from ``fold_in(fold_in(seed, step), 1)`` — are perturbed, the loss targets x_{t+1} are not.  The
series is standardised, so σ is in units of each dimension's standard deviation.  The model is trained to
map states a little off the data back onto it, so that its free runs do not drift away (docs/results.md,
ECG: σ = 0.1 and 0.03 remove spurious fast beats but damp the rhythm into a strict cycle).  The logged ``mse`` is
then the loss of the noisy-forced run against clean targets, larger than a noise-free run's.

Failed solves: an update whose Newton solve did not converge (no fallback) or whose gradient is not finite
is skipped — parameters and optimizer state stay, ``skipped`` counts it, α is not re-estimated from that
trajectory, the whole-series warm start keeps the previous solution, and a carried stream whose window
did not converge restarts from ``initial_state`` instead of continuing from an unconverged end state.

Adaptive GTF: every ``gtf.every`` steps, 𝒩 is estimated from the model Jacobians
``J_F(z̃_t)`` along the forced trajectory; ``α_est = max(0, 1 − 1/𝒩)``; α jumps up to ``α_est`` at once
and otherwise decays towards it, ``α ← γ α + (1 − γ) α_est``, with ``γ = exp(−every / (decay · steps))``
so that the decay time is a fixed fraction of the configured training length.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from distdeer.config import Config
from distdeer.mesh import WholeSeries
from distdeer.gtf import AlphaInParams, ForcedStep, alpha_from_norm, reduce_norms
from distdeer.models import Model
from distdeer.solver import Result, Solution, deer_batch, sequential
from distdeer.train import whole


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    alpha: jax.Array  # float32 scalar: current GTF forcing strength
    # whole series: (n·P, M) Newton warm start in the slot layout of ``whole`` (sharded over "time");
    # carried windows: (B, M) the streams' end states; random windows: an unused (1, M) placeholder
    warm: jax.Array
    step: jax.Array  # int32: completed updates (skipped ones included)
    skipped: jax.Array  # int32: updates skipped because the solve failed or the gradient was not finite


class StepMetrics(NamedTuple):
    loss: jax.Array
    mse: jax.Array
    alpha: jax.Array
    alpha_estimate: jax.Array
    newton_iterations: jax.Array
    newton_residual: jax.Array
    converged: jax.Array
    result: jax.Array
    lr: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array  # cumulative count after this step


def learning_rate(cfg: Config) -> optax.Schedule:
    """Exponential decay from ``train.lr`` to ``train.lr_end`` over ``train.steps``."""
    return optax.exponential_decay(cfg.train.lr, cfg.train.steps, cfg.train.lr_end / cfg.train.lr)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.train.clip)] if cfg.train.clip > 0 else []
    return optax.chain(*parts, optax.radam(learning_rate(cfg)))


def gamma(cfg: Config) -> float:
    return math.exp(-cfg.gtf.every / (cfg.gtf.decay * cfg.train.steps))


def whole_series(series) -> WholeSeries:
    """One device: a standardised series ``(T+1, N)`` in the slot layout (the rows of the T steps and
    the two ends).  Sharded placement, read per process: ``distdeer.mesh.whole_series``."""
    x = jnp.asarray(series)
    return WholeSeries(x[:-1], jnp.stack([x[0], x[-1]]))


def initial_warm(model: Model, params, data: WholeSeries, mesh=None) -> jax.Array:
    """The first Newton guess of a whole-series run: the forcing states of the targets, ẑ_{s+1} for slot
    s, in the layout of ``data.rows`` (computed per block under a mesh)."""
    fn = lambda axis, p, rows, ends: model.forcing(p, whole.targets(rows, ends, axis))  # noqa: E731
    if mesh is None:
        return fn(None, params, data.rows, data.ends)
    rep, t = P(), P(whole.AXIS)
    return jax.shard_map(partial(fn, whole.AXIS), mesh=mesh, in_specs=(rep, t, rep), out_specs=t)(
        params, data.rows, data.ends)


def init_state(model: Model, cfg: Config, data: WholeSeries | None = None) -> TrainState:
    """Fresh parameters (from ``seed``); the whole-series Newton guess from ``data`` (one device; a
    placeholder row when None, to be filled by the caller)."""
    params = model.init(jax.random.PRNGKey(cfg.seed))
    if cfg.train.seq_len is None and data is not None:
        warm = initial_warm(model, params, data)
    elif cfg.train.carry:
        warm = jnp.zeros((cfg.train.batch, model.latent), jnp.float32)  # replaced by initial_state at step 0
    else:
        warm = jnp.zeros((1, model.latent), jnp.float32)  # unused placeholder (Orbax stores no empty arrays)
    return TrainState(params, optimizer(cfg).init(params), jnp.float32(cfg.gtf.alpha), warm, jnp.int32(0),
                      jnp.int32(0))


def _jacobian_norm(model: Model, params, zt: jax.Array, kind: str, sample: int) -> jax.Array:
    """𝒩 over (a strided sample of) forced states ``zt`` (..., T, M); ``max`` takes the batch maximum
    of per-sequence geometric means."""
    stride = max(1, zt.shape[-2] // sample)
    z = zt[..., ::stride, :]
    norms = jnp.linalg.norm(jax.vmap(lambda v: model.jac(params["F"], v))(z.reshape(-1, z.shape[-1])), 2, axis=(1, 2))
    return reduce_norms(norms.reshape(z.shape[:-1]), kind)


def make_train_step(model: Model, cfg: Config, mesh=None, steps: int | None = None):
    """Returns ``train_step(state, data) -> (state, StepMetrics)`` (to be jitted).

    Whole series: ``data`` is a ``WholeSeries`` of ``steps`` = T steps (laid out over ``mesh``'s
    ``"time"`` axis, or on one device).  Windows: ``data`` is the standardised series ``(T+1, N)``; the
    windows are cut from it inside the step, so that the step is a pure function of (state, data, seed)."""
    opt = optimizer(cfg)
    lr = learning_rate(cfg)
    mask = model.forced_mask()
    g = gamma(cfg)
    solver_kw = dict(jacobian=cfg.solver.jacobian, max_iter=cfg.solver.max_iter, fallback=cfg.solver.fallback)
    is_whole = cfg.train.seq_len is None

    def forced(alpha):
        return ForcedStep(model.F, alpha, mask, model.jac, model.jac_diag)

    def step_key(step):
        """The randomness of update ``step``: window starts draw from it, the forcing noise from fold_in(·, 1)."""
        return jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)

    def noisy(x, step):
        """The forcing observations of windows: x, or x + σ ε with σ = ``train.noise`` (module docstring)."""
        if cfg.train.noise == 0:
            return x
        key = jax.random.fold_in(step_key(step), 1)
        return x + cfg.train.noise * jax.random.normal(key, x.shape, x.dtype)

    if is_whole:
        if steps is None:
            raise ValueError("make_train_step: whole-series training needs steps=T")
        block = partial(whole.local_loss, model, AlphaInParams(model.F, mask, model.jac, model.jac_diag),
                        whole.solver(cfg.solver.kind, steps, solver_kw), steps,
                        cfg.train.noise, cfg.gtf.sample)
        block = partial(block, None) if mesh is None else whole.sharded(block, mesh)

    def windows_loss(params, alpha, xw, xf, carried=None):
        """xw: (B, S+1, N) targets, xf: the same shape, forcing observations; ``carried``: None, or (B, M)
        states to start from where finite.  Returns (mse, Solution, 𝒩)."""
        zhat = jax.vmap(model.forcing, in_axes=(None, 0))(params, xf)
        z0 = jax.vmap(model.initial_state, in_axes=(None, 0))(params, xf[:, 0])
        if carried is not None:
            z0 = jnp.where(jnp.all(jnp.isfinite(carried), axis=-1, keepdims=True), carried, z0)
        if cfg.solver.kind == "sequential":
            states = jax.vmap(sequential, in_axes=(None, None, 0, 0))(forced(alpha), params["F"], z0, zhat[:, :-1])
            B = states.shape[0]
            sol = Solution(states, jnp.zeros(B, jnp.int32), jnp.ones(B, bool), jnp.zeros(B, jnp.float32),
                           jnp.full(B, Result.SUCCESS, jnp.int32))
        else:
            sol = deer_batch(forced(alpha), params["F"], z0, zhat[:, :-1], init=zhat[:, 1:], mesh=mesh,
                             throw=False, **solver_kw)
        pred = model.observe(params, sol.states)
        zprev = jnp.concatenate([z0[:, None], sol.states[:, :-1]], axis=1)
        zt = jax.lax.stop_gradient(jax.vmap(forced(alpha).forced_state)(zprev, zhat[:, :-1]))
        norm = _jacobian_norm(model, jax.lax.stop_gradient(params), zt, cfg.gtf.norm, cfg.gtf.sample)
        return jnp.mean((pred - xw[:, 1:]) ** 2), sol, norm

    def loss_fn(params, alpha, data, warm, step):
        """(loss, (mse, Solution, 𝒩 the Jacobian-norm estimate along the forced trajectory))."""
        if is_whole:
            mse, (sol, sums) = block(params, alpha, data.rows, data.ends, warm,
                                     jax.random.fold_in(step_key(step), 1))
            norm = whole.norm_from_sums(sums, cfg.gtf.norm)
        elif cfg.train.carry:
            S, B = cfg.train.seq_len, cfg.train.batch
            n = (data.shape[0] - 1) // S
            j = (step + jnp.arange(B) * n // B) % n
            xw = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, S + 1))(j * S)
            restart = (j == 0) | (step == 0)
            carried = jnp.where(restart[:, None], jnp.nan, jax.lax.stop_gradient(warm))
            mse, sol, norm = windows_loss(params, alpha, xw, noisy(xw, step), carried)
        else:
            S = cfg.train.seq_len
            starts = jax.random.randint(step_key(step), (cfg.train.batch,), 0, data.shape[0] - S)
            xw = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, S + 1))(starts)
            mse, sol, norm = windows_loss(params, alpha, xw, noisy(xw, step))
        return mse + model.regulariser(params, cfg.train.lambda_lat), (mse, sol, norm)

    def train_step(state: TrainState, data):
        (loss, (mse, sol, norm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.alpha, data, state.warm, state.step)
        grad_norm = optax.tree.norm(grads)
        converged = jnp.all(sol.converged)
        ok = jnp.isfinite(grad_norm) & converged
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A failed solve (no fallback) yields NaN gradients by design: skip that update entirely.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        estimate = alpha_from_norm(norm)
        alpha = state.alpha
        if cfg.gtf.mode == "adaptive":  # never re-estimated from an unconverged trajectory
            proposed = jnp.where(estimate > alpha, estimate, g * alpha + (1 - g) * estimate)
            alpha = jnp.where((state.step % cfg.gtf.every == 0) & converged, proposed, alpha).astype(jnp.float32)
        if is_whole:
            warm = jnp.where(ok, sol.states, state.warm)
        elif cfg.train.carry:  # an unconverged (or non-finite) end state restarts its stream (windows_loss)
            end = jax.lax.stop_gradient(sol.states[:, -1])
            warm = jnp.where(sol.converged[:, None], end, jnp.nan)
        else:
            warm = state.warm
        skipped = state.skipped + (~ok).astype(jnp.int32)
        metrics = StepMetrics(loss, mse, state.alpha, estimate, jnp.max(sol.iterations),
                              jnp.max(sol.residual), converged, jnp.max(sol.result),
                              lr(state.step), grad_norm, skipped)
        return TrainState(params, opt_state, alpha, warm, state.step + 1, skipped), metrics

    return train_step
