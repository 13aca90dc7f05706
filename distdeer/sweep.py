"""Seed sweeps: train one config for several seeds, then summarise each measure as median ± MAD.

Run k trains ``CONFIG seed=k run.dir=<run.dir>-seed<k>``; the summary of their evaluations goes to
``<run.dir>-summary.json``.  Every run is resumable, so rerunning an interrupted sweep finishes it.

``parallel=1`` trains the seeds one after another in this process.  ``parallel=N`` trains N at a time as
separate ``distdeer train`` processes, each pinned to its own contiguous share of this process's CPUs:
unpinned, the runs' XLA thread pools contend for every core, while a pinned run sizes its pool to its
share (XLA counts the schedulable CPUs).  Wall times of pinned seeds: docs/results.md (Lorenz-63).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from distdeer import config, run
from distdeer import eval as eval_mod
from distdeer.train import loop


class SweepError(ValueError):
    """Bad sweep arguments (reported in one line, exit 2)."""


def plan(config_path: str, overrides: list[str], seeds: list[int]) -> list:
    """One config per seed; every run is validated before any starts."""
    base_dir = config.load(config_path, overrides).run.dir
    runs = [config.load(config_path, [*overrides, f"seed={k}", f"run.dir={base_dir}-seed{k}"]) for k in seeds]
    for cfg in runs:
        loop.prepare(cfg)
    return runs


def cpu_shares(n: int) -> list[list[int]]:
    """This process's CPUs split into ``n`` contiguous, disjoint, near-equal shares."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SweepError(f"--parallel {n} exceeds the {len(cpus)} CPUs this process may use")
    size, extra = divmod(len(cpus), n)
    shares, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        shares.append(cpus[start:stop])
        start = stop
    return shares


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def train_parallel(config_path: str, overrides: list[str], runs, parallel: int) -> tuple[bool, list[str]]:
    """Train ``runs`` as pinned child processes, ``parallel`` at a time, output prefixed ``[seed k]``.

    SIGTERM/SIGINT are forwarded to the running children (each checkpoints and stops); no new run
    starts after one.  Returns (stopped, failures)."""
    free = cpu_shares(parallel)
    pending = list(runs)
    running: dict[subprocess.Popen, tuple] = {}
    failures: list[str] = []
    stopped = threading.Event()

    def forward(signum, frame):
        stopped.set()
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (pending and not stopped.is_set()):
            while pending and free and not stopped.is_set():
                cfg, cpus = pending.pop(0), free.pop(0)
                # The child pins itself before anything starts a thread (no preexec_fn: this process
                # runs JAX's threads, and forking it is unsafe).
                pin = (f"import os, sys; os.sched_setaffinity(0, {cpus!r}); "
                       "from distdeer.cli import main; sys.exit(main(sys.argv[1:]))")
                cmd = [sys.executable, "-c", pin, "train", config_path, *overrides,
                       f"seed={cfg.seed}", f"run.dir={cfg.run.dir}"]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                relay = threading.Thread(target=_relay, args=(proc, f"[seed {cfg.seed}] "), daemon=True)
                relay.start()
                running[proc] = (cfg, cpus, relay)
                print(f"distdeer: sweep: seed {cfg.seed} started on CPUs {cpus} (pid {proc.pid})", flush=True)
            for proc in [p for p in running if p.poll() is not None]:
                cfg, cpus, relay = running.pop(proc)
                relay.join()
                free.append(cpus)
                if proc.returncode != 0:
                    failures.append(f"seed {cfg.seed} ({cfg.run.dir}) exited with code {proc.returncode}")
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return stopped.is_set() or bool(pending), failures


def sweep(config_path: str, overrides: list[str], seeds: list[int], parallel: int = 1) -> int:
    """Train every seed, write the summary, print it; exit code 0, or 1 when a seed failed."""
    if parallel < 1:
        raise SweepError("--parallel must be >= 1")
    runs = plan(config_path, overrides, seeds)
    if parallel == 1:
        for cfg in runs:
            try:
                outcome = run.train(cfg)
            except loop.TooManySkipped as e:
                print(f"distdeer: sweep: seed {cfg.seed} ({cfg.run.dir}) failed: {e}", file=sys.stderr)
                return 1
            run.print_outcome(outcome)
            if outcome["stopped"]:
                print(f"distdeer: sweep stopped during {cfg.run.dir}; rerun to resume")
                return 0
    else:
        stopped, failures = train_parallel(config_path, overrides, runs, min(parallel, len(runs)))
        if failures:
            print("distdeer: sweep: " + "; ".join(failures), file=sys.stderr)
            return 1
        if stopped:
            print("distdeer: sweep stopped; rerun to resume")
            return 0
    results = [run.evaluation_of(cfg) for cfg in runs]
    if any(r is None for r in results):
        print("distdeer: sweep stopped before every run finished; rerun to resume")
        return 0
    eval_mod.write_summary(results)
    return 0
