"""Scaling study: GTF-DEER over device and process counts, with the sequential baseline beside it.

    python launch/scaling.py --devices 1,2,4,8 [--hosts 1,2] --T 65536[,…] --latent M [--hidden L]
        [--jacobian dense|diagonal] [--mode strong|weak] [--pin | --ray [--placement S]] [--repeats 3] --out DIR

Each (hosts, devices, T) point runs in fresh processes on this machine: one process with ``devices``
simulated CPU devices (``XLA_FLAGS``), or ``hosts`` real ``jax.distributed`` processes with
``devices/hosts`` devices each (localhost coordinator).  ``--pin`` pins process k to core k with
``taskset`` (XLA's thread flags do not keep a CPU process on one core, design §4): use it for
process-count comparisons, and run nothing else meanwhile.  ``--mode weak`` scales T with the device
count (T per device fixed); ``strong`` keeps T.

``--ray`` runs each point's processes as Ray actors instead, one per bundle of a placement group
(``--placement``, default STRICT_SPREAD: one process per node of the cluster at ``RAY_ADDRESS``; a
one-node local Ray packs them), each owning ``devices/hosts`` GPUs on a GPU cluster or that many
simulated CPU devices; the rows record their nodes.  A (hosts, devices) point that the cluster's live
nodes can never hold (e.g. 16 GPUs per process on 8-GPU nodes) is refused, exit 2, before any point is
measured (``--no-placement-check`` on a cluster that adds nodes on demand).  As a ``ray job submit`` entrypoint with
``--ray``, the multi-process points span the cluster's nodes; without it, every point runs on the node
the job lands on.

Writes ``DIR/scaling.json`` (every row, raw), ``DIR/scaling.csv``, ``DIR/scaling.png`` and, given
three or more distinct (slice, devices) points, ``DIR/costmodel.json``: the constants of
``distdeer/bench/costmodel.py`` fitted to the rows and a projection to 8 … 1024 devices at T = 10^6 …
10^8 (marked as a projection).  Columns:
see ``distdeer/bench/scaling.py``; ``bptt_value_grad_s`` is measured in the 1-process rows and copied
to the other rows of the same T (same hardware, same run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from distdeer.distributed import free_port

COLUMNS = ["devices", "processes", "T", "M", "L", "jacobian", "newton_iterations", "per_iteration_s", "forward_s",
           "value_grad_s", "value_grad_warm_s", "newton_iterations_warm", "loss", "jacobian_s", "local_scan_s", "cross_device_s", "other_s",
           "collective_bytes", "resharding_bytes", "peak_rss_bytes", "bptt_value_grad_s", "speedup_value_grad"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _row_path(out_dir: str, hosts: int, devices: int, T: int) -> str:
    return os.path.join(out_dir, f"row-h{hosts}-d{devices}-T{T}.json")


def run_point(hosts: int, devices: int, T: int, args, out_dir: str) -> dict:
    """Measure one point in fresh processes; returns the row (raises on a failed worker)."""
    path = _row_path(out_dir, hosts, devices, T)
    per_host = devices // hosts
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={per_host}")
    base = [sys.executable, "-m", "distdeer.bench.scaling", "--T", str(T), "--latent", str(args.latent),
            "--hidden", str(args.hidden), "--jacobian", args.jacobian, "--repeats", str(args.repeats), "--out", path]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(hosts):
        cmd = base + (["--coordinator", coordinator, "--hosts", str(hosts), "--rank", str(rank)] if hosts > 1 else [])
        if args.pin:
            cmd = ["taskset", "-c", str(rank % (os.cpu_count() or 1))] + cmd
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"point hosts={hosts} devices={devices} T={T} failed:\n{log[-2000:]}")
    with open(path) as f:
        return json.load(f)


def run_point_ray(hosts: int, devices: int, T: int, args, out_dir: str) -> dict:
    """Measure one point as ``hosts`` Ray actors (one JAX process each) placed by a placement group
    (``--placement``, STRICT_SPREAD by default: one process per node); the row records the nodes."""
    import ray

    from distdeer import group

    bundle, env = group.host_resources(devices // hosts, 1)
    point = dict(T=T, M=args.latent, L=args.hidden, jacobian=args.jacobian, repeats=args.repeats)
    try:
        with group.host_group(hosts, bundle, env, args.placement, args.timeout) as (actors, where, coordinator):
            rows = ray.get([a.call.remote("distdeer.bench.scaling:measure_in_group", coordinator, hosts, r,
                                          args.timeout, **point) for r, a in enumerate(actors)], timeout=args.timeout)
    except group.PlacementTimeout:
        raise RuntimeError(f"point hosts={hosts} devices={devices} T={T}: could not place {hosts} bundles of {bundle} "
                           f"({args.placement}) within {args.timeout} s") from None
    row = dict(rows[0], nodes=[w["node_id"] for w in where], node_ips=[w["node_ip"] for w in where])
    with open(_row_path(out_dir, hosts, devices, T), "w") as f:
        json.dump(row, f, indent=1, default=float)
    return row


def write_outputs(rows: list[dict], out_dir: str, meta: dict) -> None:
    base = {}
    for r in rows:
        if r.get("bptt_value_grad_s") is not None:
            base[r["T"]] = r["bptt_value_grad_s"]
    one = {r["T"]: r["value_grad_s"] for r in rows if r["devices"] == 1 and r["processes"] == 1}
    for r in rows:
        r["bptt_value_grad_s"] = r.get("bptt_value_grad_s") or base.get(r["T"])
        r["speedup_value_grad"] = one[r["T"]] / r["value_grad_s"] if r["T"] in one else None
    with open(os.path.join(out_dir, "scaling.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(out_dir, "scaling.png"))
    if len({(r["T"] // r["devices"], r["devices"]) for r in rows}) >= 3:
        from distdeer.bench import costmodel

        model = costmodel.fit(rows)
        projection = [costmodel.project(model, T, P) for T in (10**6, 10**7, 10**8)
                      for P in (8, 64, 256, 1024)]
        with open(os.path.join(out_dir, "costmodel.json"), "w") as f:
            json.dump({"note": "PROJECTION from constants fitted to the measured rows (assumptions: "
                               "distdeer/bench/costmodel.py); nothing at these scales was measured",
                       "model": model, "projection": projection}, f, indent=1)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (T, procs) in sorted({(r["T"], r["processes"] > 1) for r in rows}):
        sel = sorted((r for r in rows if r["T"] == T and (r["processes"] > 1) == procs), key=lambda r: r["devices"])
        label = f"T={T}" + (" (processes)" if procs else "")
        ax1.plot([r["devices"] for r in sel], [r["value_grad_s"] for r in sel], "o-", label=f"GTF-DEER {label}")
        if sel[0].get("bptt_value_grad_s"):
            ax1.axhline(sel[0]["bptt_value_grad_s"], ls="--", lw=1, color=ax1.lines[-1].get_color(),
                        label=f"BPTT {label}")
    ax1.set(xscale="log", yscale="log", xlabel="devices", ylabel="value+grad time [s]", title="time per gradient")
    ax1.legend(fontsize=7)
    parts = ["jacobian_s", "local_scan_s", "cross_device_s", "other_s"]
    labels = [f"P={r['devices']}{'p' if r['processes'] > 1 else ''}\nT={r['T']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [max(r[part], 0.0) * 1e3 for r in rows]
        ax2.bar(range(len(rows)), vals, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.plot(range(len(rows)), [r["per_iteration_s"] * 1e3 for r in rows], "k_", ms=18, label="measured total")
    ax2.set_xticks(range(len(rows)), labels, fontsize=6)
    ax2.set(ylabel="ms per Newton iteration", title="where an iteration's time goes")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from distdeer.config import CHOICES

    ap = argparse.ArgumentParser(prog="launch/scaling.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=_ints, default=[1, 2, 4, 8])
    ap.add_argument("--hosts", type=_ints, default=[1])
    ap.add_argument("--T", type=_ints, required=True)
    ap.add_argument("--latent", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--jacobian", choices=CHOICES["solver.jacobian"], default="dense")
    ap.add_argument("--mode", choices=("strong", "weak"), default="strong")
    ap.add_argument("--pin", action="store_true", help="pin process k to core k (taskset)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--ray", action="store_true",
                    help="run each point's processes as Ray actors (RAY_ADDRESS, or a local Ray) instead of local processes")
    ap.add_argument("--placement", default="STRICT_SPREAD", help="placement group strategy of --ray (one bundle per process)")
    ap.add_argument("--no-placement-check", action="store_true",
                    help="--ray: do not refuse points the cluster's live nodes cannot hold (autoscaling clusters)")
    ap.add_argument("--out", required=True)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.pin and args.ray:
        print("scaling: error: --pin applies to local processes; Ray places its own (use --placement)", file=sys.stderr)
        return 2
    if args.pin and shutil.which("taskset") is None:
        print("scaling: error: --pin needs taskset (util-linux)", file=sys.stderr)
        return 2
    bad = [(h, d) for h in args.hosts for d in args.devices if d >= h and d % h]
    if bad:
        print(f"scaling: error: devices must be a multiple of hosts, got {bad[0][1]} devices on {bad[0][0]} hosts",
              file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, "scaling.json")):
        print(f"scaling: error: {args.out}/scaling.json exists; choose another --out", file=sys.stderr)
        return 2
    points = [(h, d) for h in args.hosts for d in args.devices if d >= h]
    meta = {"command": " ".join(["python", "launch/scaling.py"] + (argv if argv is not None else sys.argv[1:])),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "mode": args.mode, "pinned": args.pin}
    measure = run_point
    if args.ray:
        import ray

        from distdeer import group

        args.placement = group.connect(max(args.hosts), 1, args.placement, prog="scaling")
        meta.update(ray_nodes=sum(n["Alive"] for n in ray.nodes()), placement=args.placement)
        measure = run_point_ray
        # every point is checked before any is measured: a study should not fail at its last point
        problems = [] if args.no_placement_check else [
            (h, d, p) for h, d in points if (p := group.unplaceable(h, group.host_resources(d // h, 1)[0], args.placement))]
        if problems:
            h, d, p = problems[0]
            print(f"scaling: error: point hosts={h} devices={d}: {p}; "
                  f"{len(problems)} of {len(points)} (hosts, devices) points cannot be placed", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for hosts, devices in points:
        for T in args.T:
            total = T * devices if args.mode == "weak" else T
            row = measure(hosts, devices, total, args, args.out)
            rows.append(row)
            print(f"hosts={hosts} devices={devices} T={total}: value+grad {row['value_grad_s'] * 1e3:.1f} ms, "
                  f"{row['newton_iterations']} iterations, {row['per_iteration_s'] * 1e3:.2f} ms/iteration, "
                  f"collectives {row['collective_bytes']} B", flush=True)
    write_outputs(rows, args.out, meta)
    print(f"scaling: wrote {args.out}/scaling.csv, scaling.json, scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
