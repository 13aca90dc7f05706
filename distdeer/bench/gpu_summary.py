"""Summary of a ``launch/gpu_bench.sh`` output folder: the speed-up table, bandwidth, GPU cost-model constants.

``python -m distdeer.bench.gpu_summary DIR`` reads ``DIR/solver-T*-M*.json`` (``distdeer bench solver``),
``DIR/bandwidth.json`` (``scan_bandwidth`` rows) and ``DIR/row-*.json`` (one-device scaling rows), prints
one line per measurement and writes ``DIR/summary.json``.  The cost-model constants are fitted to the
one-GPU rows only (``c_local``, ``c_0``; one device cannot measure the collective term), with
``c_bptt`` from the solver runs' BPTT times and the gradient's cost in iterations ``k`` from the solver
runs that converged.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from distdeer.bench import costmodel


def _load(pattern: str) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(pattern))]


def solver_line(r: dict) -> str:
    line = (f"T={r['T']:>8} M={r['latent']:>2} L={r['hidden']:>3}: DEER v+g {r['deer_value_grad_s'] * 1e3:9.1f} ms "
            f"(warm {r['deer_value_grad_warm_s'] * 1e3:8.1f} ms, {r['newton_iterations']} / "
            f"{r['newton_iterations_warm']} iterations, converged {r['converged']})")
    if "bptt_value_grad_s" in r:
        line += (f"  BPTT v+g {r['bptt_value_grad_s'] * 1e3:10.1f} ms  speed-up {1 / r['ratio_value_grad']:7.1f}x "
                 f"(warm {1 / r['ratio_value_grad_warm']:7.1f}x)  grad rel. err {r['grad_rel_error']:.1e}")
    return line


def summarise(folder: str) -> dict:
    solver = [r for r in _load(os.path.join(folder, "solver-T*-M*.json")) if not r.get("memory_only")]
    solver.sort(key=lambda r: (r["latent"], r["T"]))
    bandwidth = []
    if os.path.exists(os.path.join(folder, "bandwidth.json")):
        bandwidth = json.load(open(os.path.join(folder, "bandwidth.json")))
    rows = _load(os.path.join(folder, "row-*.json"))
    doc = {"solver": solver, "bandwidth": bandwidth, "rows": rows}
    fit_rows = [dict(r, cores=None) for r in rows]
    bptt = [r for r in solver if r.get("bptt_value_grad_s") and r["latent"] == 3]
    if len(fit_rows) >= 2:
        model = costmodel.fit(fit_rows)
        if bptt:  # the scaling rows ran without the baseline: per-step BPTT from the solver runs
            model["c_bptt_s_per_step"] = min(r["bptt_value_grad_s"] / r["T"] for r in bptt)
        converged = [r["deer_value_grad_s"] / r["per_iteration_s"] for r in solver if r["converged"]]
        if converged:  # a gradient's cost in iterations, from solves that converged
            model["k_value_grad_iterations"] = float(np.median(converged))
        doc["model"] = model
        # One device: no collective constant, so no projection to several devices from these rows.
        doc["projection"] = {"note": "PROJECTION to longer T on one device of this kind (assumptions: "
                                     "distdeer/bench/costmodel.py); not measured",
                             "rows": [costmodel.project(model, T, 1) for T in (10**6, 10**7, 10**8)]}
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0]
    doc = summarise(folder)
    for r in doc["solver"]:
        print(solver_line(r))
    for b in doc["bandwidth"]:
        print(f"scan T={b['T']:>8} M={b['M']:>2} ({b['method']}): {b['seconds'] * 1e3:8.2f} ms, "
              f"≥ {b['GB_per_s']:7.1f} GB/s")
    for r in doc["rows"]:
        print(f"row T={r['T']:>8} M={r['M']}: {r['per_iteration_s'] * 1e3:.3f} ms/iteration (Jacobians "
              f"{r['jacobian_s'] * 1e3:.3f}, local scan {r['local_scan_s'] * 1e3:.3f}, other {r['other_s'] * 1e3:.3f}),"
              f" value+grad {r['value_grad_s'] * 1e3:.1f} ms, {r['newton_iterations']} iterations")
    if "model" in doc:
        print("cost model (one device):", json.dumps(doc["model"]))
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
