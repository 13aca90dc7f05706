"""``distdeer bench solver``: GTF-DEER against the sequential recurrence, side by side in one process.

The problem: a clipped shPLRNN (M latent, L hidden units, reference initialisation) forced by GTF with
strength α towards standardised Lorenz-63 data (the first min(M, 3) units forced), loss = MSE of the
un-forced predictions of the observed units.  Measured (best of ``repeats`` runs of programs compiled
ahead of time; compile times recorded apart): sequential forward, BPTT value+grad, DEER forward and
value+grad (started from the data, and warm-started from the solution one Adam-sized parameter step
away, as in training), Newton iterations, the max error of DEER's states against the sequential ones,
the gradient's relative error against BPTT, compiled memory of each value+grad, and the ratios.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import gtf
from distdeer.data import systems
from distdeer.models import plrnn
from distdeer.precision import float32_matmuls
from distdeer.solver import deer, sequential


@dataclasses.dataclass(frozen=True)
class SolverBench:
    T: int = 100_000
    latent: int = 3
    hidden: int = 50
    devices: int = 1
    jacobian: str = "dense"
    alpha: float | None = None  # None: GTF estimate α = max(0, 1 − 1/𝒩) on the data
    repeats: int = 3
    seed: int = 0
    method: str | None = None
    skip_sequential: bool = False
    memory_only: bool = False  # compile only and report XLA's memory analysis (no data, no run)
    # analytic: the model's closed-form Jacobians; autodiff: none given, the solver differentiates the step
    # (what a user's own step gets)
    jacobian_source: str = "analytic"
    init: str = "data"  # Newton's initial guess: the forcing states ("data"), or the solver's default (z0 repeated)
    adjoint: str | None = None  # the adjoint's maps (deer's adjoint=): dense, diagonal, or None (deer's default)


def _problem(cfg: SolverBench):
    """Lorenz-63 data lifted into the M-dim state space by a fixed orthonormal map R (M×3), all units
    forced (affine-readout GTF: ẑ = R x), the model read out by Rᵀ."""
    M = cfg.latent
    # Integrated on the host CPU: on an accelerator the RK4 loop (10 substeps per sample) runs one tiny
    # kernel sequence per step and would take minutes at T = 10^6.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        data = np.asarray(systems.standardise(systems.lorenz63(cfg.T + 1, seed=cfg.seed)))
    data = jnp.asarray(data)
    R = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(cfg.seed + 1), (M, max(M, 3))))[0][:, :3] \
        if M > 3 else jnp.eye(M, 3)
    zhat = data @ R.T
    params = plrnn.init_shplrnn(jax.random.PRNGKey(cfg.seed), M, cfg.hidden)
    alpha = cfg.alpha
    if alpha is None:
        sample = zhat[:-1][:: max(1, cfg.T // 10_000)]  # ≤ ~10^4 points: the estimate, not the SVDs, is the point
        alpha = float(gtf.alpha_from_norm(gtf.jacobian_norm(plrnn.clipped_shplrnn_jac, params, sample)))
    analytic = cfg.jacobian_source == "analytic"
    step = gtf.forced_step(plrnn.clipped_shplrnn, alpha, None, latent=M,
                           jac=plrnn.clipped_shplrnn_jac if analytic else None,
                           jac_diag=plrnn.clipped_shplrnn_jac_diag if analytic else None)
    return step, params, zhat[0], zhat[:-1], zhat[1:], data[1:], R, alpha


def _note(message: str) -> None:
    """Progress on stderr as each phase ends: a run stopped by a time limit shows how far it got."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _compile(fn, args):
    """Ahead-of-time compile ``fn`` for ``args``; returns (compiled, compile seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _time(fn: Callable, args, repeats: int, warmup: bool = True, compiled=None):
    """Best of ``repeats`` runs of the compiled ``fn`` (compiled ahead of time, so no run pays for
    compilation); ``warmup`` adds one untimed run first.  The sequential baselines skip it: at T = 10^6
    on an accelerator one run takes about a minute, and a run of the AOT-compiled program does not
    compile.  Returns (seconds, output)."""
    compiled = compiled or _compile(fn, args)[0]
    if warmup:
        out = jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best, out


def _memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # memory analysis is not offered by every backend
        return None


def _compiled_bytes(fn, args) -> int | None:
    return _memory_bytes(_compile(fn, args)[0])


def compiled_memory(cfg: SolverBench) -> dict:
    """XLA's memory analysis (temporaries + arguments + outputs) of DEER's and BPTT's value+grad at
    this size, from abstract shapes: nothing is allocated or run, so huge T can be assessed."""
    M, T = cfg.latent, cfg.T
    params = jax.eval_shape(lambda: plrnn.init_shplrnn(jax.random.PRNGKey(0), M, cfg.hidden))
    step = gtf.forced_step(plrnn.clipped_shplrnn, 0.2, None, latent=M, jac=plrnn.clipped_shplrnn_jac,
                           jac_diag=plrnn.clipped_shplrnn_jac_diag)
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (params, S(M), S(T, M), S(T, M), S(T, 3), S(M, 3))

    def deer_vg(p, z0, xs, init, targets, R):
        return jax.value_and_grad(lambda q: jnp.mean((deer(step, q, z0, xs, init=init, throw=False,
                                                           jacobian=cfg.jacobian, method=cfg.method,
                                                           adjoint=cfg.adjoint).states @ R
                                                      - targets) ** 2))(p)

    def bptt_vg(p, z0, xs, init, targets, R):
        return jax.value_and_grad(lambda q: jnp.mean((sequential(step, q, z0, xs) @ R - targets) ** 2))(p)

    out = dataclasses.asdict(cfg)
    out.update(backend=jax.default_backend(), deer_value_grad_bytes=_compiled_bytes(jax.jit(deer_vg), args),
               bptt_value_grad_bytes=_compiled_bytes(jax.jit(bptt_vg), args))
    return out


@float32_matmuls
def run(cfg: SolverBench) -> dict:
    """Run the benchmark; returns a flat dict of raw numbers (seconds, bytes).  Every program is traced
    with float32 matrix products (the solver always uses them; the sequential baseline gets the same,
    not the GPU's default TF32), so both compute the same recurrence."""
    if cfg.memory_only:
        return compiled_memory(cfg)
    step, params, z0, xs, init, targets, R, alpha = _problem(cfg)
    mesh = None
    if cfg.devices > 1:
        if len(jax.devices()) < cfg.devices:
            raise ValueError(f"bench: {cfg.devices} devices requested, {len(jax.devices())} available")
        mesh = jax.make_mesh((cfg.devices,), ("time",), devices=jax.devices()[: cfg.devices])
        if jax.process_count() > 1:  # every process built the same host arrays: make them global
            from distdeer.mesh import replicate

            params, z0, xs, init, targets, R = replicate((params, z0, xs, init, targets, R), mesh)
    if cfg.init == "default":
        init = jnp.broadcast_to(z0, xs.shape)  # what deer() starts from when given no init
    opts = dict(jacobian=cfg.jacobian, mesh=mesh, init=init, throw=False, method=cfg.method,
                max_iter=200, adjoint=cfg.adjoint)

    def loss_of(states):
        return jnp.mean((states @ R - targets) ** 2)

    seq_fwd = jax.jit(lambda p: sequential(step, p, z0, xs))
    bptt = jax.jit(jax.value_and_grad(lambda p: loss_of(sequential(step, p, z0, xs))))
    deer_fwd = jax.jit(lambda p: deer(step, p, z0, xs, **opts))

    def deer_loss(p, guess):
        sol = deer(step, p, z0, xs, **{**opts, "init": guess})
        return loss_of(sol.states), sol

    deer_vg = jax.jit(jax.value_and_grad(deer_loss, has_aux=True))
    # Training warm-starts Newton from the previous optimizer step's solution: emulate one Adam-sized
    # step (every parameter moved by ±lr, lr = 1e-3) and start from the solution there.
    signs = jax.tree.map(lambda a, k: jnp.sign(jax.random.normal(k, a.shape)), params,
                         dict(zip(params, jax.random.split(jax.random.PRNGKey(cfg.seed + 2), len(params)))))
    previous = jax.tree.map(lambda a, s: a - 1e-3 * s, params, signs)

    out = dataclasses.asdict(cfg)
    out["alpha"] = alpha
    out.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
               jax_version=jax.__version__, machine=platform.machine(), processor=platform.processor())
    fwd_c, out["deer_forward_compile_s"] = _compile(deer_fwd, (params,))
    vg_c, out["deer_value_grad_compile_s"] = _compile(deer_vg, (params, init))
    _note(f"DEER compiled (forward {out['deer_forward_compile_s']:.1f} s, "
          f"value+grad {out['deer_value_grad_compile_s']:.1f} s)")
    t_deer_fwd, sol = _time(deer_fwd, (params,), cfg.repeats, compiled=fwd_c)
    t_deer_vg, ((loss_d, sol_vg), g_deer) = _time(deer_vg, (params, init), cfg.repeats, compiled=vg_c)
    warm_guess = fwd_c(previous).states
    t_warm, ((_, sol_warm), _) = _time(deer_vg, (params, warm_guess), cfg.repeats, compiled=vg_c)
    out.update(deer_forward_s=t_deer_fwd, deer_value_grad_s=t_deer_vg,
               newton_iterations=int(sol.iterations), converged=bool(sol.converged),
               residual=float(sol.residual), deer_loss=float(loss_d),
               # forward time / iterations (includes the one extra step evaluation of the residual)
               per_iteration_s=t_deer_fwd / max(int(sol.iterations), 1),
               deer_value_grad_warm_s=t_warm, newton_iterations_warm=int(sol_warm.iterations),
               converged_warm=bool(sol_warm.converged), deer_value_grad_bytes=_memory_bytes(vg_c))
    _note(f"DEER timed (value+grad {t_deer_vg * 1e3:.1f} ms, {int(sol.iterations)} iterations)")
    if not cfg.skip_sequential:
        seq_c, out["sequential_forward_compile_s"] = _compile(seq_fwd, (params,))
        bptt_c, out["bptt_value_grad_compile_s"] = _compile(bptt, (params,))
        _note(f"sequential compiled (forward {out['sequential_forward_compile_s']:.1f} s, "
              f"BPTT {out['bptt_value_grad_compile_s']:.1f} s)")
        t_seq, ref = _time(seq_fwd, (params,), cfg.repeats, warmup=False, compiled=seq_c)
        t_bptt, (loss_b, g_bptt) = _time(bptt, (params,), cfg.repeats, warmup=False, compiled=bptt_c)
        gerr = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                   for a, b in zip(jax.tree.leaves(g_deer), jax.tree.leaves(g_bptt)))
        out.update(sequential_forward_s=t_seq, bptt_value_grad_s=t_bptt, bptt_loss=float(loss_b),
                   max_state_error=float(jnp.max(jnp.abs(sol.states - ref))), grad_rel_error=gerr,
                   bptt_value_grad_bytes=_memory_bytes(bptt_c),
                   ratio_forward=t_deer_fwd / t_seq, ratio_value_grad=t_deer_vg / t_bptt,
                   ratio_value_grad_warm=t_warm / t_bptt)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def report(res: dict) -> str:
    """Human-readable summary of ``run``'s result."""
    if res.get("memory_only"):
        return (f"T={res['T']} M={res['latent']} L={res['hidden']} jacobian={res['jacobian']}: compiled memory "
                f"(XLA estimate, not run) DEER value+grad {res['deer_value_grad_bytes'] / 2**30:.2f} GiB, "
                f"BPTT value+grad {res['bptt_value_grad_bytes'] / 2**30:.2f} GiB")
    lines = [f"T={res['T']} M={res['latent']} L={res['hidden']} devices={res['devices']} "
             f"jacobian={res['jacobian']} ({res['jacobian_source']}) adjoint={res['adjoint'] or 'default'} "
             f"init={res['init']} alpha={res['alpha']:.3f} backend={res['backend']} ({res['device_kind']})",
             f"  Newton iterations {res['newton_iterations']}  converged {res['converged']}  "
             f"residual {res['residual']:.2e}  (warm start: {res['newton_iterations_warm']} iterations, "
             f"converged {res['converged_warm']}); {res['per_iteration_s'] * 1e3:.2f} ms per iteration"]
    rows = [("sequential forward", "sequential_forward_s"), ("BPTT value+grad", "bptt_value_grad_s"),
            ("DEER forward", "deer_forward_s"), ("DEER value+grad", "deer_value_grad_s"),
            ("DEER value+grad warm", "deer_value_grad_warm_s")]
    for name, key in rows:
        if key in res:
            lines.append(f"  {name:<20s} {res[key] * 1e3:10.1f} ms")
    if "ratio_value_grad" in res:
        lines.append(f"  ratio DEER/sequential: forward {res['ratio_forward']:.3f}  "
                     f"value+grad {res['ratio_value_grad']:.3f}  value+grad warm {res['ratio_value_grad_warm']:.3f}")
        lines.append(f"  max |z_deer - z_seq| {res['max_state_error']:.2e}  "
                     f"grad rel. error {res['grad_rel_error']:.2e}")
    for name, key in (("DEER value+grad", "deer_value_grad_bytes"), ("BPTT value+grad", "bptt_value_grad_bytes")):
        if res.get(key) is not None:
            lines.append(f"  compiled memory {name:<16s} {res[key] / 2**20:9.1f} MiB")
    lines.append(f"  peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
