"""``distdeer bench train``: the training step, measured two ways.

* ``run`` (no ``--devices``): training-step time of GTF-DEER vs sequential GTF-BPTT, same run, one device.
* ``sharded`` (``--devices P``, optionally ``--processes K``): the whole-series step exactly as
  ``distdeer train`` compiles it on P devices — the bytes of every collective in the compiled program,
  its memory per device, and step times.

``run``: both train the same model on the same whole series with the same configuration, differing only in
``solver.kind``; after compilation, each runs ``steps`` training steps.  Reported: mean step time
(excluding the first step), the ratio, and for DEER the Newton iterations per step (mean over the steps
after the first 100, the warm-start regime) and the loss trajectories' agreement.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import config as config_mod
from distdeer.bench.hlo import collective_bytes
from distdeer.models import Model
from distdeer.train.loop import load_series
from distdeer.mesh import whole_series_of
from distdeer.train import modes
from distdeer.train.step import TrainState, init_state, make_train_step, optimizer


def run(T: int = 100_000, steps: int = 200, latent: int = 3, hidden: int = 50, seed: int = 0,
        overrides: list[str] = ()) -> dict:
    base = config_mod.load(None, [f"data.steps={T + 1}", f"model.latent={latent}", f"model.hidden={hidden}",
                                  f"train.steps={steps}", f"seed={seed}", "mesh.devices=1", *overrides])
    series, _ = load_series(base)
    x = whole_series_of(series)
    out = {"T": T, "steps": steps, "latent": latent, "hidden": hidden, "overrides": list(overrides),
           "backend": jax.default_backend()}
    losses = {}
    for kind in ("deer", "sequential"):
        cfg = dataclasses.replace(base, solver=dataclasses.replace(base.solver, kind=kind))
        model = Model.from_config(cfg.model, series.shape[1])
        mode = modes.for_config(cfg, model, None, T)
        step = jax.jit(make_train_step(model, cfg, mode))
        state = init_state(model, cfg, mode, x)
        times, iters, loss = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = jax.block_until_ready(step(state, x))
            times.append(time.perf_counter() - t0)
            iters.append(int(m.newton_iterations))
            loss.append(float(m.loss))
        out[f"{kind}_step_s"] = float(np.mean(times[1:]))
        losses[kind] = np.asarray(loss)
        if kind == "deer":
            out["newton_iterations_mean_after_100"] = float(np.mean(iters[100:])) if steps > 100 else None
            out["newton_iterations_first_10"] = iters[:10]
    out["ratio_step"] = out["deer_step_s"] / out["sequential_step_s"]
    out["max_loss_rel_diff"] = float(np.max(np.abs(losses["deer"] - losses["sequential"])
                                            / np.abs(losses["sequential"])))
    return out


def report(r: dict) -> str:
    return (f"T={r['T']} M={r['latent']} L={r['hidden']} steps={r['steps']} backend={r['backend']}\n"
            f"  GTF-DEER step   {r['deer_step_s'] * 1e3:9.1f} ms\n"
            f"  GTF-BPTT step   {r['sequential_step_s'] * 1e3:9.1f} ms\n"
            f"  ratio DEER/BPTT {r['ratio_step']:.3f}\n"
            f"  Newton iterations per step: first 10 {r['newton_iterations_first_10']}, "
            f"mean after step 100: {r['newton_iterations_mean_after_100']}\n"
            f"  max relative loss difference along the run: {r['max_loss_rel_diff']:.2e}")


# -- the whole-series training step as the loop runs it, on P devices ---------------------------------

def memory_bytes(compiled) -> int:
    """Per-device bytes of a compiled program: temporaries + arguments + outputs − donated (aliased)."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _config(T: int, latent: int, hidden: int, steps: int, devices: int, overrides) -> "config_mod.Config":
    return config_mod.load(None, [f"data.steps={T + 1}", f"model.latent={latent}", f"model.hidden={hidden}",
                                  f"train.steps={max(steps, 1)}", f"mesh.devices={devices}", "train.seq_len=null",
                                  *overrides])


def sharded(T: int = 2 ** 16, devices: int = 1, steps: int = 6, latent: int = 3, hidden: int = 50,
            overrides: list[str] = (), compile_only: bool = False) -> dict:
    """Compile (and unless ``compile_only``, run ``steps`` steps of) the whole-series training step exactly
    as ``distdeer train`` does on ``devices`` devices (all devices of all processes of a
    ``jax.distributed`` group; on CPU simulated ones).  Returns the compiled program's
    ``collective_bytes_per_step`` (all kinds summed, and per kind), ``memory_per_device_bytes``, and the
    median step time (steps after the first) with the Newton iterations per step."""
    from distdeer import mesh as mesh_mod
    from distdeer.data import loader
    from distdeer.train import loop

    cfg = _config(T, latent, hidden, steps, devices, overrides)
    mesh = mesh_mod.build(cfg, T + 1)
    model = Model.from_config(cfg.model, 3)
    P = 1 if mesh is None else mesh.size
    n = mesh_mod.block(T, P)
    rows_sh = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("time"))
    rep = None if mesh is None else mesh_mod.replicated(mesh)
    mode = modes.for_config(cfg, model, mesh, T)
    sds = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)  # noqa: E731
    data = mesh_mod.WholeSeries(sds((n * P, 3), rows_sh), sds((2, 3), rep))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(cfg.seed))
    state = TrainState(params, jax.eval_shape(optimizer(cfg).init, params), jnp.float32(0), jnp.int32(0), jnp.int32(0),
                       None)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=rep), state)
    state = state._replace(mode_state=modes.WarmStart(sds((n * P, model.latent), rows_sh)))
    run_step = loop.compile_step(model, cfg, mode, mesh, state, data)
    t0 = time.perf_counter()
    compiled = run_step.jitted.lower(state.mode_state, state._replace(mode_state=None), data).compile()
    kinds = collective_bytes(compiled.as_text())
    out = {"T": T, "devices": P, "processes": jax.process_count(), "latent": model.latent, "hidden": hidden,
           "overrides": list(overrides), "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "compile_s": time.perf_counter() - t0,
           "collective_bytes_per_step": int(sum(kinds.values())), "collective_bytes_by_kind": kinds,
           "memory_per_device_bytes": memory_bytes(compiled)}
    if compile_only:
        return out
    source = loader.open_source(cfg)
    data = mode.place(source, mesh)
    state = loop.initial_state(model, cfg, mode, data, mesh)
    times, iters, losses = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = jax.block_until_ready(run_step(state, data))
        times.append(time.perf_counter() - t0)
        m = jax.device_get(m)
        iters.append(int(m.newton_iterations))
        losses.append(float(m.loss))
    out.update(step_times_s=times, step_s_median=float(np.median(times[1:])) if steps > 1 else None,
               newton_iterations=iters, losses=losses)
    return out


def report_sharded(r: dict) -> str:
    lines = [f"whole-series training step: T={r['T']} M={r['latent']} L={r['hidden']} devices={r['devices']} "
             f"processes={r['processes']} backend={r['backend']}",
             f"  collective bytes per step  {r['collective_bytes_per_step']:,}  {r['collective_bytes_by_kind']}",
             f"  memory per device          {r['memory_per_device_bytes']:,} B "
             f"({r['memory_per_device_bytes'] / 2 ** 20:.1f} MiB); × devices "
             f"{r['memory_per_device_bytes'] * r['devices'] / 2 ** 20:.1f} MiB"]
    if r.get("step_s_median") is not None:
        lines.append(f"  step time median {r['step_s_median'] * 1e3:.1f} ms over {len(r['step_times_s']) - 1} "
                     f"steps after the first; Newton iterations {r['newton_iterations']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One process of a ``jax.distributed`` group running ``sharded`` (``distdeer bench train
    --processes K`` starts K of these); rank 0 writes the JSON row."""
    import argparse
    import json

    from distdeer import distributed

    ap = argparse.ArgumentParser(prog="python -m distdeer.bench.train")
    for name, default in (("--T", 2 ** 16), ("--devices", 1), ("--steps", 6), ("--latent", 3), ("--hidden", 50),
                          ("--processes", 1), ("--rank", 0)):
        ap.add_argument(name, type=int, default=default)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    distributed.initialize(a.coordinator, a.processes, a.rank, 300)
    row = sharded(a.T, a.devices, a.steps, a.latent, a.hidden, a.overrides, a.compile_only)
    distributed.shutdown()
    if a.rank == 0:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


def in_processes(processes: int, pin: bool, T: int, devices: int, steps: int, latent: int, hidden: int,
                 overrides: list[str], compile_only: bool, timeout: float | None = None) -> dict:
    """``sharded`` in ``processes`` ``jax.distributed`` processes on this machine (devices / processes
    simulated CPU devices each; ``pin``: process r on CPU core r), as a multi-host run would be.
    ``timeout`` (seconds): the processes are killed and ``TimeoutError`` raised when they take longer."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from distdeer import distributed

    if devices % processes:
        raise ValueError(f"--devices {devices} is not a multiple of --processes {processes}")
    port = distributed.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // processes}",
                   JAX_PLATFORMS="cpu")
        procs = []
        for r in range(processes):
            cmd = [sys.executable, "-m", "distdeer.bench.train", "--coordinator", f"127.0.0.1:{port}",
                   "--processes", str(processes), "--rank", str(r), "--T", str(T), "--devices", str(devices),
                   "--steps", str(steps), "--latent", str(latent), "--hidden", str(hidden), "--out", out]
            cmd += [f"--set={o}" for o in overrides] + (["--compile-only"] if compile_only else [])
            procs.append(subprocess.Popen((["taskset", "-c", str(r % os.cpu_count())] if pin else []) + cmd, env=env))
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            codes = [p.wait(None if deadline is None else max(0.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"benchmark processes still running after {timeout:g} s") from None
        finally:
            for p in procs:
                p.kill()
        if any(codes):
            raise RuntimeError(f"benchmark processes exited with {codes}")
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    raise SystemExit(main())
