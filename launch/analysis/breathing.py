"""How much the attractor breathes: the maximum of the third coordinate (Lorenz z) in each block of
2000 steps (a tenth of the slow period), in data units; printed as the spread of the block maxima
(sd and 10-90 % range) for the test series and each run's compared free run (generated.npy)."""
import os
import sys

import numpy as np

from distdeer.data import store

BLOCK = 2000


def block_max(s):
    s = np.asarray(s, np.float64)[: len(s) // BLOCK * BLOCK, 2]
    return s.reshape(-1, BLOCK).max(1)


def row(name, m):
    lo, hi = np.percentile(m, [10, 90])
    print(f"{name:28s} sd {m.std(ddof=1):6.2f}  10-90 % {lo:6.1f} .. {hi:6.1f}  blocks {len(m)}")


row("test data", block_max(store.read_data_units(sys.argv[1])))
for run in sys.argv[2:]:
    row(os.path.basename(run.rstrip("/")), block_max(np.load(os.path.join(run, "generated.npy"))))
