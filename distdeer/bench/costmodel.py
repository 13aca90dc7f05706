"""A cost model of one GTF-DEER Newton iteration, fitted to measured scaling rows, and its projection.

Model (per Newton iteration on P devices, slice n = T/P)::

    t_iter(T, P) = c_local · T / W  +  c_coll · P  +  c_0,     W = min(P, cores)

* ``c_local``: seconds per local step — step + Jacobian formation, the local scan, the fix-up (all
  O(n) work on a device);
* ``c_coll``: seconds per device in the cross-device prefix (all-gather of P summaries of M² + M
  values and the O(P M²) fold; latency-dominated at small M);
* ``c_0``: per-iteration fixed cost (collective latency of the halo and the stop test, dispatch).

``W`` is the parallel width: P on accelerators; on CPU simulated devices share the process's cores,
so W = min(P, cores) (a row's ``cores``: the cores its processes may use).

A gradient costs ``k_vg`` iterations' worth (forward Newton + implicit adjoint), taken as the median of
``value_grad_s / per_iteration_s`` over the rows; BPTT costs ``c_bptt · T`` (sequential, per step).
``project`` extrapolates to P devices and T steps: a **projection** — it assumes the fitted constants
hold at that scale (same device kind, the all-gather prefix, collectives that do not slow down with P
beyond the linear term, the same Newton iteration count), none of which was measured there.
"""

from __future__ import annotations

import numpy as np


def width(row: dict) -> int:
    cores = row.get("cores")
    return min(row["devices"], cores) if cores else row["devices"]


def fit(rows: list[dict]) -> dict:
    """Least-squares constants from rows of ``distdeer.bench.scaling.measure`` (one device kind)."""
    n = np.array([r["T"] / width(r) for r in rows], float)
    P = np.array([r["devices"] for r in rows], float)
    y = np.array([r["per_iteration_s"] for r in rows], float)
    X = np.stack([n, np.where(P > 1, P, 0.0), np.ones_like(n)], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    coef = np.maximum(coef, 0.0)
    pred = X @ coef
    k_vg = float(np.median([r["value_grad_s"] / r["per_iteration_s"] for r in rows]))
    bptt = [r["bptt_value_grad_s"] / r["T"] for r in rows if r.get("bptt_value_grad_s")]
    return {"c_local_s_per_step": float(coef[0]), "c_coll_s_per_device": float(coef[1]), "c_0_s": float(coef[2]),
            "k_value_grad_iterations": k_vg, "c_bptt_s_per_step": float(np.median(bptt)) if bptt else None,
            "fit_max_rel_error": float(np.max(np.abs(pred - y) / y)), "rows": len(rows)}


def project(model: dict, T: int, P: int) -> dict:
    """Projected value+grad time on P devices (each a full device: W = P) and its ratio to BPTT
    (sequential) at length T."""
    t_iter = model["c_local_s_per_step"] * T / P + model["c_coll_s_per_device"] * (P if P > 1 else 0) + model["c_0_s"]
    t_vg = model["k_value_grad_iterations"] * t_iter
    out = {"T": T, "devices": P, "per_iteration_s": t_iter, "value_grad_s": t_vg}
    if model.get("c_bptt_s_per_step"):
        out["bptt_value_grad_s"] = model["c_bptt_s_per_step"] * T
        out["speedup_vs_bptt"] = out["bptt_value_grad_s"] / t_vg
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m distdeer.bench.costmodel DIR/scaling.json [--cores K] [--out costmodel.json]``: refit
    (``--cores`` for rows that do not record their cores) and print the projection table."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m distdeer.bench.costmodel")
    ap.add_argument("scaling_json")
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    with open(a.scaling_json) as f:
        rows = json.load(f)["rows"]
    for r in rows:
        r.setdefault("cores", a.cores)
    model = fit(rows)
    projection = [project(model, T, P) for T in (10**6, 10**7, 10**8) for P in (8, 64, 256, 1024)]
    doc = {"note": "PROJECTION from constants fitted to the measured rows (assumptions: "
                   "distdeer/bench/costmodel.py); nothing at these scales was measured", "model": model,
           "projection": projection}
    print(json.dumps(model, indent=1))
    for p in projection:
        print(f"T={p['T']:>10} P={p['devices']:>5}: value+grad {p['value_grad_s']:.3g} s"
              + (f", {p['speedup_vs_bptt']:.3g}x BPTT" if "speedup_vs_bptt" in p else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
