"""``distdeer eval``: the reference DSR protocol on a trained run (design §5).

Protocol: from the first test point the model runs freely for 1.25·T_test steps; the first 0.25·T_test
are dropped, so the compared generated series has exactly the test series' length.  Measures: D_stsp
(binning for N < 6, Gaussian mixture otherwise), D_H (σ = 20), PE(20), and the model's largest Lyapunov
exponent (its own free run from the first test point: the dropped 0.25·T_test steps as transient, then
20 000 steps — the stretch the other measures compare, not a chaotic transient before it).  Writes
into the run directory ``eval.json``, ``generated.npy`` (in the test data's units), ``attractor.png``,
``spectrum.png`` and ``timeseries.png``.  Several run directories (seeds) evaluated alike are summarised
by median ± MAD per measure, NaN values, diverged runs (non-finite free run) and runs at rest on a fixed
point (:func:`at_rest`) counted.

Which checkpoint: the latest (default), or with ``eval.select=train`` / ``--select train`` the retained
checkpoint whose free runs from three training points come closest (worst-case D_stsp) to the *training*
series — model selection that never sees the test data; ``eval.json["checkpoint"]`` records every
candidate's numbers, ``step`` the evaluated checkpoint and ``latest_step`` how far the run had trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from distdeer import config as config_mod
from distdeer import files
from distdeer import metrics, plots
from distdeer.data import loader, reference, store, systems
from distdeer.models import Model
from distdeer.precision import float32_matmuls
from distdeer.solver import sequential
from distdeer.train import checkpoint

KNOWN_LYAPUNOV = {"lorenz63": 0.9056, "rossler": 0.0714}  # largest exponents per time unit (literature)
PE_STEPS = 20
SIGMA = 20.0
N_BINS = 30
LYAPUNOV_STEPS = 20_000
SELECTIONS = config_mod.CHOICES["eval.select"]
SELECT_MAX_T = 100_000  # training steps a candidate checkpoint is compared with (eval.select=train)
SELECT_STARTS = 3  # free runs per candidate, from evenly spaced training points


class EvalError(ValueError):
    """A run directory or test file that cannot be evaluated."""


def load_run(run_dir: str, step: int | None = None):
    """(config, model, params, normalisation, step) of a complete checkpoint of a run: ``step``, or the
    latest when None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise EvalError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_mod.load(path)
    with open(os.path.join(run_dir, "normalisation.json")) as f:
        norm = json.load(f)
    mngr = checkpoint.manager(checkpoint.location(cfg), cfg.checkpoint.keep)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise EvalError(f"{run_dir} has no complete checkpoint to evaluate")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise EvalError(f"{run_dir} has no checkpoint at step {step} (retained: {sorted(steps)})")
        model = Model.from_config(cfg.model, len(norm["mean"]))
        # concrete arrays on this process's default device: the restore lays the parameters out there, whatever
        # devices and processes the run was saved from
        params = checkpoint.restore_params(mngr, step, model.init(jax.random.PRNGKey(0)))
    finally:
        mngr.close()
    return cfg, model, params, norm, step


def retained_steps(run_dir: str) -> list[int]:
    """The steps of a run's complete checkpoints, ascending (``checkpoint.keep`` bounds how many)."""
    cfg = config_mod.load(os.path.join(run_dir, "config.yaml"))
    mngr = checkpoint.manager(checkpoint.location(cfg), cfg.checkpoint.keep)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def test_series(cfg, norm: dict, path: str | None) -> tuple[np.ndarray, str, str]:
    """Test observations in the *training* standardisation, (T_test, N) float32; their source (a real
    path, or ``generated:...``); and :func:`content_digest` of the observations in their own units.
    Without a path, a fresh clean trajectory of the configured system (another seed, ``eval.test_steps``
    long) is generated."""
    mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
    if path is None:
        if cfg.data.path is not None:
            raise EvalError("the run trained on a file and sets no eval.data: pass the test series with --data")
        steps = cfg.data.steps if cfg.eval.test_steps is None else cfg.eval.test_steps
        raw = np.asarray(systems.generate(cfg.data.system, steps, cfg.data.dt, 0.0, cfg.data.seed + 1000), np.float64)
        source = f"generated:{cfg.data.system}:seed{cfg.data.seed + 1000}"
    else:
        named = path
        path = reference.resolve(path)
        if not os.path.exists(path):
            raise EvalError(f"test data {path} not found")
        raw = store.read_data_units(path)
        source = named if named.startswith(reference.PREFIX) else os.path.realpath(path)
    if raw.shape[1] != len(mean):
        raise EvalError(f"test data has {raw.shape[1]} dimensions, the model observes {len(mean)}")
    return ((raw - mean) / std).astype(np.float32), source, content_digest(raw)


def content_digest(raw: np.ndarray) -> str:
    """SHA-256 of a series' values (as float64, with its shape): two files holding the same test series —
    a copy elsewhere, or the same values as .npy and .zarr — are the same test data for a summary."""
    raw = np.ascontiguousarray(raw, np.float64)
    return hashlib.sha256(repr(raw.shape).encode() + raw.tobytes()).hexdigest()


def free_run(model: Model, params, x0, steps: int) -> np.ndarray:
    """Observations (steps, N) of the model running freely from the state inferred from ``x0``."""
    z0 = model.initial_state(params, jnp.asarray(x0))
    states = jax.jit(lambda p, z: sequential(lambda q, v, _: model.F(q["F"], v), p, z, jnp.zeros((steps, 0))))(
        params, z0)
    return np.asarray(model.observe(params, states))


def n_step_predictions(model: Model, params, x_starts: np.ndarray, n: int) -> np.ndarray:
    """From every start observation: infer the state, run n steps, observe."""
    def one(x0):
        z = model.initial_state(params, x0)
        z = jax.lax.fori_loop(0, n, lambda _, v: model.F(params["F"], v), z)
        return model.observe(params, z)

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x_starts)))


def largest_lyapunov(model: Model, params, x0, transient: int, steps: int = LYAPUNOV_STEPS) -> float:
    """Largest Lyapunov exponent per step: mean log growth of a tangent vector renormalised each step,
    over ``steps`` steps of the free run from ``x0`` after ``transient`` steps."""
    z0 = model.initial_state(params, jnp.asarray(x0))

    def body(carry, _):
        z, v = carry
        # J v by one forward-mode pass: no M × M Jacobian (an LRU's has M in the hundreds)
        z_next, w = jax.jvp(lambda u: model.F(params["F"], u), (z,), (v,))
        g = jnp.linalg.norm(w)
        return (z_next, w / g), jnp.log(g)

    @jax.jit
    def run(z0):
        z = jax.lax.fori_loop(0, transient, lambda _, v: model.F(params["F"], v), z0)
        v = jnp.ones_like(z) / jnp.sqrt(z.shape[0])
        return jnp.mean(jax.lax.scan(body, (z, v), None, length=steps)[1])

    return float(run(z0))


def _series_attributes(cfg) -> dict:
    """What the training series says about itself: the attributes ``distdeer data generate`` stores
    with a .zarr series (``system``, ``dt``, …); {} for a generated run, a .npy/.csv file or a lost file."""
    if cfg.data.path is None:
        return {}
    try:
        return store.attributes(store.open_series(reference.resolve(cfg.data.path)))
    except store.DataError:
        return {}


def sampling_interval(cfg) -> float | None:
    """Time units per step: ``data.dt`` (set for every generated run), else the series' ``dt`` attribute;
    None when unknown (an imported file without ``data.dt``)."""
    return cfg.data.dt if cfg.data.dt is not None else _series_attributes(cfg).get("dt")


def reference_lyapunov(cfg) -> float | None:
    """The data system's largest exponent per time unit: ``eval.lyapunov_reference`` if set, else the
    literature value of a generated system — ``data.system``, or the ``system`` attribute that
    ``distdeer data generate`` stores with a .zarr series; None when unknown."""
    if cfg.eval.lyapunov_reference is not None:
        return cfg.eval.lyapunov_reference
    system = cfg.data.system if cfg.data.path is None else _series_attributes(cfg).get("system")
    return KNOWN_LYAPUNOV.get(system)


def headline(res: dict) -> str:
    """One line of an evaluation's measures (the CLI prints it)."""
    lyap = res["lyapunov_max"]
    ref = lyap["system_reference_per_time_unit"]
    return (f"D_stsp {res['D_stsp']['value']:.3f} ({res['D_stsp']['variant']})  "
            f"D_H(σ={res['D_H']['sigma']:g}) {res['D_H']['value']:.3f}  "
            + (f"D_slow {res['D_slow']['value']:.3f}  " if "D_slow" in res else "")
            + f"PE({res['PE']['n']}) {res['PE']['value']:.4f}  λ_max "
            + (f"{lyap['per_step']:.4f} per step (set data.dt for per time unit)" if lyap["per_time_unit"] is None
               else f"{lyap['per_time_unit']:.3f} per time unit")
            + (f" (data system {ref:.3f})" if ref is not None else "")
            + ("  — the free run rests on a fixed point" if res.get("fixed_point", {}).get("value") else ""))


def dropped_steps(T: int) -> int:
    """The protocol's transient: the first 0.25·T steps of the free run, dropped before comparing."""
    return T // 4


def protocol_run(model: Model, params, x0, T: int) -> np.ndarray:
    """The reference protocol's generated series of length T: a free run of 1.25·T steps from the
    observation ``x0`` with the first 0.25·T dropped (D_stsp depends on sample size: lengths stay equal)."""
    drop = dropped_steps(T)
    return free_run(model, params, x0, T + drop)[drop:]


REST_TOL = 1e-3  # standardised units: far below any attractor's spread, above float32 jitter at rest


def at_rest(gen: np.ndarray, tol: float = REST_TOL) -> dict:
    """Whether the free run ``gen`` (T, N, standardised) rests on a fixed point: the largest standard
    deviation over its last quarter of any channel, ``spread``, is below ``tol``.  The measures score a
    fixed point as a finite failure (a flat spectrum), often better than a live model with the wrong rhythm,
    so a summary must be able to say how many of its runs stopped moving.  A diverged run is not at rest."""
    tail = np.asarray(gen[-max(1, len(gen) // 4):], np.float64)
    finite = bool(np.all(np.isfinite(tail)))
    spread = float(np.max(np.std(tail, axis=0))) if finite else float("nan")
    return {"value": finite and spread < tol, "spread": spread, "tol": tol, "over": "last quarter"}


def divergences(x_ref: np.ndarray, gen: np.ndarray) -> dict:
    """D_stsp (binning for N < 6, the Gaussian-mixture variant otherwise) and D_H (σ = 20) of ``gen``
    against ``x_ref``, each with its variant and parameters."""
    if x_ref.shape[1] < 6:
        stsp = {"value": metrics.state_space_divergence(x_ref, gen, n_bins=N_BINS), "variant": "binning",
                "n_bins": N_BINS}
    else:
        stsp = {"value": metrics.state_space_divergence_gmm(x_ref, gen), "variant": "gmm",
                "scaling": 1.0, "max_t": 10_000, "mc_samples": 1000, "seed": 0}
    return {"D_stsp": stsp, "D_H": {"value": metrics.power_spectrum_distance(x_ref, gen, SIGMA), "sigma": SIGMA}}


def slow_scale(cfg, x_ref: np.ndarray, gen: np.ndarray) -> dict:
    """D_slow of ``gen`` against ``x_ref`` with the run's ``eval.slow_block`` / ``eval.slow_sigma``; {} when
    the config measures no slow scale."""
    block = cfg.eval.slow_block
    if block is None:
        return {}
    return {"D_slow": {"value": metrics.slow_scale_distance(x_ref, gen, block, cfg.eval.slow_sigma),
                       "block": block, "sigma": cfg.eval.slow_sigma}}


def selection_rank(candidate: dict) -> tuple:
    """Order of preference among checkpoints: lower worst-case D_stsp over the starts; where that is NaN
    (some free run left the data's box or diverged) after every finite one, ranked by worst-case D_H;
    then the later step."""
    finite = lambda v: v if np.isfinite(v) else float("inf")  # noqa: E731
    return finite(candidate["D_stsp"]), finite(candidate["D_H"]), -candidate["step"]


def training_divergences(model: Model, params, x_train: np.ndarray, starts: int = SELECT_STARTS) -> dict:
    """D_stsp and D_H against the training series ``x_train`` (T, N) of free runs started at ``starts``
    evenly spaced training points (the first among them), each the reference protocol's length (1.25·T,
    the first 0.25·T dropped).  A model with several attractors can reach a good one from one start and a
    poor one (or none) from another, and the test protocol starts wherever the test series does, so each
    measure is the worst over the starts (NaN when any run left the box or diverged)."""
    T = len(x_train)
    per_start = []
    for i in range(starts):
        gen = protocol_run(model, params, x_train[i * T // starts], T)
        if np.all(np.isfinite(gen)):
            d = divergences(x_train, gen)
            per_start.append((d["D_stsp"]["value"], d["D_H"]["value"]))
        else:  # diverged
            per_start.append((float("nan"), float("nan")))
    worst = lambda vals: float("nan") if not np.all(np.isfinite(vals)) else float(np.max(vals))  # noqa: E731
    return {"D_stsp": worst([a for a, _ in per_start]), "D_H": worst([b for _, b in per_start]),
            "per_start": [{"start": i * T // starts, "D_stsp": a, "D_H": b} for i, (a, b) in enumerate(per_start)]}


def select_checkpoint(run_dir: str) -> dict:
    """Choose among a run's retained checkpoints without looking at the test data: each one is scored by
    :func:`training_divergences` on the training series (its first ``SELECT_MAX_T`` steps) and the best
    by :func:`selection_rank` is chosen.  Returns ``{"by", "steps_compared", "starts", "chosen",
    "candidates"}`` with every candidate's numbers."""
    cfg = config_mod.load(os.path.join(run_dir, "config.yaml"))
    try:
        source = loader.open_source(cfg)
        x_train = np.asarray(source.rows(0, min(source.shape[0], SELECT_MAX_T)), np.float32)
    except store.DataError as e:
        raise EvalError(f"eval.select=train needs the run's training series: {e}") from None
    candidates = []
    for step in retained_steps(run_dir):
        _, model, params, _, _ = load_run(run_dir, step)
        candidates.append({"step": step, **training_divergences(model, params, x_train)})
    return {"by": "worst D_stsp over free runs from evenly spaced training points, against the training series",
            "steps_compared": len(x_train), "starts": SELECT_STARTS,
            "chosen": min(candidates, key=selection_rank)["step"], "candidates": candidates}


@float32_matmuls  # distdeer/precision.py: free runs compute what a CPU computes
def evaluate(run_dir: str, data: str | None = None, figures: bool = True, select: str | None = None) -> dict:
    """The reference protocol on one run (see the module docstring).  ``data``: the test series; None:
    the run's ``eval.data``.  ``select``: which checkpoint — ``latest``, or ``train``
    (:func:`select_checkpoint`); None: the run's ``eval.select``."""
    cfg, model, params, norm, latest = load_run(run_dir)
    step = latest
    select = cfg.eval.select if select is None else select
    if select not in SELECTIONS:
        raise EvalError(f"unknown checkpoint selection {select!r} (choose from {', '.join(SELECTIONS)})")
    # The test series is read before the selection (minutes) so that a missing one fails at once.
    x_test, source, digest = test_series(cfg, norm, cfg.eval.data if data is None else data)
    if cfg.eval.slow_block is not None and len(x_test) < metrics.MIN_BLOCKS * cfg.eval.slow_block:
        raise EvalError(f"eval.slow_block {cfg.eval.slow_block}: the test series' {len(x_test)} steps hold fewer "
                        f"than {metrics.MIN_BLOCKS} blocks")
    selection = select_checkpoint(run_dir) if select == "train" else None
    if selection is not None and selection["chosen"] != latest:
        _, model, params, _, step = load_run(run_dir, selection["chosen"])
    T = len(x_test)
    drop = dropped_steps(T)
    gen = protocol_run(model, params, x_test[0], T)
    # latest_step: how far the run had trained (``step`` is the evaluated checkpoint, earlier when selected)
    res = {"run_dir": os.path.abspath(run_dir), "step": step, "latest_step": latest,
           "test_data": source, "test_data_sha256": digest,
           "T_test": T,
           "protocol": {"free_run_steps": T + drop, "dropped": drop, "start": "first test point"},
           "diverged": not bool(np.all(np.isfinite(gen))), "fixed_point": at_rest(gen)}
    res.update(divergences(x_test, gen))
    res.update(slow_scale(cfg, x_test, gen))
    res["PE"] = {"value": metrics.prediction_error(lambda xs, n: n_step_predictions(model, params, xs, n),
                                                   x_test, PE_STEPS), "n": PE_STEPS, "units": "standardised"}
    lyap = largest_lyapunov(model, params, x_test[0], transient=drop)
    dt = sampling_interval(cfg)
    res["lyapunov_max"] = {"per_step": lyap, "per_time_unit": None if dt is None else lyap / dt, "dt": dt,
                           "system_reference_per_time_unit": reference_lyapunov(cfg),
                           "steps": LYAPUNOV_STEPS, "transient": drop}
    res["checkpoint"] = {"select": select, **({"selection": selection} if selection else {})}
    mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
    np.save(os.path.join(run_dir, "generated.npy"), (gen * std + mean).astype(np.float32))
    if figures:
        plots.attractor_figure(x_test, gen, os.path.join(run_dir, "attractor.png"),
                               f"D_stsp {res['D_stsp']['value']:.3f}  D_H {res['D_H']['value']:.3f}")
        plots.spectrum_figure(metrics.smoothed_spectra(x_test, SIGMA), metrics.smoothed_spectra(gen, SIGMA),
                              os.path.join(run_dir, "spectrum.png"))
        plots.timeseries_figure(x_test, gen, os.path.join(run_dir, "timeseries.png"))
        if "D_slow" in res and not res["diverged"]:
            block = cfg.eval.slow_block
            plots.envelope_figure(metrics.block_features(x_test, block), metrics.block_features(gen, block), block,
                                  os.path.join(run_dir, "slow.png"))
    # Written last and atomically: an eval.json present is a complete evaluation (a sweep reuses it).
    files.write_atomic(os.path.join(run_dir, "eval.json"), json.dumps(res, indent=2))
    return res


def summary_path(run_dirs: list[str]) -> str:
    """Where a summary of ``run_dirs`` goes by default: ``<base>-summary.json`` for a sweep's runs
    ``<base>-seed<k>`` (the name ``distdeer sweep`` gives them), else ``summary.json`` in their common
    parent directory."""
    dirs = [os.path.abspath(d).rstrip(os.sep) for d in run_dirs]
    bases = {re.sub(r"-seed\d+$", "", d) for d in dirs}
    if len(bases) == 1 and all(re.search(r"-seed\d+$", d) for d in dirs):
        return f"{bases.pop()}-summary.json"
    return os.path.join(os.path.commonpath(dirs), "summary.json")


def write_summary(results: list[dict], path: str | None = None) -> str:
    """Summarise ``results`` into ``path`` (default :func:`summary_path`), print the numbers, return the path."""
    summary = summarise(results)
    path = path or summary_path([r["run_dir"] for r in results])
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "protocol")}, indent=1))
    print(f"distdeer: summary written to {path}")
    return path


def summarise(results: list[dict]) -> dict:
    """Median ± MAD per measure over runs (seeds) evaluated alike; NaN values are counted, not averaged,
    and so are diverged runs (a non-finite free run).  Runs evaluated on different test data or with
    different measure parameters are refused (EvalError): their numbers do not compare.  Test data are
    compared by content (``test_data_sha256``) when every run recorded it, else by real path (eval.json
    files written before the digest; older ones may hold a relative path)."""
    by_content = all("test_data_sha256" in r for r in results)

    def real(data):
        return data if data.startswith("generated:") else os.path.realpath(data)

    def protocol(r):
        data = {"test_data_sha256": r["test_data_sha256"]} if by_content else {"test_data": real(r["test_data"])}
        return {**data, "T_test": r["T_test"],
                "D_stsp": {k: v for k, v in r["D_stsp"].items() if k != "value"},
                "D_H": {k: v for k, v in r["D_H"].items() if k != "value"},
                "PE": {k: v for k, v in r["PE"].items() if k != "value"},
                **({"D_slow": {k: v for k, v in r["D_slow"].items() if k != "value"}} if "D_slow" in r else {})}

    first = protocol(results[0])
    for r in results[1:]:
        if protocol(r) != first:
            raise EvalError(f"{r['run_dir']} was evaluated differently from {results[0]['run_dir']} "
                            f"(test data or measure parameters); evaluate them on the same --data")
    out = {"runs": [r["run_dir"] for r in results],
           "protocol": {"test_data": real(results[0]["test_data"]), **first},
           "diverged_runs": sum(bool(r.get("diverged", False)) for r in results)}
    if all("fixed_point" in r for r in results):  # eval.json files written before the flag lack it
        out["fixed_point_runs"] = sum(bool(r["fixed_point"]["value"]) for r in results)
    values = {key: [r[key]["value"] for r in results] for key in ("D_stsp", "D_H", "D_slow", "PE")
              if key in results[0]}  # D_slow: in every run or none (their protocols are equal)
    values["lyapunov_max_per_step"] = [r["lyapunov_max"]["per_step"] for r in results]
    if all(r["lyapunov_max"].get("per_time_unit") is not None for r in results):
        values["lyapunov_max_per_time_unit"] = [r["lyapunov_max"]["per_time_unit"] for r in results]
    for key, vals in values.items():
        vals = np.array(vals, np.float64)
        ok = vals[np.isfinite(vals)]
        med = float(np.median(ok)) if len(ok) else float("nan")
        out[key] = {"median": med, "mad": float(np.median(np.abs(ok - med))) if len(ok) else float("nan"),
                    "n": len(vals), "nan_runs": int((~np.isfinite(vals)).sum()), "values": vals.tolist()}
    return out
