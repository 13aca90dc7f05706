"""The training loop: run directory, resume and preemption rules (``distdeer.run`` wraps it in the
evaluation and report that follow).

Run directory::

    config.yaml         the resolved configuration (the run's identity)
    normalisation.json  mean/std of the data (results in data units)
    metrics.jsonl       one JSON object per logged step
    checkpoints/        Orbax checkpoints (state + metadata with params_sha256 and state_sha256);
                        elsewhere if checkpoint.dir is set
    hosts.json, events.jsonl   the current process group and its history (launch/train.py runs)
    loss.png            loss and α over training (``distdeer.run``, at the end)
    eval.json, generated.npy, attractor.png, spectrum.png, timeseries.png   evaluation (``distdeer.run``)

Resume rules (all here): the same command on the same directory restores the latest *complete*
checkpoint and continues; state that influences the next step is either checkpointed (params,
optimizer state, α, the Newton warm start or the carried windows' end states) or a pure function of
(seed, step, data), so the result is bitwise that of an uninterrupted run on the same devices.
``metrics.jsonl`` is cut back to the restored step.  A directory whose config differs in ``model``,
``data``, ``gtf``, ``solver``, ``seed`` or the training batch geometry is refused.  SIGTERM (``ray job
stop``, preemption) finishes the current step, saves, and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import config as config_mod
from distdeer import distributed
from distdeer import files
from distdeer import mesh as mesh_mod
from distdeer.config import Config, ConfigError
from distdeer.data import loader, store
from distdeer.precision import float32_matmuls
from distdeer.solver import Result
from distdeer.models import Model
from distdeer.train import checkpoint
from distdeer.train import modes
from distdeer.train.step import TrainState, make_train_step, optimizer

IDENTITY_SECTIONS = ("seed", "data", "model", "gtf", "solver")
IDENTITY_TRAIN_KEYS = ("seq_len", "batch", "carry", "noise", "lambda_lat", "lr", "lr_end", "clip", "steps")


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (restarts and tests reuse compiled programs)."""
    path = os.environ.get("DISTDEER_COMPILATION_CACHE", os.path.expanduser("~/.cache/distdeer/jax"))
    if path and path != "off":
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_series(cfg: Config) -> tuple[np.ndarray, dict]:
    """The whole standardised training series (T, N), validated, and its normalisation."""
    source = loader.open_source(cfg)
    return store.check_series(source.all(), source.info["source"]), source.info


def _identity(cfg: Config) -> dict:
    d = config_mod.to_dict(cfg)
    out = {k: d[k] for k in IDENTITY_SECTIONS}
    if out["data"]["path"] is not None:
        # The same file however it is named (relative, absolute, links); the generator's keys and the
        # sampling interval (used by evaluation only) do not change what a file-trained run computes.
        out["data"] = {"path": os.path.realpath(out["data"]["path"])}
    out["train"] = {k: d["train"][k] for k in IDENTITY_TRAIN_KEYS}
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _finite_or_none(x) -> float | None:
    """A logged estimate, or null where it was not made (NaN: 𝒩 of an LRU)."""
    x = float(x)
    return x if np.isfinite(x) else None


def check_run_dir(cfg: Config) -> bool:
    """True if the run directory holds a run to resume; refuses (ConfigError) a different config."""
    path = os.path.join(cfg.run.dir, "config.yaml")
    if not os.path.exists(path):
        if os.path.isdir(checkpoint.location(cfg)):
            raise ConfigError(f"{cfg.run.dir} holds checkpoints but no config.yaml; refusing to mix runs")
        return False
    a, b = _flat(_identity(config_mod.load(path))), _flat(_identity(cfg))
    if a != b:
        diffs = sorted(k for k in a if a[k] != b.get(k))
        raise ConfigError(f"run directory {cfg.run.dir} holds a different run ({', '.join(diffs)} differ); "
                          "choose another run.dir")
    return True


def start_run_dir(cfg: Config, info: dict) -> None:
    """Create the run directory: ``config.yaml`` (kept when resuming) and ``normalisation.json``."""
    resuming = check_run_dir(cfg)
    os.makedirs(cfg.run.dir, exist_ok=True)
    if not resuming:
        files.write_atomic(os.path.join(cfg.run.dir, "config.yaml"), config_mod.dump(cfg))
    files.write_atomic(os.path.join(cfg.run.dir, "normalisation.json"), json.dumps(info, indent=1))


def _cut_metrics(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    files.write_atomic(path, "".join(keep))


class Control:
    """A handle on a running loop, safe to use from another thread (a launcher's supervisor) or a
    signal handler: ``stop()`` asks for a checkpoint and a clean exit at the next step boundary;
    ``progress()`` says how far the loop is, for the launcher's watchdog: ``(step, phase, seconds)`` —
    the last completed step (None before the first), the phase (``starting`` → ``loading`` →
    ``compiling`` → ``first step`` → ``training``) and the seconds since the phase began or the last
    step completed."""

    def __init__(self):
        self._stop = threading.Event()
        self._step: int | None = None
        self._phase = "starting"
        self._time = time.monotonic()

    def stop(self, *_) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def mark(self, phase: str) -> None:
        self._phase, self._time = phase, time.monotonic()

    def beat(self, step: int) -> None:
        self._step, self._phase, self._time = step, "training", time.monotonic()

    def progress(self) -> tuple[int | None, str, float]:
        return self._step, self._phase, time.monotonic() - self._time


@contextlib.contextmanager
def on_signals(handler):
    """SIGTERM/SIGINT → ``handler`` while the block runs (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _progress(total: int, start: int, quiet: bool):
    """A rich progress bar on a terminal; plain log lines otherwise; nothing on processes other than 0."""
    if quiet:
        return None, lambda step, info: None
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn())
        task = bar.add_task("train", total=total, completed=start, info="")
        return bar, lambda step, info: bar.update(task, completed=step, info=info)
    return None, lambda step, info: print(f"step {step}/{total} {info}", flush=True)


def prepare(cfg: Config, read: bool = True):
    """Everything that can fail on bad input, with no side effect: (source, model, resume?).

    ``read=False`` (a launcher checking a run before its workers start) reads only metadata of a zarr
    series; otherwise the whole series is read and validated."""
    source = loader.open_source(cfg)
    if read and jax.process_count() == 1:
        store.check_series(source.all(), source.info["source"])
    T, N = source.shape
    S = cfg.train.seq_len
    if S is not None and S + cfg.train.burn_in + 1 > T:
        need = f"train.seq_len={S}" + (f" after train.burn_in={cfg.train.burn_in}" if cfg.train.burn_in else "")
        raise ConfigError(f"{need} needs a series of at least {S + cfg.train.burn_in + 1} steps, got {T}")
    if cfg.mesh.hosts != jax.process_count() and read:
        raise ConfigError(f"mesh.hosts={cfg.mesh.hosts} but this is {jax.process_count()} process(es); "
                          "multi-host runs start with launch/train.py --hosts N")
    try:
        model = Model.from_config(cfg.model, N)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return source, model, check_run_dir(cfg)


def initial_state(model: Model, cfg: Config, mode, data, mesh) -> TrainState:
    """Fresh state as global arrays on ``mesh``: replicated parameters and optimizer state, and the
    mode's own state computed on the mesh (a whole-series warm start sharded like ``data.rows``)."""
    params = model.init(jax.random.PRNGKey(cfg.seed))
    state = mesh_mod.replicate(TrainState(params, optimizer(cfg).init(params), jnp.float32(cfg.gtf.alpha),
                                          jnp.int32(0), jnp.int32(0), None), mesh)
    shardings = {} if mesh is None else {"out_shardings": mode.state_sharding(data)}
    return state._replace(mode_state=jax.jit(mode.initial, **shardings)(state.params, data))


def compile_step(model: Model, cfg: Config, mode, mesh, state: TrainState, data):
    """The jitted training step the loop runs: ``run(state, data) -> (state, metrics)``; ``.jitted`` is the
    underlying ``jax.jit`` of ``(mode_state, state without it, data)`` (to lower and analyse it).

    The mode's state is donated: the next step's overwrites it in place (a whole-series warm start: T·M
    floats saved per device).  That is safe because a checkpoint save copies it to the host before it
    returns (``checkpoint.WarmStartHandler``, and Orbax's blocking transfer for the small carried
    states); nothing else is donated, since Orbax may still be reading the parameters of an asynchronous
    save (it defers the device-to-host copy of some arrays).  On a mesh the shardings are pinned to the
    state's own: otherwise the second step recompiles for the first step's output layout."""
    fn = make_train_step(model, cfg, mode)
    kw = {}
    if mesh is not None:
        sharding = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
        own, rest = sharding(state.mode_state), sharding(state._replace(mode_state=None))
        kw = {"in_shardings": (own, rest, sharding(data)),
              "out_shardings": (rest._replace(mode_state=own), mesh_mod.replicated(mesh))}
    jitted = jax.jit(lambda own, rest, d: fn(rest._replace(mode_state=own), d), donate_argnums=0, **kw)

    compiled = None

    def run_step(state, data):
        return (compiled or jitted)(state.mode_state, state._replace(mode_state=None), data)

    def compile(state, data):
        """Compile now, for these arguments (the loop reports compilation apart from the first step)."""
        nonlocal compiled
        compiled = jitted.lower(state.mode_state, state._replace(mode_state=None), data).compile()

    run_step.jitted, run_step.compile = jitted, compile
    return run_step


class TooManySkipped(RuntimeError):
    """More updates were skipped (failed solves) than ``train.max_skipped`` allows."""


@float32_matmuls  # distdeer/precision.py: the GPU default (TF32) is too coarse
def run(cfg: Config, control: Control | None = None) -> dict:
    """Train (or resume) the configured run; returns a summary dict.

    The same function runs in one process and in each process of a ``jax.distributed`` group (the
    launcher's workers): every process builds the same global mesh and steps together; process 0
    alone writes the plain files; checkpoints are collective (Orbax)."""
    enable_compilation_cache()
    control = control or Control()
    control.mark("loading")
    primary = distributed.is_primary()
    source, model, _ = prepare(cfg)
    R = source.shape[0]
    steps = R - 1  # T: steps of the whole series
    mesh = mesh_mod.build(cfg, R)
    run_dir = cfg.run.dir
    if primary:
        start_run_dir(cfg, source.info)
    distributed.barrier("distdeer-run-dir")
    mode = modes.for_config(cfg, model, mesh, steps)
    data = mode.place(source, mesh)
    state = initial_state(model, cfg, mode, data, mesh)
    mngr = checkpoint.manager(checkpoint.location(cfg), cfg.checkpoint.keep)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    latest = mngr.latest_step()
    if latest is not None:
        state, meta = checkpoint.restore(mngr, latest, state, steps)
        if checkpoint.state_sha256(state, mode.fingerprinted) != meta["state_sha256"]:
            raise checkpoint.CheckpointError(f"checkpoint {latest} in {checkpoint.location(cfg)} restored to a state "
                                             "that differs from the one saved (state_sha256 mismatch)")
        if primary:
            _cut_metrics(metrics_path, latest)
            print(f"distdeer: resuming {run_dir} from its checkpoint at step {latest}", flush=True)
    elif primary and os.path.exists(metrics_path):
        os.remove(metrics_path)
    start = int(state.step)
    control.mark("compiling")
    train_step = compile_step(model, cfg, mode, mesh, state, data)
    if start < cfg.train.steps:
        train_step.compile(state, data)
    control.mark("first step")
    skip_budget = int(cfg.train.max_skipped * cfg.train.steps)
    total = cfg.train.steps
    bar, show = _progress(total, start, quiet=not primary)
    last = {}
    t_prev = t_start = time.perf_counter()
    save_s = 0.0
    stopped = False
    failed = None
    log = open(metrics_path, "a") if primary else contextlib.nullcontext()
    with on_signals(control.stop), log, (bar if bar is not None else contextlib.nullcontext()):
        for step in range(start, total):
            state, m = train_step(state, data)
            done = step + 1
            # Multi-process: a tiny collective after the step, so it returns once the step has run on every
            # process — the launcher's watchdog heartbeat then means the step finished.
            stop = distributed.any_process(control.stop_requested)
            control.beat(done)
            if done % cfg.train.log_every == 0 or done == total or stop:
                m = jax.device_get(m)
                now = time.perf_counter()
                last = {"step": done, "loss": float(m.loss), "mse": float(m.mse), "alpha": float(m.alpha),
                        "alpha_estimate": _finite_or_none(m.alpha_estimate), "newton_iterations": int(m.newton_iterations),
                        "newton_residual": float(m.newton_residual), "converged": bool(m.converged),
                        "result": int(m.result), "lr": float(m.lr), "grad_norm": float(m.grad_norm),
                        "skipped": int(m.skipped),
                        "step_time_s": (now - t_prev) / cfg.train.log_every, "checkpoint_s_total": save_s,
                        "elapsed_s": now - t_start}
                t_prev = now
                if primary:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                show(done, f"loss {last['loss']:.4g} α {last['alpha']:.3f} it {last['newton_iterations']} "
                           f"{1.0 / max(last['step_time_s'], 1e-9):.1f} it/s"
                           + (f" skipped {last['skipped']}" if last["skipped"] else ""))
                if last["skipped"] > skip_budget:
                    # a converged (or sequential) solve that was skipped had a non-finite loss or gradient
                    newton = Result(last["result"]) != Result.SUCCESS
                    cause = (f"Newton solve failed, last result {Result(last['result']).name}, residual "
                             f"{last['newton_residual']:.3g}" if newton else "non-finite loss or gradient")
                    remedy = "solver.fallback=true or a larger solver.max_iter" if newton else \
                        "a smaller train.lr or train.clip"
                    if Result(last["result"]) == Result.NONFINITE and cfg.solver.fallback:
                        # the fallback evaluated the recurrence step by step and it overflowed as well: the
                        # model's own forced trajectory leaves float range, no solver setting helps
                        cause = ("the forced trajectory is non-finite: the sequential fallback"
                                 + (" or a window's burn-in" if cfg.train.burn_in else "")
                                 + " overflowed too, last result NONFINITE")
                        remedy = ("a smaller train.lr, contractive unforced units at the start (a smaller "
                                  "model.unforced_init), or unforced a held below 1 (model.unforced_decay=exp)")
                    failed = (f"{last['skipped']} of {done} updates skipped ({cause}), more than "
                              f"train.max_skipped={cfg.train.max_skipped} of {total} steps; saved step {done}; rerun "
                              f"with a larger train.max_skipped to continue, or start a new run with {remedy}")
                    stop = True
            if done % cfg.checkpoint.every == 0 or done == total or stop:
                t_save = time.perf_counter()
                checkpoint.save(mngr, done, state, {"step": done, "params_sha256": checkpoint.params_sha256(state.params),
                                                    "state_sha256": checkpoint.state_sha256(state, mode.fingerprinted),
                                                    "loss": last.get("loss"), "skipped": int(state.skipped),
                                                    "devices": len(jax.devices()), "processes": jax.process_count()},
                                steps)
                save_s += time.perf_counter() - t_save  # the blocking part; Orbax writes in the background
            if stop:
                stopped = True
                break
        # Still under the handler: a signal while the last save commits must not kill the process.
        mngr.wait_until_finished()
        mngr.close()
    if failed:
        raise TooManySkipped(failed)
    return {"run_dir": run_dir, "step": int(state.step), "stopped": stopped,
            "params_sha256": checkpoint.params_sha256(state.params), "last": last}


def inspect(run_dir: str) -> dict:
    """Latest complete step, params_sha256, config summary and last metrics of a run directory."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_mod.load(cfg_path)
    ckpt_dir = checkpoint.location(cfg)
    step, meta = None, {}
    if os.path.isdir(ckpt_dir):
        mngr = checkpoint.manager(ckpt_dir, cfg.checkpoint.keep)
        step = mngr.latest_step()
        mngr.close()
        if step is not None:
            meta = checkpoint.read_meta(ckpt_dir, step)
    last = None
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mpath):
        with open(mpath) as f:
            lines = [line for line in f if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    return {"run_dir": os.path.abspath(run_dir), "step": step, "params_sha256": meta.get("params_sha256"),
            "skipped": meta.get("skipped"),
            "config": {"model": config_mod.to_dict(cfg)["model"], "data": config_mod.to_dict(cfg)["data"],
                       "train": config_mod.to_dict(cfg)["train"]},
            "last_metrics": last}
