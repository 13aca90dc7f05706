"""One GTF-DEER training step: forcing → forced step → DEER solve → loss → implicit adjoint → optax.

What an update trains on, and what state it keeps besides parameters, optimizer state and α, is the
training mode's (``distdeer.train.modes``: whole series, random windows, carried windows); this module
holds what every mode shares — the optimizer, the handling of failed solves and adaptive GTF.

Failed solves: an update whose Newton solve did not converge (no fallback) or whose gradient is not finite
is skipped — parameters and optimizer state stay, ``skipped`` counts it, α is not re-estimated from that
trajectory, and the mode is told (``advance(…, ok=False)``: the whole-series warm start keeps the previous
solution; a carried stream whose window did not converge restarts from the data).

Adaptive GTF: every ``gtf.every`` steps, 𝒩 is estimated from the model Jacobians
``J_F(z̃_t)`` along the forced trajectory; ``α_est = max(0, 1 − 1/𝒩)``; α jumps up to ``α_est`` at once
and otherwise decays towards it, ``α ← max(α_min, γ α + (1 − γ) α_est)``, with ``γ = exp(−every / (decay ·
steps))`` so that the decay time is a fixed fraction of the configured training length, and ``α_min =
gtf.alpha_min`` (default 0: no floor).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from distdeer.config import Config
from distdeer.gtf import alpha_from_norm
from distdeer.models import Model


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    alpha: jax.Array  # float32 scalar: current GTF forcing strength
    step: jax.Array  # int32: completed updates (skipped ones included)
    skipped: jax.Array  # int32: updates skipped because the solve failed or the gradient was not finite
    mode_state: Any  # the training mode's own state (modes.WarmStart, StreamEnds or NoState)


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


def init_state(model: Model, cfg: Config, mode, data) -> TrainState:
    """Fresh parameters (from ``seed``), optimizer state, α, and the mode's initial state for ``data``."""
    params = model.init(jax.random.PRNGKey(cfg.seed))
    return TrainState(params, optimizer(cfg).init(params), jnp.float32(cfg.gtf.alpha), jnp.int32(0), jnp.int32(0),
                      mode.initial(params, data))


def make_train_step(model: Model, cfg: Config, mode):
    """Returns ``train_step(state, data) -> (state, StepMetrics)`` (to be jitted) for the training mode
    ``mode`` (``modes.for_config``) and its data (``mode.place``)."""
    opt = optimizer(cfg)
    lr = learning_rate(cfg)
    g = gamma(cfg)

    def loss_fn(params, alpha, data, mode_state, step):
        """(loss, (mse, Solution, 𝒩 the Jacobian-norm estimate along the forced trajectory))."""
        mse, sol, norm = mode.loss(params, alpha, data, mode_state, step)
        return mse + model.regulariser(params, cfg.train.lambda_lat), (mse, sol, norm)

    def train_step(state: TrainState, data):
        (loss, (mse, sol, norm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.alpha, data, state.mode_state, state.step)
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
            proposed = jnp.where(estimate > alpha, estimate,
                                 jnp.maximum(cfg.gtf.alpha_min, g * alpha + (1 - g) * estimate))
            alpha = jnp.where((state.step % cfg.gtf.every == 0) & converged, proposed, alpha).astype(jnp.float32)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        metrics = StepMetrics(loss, mse, state.alpha, estimate, jnp.max(sol.iterations),
                              jnp.max(sol.residual), converged, jnp.max(sol.result),
                              lr(state.step), grad_norm, skipped)
        return TrainState(params, opt_state, alpha, state.step + 1, skipped,
                          mode.advance(state.mode_state, sol, ok)), metrics

    return train_step
