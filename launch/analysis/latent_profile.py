"""Unforced latent units of an M = 8 ECG run around each heartbeat (docs/results.md, ECG section).

    python launch/analysis/latent_profile.py RUN_DIR STEP

Two trajectories of the checkpoint at STEP: forced by the training series (the five observed units set
to the data at every step, the three unforced ones running on) and free-running from the first test
point.  For each: the mean and across-beat sd of the unforced units at fixed lags after a QRS peak, and
the correlation of their state at a beat with the next beat interval.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import eval as ev
from distdeer.data import reference
from distdeer.solver import sequential

run, step = sys.argv[1], int(sys.argv[2])
cfg, model, params, norm, _ = ev.load_run(run, step)
mean, std = np.array(norm["mean"]), np.array(norm["std"])
standardise = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
x_train = standardise(np.load(reference.resolve("ref:ECG_pecuzal_5d_train.npy")))
x_test = standardise(np.load(reference.resolve("ref:ECG_pecuzal_5d_test.npy")))
N = x_train.shape[1]


def forced_step(p, z, x):
    return model.F(p["F"], jnp.concatenate([x, z[N:]]))


run_on = jax.jit(lambda p, z, xs, f: sequential(f, p, z, xs), static_argnums=3)
free = np.asarray(run_on(params, model.initial_state(params, jnp.asarray(x_test[0])),
                         jnp.zeros((125_000, 0)), lambda p, z, _: model.F(p["F"], z)))
forced = np.asarray(run_on(params, model.initial_state(params, jnp.asarray(x_train[0])),
                           jnp.asarray(x_train[:-1]), forced_step))


def qrs_peaks(first_coordinate):  # local maxima above 3.0 (data units), as the rhythm table
    d = first_coordinate * std[0] + mean[0]
    return np.where((d[1:-1] > 3.0) & (d[1:-1] >= d[:-2]) & (d[1:-1] > d[2:]))[0] + 1


for name, states, peaks in (("forced by the training series", forced, qrs_peaks(x_train[:, 0])),
                            ("free-running", free, qrs_peaks(free[:, 0]))):
    u = states[:, N:]
    print(f"{name}: {len(peaks)} beats, unforced units overall sd {u.std(0).round(3)}")
    for lag in (0, 100, 200, 300, 400, 500, 600):
        idx = peaks[:-1] + lag
        idx = idx[idx < len(u)]
        print(f"  {lag:3d} steps after a peak: mean {u[idx].mean(0).round(3)}  sd {u[idx].std(0).round(3)}")
    at_beat, next_interval = u[peaks[1:-1]], np.diff(peaks)[1:]
    corr = [np.corrcoef(at_beat[:, k], next_interval)[0, 1] for k in range(u.shape[1])]
    print(f"  corr(unforced state at a beat, next interval): {np.round(corr, 2)}")
