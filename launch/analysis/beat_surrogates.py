"""What an ECG model's free run must reproduce to reach the targets: surrogates built from real beats.

    python launch/analysis/beat_surrogates.py [TRAIN.npy TEST.npy]

The training series is cut into beats (QRS peak to QRS peak: local maxima above 3.0 in the first
coordinate, as in docs/results.md's rhythm tables), and series of the test series' length are assembled
from them in different ways.  Each is scored against the test series with the reference measures
(``distdeer.metrics``: D_stsp with 30 bins, D_H with σ = 20), as a model's free run would be.  No model is
involved: the rows say how much beat-to-beat variety of waveform and of rhythm the measures ask for.
Rows with random choices report the median over three draws (seeds 0, 1, 2).
"""
import sys

import numpy as np

from distdeer.metrics import power_spectrum_distance, state_space_divergence
from distdeer.data import reference

train_path, test_path = (sys.argv[1:3] if len(sys.argv) == 3 else
                         (reference.resolve("ref:ECG_pecuzal_5d_train.npy"), reference.resolve("ref:ECG_pecuzal_5d_test.npy")))
train, test = np.load(train_path), np.load(test_path)
T = len(test)
d = train[:, 0]
peaks = np.where((d[1:-1] > 3.0) & (d[1:-1] >= d[:-2]) & (d[1:-1] > d[2:]))[0] + 1
beats = [train[a:b] for a, b in zip(peaks[:-1], peaks[1:])]
lengths = np.array([len(b) for b in beats])
median_beat = beats[int(np.argsort(lengths)[len(lengths) // 2])]
baseline = np.median(np.stack([np.median(b, 0) for b in beats]), 0)


def tile(seq):
    """Concatenate the beats of ``seq`` cyclically up to T steps."""
    out, n, i = [], 0, 0
    while n < T:
        out.append(seq[i % len(seq)])
        n += len(out[-1])
        i += 1
    return np.concatenate(out)[:T]


def warp(beat, n):
    """The beat linearly resampled to n steps (same waveform, another interval)."""
    t = np.linspace(0, len(beat) - 1, n)
    return np.stack([np.interp(t, np.arange(len(beat)), beat[:, j]) for j in range(beat.shape[1])], 1)


def score(build):
    """(D_stsp, D_H) of ``build(rng)`` against the test series, median over three draws."""
    s = np.array([(state_space_divergence(test, x), power_spectrum_distance(test, x))
                  for x in (build(np.random.default_rng(k)) for k in range(3))])
    return np.median(s, 0)


rows = {
    "the training series itself (the floor)": lambda rng: train[:T],
    "all real beats, shuffled": lambda rng: tile([beats[i] for i in rng.permutation(len(beats))]),
    **{f"{k} random real beats, repeated": (lambda k: lambda rng: tile(
        [beats[i] for i in rng.choice(len(beats), k, replace=False)]))(k) for k in (1, 5, 10, 20, 50)},
    "one median beat, repeated": lambda rng: tile([median_beat]),
    "one median beat + white noise sd 0.05": lambda rng: tile([median_beat]) + 0.05 * rng.standard_normal((T, train.shape[1])),
    "one median beat warped to the real intervals (rhythm only)": lambda rng: tile(
        [warp(median_beat, n) for n in lengths]),
    "the same + white noise sd 0.05": lambda rng: tile([warp(median_beat, n) for n in lengths])
    + 0.05 * rng.standard_normal((T, train.shape[1])),
    "real beats, each one's baseline removed": lambda rng: tile(
        [b - np.median(b, 0) + baseline for b in beats]),
    "real beats warped to one interval (waveforms only)": lambda rng: tile(
        [warp(b, len(median_beat)) for b in beats]),
}
aligned = np.stack([b[:600] for b in beats if len(b) >= 600])  # the first 600 steps after each QRS peak
print(f"{len(beats)} beats in the training series: interval median {np.median(lengths):.0f}, "
      f"sd {lengths.std():.1f} steps; across-beat sd of the waveform aligned at the QRS peak (mean over "
      f"the 600 steps) {aligned.std(0).mean(0).round(3)}, the coordinates' sd {train.std(0).round(3)}")
for name, build in rows.items():
    dstsp, dh = score(build)
    print(f"{name:62s} D_stsp {dstsp:6.3f}  D_H {dh:.3f}", flush=True)
