"""Multi-host training under Ray: one JAX process per host, and a supervisor that restarts the group.

Imported only by ``launch/train.py`` (``import distdeer`` never imports Ray).  Plain Ray actors and a
supervisor loop, not Ray Train's ``JaxTrainer`` (docs/cluster.md says why): the same code path runs on
a laptop's local Ray, on ``ray.cluster_utils.Cluster`` in the tests and on a GPU cluster.

One attempt: a placement group of ``mesh.hosts`` bundles (``ray.placement``, STRICT_SPREAD on a real
cluster: one process per node, owning that node's GPUs) → one ``HostWorker`` actor per bundle → rank
0 names the coordinator (its node IP and a free port) → every rank calls ``jax.distributed.initialize``
concurrently and then runs ``distdeer.train.loop.run`` — the same program as ``distdeer train``.

Failure handling (a JAX process group cannot lose a member, design §4): any worker error, a dead actor
or node, or a rank whose last step is older than ``ray.watchdog_s`` (also a rank that has compiled its
step but not completed the first one; ``ray.startup_s`` before that: ``overdue``) ends the attempt;
every actor is killed, the placement group removed, and a new attempt starts fresh processes with a
new coordinator port, which restore the latest complete checkpoint.  After ``ray.max_failures`` restarts
the job fails with the cause.  Bad input (config, data, checkpoint) is never retried.  SIGTERM to the
driver (``ray job stop``) asks every rank to stop at the same step boundary, which saves a checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distdeer import config as config_mod
from distdeer import distributed
from distdeer import files
from distdeer.config import Config

POLL_S = 0.5


class FatalError(RuntimeError):
    """A worker failed on bad input (config, data, checkpoint): restarting cannot help."""


class TrainingFailed(RuntimeError):
    """Training stopped itself (more skipped updates than train.max_skipped): restarting would repeat it."""


@ray.remote(max_restarts=0, max_concurrency=4)
class HostWorker:
    """One JAX process of the group.  Threaded actor: ``progress``/``stop`` answer while ``train`` runs."""

    def __init__(self, env: dict[str, str]):
        os.environ.update(env)  # before JAX is imported in this fresh process
        self.control = None

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "gpus": ray.get_gpu_ids()}

    def free_port(self) -> int:
        return distributed.free_port("")  # on this worker's node, which other nodes connect to

    def train(self, cfg_dict: dict, coordinator: str, hosts: int, rank: int, timeout_s: int) -> dict:
        from distdeer import distributed
        from distdeer.config import ConfigError
        from distdeer.data.store import DataError
        from distdeer.train import loop
        from distdeer.train.checkpoint import CheckpointError

        self.control = loop.Control()
        distributed.initialize(coordinator, hosts, rank, timeout_s)
        import jax

        try:
            summary = loop.run(config_mod.from_dict(Config, cfg_dict), self.control)
        except (ConfigError, DataError, CheckpointError) as e:
            raise FatalError(str(e)) from None
        except loop.TooManySkipped as e:
            raise TrainingFailed(str(e)) from None
        devices = len(jax.devices())
        distributed.shutdown()
        return {"step": summary["step"], "stopped": summary["stopped"], "params_sha256": summary["params_sha256"],
                "last": summary["last"], "devices": devices,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def call(self, target: str, *args, **kwargs):
        """Run ``module:function`` (imported in this worker) with the arguments given; its result.  How
        other tools use the group's processes (``launch/scaling.py --ray`` runs
        ``distdeer.bench.scaling:measure_in_group`` on every host) without this module knowing them."""
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def progress(self):
        return self.control.progress() if self.control is not None else (None, "starting", 0.0)

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()


def _pdeathsig() -> None:
    """In the child before exec: SIGTERM when the parent (the launcher) dies, however it dies (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # no glibc (not Linux): the launcher's atexit stop is then the only guard
        return


class LocalRay:
    """A private Ray for one local run (``launch/train.py`` without ``RAY_ADDRESS``).

    * Its own session: ``ray start --head --block`` runs in a new session, so a signal to the launcher's
      process group (``timeout``, ``kill -- -PGID``, a batch scheduler cancelling the job, Ctrl-C) reaches
      the launcher, which has every worker checkpoint and stop, and not Ray's services under them.  It
      still ends with the launcher: ``stop()`` at exit, and SIGTERM from the kernel if the launcher dies.
    * Private: token authentication on with a fresh token known only to this process tree (Ray's
      services listen on every interface whatever their node address, so the token is what keeps
      other clients out); the JAX coordinator of a one-node group binds to 127.0.0.1 (``host_group``).
    """

    def __init__(self, num_cpus: int, timeout_s: float = 120.0):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        from ray._raylet import Config

        Config.initialize("")  # Ray read its authentication mode when imported: read it again
        port = distributed.free_port()
        self.address = f"127.0.0.1:{port}"
        # Its own session directory: Ray processes on this machine that look up "the latest session" under
        # the default /tmp/ray (a job driver of another cluster, say) must not find this one and its token.
        self.temp_dir = tempfile.mkdtemp(prefix="distdeer-ray-", dir="/tmp")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}"], start_new_session=True, preexec_fn=_pdeathsig,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.init(address=self.address, logging_level="ERROR")
                return
            except Exception as e:  # the head is not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the local Ray did not start: {type(e).__name__}: {_first_line(e)}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            ray.shutdown()
            self.proc.terminate()  # `ray start --block` stops the services it started
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def connect(hosts: int, cpus_per_host: float, placement: str, prog: str = "distdeer") -> str:
    """Join the cluster at ``RAY_ADDRESS``, or start a private local Ray (``LocalRay``) with room for
    ``hosts`` processes.  Returns the placement strategy to use: on a one-node local Ray a STRICT_SPREAD
    group of several hosts cannot be placed, so it becomes PACK (said on stderr)."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return placement
    LocalRay(num_cpus=max(os.cpu_count() or 1, int(hosts * cpus_per_host + 0.999)))
    if placement.startswith("STRICT_SPREAD") and len(ray.nodes()) < hosts:
        print(f"{prog}: local Ray (one node): {hosts} processes share this machine (placement PACK)", file=sys.stderr)
        return "PACK"
    return placement


def host_resources(devices_per_host: int, cpus_per_host: float) -> tuple[dict, dict]:
    """(Ray resources of one host's bundle, environment of its worker process).  With GPUs in the
    cluster one process owns ``devices_per_host`` GPUs; on CPU hosts it gets that many simulated XLA
    devices."""
    k = devices_per_host or 1
    bundle = {"CPU": cpus_per_host}
    env = {name: os.environ[name] for name in ("DISTDEER_COMPILATION_CACHE",) if name in os.environ}
    if ray.cluster_resources().get("GPU", 0) > 0:
        bundle["GPU"] = k
    else:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={k}")
    return bundle, env


def unplaceable(hosts: int, bundle: dict, strategy: str) -> str | None:
    """Why ``hosts`` bundles of ``bundle`` can never be placed with ``strategy`` on the cluster's live
    nodes, or None when they can.  Judged from each node's total resources, not what is free now (busy
    resources are waited for), so it answers "never as the cluster stands": a cluster that adds nodes on
    demand (autoscaling) needs the check switched off (``ray.check_placement``, ``--no-placement-check``)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    # how many bundles one node can hold (bundle amounts are positive: config validation)
    rooms = [min(int(res.get(k, 0) // v) for k, v in bundle.items()) for res in nodes]
    if strategy.startswith("STRICT_SPREAD"):
        fits, how = sum(r >= 1 for r in rooms) >= hosts, "one per node"
    elif strategy.startswith("STRICT_PACK"):
        fits, how = max(rooms, default=0) >= hosts, "all on one node"
    else:
        fits, how = sum(rooms) >= hosts, "in all"
    if fits:
        return None
    have = ", ".join(f"{k} {max((res.get(k, 0) for res in nodes), default=0):g}" for k in bundle)
    return (f"cannot place {hosts} processes of {bundle} ({strategy}: {how}): the cluster has {len(nodes)} live "
            f"node(s), of which {sum(r >= 1 for r in rooms)} can hold one (largest node: {have})")


class PlacementTimeout(RuntimeError):
    """The placement group's bundles could not be placed in time."""


@contextlib.contextmanager
def host_group(hosts: int, bundle: dict, env: dict, strategy: str, timeout_s: float):
    """One ``HostWorker`` per bundle of a placement group of ``hosts`` bundles; yields ``(actors, where,
    coordinator)`` — ``where`` per rank (pid, node, IP), ``coordinator`` rank 0's IP and a free port.
    Kills the actors and removes the group on exit, whatever happened."""
    pg = placement_group([dict(bundle) for _ in range(hosts)], strategy=strategy)
    actors = []
    try:
        if not pg.wait(timeout_seconds=timeout_s):
            raise PlacementTimeout()
        for rank in range(hosts):
            placed = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            actors.append(HostWorker.options(scheduling_strategy=placed, num_cpus=bundle["CPU"],
                                             num_gpus=bundle.get("GPU", 0)).remote(env))
        where = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
        port = ray.get(actors[0].free_port.remote(), timeout=60)
        # One node: the coordinator binds to loopback only (nothing outside the machine needs it).
        host = "127.0.0.1" if len({w["node_id"] for w in where}) == 1 else where[0]["node_ip"]
        yield actors, where, f"{host}:{port}"
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


@dataclasses.dataclass
class Outcome:
    ok: bool
    cause: str = ""
    fatal: bool = False
    summary: dict | None = None
    code: int = 2  # the job's exit code when fatal: 2 bad input, 1 training failed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Supervisor:
    """Runs attempts until the run finishes, is stopped, fails on bad input or spends its restart budget.

    Writes into the run directory ``hosts.json`` (the current group: per rank its pid and node, the
    coordinator, the attempt) and ``events.jsonl`` (start, failure with cause, first step of each
    attempt, end — the restart-latency benchmark reads these)."""

    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.log = log
        self.run_dir = cfg.run.dir
        self.stop_requested = threading.Event()
        self.failures: list[str] = []

    # -- files ---------------------------------------------------------------------------------------
    def _event(self, **fields) -> None:
        with open(os.path.join(self.run_dir, "events.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.time(), "utc": _now(), **fields}) + "\n")

    def _write_hosts(self, attempt: int, coordinator: str, where: list[dict]) -> None:
        doc = {"attempt": attempt, "coordinator": coordinator, "updated": _now(), "failures": self.failures,
               "hosts": [{"rank": r, **w} for r, w in enumerate(where)]}
        files.write_atomic(os.path.join(self.run_dir, "hosts.json"), json.dumps(doc, indent=1))

    # -- one attempt ---------------------------------------------------------------------------------
    def attempt(self, number: int) -> Outcome:
        cfg, hosts = self.cfg, self.cfg.mesh.hosts
        bundle, env = host_resources(cfg.mesh.devices_per_host, cfg.ray.cpus_per_host)
        try:
            with host_group(hosts, bundle, env, cfg.ray.placement, cfg.ray.startup_s) as (actors, where, coordinator):
                self._write_hosts(number, coordinator, where)
                self._event(event="group_started", attempt=number, coordinator=coordinator,
                            pids=[w["pid"] for w in where])
                cfg_dict = config_mod.to_dict(cfg)
                refs = [a.train.remote(cfg_dict, coordinator, hosts, r, int(cfg.ray.startup_s))
                        for r, a in enumerate(actors)]
                return self._watch(number, actors, refs)
        except PlacementTimeout:
            return Outcome(False, f"could not place {hosts} hosts of {bundle} ({cfg.ray.placement}) within "
                                  f"ray.startup_s={cfg.ray.startup_s:g} s")
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            return Outcome(False, f"starting the group failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def _watch(self, number: int, actors: list, refs: list) -> Outcome:
        cfg = self.cfg
        started = next_note = time.monotonic()
        ranks = [Seen() for _ in actors]  # what the driver last heard from each rank
        first_step = None
        pending: dict = {}
        results: dict[int, dict] = {}
        stop_sent = False
        while True:
            if self.stop_requested.is_set() and not stop_sent:
                self.log("distdeer: stop requested: every rank checkpoints at the next step and exits")
                for a in actors:
                    a.stop.remote()
                stop_sent = True
            ready, _ = ray.wait([r for i, r in enumerate(refs) if i not in results], num_returns=1, timeout=POLL_S)
            for ref in ready:
                rank = refs.index(ref)
                try:
                    results[rank] = ray.get(ref)
                    ranks[rank] = ranks[rank]._replace(done=True)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, FatalError):
                        return Outcome(False, str(e.cause), fatal=True)
                    if isinstance(e.cause, TrainingFailed):
                        return Outcome(False, f"training failed: {e.cause}", fatal=True, code=1)
                    return Outcome(False, f"rank {rank} failed: {_first_line(e)}")
                except ray.exceptions.RayError as e:
                    return Outcome(False, f"rank {rank} lost: {type(e).__name__}: {_first_line(e)}")
            if len(results) == len(refs):
                rss = [results[r]["peak_rss_bytes"] for r in sorted(results)]
                return Outcome(True, summary=dict(results[0], peak_rss_bytes=rss))
            # Watchdog: ask every rank for its progress (a stopped or hung process does not answer).
            now = time.monotonic()
            for rank, a in enumerate(actors):
                if rank not in pending:
                    pending[rank] = a.progress.remote()
            answered, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
            for rank, ref in list(pending.items()):
                if ref in answered:
                    del pending[rank]
                    try:
                        step, phase, age = ray.get(ref)
                    except ray.exceptions.RayError:
                        continue  # the train ref reports the failure
                    ranks[rank] = ranks[rank]._replace(step=step, phase=phase, since=now - age)
                    if step is not None and first_step is None:
                        first_step = step
                        self._event(event="training", attempt=number, step=step)
            cause = overdue(ranks, now - started, now, cfg.ray.startup_s, cfg.ray.watchdog_s)
            if cause is not None:
                return Outcome(False, cause)
            if first_step is None and now >= next_note + WAITING_NOTE_S:
                next_note = now
                self.log(f"distdeer: no step yet after {now - started:.0f} s: " + waiting(ranks, now))

    # -- the job ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Exit code: 0 finished or stopped with a checkpoint; 1 restart budget spent; 2 bad input."""
        cfg = self.cfg
        self._event(event="job_started", hosts=cfg.mesh.hosts, devices_per_host=cfg.mesh.devices_per_host,
                    max_failures=cfg.ray.max_failures, ray_address=ray.get_runtime_context().gcs_address)
        number = 0
        while True:
            outcome = self.attempt(number)
            if outcome.ok:
                s = outcome.summary
                self._event(event="stopped" if s["stopped"] else "finished", attempt=number, step=s["step"],
                            params_sha256=s["params_sha256"], peak_rss_bytes=s["peak_rss_bytes"])
                state = "stopped (signal) at" if s["stopped"] else "finished at"
                self.log(f"distdeer: {state} step {s['step']} on {cfg.mesh.hosts} hosts × {s['devices'] // cfg.mesh.hosts} "
                         f"devices after {len(self.failures)} restart(s); params sha256 {s['params_sha256'][:16]}…; "
                         "peak resident memory per process "
                         + ", ".join(f"{b / 2 ** 30:.2f}" for b in s["peak_rss_bytes"]) + " GiB")
                return 0
            if outcome.fatal:
                self._event(event="failed", attempt=number, cause=outcome.cause, fatal=True)
                self.log(f"distdeer: {'error: ' if outcome.code == 2 else ''}{outcome.cause}")
                return outcome.code
            self.failures.append(outcome.cause)
            self._event(event="failure", attempt=number, cause=outcome.cause)
            if self.stop_requested.is_set():
                self.log(f"distdeer: stopped while the group failed ({outcome.cause}); the latest complete "
                         "checkpoint is kept")
                return 1
            if len(self.failures) > cfg.ray.max_failures:
                self.log(f"distdeer: error: giving up after {len(self.failures)} failures "
                         f"(ray.max_failures={cfg.ray.max_failures}); last cause: {outcome.cause}")
                self._event(event="failed", attempt=number, cause=outcome.cause, fatal=False)
                return 1
            number += 1
            self.log(f"distdeer: {outcome.cause} — restarting the group from the latest checkpoint "
                     f"(restart {len(self.failures)} of at most {cfg.ray.max_failures})")

    def install_signal_handlers(self) -> None:
        def handle(signum, frame):
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


WAITING_NOTE_S = 60.0  # while an attempt has no step yet, say every minute where each rank is


class Seen(typing.NamedTuple):
    """What the supervisor last heard from one rank (``Control.progress``), on the driver's clock."""
    step: int | None = None  # last completed step
    phase: str = "not answering"  # starting, loading, compiling, first step, training
    since: float | None = None  # when that phase began or that step completed (None: never answered)
    done: bool = False  # the rank's training call returned


def overdue(ranks: list[Seen], elapsed: float, now: float, startup_s: float, watchdog_s: float) -> str | None:
    """Why the attempt must end, or None.  A rank that completed a step must complete the next within
    ``watchdog_s``; so must a rank that has compiled its step and is running the first one (a hang there —
    a collective or a kernel that never returns — is reported after ``watchdog_s``, not after the whole
    start-up allowance); before that, the attempt's first ``startup_s`` cover placement, JAX start-up,
    data loading and compilation."""
    for rank, r in enumerate(ranks):
        if r.done:
            continue
        if r.step is not None and now - r.since > watchdog_s:
            return (f"rank {rank} made no progress for {now - r.since:.0f} s > ray.watchdog_s={watchdog_s:g} s "
                    "(hung collective or stalled process; watchdog)")
        if r.step is None and r.phase == "first step" and now - r.since > watchdog_s:
            return (f"rank {rank} compiled its step {now - r.since:.0f} s ago and has not completed it: > "
                    f"ray.watchdog_s={watchdog_s:g} s (hung collective or stalled process; watchdog)")
        if r.step is None and r.phase != "first step" and elapsed > startup_s:
            return (f"rank {rank} completed no step within ray.startup_s={startup_s:g} s (watchdog; last heard: "
                    f"{r.phase})")
    return None


def waiting(ranks: list[Seen], now: float) -> str:
    """Where each rank is, e.g. ``rank 0 first step for 65 s, rank 1 compiling for 80 s``."""
    return ", ".join(f"rank {rank} {r.phase}" + ("" if r.since is None else f" for {now - r.since:.0f} s")
                     for rank, r in enumerate(ranks))


def _first_line(e: Exception) -> str:
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]
