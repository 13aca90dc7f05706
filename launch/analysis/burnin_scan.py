"""Diagnostic for ECG runs (docs/results.md, "A fourth seed of B, and carried windows"): the test D_stsp /
D_H of every retained checkpoint, free-running (a) from ``L x0`` of the first test point (the protocol) and
(b) from the state a forced burn-in on test points 0..1999 leaves (observed units set to the data, unforced
units running on); then 125 000 free steps, the first 25 000 dropped, compared with the whole test series.
The test series is looked at for every checkpoint: this describes runs, it selects nothing.

    python launch/analysis/burnin_scan.py RUN_DIR OUT.json      # from the repository root
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import eval as ev
from distdeer.data import reference
from distdeer.metrics import state_space_divergence, power_spectrum_distance
from distdeer.solver import sequential

run = sys.argv[1]
out = []
test_raw = np.load(reference.resolve("ref:ECG_pecuzal_5d_test.npy"))
N = test_raw.shape[1]
run_on = jax.jit(lambda p, z, xs, f: sequential(f, p, z, xs), static_argnums=3)
for step in ev.retained_steps(run):
    cfg, model, params, norm, _ = ev.load_run(run, step)
    mean, std = np.array(norm["mean"]), np.array(norm["std"])
    x = ((test_raw - mean) / std).astype(np.float32)

    def free_f(p, z, _):
        return model.F(p["F"], z)

    def forced_f(p, z, xx):
        return model.F(p["F"], jnp.concatenate([xx, z[N:]]))

    z0 = model.initial_state(params, jnp.asarray(x[0]))
    row = {"step": step}
    zb = run_on(params, z0, jnp.asarray(x[:2000]), forced_f)[-1]
    for name, start in (("protocol", z0), ("burnin", zb)):
        zs = np.asarray(run_on(params, start, jnp.zeros((125_000, 0)), free_f))[25_000:]
        g = np.asarray(model.observe(params, jnp.asarray(zs))) * std + mean
        if not np.isfinite(g).all():
            row[name] = [float("nan"), float("nan")]
            continue
        row[name] = [float(state_space_divergence(test_raw, g)), float(power_spectrum_distance(test_raw, g))]
    print(json.dumps(row), flush=True)
    out.append(row)
json.dump(out, open(sys.argv[2], "w"))
