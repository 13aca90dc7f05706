"""Linear SSM (LRU) against GTF-trained nonlinear RNNs (docs/results.md, "Linear SSM against GTF").

    python launch/analysis/lru_compare.py grid  OUT            # Lorenz-63: every arm at each train.noise, seed 0
    python launch/analysis/lru_compare.py seeds OUT 1,2,3,4    # Lorenz-63: the chosen noise per arm
    python launch/analysis/lru_compare.py seeds OUT 0,1,2 --data slowfast|ecg --from L63_OUT
    python launch/analysis/lru_compare.py table OUT [SEEDS] [--from L63_OUT]   # OUT/summary.json and rows

Every arm trains on the same windows (16 windows of 200 steps per update, drawn alike), the same number of
updates and the same optimizer schedule; the only tuning is train.noise ∈ NOISES, chosen per arm on
Lorenz-63 seed 0 by the free run's D_stsp against the *training* series (``eval.training_divergences``)
and kept for the other systems (no tuning there, for any arm).  Runs go two at a time, each pinned to one
core (``taskset``).  Needs the reference series (``distdeer data fetch lorenz63`` / ``ecg``).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import numpy as np

NOISES = (0.0, 0.05)
LRU = "configs/lorenz63-lru.yaml"
GTF = ["gtf.alpha=0.2", "solver.kind=sequential"]
# Per system: updates, the shPLRNN's config, what the LRU config changes (data, evaluation), and the LRU
# sizes — parameter-matched (±20 % of the shPLRNN's) and about ten times that.
SYSTEMS = {
    "l63": (30_000, "configs/lorenz63-quality.yaml", [],
            ["model.hidden=10", "model.state=8", "model.layers=1"], ["model.hidden=24", "model.state=24", "model.layers=2"]),
    # the slow–fast system as configs/slowfast.yaml generates it; r_max reaches its slow scale (1/20 000)
    "slowfast": (20_000, "configs/slowfast.yaml",
                 ["data.path=null", "data.system=slowfast", "data.steps=100000", "data.noise=0.05", "eval.data=null",
                  "eval.lyapunov_reference=null", "model.r_max=0.99995"],
                 ["model.hidden=10", "model.state=8", "model.layers=1"], ["model.hidden=24", "model.state=24", "model.layers=2"]),
    "ecg": (20_000, "configs/ecg-quality.yaml",
            ["data.path=ref:ECG_pecuzal_5d_train.npy", "data.dt=null", "eval.data=ref:ECG_pecuzal_5d_test.npy",
             "eval.lyapunov_reference=null"],
            ["model.hidden=24", "model.state=24", "model.layers=1"], ["model.hidden=56", "model.state=56", "model.layers=2"]),
}
# the shPLRNN arms run their own config with the same windows, updates and evaluation as the LRU arms
SHPLRNN = ["train.seq_len=200", "train.batch=16", "solver.kind=sequential", "eval.select=latest", "checkpoint.keep=3",
           "train.lr=1.0e-3", "train.lr_end=1.0e-5"]


def arms(system):
    updates, shplrnn, data, small, large = SYSTEMS[system]
    # GTF on the inputs: α constant; windows of 200 run GTF-BPTT (the same loss and gradient as DEER, faster
    # on CPU for short windows: 171 vs 10 updates/s measured)
    return updates, {"lru-tf": (LRU, data + small), "lru-tf-large": (LRU, data + large),
                     "lru-gtf": (LRU, data + small + GTF), "shplrnn-gtf": (shplrnn, SHPLRNN)}


def run_dir(out, arm, noise, seed):
    return os.path.join(out, f"{arm}-n{noise:g}-seed{seed}")


def train(out, system, arm, noise, seed, core):
    updates, table = arms(system)
    cfg, extra = table[arm]
    d = run_dir(out, arm, noise, seed)
    if os.path.exists(os.path.join(d, "eval.json")):
        return
    cmd = ["taskset", "-c", str(core), "distdeer", "train", cfg, f"run.dir={d}", f"seed={seed}",
           f"train.steps={updates}", f"train.noise={noise}", "train.log_every=100",
           f"checkpoint.every={updates // 2}", *extra]
    t = time.time()
    with open(d + ".log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    print(f"{arm} noise {noise} seed {seed}: rc {rc}, {time.time() - t:.0f} s", flush=True)


def pool(jobs, run=None):
    """Two workers, pinned to cores 0 and 1: each pops a job and calls ``run(*job, core)`` (default
    :func:`train`)."""
    run = run or train
    lock = threading.Lock()

    def worker(core):
        while True:
            with lock:
                if not jobs:
                    return
                job = jobs.pop(0)
            run(*job, core)

    threads = [threading.Thread(target=worker, args=(c,)) for c in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def training_dstsp(d):
    """D_stsp of the run's final free run against its training series (model selection without test data)."""
    from distdeer import eval as ev
    from distdeer.train import loop
    cfg, model, params, norm, _ = ev.load_run(d)
    x, _ = loop.load_series(cfg)
    return ev.training_divergences(model, params, np.asarray(x)[: ev.SELECT_MAX_T])


def chosen_noise(out, arm):
    """The arm's train.noise, chosen on Lorenz-63 seed 0 (``out``: the Lorenz-63 results)."""
    path = os.path.join(out, "selection.json")
    sel = json.load(open(path)) if os.path.exists(path) else {}
    if arm not in sel:
        scores = {str(n): training_dstsp(run_dir(out, arm, n, 0)) for n in NOISES}
        best = min(NOISES, key=lambda n: (not np.isfinite(scores[str(n)]["D_stsp"]), scores[str(n)]["D_stsp"]))
        sel[arm] = {"noise": best, "training_scores": scores}
        json.dump(sel, open(path, "w"), indent=1)
    return sel[arm]["noise"]


def fixed_point(d):
    """The run's free run rests on a fixed point: ``distdeer.eval.at_rest`` of its generated.npy, standardised
    by the run's normalisation.  (Until 2026-12-06 this took the float32 standard deviation in data units, whose
    rounding over 10^4–10^5 equal values of magnitude ~10–40 exceeds 10^-3: it missed exact fixed points.)"""
    from distdeer.eval import at_rest

    norm = json.load(open(os.path.join(d, "normalisation.json")))
    g = (np.load(os.path.join(d, "generated.npy")) - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    return bool(at_rest(g)["value"])


def median_mad(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return None
    med = float(np.median(v))
    return {"median": med, "mad": float(np.median(np.abs(v - med))), "n": int(len(v))}


def table(out, seeds, tuned):
    """Per arm: the runs' measures, gradient norms along training and wall time, and median ± MAD."""
    rows = {}
    for arm in ("lru-tf", "lru-tf-large", "lru-gtf", "shplrnn-gtf"):
        noise = chosen_noise(tuned, arm)
        per = []
        for s in seeds:
            d = run_dir(out, arm, noise, s)
            if not os.path.exists(os.path.join(d, "eval.json")):
                continue
            e = json.load(open(os.path.join(d, "eval.json")))
            m = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
            g = np.array([r["grad_norm"] for r in m])
            lyap = e["lyapunov_max"]
            per.append({"seed": s, "D_stsp": e["D_stsp"]["value"], "D_H": e["D_H"]["value"], "PE20": e["PE"]["value"],
                        "lyapunov_max": lyap.get("per_time_unit") or lyap.get("per_step"),
                        "lyapunov_unit": "per time unit" if lyap.get("per_time_unit") else "per step",
                        "lyapunov_true": lyap.get("system_reference_per_time_unit"),
                        "diverged": e["diverged"], "fixed_point": fixed_point(d),
                        "grad_norm_first_tenth": float(np.median(g[: max(1, len(g) // 10)])),
                        "grad_norm_last_tenth": float(np.median(g[-max(1, len(g) // 10):])),
                        "grad_norm_max": float(np.max(g)), "grad_norm_along": g[:: max(1, len(g) // 10)].tolist(),
                        "train_s": m[-1]["elapsed_s"], "final_mse": m[-1]["mse"]})
        summary = {k: median_mad([p[k] for p in per]) for k in ("D_stsp", "D_H", "PE20", "lyapunov_max", "train_s")}
        summary["diverged_or_fixed_point"] = f"{sum(p['diverged'] or p['fixed_point'] for p in per)}/{len(per)}"
        rows[arm] = {"noise": noise, "summary": summary, "runs": per}
    json.dump(rows, open(os.path.join(out, "summary.json"), "w"), indent=1)
    for arm, r in rows.items():
        sm = r["summary"]
        cell = lambda k: "—" if sm[k] is None else f"{sm[k]['median']:.3g} ± {sm[k]['mad']:.2g}"  # noqa: E731
        print(f"| {arm} | {r['noise']:g} | {cell('D_stsp')} | {cell('D_H')} | {cell('PE20')} | {cell('lyapunov_max')} | "
              f"{sm['diverged_or_fixed_point']} | {cell('train_s')} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["grid", "seeds", "table"])
    ap.add_argument("out")
    ap.add_argument("seeds", nargs="?", default="0,1,2,3,4")
    ap.add_argument("--data", default="l63", choices=sorted(SYSTEMS))
    ap.add_argument("--from", dest="tuned", default=None, help="the Lorenz-63 OUT holding selection.json")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tuned = a.tuned or a.out
    seeds = [int(s) for s in a.seeds.split(",")]
    names = list(arms(a.data)[1])
    if a.what == "grid":
        pool([(a.out, "l63", arm, n, 0) for arm in names for n in NOISES])
    elif a.what == "seeds":
        pool([(a.out, a.data, arm, chosen_noise(tuned, arm), s) for s in seeds for arm in names])
    else:
        table(a.out, seeds, tuned)
