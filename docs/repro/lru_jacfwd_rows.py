"""jit(vmap(jacfwd(f))) returns wrong Jacobians past row 364 for distdeer's LRU step (CPU, jax 0.10.2).

    python docs/repro/lru_jacfwd_rows.py

Prints, for batches of n states, how many rows of the jitted forward-mode Jacobians differ from the eager
ones (and from reverse mode).  Seen 2026-12-05 on a 2-core Intel Xeon VM: 0 wrong rows for n ≤ 360, every
row from 364 on wrong (errors up to ~600) for n ≥ 400, with complex or with real arithmetic in the step;
``jacrev`` under the same jit agrees with the eager Jacobians.  distdeer therefore takes the LRU's
Jacobians by ``jax.jacrev`` (models/model.py); tests/test_lru.py checks 1000 rows.
"""

import jax
import numpy as np

from distdeer import config
from distdeer.models import Model, lru

cfg = config.load(None, ["model.kind=lru", "gtf.mode=constant", "model.hidden=6", "model.state=3", "model.layers=2"])
model = Model.from_config(cfg.model, 3)
F = dict(model.init(jax.random.PRNGKey(0))["F"])
F["W1"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), F["W1"].shape)  # a non-trivial block
step = lambda p, z: lru.step(p, z, layers=2, state=3, block="glu")  # noqa: E731
for n in (360, 400, 1000):
    z = jax.random.normal(jax.random.PRNGKey(2), (n, model.latent))
    for name, jac in (("jacfwd", jax.jacfwd(step, argnums=1)), ("jacrev", jax.jacrev(step, argnums=1))):
        batched = lambda p, zs: jax.vmap(jac, in_axes=(None, 0))(p, zs)  # noqa: E731
        err = np.abs(np.asarray(jax.jit(batched)(F, z) - batched(F, z))).max(axis=(1, 2))
        wrong = np.nonzero(err > 1e-4)[0]
        print(f"n={n} {name}: {len(wrong)} wrong rows" + (f", first {wrong[0]}, max error {err.max():.3g}" if len(wrong) else ""))
