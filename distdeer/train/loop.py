"""``distdeer train``: the training loop, run directory, resume and preemption rules.

Run directory::

    config.yaml         the resolved configuration (the run's identity)
    normalisation.json  mean/std of the data (results in data units)
    metrics.jsonl       one JSON object per logged step
    checkpoints/        Orbax checkpoints (state + metadata with params_sha256)
    loss.png            loss and α over training (written at the end)
    eval.json, generated.npy, attractor.png, spectrum.png, timeseries.png   evaluation at the end

Resume rules (all here): the same command on the same directory restores the latest *complete*
checkpoint and continues; state that influences the next step is either checkpointed (params,
optimizer state, α, the Newton warm start) or a pure function of (seed, step, data), so the result is
bitwise that of an uninterrupted run on the same devices.  ``metrics.jsonl`` is cut back to the
restored step.  A directory whose config differs in ``model``, ``data``, ``gtf``, ``solver``, ``seed``
or the training batch geometry is refused.  SIGTERM (``ray job stop``, preemption) finishes the current
step, saves, and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import config as config_mod
from distdeer.config import Config, ConfigError
from distdeer.data import store, systems
from distdeer.models import Model
from distdeer import plots
from distdeer.train import checkpoint
from distdeer.train.step import init_state, make_train_step

IDENTITY_SECTIONS = ("seed", "data", "model", "gtf", "solver")
IDENTITY_TRAIN_KEYS = ("seq_len", "batch", "lambda_lat", "lr", "lr_end", "clip", "steps")


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (restarts and tests reuse compiled programs)."""
    path = os.environ.get("DISTDEER_COMPILATION_CACHE", os.path.expanduser("~/.cache/distdeer/jax"))
    if path and path != "off":
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_series(cfg: Config) -> tuple[np.ndarray, dict]:
    """Standardised training series (T, N) and its normalisation (from the file or generated)."""
    if cfg.data.path is not None:
        return store.load(cfg.data.path)
    raw = np.asarray(systems.generate(cfg.data.system, cfg.data.steps, cfg.data.dt, cfg.data.noise,
                                      cfg.data.seed), np.float64)
    z, mean, std = store.standardise(raw)
    return z, {"mean": mean.tolist(), "std": std.tolist(), "source": f"generated:{cfg.data.system}"}


def _identity(cfg: Config) -> dict:
    d = config_mod.to_dict(cfg)
    out = {k: d[k] for k in IDENTITY_SECTIONS}
    out["train"] = {k: d["train"][k] for k in IDENTITY_TRAIN_KEYS}
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_run_dir(cfg: Config) -> bool:
    """True if the run directory holds a run to resume; refuses (ConfigError) a different config."""
    path = os.path.join(cfg.run.dir, "config.yaml")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(cfg.run.dir, "checkpoints")):
            raise ConfigError(f"{cfg.run.dir} holds checkpoints but no config.yaml; refusing to mix runs")
        return False
    a, b = _flat(_identity(config_mod.load(path))), _flat(_identity(cfg))
    if a != b:
        diffs = sorted(k for k in a if a[k] != b.get(k))
        raise ConfigError(f"run directory {cfg.run.dir} holds a different run ({', '.join(diffs)} differ); "
                          "choose another run.dir")
    return True


def _mesh(cfg: Config, series_len: int):
    devices = jax.devices()
    n = cfg.mesh.devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"mesh.devices={n} but only {len(devices)} devices are available")
    if n == 1:
        return None
    axis = "time" if cfg.train.seq_len is None else "data"
    if axis == "time" and series_len - 1 < n:
        raise ConfigError(f"series of {series_len} steps is shorter than the {n} devices it is sharded over")
    if axis == "data":
        return jax.sharding.Mesh(np.array(devices[:n]).reshape(n, 1), ("data", "time"))
    return jax.sharding.Mesh(np.array(devices[:n]), ("time",))


def _cut_metrics(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class _Stop:
    """SIGTERM/SIGINT → stop at the next step boundary (after saving)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _progress(total: int, start: int):
    """A rich progress bar on a terminal; plain log lines otherwise."""
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn())
        task = bar.add_task("train", total=total, completed=start, info="")
        return bar, lambda step, info: bar.update(task, completed=step, info=info)
    return None, lambda step, info: print(f"step {step}/{total} {info}", flush=True)


def prepare(cfg: Config):
    """Everything that can fail on bad input, with no side effect: (series, info, model, resume?)."""
    series, info = load_series(cfg)
    T, N = series.shape
    S = cfg.train.seq_len
    if S is not None and S + 1 > T:
        raise ConfigError(f"train.seq_len={S} needs a series of at least {S + 1} steps, got {T}")
    try:
        model = Model.from_config(cfg.model, N)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return series, info, model, check_run_dir(cfg)


def run(cfg: Config) -> dict:
    """Train (or resume) the configured run; returns a summary dict."""
    enable_compilation_cache()
    series, info, model, resuming = prepare(cfg)
    mesh = _mesh(cfg, series.shape[0])
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    if not resuming:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_mod.dump(cfg))
    with open(os.path.join(run_dir, "normalisation.json"), "w") as f:
        json.dump(info, f, indent=1)
    series_j = jnp.asarray(series)
    state = init_state(model, cfg, series_j)
    mngr = checkpoint.manager(os.path.join(run_dir, "checkpoints"), cfg.checkpoint.keep)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    latest = mngr.latest_step()
    if latest is not None:
        state, _ = checkpoint.restore(mngr, latest, state)
        _cut_metrics(metrics_path, latest)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    start = int(state.step)
    # No buffer donation: an asynchronous checkpoint may still be reading the previous state.
    train_step = jax.jit(make_train_step(model, cfg, mesh))
    total = cfg.train.steps
    bar, show = _progress(total, start)
    last = {}
    t_prev = time.perf_counter()
    stopped = False
    with _Stop() as stop, open(metrics_path, "a") as log, (bar if bar is not None else contextlib.nullcontext()):
        for step in range(start, total):
            state, m = train_step(state, series_j)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == total or stop.requested:
                m = jax.device_get(m)
                now = time.perf_counter()
                last = {"step": done, "loss": float(m.loss), "mse": float(m.mse), "alpha": float(m.alpha),
                        "alpha_estimate": float(m.alpha_estimate), "newton_iterations": int(m.newton_iterations),
                        "newton_residual": float(m.newton_residual), "converged": bool(m.converged),
                        "result": int(m.result), "lr": float(m.lr), "grad_norm": float(m.grad_norm),
                        "step_time_s": (now - t_prev) / cfg.train.log_every}
                t_prev = now
                log.write(json.dumps(last) + "\n")
                log.flush()
                show(done, f"loss {last['loss']:.4g} α {last['alpha']:.3f} it {last['newton_iterations']} "
                           f"{1.0 / max(last['step_time_s'], 1e-9):.1f} it/s")
            if done % cfg.checkpoint.every == 0 or done == total or stop.requested:
                checkpoint.save(mngr, done, state, {"step": done, "params_sha256": checkpoint.params_sha256(state.params),
                                                    "loss": last.get("loss"), "warm_rows": int(state.warm.shape[0])})
            if stop.requested:
                stopped = True
                break
    mngr.wait_until_finished()
    mngr.close()
    evaluation = None
    if not stopped:
        plots.loss_figure(metrics_path, os.path.join(run_dir, "loss.png"))
        if cfg.eval.at_end and (cfg.data.path is None or cfg.eval.data is not None):
            from distdeer import eval as eval_mod

            evaluation = eval_mod.evaluate(run_dir, cfg.eval.data)
    return {"run_dir": run_dir, "step": int(state.step), "stopped": stopped,
            "params_sha256": checkpoint.params_sha256(state.params), "last": last, "eval": evaluation}


def inspect(run_dir: str) -> dict:
    """Latest complete step, params_sha256, config summary and last metrics of a run directory."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_mod.load(cfg_path)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
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
            "config": {"model": config_mod.to_dict(cfg)["model"], "data": config_mod.to_dict(cfg)["data"],
                       "train": config_mod.to_dict(cfg)["train"]},
            "last_metrics": last}
