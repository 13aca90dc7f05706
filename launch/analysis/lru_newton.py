"""Newton iterations of DEER on an LRU with GTF on its inputs, dense against diagonal (docs/results.md,
"Linear SSM against GTF").

    python launch/analysis/lru_newton.py RUN_DIR [--T 100000]

For the trained LRU of RUN_DIR, on the first T steps of its training series and for α in ALPHAS: the
iterations and outcome of dense DEER and of the diagonal mode, warm-started from the data as in training;
then the same diagonal solves with the eigenvalues' phases set to zero (λ real), to separate the cost of
dropping the rotation Im λ from the diagonal approximation of the feedback.  Prints one JSON row per α.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from distdeer import deer
from distdeer import eval as ev
from distdeer.gtf import ForcedStep
from distdeer.train import loop

ALPHAS = (1.0, 0.5, 0.2, 0.1)


def solve(model, params, x, alpha, jacobian):
    forced = ForcedStep(model.F, jnp.float32(alpha), model.forced_mask(), model.jac, model.jac_diag)
    zhat = model.forcing(params, x)
    t = time.perf_counter()
    sol = deer(forced, params["F"], model.initial_state(params, x[0]), zhat[:-1], init=zhat[1:], jacobian=jacobian,
               max_iter=100, fallback=False, throw=False)
    return {"iterations": int(sol.iterations), "converged": bool(sol.converged), "result": int(sol.result),
            "seconds": round(time.perf_counter() - t, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--T", type=int, default=100_000)
    a = ap.parse_args()
    cfg, model, params, _, step = ev.load_run(a.run_dir)
    x = jnp.asarray(np.asarray(loop.load_series(cfg)[0])[: a.T + 1])
    real = {**params, "F": {**params["F"], "theta": jnp.full_like(params["F"]["theta"], -30.0)}}  # arg λ ≈ 0
    phases = np.exp(np.asarray(params["F"]["theta"]))
    print(json.dumps({"run": a.run_dir, "step": step, "T": a.T, "M": model.latent,
                      "arg_lambda_median": float(np.median(phases)), "arg_lambda_max": float(phases.max())}))
    for alpha in ALPHAS:
        row = {"alpha": alpha}
        for jac in ("dense", "diagonal"):
            row[jac] = solve(model, params, x, alpha, jac)
        row["diagonal_real_lambda"] = solve(model, real, x, alpha, "diagonal")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
