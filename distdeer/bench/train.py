"""``distdeer bench train``: training-step time of GTF-DEER vs sequential GTF-BPTT, same run.

Both train the same model on the same whole series with the same configuration, differing only in
``solver.kind``; after compilation, each runs ``steps`` training steps.  Reported: mean step time
(excluding the first step), the ratio, and for DEER the Newton iterations per step (mean over the steps
after the first 100, the warm-start regime) and the loss trajectories' agreement.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import config as config_mod
from distdeer.models import Model
from distdeer.train.loop import load_series
from distdeer.train.step import init_state, make_train_step


def run(T: int = 100_000, steps: int = 200, latent: int = 3, hidden: int = 50, seed: int = 0,
        overrides: list[str] = ()) -> dict:
    base = config_mod.load(None, [f"data.steps={T + 1}", f"model.latent={latent}", f"model.hidden={hidden}",
                                  f"train.steps={steps}", f"seed={seed}", "mesh.devices=1", *overrides])
    series, _ = load_series(base)
    x = jnp.asarray(series)
    out = {"T": T, "steps": steps, "latent": latent, "hidden": hidden, "overrides": list(overrides),
           "backend": jax.default_backend()}
    losses = {}
    for kind in ("deer", "sequential"):
        cfg = dataclasses.replace(base, solver=dataclasses.replace(base.solver, kind=kind))
        model = Model.from_config(cfg.model, series.shape[1])
        step = jax.jit(make_train_step(model, cfg))
        state = init_state(model, cfg, x)
        times, iters, loss = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = jax.block_until_ready(step(state, x))
            times.append(time.perf_counter() - t0)
            iters.append(int(m.newton_iterations))
            loss.append(float(m.loss))
        out[f"{kind}_step_s"] = float(np.mean(times[1:]))
        losses[kind] = np.asarray(loss)
        if kind == "deer":
            out["newton_iterations_mean_after_100"] = float(np.mean(iters[100:])) if steps > 100 else None
            out["newton_iterations_first_10"] = iters[:10]
    out["ratio_step"] = out["deer_step_s"] / out["sequential_step_s"]
    out["max_loss_rel_diff"] = float(np.max(np.abs(losses["deer"] - losses["sequential"])
                                            / np.abs(losses["sequential"])))
    return out


def report(r: dict) -> str:
    return (f"T={r['T']} M={r['latent']} L={r['hidden']} steps={r['steps']} backend={r['backend']}\n"
            f"  GTF-DEER step   {r['deer_step_s'] * 1e3:9.1f} ms\n"
            f"  GTF-BPTT step   {r['sequential_step_s'] * 1e3:9.1f} ms\n"
            f"  ratio DEER/BPTT {r['ratio_step']:.3f}\n"
            f"  Newton iterations per step: first 10 {r['newton_iterations_first_10']}, "
            f"mean after step 100: {r['newton_iterations_mean_after_100']}\n"
            f"  max relative loss difference along the run: {r['max_loss_rel_diff']:.2e}")
