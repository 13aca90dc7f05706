"""Benchmark: time from a worker failure to training again, and the checkpoint cost, under Ray.

    python launch/bench_faults.py [--steps 400] [--every 50] [--out docs/bench-raw/faults.json]

Starts a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs and three
1-CPU nodes), then runs ``launch/train.py`` (2 hosts × 1 CPU device, a small model on a
generated Lorenz-63 series) three times:

1. uninterrupted — the checkpoint cost: blocking time of all saves / wall time of the training loop
   (``checkpoint_s_total``/``elapsed_s`` from metrics.jsonl) at ``checkpoint.every = --every`` and at
   the default interval (200);
2. SIGKILL of rank 1's process at 40 % of the steps;
3. SIGSTOP of rank 0's process (a hang) at 40 %, caught by the watchdog (``ray.watchdog_s``).

For 2 and 3, from events.jsonl: detection (failure recorded − signal sent), restart (new group's
processes placed and coordinator chosen − failure), restore to first step (first completed step of the
new attempt − group start), and the total.  Writes a JSON file with every raw number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _events(run_dir):
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def _metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _pid(run_dir, rank):
    with open(os.path.join(run_dir, "hosts.json")) as f:
        return json.load(f)["hosts"][rank]["pid"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--watchdog", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ["JAX_PLATFORMS"] = "cpu"
    from ray.cluster_utils import Cluster

    work = tempfile.mkdtemp(prefix="distdeer-faults-")
    cfg = os.path.join(work, "bench.yaml")
    with open(cfg, "w") as f:
        f.write(f"""data: {{steps: 20001}}
model: {{kind: clipped_shplrnn, latent: 3, hidden: 16}}
train: {{steps: {args.steps}, lr: 2.0e-3, lr_end: 5.0e-4, log_every: 1}}
checkpoint: {{every: {args.every}, keep: 2}}
ray: {{max_failures: 2, watchdog_s: {args.watchdog}, startup_s: 300}}
eval: {{at_end: false}}
""")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = dict(os.environ, RAY_ADDRESS=cluster.address)

    def launch(name, *extra):
        run_dir = os.path.join(work, name)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), cfg, f"run.dir={run_dir}", *extra,
               "--hosts", "2", "--devices-per-host", "1"]
        return run_dir, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_step(run_dir, proc, step):
        while not _metrics(run_dir) or _metrics(run_dir)[-1]["step"] < step:
            if proc.poll() is not None:
                raise RuntimeError(f"{run_dir} ended early ({proc.returncode})")
            time.sleep(0.02)

    result = {"command": " ".join(["python", "launch/bench_faults.py"] + sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "setup": "2 hosts x 1 CPU device, "
              "Lorenz-63 T=20001, clipped shPLRNN M=3 L=16, local Cluster of 3 one-CPU nodes"}
    try:
        for every in (args.every, 200):
            run_dir, proc = launch(f"clean-every{every}", f"checkpoint.every={every}")
            assert proc.wait(timeout=1800) == 0, f"clean run failed ({run_dir})"
            rows = _metrics(run_dir)
            tail = [r["step_time_s"] for r in rows[len(rows) // 4:]]
            result[f"clean_every{every}"] = {
                "checkpoint_s_total": rows[-1]["checkpoint_s_total"], "elapsed_s": rows[-1]["elapsed_s"],
                "checkpoint_fraction": rows[-1]["checkpoint_s_total"] / rows[-1]["elapsed_s"],
                "saves": args.steps // every, "median_step_s": sorted(tail)[len(tail) // 2]}
        for name, rank, sig in (("sigkill", 1, signal.SIGKILL), ("hang", 0, signal.SIGSTOP)):
            run_dir, proc = launch(name)
            wait_step(run_dir, proc, int(0.4 * args.steps))
            victim = _pid(run_dir, rank)
            t_sig = time.time()
            os.kill(victim, sig)
            code = proc.wait(timeout=1800)
            if sig == signal.SIGSTOP:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ev = _events(run_dir)
            fail = next(e for e in ev if e["event"] == "failure")
            group = next(e for e in ev if e["event"] == "group_started" and e["attempt"] == 1)
            first = next(e for e in ev if e["event"] == "training" and e["attempt"] == 1)
            result[name] = {"exit": code, "cause": fail["cause"], "detect_s": fail["time"] - t_sig,
                            "restart_s": group["time"] - fail["time"], "restore_first_step_s": first["time"] - group["time"],
                            "failure_to_training_s": first["time"] - t_sig, "resumed_step": first["step"]}
    finally:
        cluster.shutdown()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
