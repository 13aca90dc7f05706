"""How much of the test series' slow power a free-running model carries.

For each run directory: the test series' power in the lowest three frequency bins of the smoothed,
normalised spectra (``distdeer.metrics.smoothed_spectra``, σ = 20 — the spectra D_H compares) divided by
the same power of the run's ``generated.npy``, per coordinate.  A ratio ≫ 1: the model lacks the slow
modulation (on the slow–fast system, the breathing of the attractor with the hidden drive).

    python launch/analysis/lowfreq.py TEST.zarr RUN_DIR [RUN_DIR ...]
"""
import os
import sys

import numpy as np

from distdeer.data import store
from distdeer.metrics import smoothed_spectra

x, _ = store.load(sys.argv[1])
p = smoothed_spectra(x)[:, :3].sum(1)
for run in sys.argv[2:]:
    q = smoothed_spectra(np.load(os.path.join(run, "generated.npy")))[:, :3].sum(1)
    print(os.path.basename(os.path.normpath(run)), " ".join(f"{r:.1f}" for r in p / q))
