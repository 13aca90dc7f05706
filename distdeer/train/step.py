"""One GTF-DEER training step: forcing → forced step → DEER solve → loss → implicit adjoint → optax.

Two modes, chosen by ``train.seq_len``:

* whole series (``null``): one sequence of length T, time-sharded over the mesh's ``"time"`` axis;
  Newton is warm-started from the previous step's solution (kept in the state, unpadded);
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

Adaptive GTF (DESIGN §2.2): every ``gtf.every`` steps, 𝒩 is estimated from the model Jacobians
``J_F(z̃_t)`` along the forced trajectory; ``α_est = max(0, 1 − 1/𝒩)``; α jumps up to ``α_est`` at once
and otherwise decays towards it, ``α ← γ α + (1 − γ) α_est``, with ``γ = exp(−every / (decay · steps))``
so that the decay time is a fixed fraction of the configured training length.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from distdeer.config import Config
from distdeer.gtf import ForcedStep, alpha_from_norm, reduce_norms
from distdeer.models import Model
from distdeer.solver import Result, Solution, deer, deer_batch, sequential


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    alpha: jax.Array  # float32 scalar: current GTF forcing strength
    warm: jax.Array  # (T, M) Newton warm start (whole series), (B, M) end states (carried windows) or unused (1, M)
    step: jax.Array  # int32: completed updates


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


def learning_rate(cfg: Config) -> optax.Schedule:
    """Exponential decay from ``train.lr`` to ``train.lr_end`` over ``train.steps``."""
    return optax.exponential_decay(cfg.train.lr, cfg.train.steps, cfg.train.lr_end / cfg.train.lr)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.train.clip)] if cfg.train.clip > 0 else []
    return optax.chain(*parts, optax.radam(learning_rate(cfg)))


def gamma(cfg: Config) -> float:
    return math.exp(-cfg.gtf.every / (cfg.gtf.decay * cfg.train.steps))


def init_state(model: Model, cfg: Config, series: jax.Array | None) -> TrainState:
    """Fresh parameters (from ``seed``); the first Newton guess is the data's forcing states (a
    placeholder row when ``series`` is None, to be filled by the caller)."""
    params = model.init(jax.random.PRNGKey(cfg.seed))
    if cfg.train.seq_len is None and series is not None:
        warm = model.forcing(params, jnp.asarray(series))[1:]
    elif cfg.train.carry:
        warm = jnp.zeros((cfg.train.batch, model.latent), jnp.float32)  # replaced by initial_state at step 0
    else:
        warm = jnp.zeros((1, model.latent), jnp.float32)  # unused placeholder (Orbax stores no empty arrays)
    alpha = cfg.gtf.alpha
    return TrainState(params, optimizer(cfg).init(params), jnp.float32(alpha), warm, jnp.int32(0))


def _jacobian_norm(model: Model, params, zt: jax.Array, kind: str, sample: int) -> jax.Array:
    """𝒩 over (a strided sample of) forced states ``zt`` (..., T, M); ``max`` takes the batch maximum
    of per-sequence geometric means."""
    stride = max(1, zt.shape[-2] // sample)
    z = zt[..., ::stride, :]
    norms = jnp.linalg.norm(jax.vmap(lambda v: model.jac(params["F"], v))(z.reshape(-1, z.shape[-1])), 2, axis=(1, 2))
    return reduce_norms(norms.reshape(z.shape[:-1]), kind)


def make_train_step(model: Model, cfg: Config, mesh=None, length: int | None = None):
    """Returns ``train_step(state, series) -> (state, StepMetrics)`` (to be jitted).

    ``series``: standardised observations ``(T_total, N)``, possibly padded at the end to a multiple of
    the device count (``length`` = the true T_total; rows beyond it are ignored).  In window mode the
    windows are cut from it inside the step, so that the step is a pure function of (state, series,
    seed)."""
    opt = optimizer(cfg)
    lr = learning_rate(cfg)
    mask = model.forced_mask()
    g = gamma(cfg)
    solver_kw = dict(jacobian=cfg.solver.jacobian, max_iter=cfg.solver.max_iter, fallback=cfg.solver.fallback,
                     throw=False)
    whole = cfg.train.seq_len is None

    def forced(alpha):
        return ForcedStep(model.F, alpha, mask, model.jac, model.jac_diag)

    def solve(alpha, F_params, z0, xs, warm):
        if cfg.solver.kind == "sequential":  # GTF-BPTT: the same forced recurrence, step by step
            states = sequential(forced(alpha), F_params, z0, xs)
            return Solution(states, jnp.int32(0), jnp.bool_(True), jnp.float32(0.0), jnp.int32(Result.SUCCESS))
        return deer(forced(alpha), F_params, z0, xs, init=warm, mesh=mesh, **solver_kw)

    def step_key(step):
        """The randomness of update ``step``: window starts draw from it, the forcing noise from fold_in(·, 1)."""
        return jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)

    def noisy(x, step):
        """The forcing observations: x, or x + σ ε with σ = ``train.noise`` (module docstring)."""
        if cfg.train.noise == 0:
            return x
        key = jax.random.fold_in(step_key(step), 1)
        return x + cfg.train.noise * jax.random.normal(key, x.shape, x.dtype)

    def one_sequence(params, alpha, x, xf, warm):
        """x: (S+1, N) targets, xf: (S+1, N) forcing observations → (mse, Solution, forced states z̃ (S, M))."""
        zhat = model.forcing(params, xf)
        z0 = model.initial_state(params, xf[0])
        sol = solve(alpha, params["F"], z0, zhat[:-1], warm)
        pred = model.observe(params, sol.states)
        zprev = jnp.concatenate([z0[None], sol.states[:-1]])
        return jnp.mean((pred - x[1:]) ** 2), sol, forced(alpha).forced_state(zprev, zhat[:-1])

    def windows_loss(params, alpha, xw, xf, carried=None):
        """xw: (B, S+1, N) targets, xf: the same shape, forcing observations; ``carried``: None, or (B, M)
        states to start from where finite."""
        zhat = jax.vmap(model.forcing, in_axes=(None, 0))(params, xf)
        z0 = jax.vmap(model.initial_state, in_axes=(None, 0))(params, xf[:, 0])
        if carried is not None:
            z0 = jnp.where(jnp.all(jnp.isfinite(carried), axis=-1, keepdims=True), carried, z0)
        if cfg.solver.kind == "sequential":
            sol = jax.vmap(solve, in_axes=(None, None, 0, 0, 0))(alpha, params["F"], z0, zhat[:, :-1], zhat[:, 1:])
        else:
            sol = deer_batch(forced(alpha), params["F"], z0, zhat[:, :-1], init=zhat[:, 1:], mesh=mesh,
                             **solver_kw)
        pred = model.observe(params, sol.states)
        zprev = jnp.concatenate([z0[:, None], sol.states[:, :-1]], axis=1)
        zt = jax.vmap(forced(alpha).forced_state)(zprev, zhat[:, :-1])
        return jnp.mean((pred - xw[:, 1:]) ** 2), sol, zt

    def loss_fn(params, alpha, series, warm, step):
        if length is not None and series.shape[0] != length:
            series = series[:length]
        if whole:
            mse, sol, zt = one_sequence(params, alpha, series, noisy(series, step), warm)
        elif cfg.train.carry:
            S, B = cfg.train.seq_len, cfg.train.batch
            n = (series.shape[0] - 1) // S
            j = (step + jnp.arange(B) * n // B) % n
            xw = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(series, s, S + 1))(j * S)
            restart = (j == 0) | (step == 0)
            carried = jnp.where(restart[:, None], jnp.nan, jax.lax.stop_gradient(warm))
            mse, sol, zt = windows_loss(params, alpha, xw, noisy(xw, step), carried)
        else:
            S = cfg.train.seq_len
            starts = jax.random.randint(step_key(step), (cfg.train.batch,), 0, series.shape[0] - S)
            xw = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(series, s, S + 1))(starts)
            mse, sol, zt = windows_loss(params, alpha, xw, noisy(xw, step))
        return mse + model.regulariser(params, cfg.train.lambda_lat), (mse, sol, zt)

    def train_step(state: TrainState, series: jax.Array):
        (loss, (mse, sol, zt)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.alpha, series, state.warm, state.step)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.all(sol.converged)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A failed solve (no fallback) yields NaN gradients by design: skip that update entirely.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        estimate = alpha_from_norm(_jacobian_norm(model, state.params, jax.lax.stop_gradient(zt),
                                                  cfg.gtf.norm, cfg.gtf.sample))
        alpha = state.alpha
        if cfg.gtf.mode == "adaptive":
            proposed = jnp.where(estimate > alpha, estimate, g * alpha + (1 - g) * estimate)
            alpha = jnp.where(state.step % cfg.gtf.every == 0, proposed, alpha).astype(jnp.float32)
        if whole:
            warm = jnp.where(ok, sol.states, state.warm)
        elif cfg.train.carry:  # a non-finite end state restarts its stream (windows_loss)
            warm = jax.lax.stop_gradient(sol.states[:, -1])
        else:
            warm = state.warm
        metrics = StepMetrics(loss, mse, state.alpha, estimate, jnp.max(sol.iterations),
                              jnp.max(sol.residual), jnp.all(sol.converged), jnp.max(sol.result),
                              lr(state.step), grad_norm)
        return TrainState(params, opt_state, alpha, warm, state.step + 1), metrics

    return train_step
