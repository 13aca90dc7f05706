"""Long time scales: whole series against the best of three window arms at equal wall time
(docs/results.md, "Long time scales: where the whole series wins").

    python launch/analysis/timescales.py data  OUT                          # every case's series
    python launch/analysis/timescales.py probe OUT CASE                     # each arm's seconds per update
    python launch/analysis/timescales.py run   OUT CASE SEEDS --arms whole --whole-steps S
    python launch/analysis/timescales.py run   OUT CASE SEEDS --arms win200,win1000,carried,win200-equal
    python launch/analysis/timescales.py floor OUT [CASE,…]                 # true series against the test series
    python launch/analysis/timescales.py table OUT [CASE,…]                 # OUT/summary.json and the rows
    python launch/analysis/timescales.py decode OUT                         # the slow variable in the forced rows
    python launch/analysis/timescales.py push OUT CASE SEEDS                # each loss's gradient on the memories
    python launch/analysis/timescales.py ceiling OUT                        # the ratio a perfect model can reach

Cases: ``bursting`` (Hindmarsh–Rose, the membrane potential alone, delay-embedded), ``membrane`` (the same
potential not embedded: the adaptation z left to unforced units; ``membrane1m``: the same on 10^6 steps), ``drive`` (slow–fast,
drive observed), ``hidden`` (slow–fast, drive hidden), ``control`` (Hindmarsh–Rose, all variables), and for
the diagnosis ``oscillator`` (the drive u alone).  ``--variant`` adds the same overrides to every arm
(``-slow``: slowly decaying unforced units; ``-free``/``-free0``: no forcing, α = 0, with / without them;
``-a1e-3``, ``-a1e-2``: weak constant forcing; ``-lin-…``: the same with a linear ALRNN).  Each
case trains on one noisy series (seed 0) and is tested on one clean series (seed 1, ≥ 10 slow periods), the
same files for every arm and seed.  Arms: the case's config as it stands (whole series, GTF-DEER) and
windows of 200, windows of 1000, carried windows of 200 (GTF-BPTT through lax.scan, 16 per update), and
(since 2026-12-06, after ``push`` measured why windows lose the slow units) windows of 200 after a 1000-step
burn-in (``train.burn_in``); no arm is tuned.  Equal wall time: the whole series runs ``--whole-steps`` updates first (its seconds per update vary
with the Newton iterations); each window arm then gets ``train.steps`` = the whole series' measured training
time ÷ the arm's probed seconds per update (steady: no Newton solve), so that the learning-rate and α
schedules span its run, as for any run of that length.  ``win200-equal`` gives windows of 200 the whole
series' number of updates.  Runs go two at a time, each pinned to one core (``taskset``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from lru_compare import fixed_point, median_mad, pool  # noqa: E402

WINDOWS = ["train.batch=16", "solver.kind=sequential"]
ARMS = {"whole": [], "win200": ["train.seq_len=200", *WINDOWS], "win1000": ["train.seq_len=1000", *WINDOWS],
        "carried": ["train.seq_len=200", "train.carry=true", *WINDOWS],
        # windows of 200 that start from the end of a 1000-step forced run (no gradient) before them
        "burn": ["train.seq_len=200", "train.burn_in=1000", *WINDOWS]}
# case: (config, train file, test file, overrides)
CASES = {"bursting": ("configs/bursting-membrane.yaml", "hr/train.zarr", "hr/test.zarr", []),
         "drive": ("configs/slowfast-drive.yaml", "sfd/train.zarr", "sfd/test.zarr", []),
         "hidden": ("configs/slowfast.yaml", "sf/train.zarr", "sf/test.zarr", []),
         "control": ("configs/bursting.yaml", "hrc/train.zarr", "hrc/test.zarr", []),
         # the membrane potential alone, not embedded: z is left to the unforced units
         "membrane": ("configs/bursting-raw.yaml", "hrr/train.zarr", "hrr/test.zarr", []),
         # the same, trained on 10^6 steps (the 10^5-step series extended: same seed, same noise level)
         "membrane1m": ("configs/bursting-raw.yaml", "hrr1m/train.zarr", "hrr/test.zarr", []),
         # diagnosis: the drive u alone (a noisy harmonic of period 20 000 steps), one observed unit + 2 free
         "oscillator": ("configs/slowfast-drive.yaml", "osc/train.zarr", "osc/test.zarr",
                        ["model.latent=3", "data.dt=0.01"])}
# the channel whose block mean follows the slow variable: u (drive observed), z (ρ = 28 + 10u lifts z), the
# membrane potential (bursts raise its mean) — in the embedding its current value
SLOW_CHANNEL = {"bursting": 0, "membrane": 0, "membrane1m": 0, "drive": 3, "hidden": 2, "control": 0, "oscillator": 0}
# a change tested the same way as the plain arms (run dirs ARM+VARIANT-seedS): name -> overrides for every arm
VARIANTS = {"": [], "-slow": ["model.unforced_timescale=100000"],
            # no forcing at all: the loss is the free run's, over the whole series or each window
            "-free": ["gtf.mode=constant", "gtf.alpha=0.0", "model.unforced_timescale=100000"],
            "-free0": ["gtf.mode=constant", "gtf.alpha=0.0"],
            # weak constant forcing: the loss looks ~1/α steps ahead
            "-a1e-3": ["gtf.mode=constant", "gtf.alpha=0.001"], "-a1e-2": ["gtf.mode=constant", "gtf.alpha=0.01"],
            # a linear model (ALRNN without ReLU units): it holds a rotation exactly
            "-lin-a1e-3": ["gtf.mode=constant", "gtf.alpha=0.001", "model.kind=alrnn", "model.nonlinear=0"],
            "-lin-a1e-2": ["gtf.mode=constant", "gtf.alpha=0.01", "model.kind=alrnn", "model.nonlinear=0"],
            # a floor under the adaptive α (tried on the runs whose α collapsed without it)
            "-floor": ["gtf.alpha_min=0.1"]}
PROBE_STEPS = {"whole": 40, "win200": 1500, "win1000": 400, "carried": 1500, "burn": 600}


def sh(*cmd):
    subprocess.run(cmd, check=True)


def data(out):
    """The series: training seed 0 with 5 % noise, test seed 1 clean."""
    def gen(system, steps, noise, seed, path, dt):
        if not os.path.exists(path):
            sh("distdeer", "data", "generate", system, "--steps", str(steps), "--dt", str(dt), "--noise", str(noise),
               "--seed", str(seed), "--out", path)

    o = lambda p: os.path.join(out, p)  # noqa: E731
    for d in ("hr", "sfd", "sf", "hrc", "osc", "hrr", "hrr1m"):
        os.makedirs(o(d), exist_ok=True)
    gen("slowfast_drive", 100_000, 0.05, 0, o("sfd/train.zarr"), 0.01)
    gen("slowfast_drive", 200_000, 0.0, 1, o("sfd/test.zarr"), 0.01)
    gen("slowfast", 100_000, 0.05, 0, o("sf/train.zarr"), 0.01)
    gen("slowfast", 200_000, 0.0, 1, o("sf/test.zarr"), 0.01)
    gen("hindmarsh_rose", 100_000, 0.05, 0, o("hrc/train.zarr"), 0.05)
    gen("hindmarsh_rose", 100_000, 0.0, 1, o("hrc/test.zarr"), 0.05)
    gen("hindmarsh_rose", 1_000_000, 0.05, 0, o("hrc/train1m.zarr"), 0.05)
    if not os.path.exists(o("hr/train.zarr")):
        sh("distdeer", "data", "embed", o("hrc/train.zarr"), "--channel", "0", "--out", o("hr/train.zarr"))
        sh("distdeer", "data", "embed", o("hrc/test.zarr"), "--channel", "0", "--like", o("hr/train.zarr"),
           "--out", o("hr/test.zarr"))
    for name in ("train", "test"):  # the membrane potential alone: a dimension-1 embedding keeps channel 0
        if not os.path.exists(o(f"hrr/{name}.zarr")):
            sh("distdeer", "data", "embed", o(f"hrc/{name}.zarr"), "--channel", "0", "--lag", "1", "--dim", "1",
               "--out", o(f"hrr/{name}.zarr"))
    if not os.path.exists(o("hrr1m/train.zarr")):
        sh("distdeer", "data", "embed", o("hrc/train1m.zarr"), "--channel", "0", "--lag", "1", "--dim", "1",
           "--out", o("hrr1m/train.zarr"))
    from distdeer.data import store

    for name in ("train", "test"):  # the oscillator: the drive channel u of the slow–fast series
        if not os.path.exists(o(f"osc/{name}.zarr")):
            np.save(o(f"osc/{name}.npy"), store.read_data_units(o(f"sfd/{name}.zarr"))[:, 3:4])
            sh("distdeer", "data", "import", o(f"osc/{name}.npy"), "--out", o(f"osc/{name}.zarr"))


def command(out, case, arm, seed, steps, run_dir, core, variant=""):
    cfg, train_file, test_file, extra = CASES[case]
    return ["taskset", "-c", str(core), "distdeer", "train", cfg, f"run.dir={run_dir}", f"seed={seed}",
            f"data.path={os.path.join(out, train_file)}", f"eval.data={os.path.join(out, test_file)}",
            f"train.steps={steps}", f"train.log_every={max(1, steps // 200)}",
            f"checkpoint.every={max(1, steps // 4)}", *extra, *ARMS[arm.removesuffix("-equal")], *VARIANTS[variant]]


def probe_one(out, case, arm, core):
    d = os.path.join(out, "probe", f"{case}-{arm}")
    if not os.path.exists(os.path.join(d, "metrics.jsonl")):
        cmd = command(out, case, arm, 0, PROBE_STEPS[arm], d, core) + ["eval.at_end=false"]
        with open(d + ".log", "w") as log:
            subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def seconds_per_update(out, case, arm):
    """Median step time of the probe's logged rows after the first (the first holds compilation)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "probe", f"{case}-{arm}", "metrics.jsonl"))]
    return float(np.median([r["step_time_s"] for r in rows[1:]]))


def run_one(out, case, arm, seed, whole_steps, variant, core):
    d = os.path.join(out, case, f"{arm}{variant}-seed{seed}")
    if os.path.exists(os.path.join(d, "eval.json")):
        return
    whole = os.path.join(out, case, f"whole{variant}-seed{seed}", "metrics.jsonl")
    if arm == "whole":
        steps = whole_steps
    else:
        while not os.path.exists(os.path.join(os.path.dirname(whole), "eval.json")):
            time.sleep(10)  # the whole series of this seed is still training on the other core
        last = json.loads(open(whole).read().splitlines()[-1])  # the whole series' run of this seed
        steps = last["step"] if arm == "win200-equal" else \
            max(1, int(last["elapsed_s"] / seconds_per_update(out, case, arm.removesuffix("-equal"))))
    t = time.time()
    os.makedirs(os.path.dirname(d), exist_ok=True)
    with open(d + ".log", "w") as log:
        rc = subprocess.call(command(out, case, arm, seed, steps, d, core, variant), stdout=log,
                             stderr=subprocess.STDOUT)
    with open(d + ".wall.json", "w") as f:
        json.dump({"rc": rc, "wall_s_with_eval": time.time() - t, "steps": steps, "core": core}, f)
    print(f"{case} {arm}{variant} seed {seed}: rc {rc}, {steps} steps, {time.time() - t:.0f} s", flush=True)


def case_test(out, case):
    """(the config's ``eval.slow_block``, the case's test series standardised by its training series' mean and
    standard deviation (T, N), the training series' attributes)."""
    import yaml

    from distdeer.data import store

    cfg_path, train_file, test_file, _ = CASES[case]
    attrs = store.attributes(store.open_series(os.path.join(out, train_file)))
    test = (store.read_data_units(os.path.join(out, test_file)) - np.asarray(attrs["mean"])) / np.asarray(attrs["std"])
    return yaml.safe_load(open(cfg_path))["eval"]["slow_block"], test, attrs


def floor(out, seeds=(2, 3, 4, 5), cases=None):
    """Each case's measures between its test series and independent clean series of the same length (other
    seeds; a slow–fast drive started at a random phase, as a model's free run has one): the floor and spread
    the arms' numbers compare with.  Writes OUT/floor.json."""
    import jax
    import jax.numpy as jnp

    from distdeer import metrics
    from distdeer.data import embed, systems
    from distdeer.eval import divergences

    rng = np.random.default_rng(0)
    path = os.path.join(out, "floor.json")
    res = json.load(open(path)) if cases and os.path.exists(path) else {}
    for case in CASES:
        if case == "oscillator" or (cases and case not in cases):
            continue  # a harmonic: any two series of it agree up to their phase
        block, test, attrs = case_test(out, case)
        mean, std = np.asarray(attrs["mean"]), np.asarray(attrs["std"])
        rows = []
        for seed in seeds:
            if case in ("drive", "hidden"):
                p = rng.uniform(0, 2 * np.pi)
                x0 = jnp.array([1.0, 1.0, 20.0, np.cos(p), np.sin(p)])
                x0 = x0.at[:3].add(0.1 * jax.random.normal(jax.random.PRNGKey(seed), (3,)))
                raw = np.asarray(systems.integrate(systems.slowfast_field, x0, len(test), 0.01, transient=2000))
                raw = raw[:, :4 if case == "drive" else 3]
            else:
                emb = attrs.get("embedding")
                steps = len(test) + (0 if emb is None else (emb["dim"] - 1) * emb["lag"])
                raw = np.asarray(systems.generate("hindmarsh_rose", steps, 0.05, 0.0, seed), np.float64)
                if emb is not None:
                    raw = embed.delay_embed(raw[:, emb["channel"]], emb["lag"], emb["dim"])
            x = (raw - mean) / std
            d = divergences(test, x)
            rows.append({"seed": seed, "D_stsp": d["D_stsp"]["value"], "D_H": d["D_H"]["value"],
                         "D_slow": metrics.slow_scale_distance(test, x, block)})
        res[case] = {"rows": rows, **{k: median_mad([r[k] for r in rows]) for k in ("D_stsp", "D_H", "D_slow")}}
        print(case, {k: res[case][k] for k in ("D_stsp", "D_H", "D_slow")}, flush=True)
    json.dump(res, open(path, "w"), indent=1)


def ceiling(out):
    """The largest ratio the target can see when a window arm rests on a fixed point: D_slow of a constant
    free run (at several levels: a fixed point scores the same wherever it lies) against each case's test
    series, divided by the case's floor (OUT/floor.json: test vs independent true series).  A model as good
    as the truth scores about the floor, so (fixed point) / floor bounds "whole ÷ best window" from above
    whenever the best window arm is a fixed point.  Writes OUT/ceiling.json."""
    from distdeer import metrics

    floors = json.load(open(os.path.join(out, "floor.json")))
    res = {}
    for case in CASES:
        if case not in floors:
            continue
        block, test, _ = case_test(out, case)
        fixed = [metrics.slow_scale_distance(test, np.full_like(test, level), block) for level in (-1.0, 0.0, 1.0)]
        pairs = [r["D_slow"] for r in floors[case]["rows"]]
        res[case] = {"fixed_point": fixed, "floor_median": floors[case]["D_slow"]["median"],
                     "floor_pairs": pairs, "ceiling_at_median": fixed[1] / floors[case]["D_slow"]["median"],
                     "ceiling_range": [fixed[1] / max(pairs), fixed[1] / min(pairs)]}
        print(case, {k: (np.round(v, 3).tolist() if not isinstance(v, float) else round(v, 3)) for k, v in res[case].items()},
              flush=True)
    json.dump(res, open(os.path.join(out, "ceiling.json"), "w"), indent=1)


def history_features(x, k, lags=8):
    """Features of the last ``k`` steps of ``x`` (T, C) at every t ≥ k − 1: the values at ``lags`` lags
    spread over [0, k − 1], their squares and products within a lag, and the mean of each channel and of its
    square over the k steps → (T − k + 1, F)."""
    T, C = x.shape
    rows = []
    for j in np.unique(np.linspace(0, k - 1, min(k, lags)).astype(int)):
        v = x[k - 1 - j:T - j]
        rows += [v] + [v[:, a:a + 1] * v[:, a:] for a in range(C)]
    for w in (x, x ** 2):
        c = np.concatenate([np.zeros((1, C)), np.cumsum(w, axis=0)])
        rows.append((c[k:] - c[:-k]) / k)
    return np.concatenate(rows, axis=1)


def decode_r2(x, target, k, ridge=1e-3):
    """R² on the last 30 % of a ridge regression of ``target`` (T,) on ``history_features(x, k)``, fitted on
    the first 70 %: how much of the slow variable the last k forced observations already tell."""
    f = history_features(x, k)
    f = (f - f.mean(0)) / (f.std(0) + 1e-12)
    return held_out_r2(np.concatenate([f, np.ones((len(f), 1))], axis=1), target[k - 1:], ridge)


def held_out_r2(f, y, ridge=0.0):
    """R² on the last 30 % of a (ridge-)regression of ``y`` (T,) on the features ``f`` (T, F) fitted on the
    first 70 %: ``ridge`` × (fitted rows) on the diagonal of the normal equations (least squares at 0)."""
    n = int(0.7 * len(f))
    if ridge:
        w = np.linalg.solve(f[:n].T @ f[:n] + ridge * n * np.eye(f.shape[1]), f[:n].T @ y[:n])
    else:
        w = np.linalg.lstsq(f[:n], y[:n], rcond=None)[0]
    return float(1.0 - np.var(y[n:] - f[n:] @ w) / np.var(y[n:]))


def decode(out, histories=(1, 10, 30, 100, 300, 1000, 3000)):
    """How long a history of the forced channels a model needs to know the hidden slow variable: R² of the
    clean slow variable (the drive u; the adaptation current z) decoded from the last k steps of the noisy
    observed channels that the training forces (x, y, z; the membrane potential).  Writes OUT/decode.json."""
    from distdeer.data import store

    o = lambda p: os.path.join(out, p)  # noqa: E731
    os.makedirs(o("clean"), exist_ok=True)
    for system, dt, name in (("slowfast_drive", 0.01, "sfd"), ("hindmarsh_rose", 0.05, "hrc")):
        if not os.path.exists(o(f"clean/{name}.zarr")):  # the training series without its noise
            sh("distdeer", "data", "generate", system, "--steps", "100000", "--dt", str(dt), "--noise", "0",
               "--seed", "0", "--out", o(f"clean/{name}.zarr"))
    sf, sf_clean = store.read_data_units(o("sf/train.zarr")), store.read_data_units(o("clean/sfd.zarr"))
    hr, hr_clean = store.read_data_units(o("hrc/train.zarr")), store.read_data_units(o("clean/hrc.zarr"))
    standard = lambda v: (v - v.mean(0)) / v.std(0)  # noqa: E731
    emb = store.read_data_units(o("hr/train.zarr"))  # row r: the membrane potential at r + span, r + span − τ, …
    cases = {"hidden: u from x, y, z": (standard(sf), sf_clean[:, 3]),
             "bursting: z from the membrane potential": (standard(hr[:, :1]), hr_clean[:, 2]),
             "bursting: z from its delay embedding": (standard(emb), hr_clean[len(hr) - len(emb):, 2])}
    res = {name: {k: decode_r2(x, y, k) for k in histories} for name, (x, y) in cases.items()}
    for name, r in res.items():
        print(name, " ".join(f"k={k}: {v:.3f}" for k, v in r.items()), flush=True)
    json.dump(res, open(o("decode.json"), "w"), indent=1)


# case: (its training series, the clean series holding the slow variable, that variable's channel)
SLOW_TRUTH = {"membrane": ("hrr/train.zarr", "clean/hrc.zarr", 2),
              # the 10^6-step run decoded over the first 10^5 steps of its series (the 10^5-step series, up to rounding)
              "membrane1m": ("hrr/train.zarr", "clean/hrc.zarr", 2), "bursting": ("hr/train.zarr", "clean/hrc.zarr", 2),
              "hidden": ("sf/train.zarr", "clean/sfd.zarr", 3), "drive": ("sfd/train.zarr", "clean/sfd.zarr", 3)}


def slow_in_state(out, case, run_dir):
    """R² (held-out last 30 %) of the clean slow variable decoded linearly from the trained model's unforced
    units along its GTF-forced trajectory over the training series at the run's final α: whether the model,
    while forced, carries the slow variable in its own state.  None without unforced units."""
    import jax
    import jax.numpy as jnp

    from distdeer import eval as ev
    from distdeer.data import store
    from distdeer.gtf import ForcedStep

    cfg, model, params, norm, _ = ev.load_run(run_dir)
    N = model.observed
    if model.latent == N or model.readout != "identity":
        return None
    train_file, clean_file, channel = SLOW_TRUTH[case]
    x = (store.read_data_units(os.path.join(out, train_file)) - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    target = store.read_data_units(os.path.join(out, clean_file))[:, channel]
    target = target[len(target) - len(x):]  # an embedding's row r is the time of its newest sample
    alpha = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()[-1])["alpha"]
    x = jnp.asarray(x, jnp.float32)
    step = ForcedStep(model.F, alpha, model.forced_mask(), model.jac, model.jac_diag)
    zhat = model.forcing(params, x)
    states = jax.lax.scan(lambda z, h: (step(params["F"], z, h), z), model.initial_state(params, x[0]), zhat)[1]
    h = np.asarray(states[:, N:], np.float64)
    return held_out_r2(np.concatenate([h, h ** 2, np.ones((len(h), 1))], axis=1), target)


def push(out, case, seeds, batches=100):
    """The gradient each arm's loss puts on the unforced units' memories, at the same parameters.

    Under ``unforced_decay: exp`` unit j's memory is τ_j = −1/log a_j = exp(−ν_j) steps, so
    p_j = ∂L/∂ν_j = −∂L/∂log τ_j: a descent step lengthens the memory where p_j > 0.  Per seed, at the
    initialisation (α = 1), the whole series' retained checkpoints and the last checkpoint of windows of 200
    (each at its logged α), p is taken under the whole series' loss (one solve, float32, converged) and as
    the mean ± standard error over ``batches`` batches of 16 random windows of 200 and of 1000 and of
    "carried" windows of 200 — windows on the grid of 200 that start from the whole series' forced state at
    their first row, with no gradient through it (truncated BPTT with the streams' states at these
    parameters), and "burn1000": windows of 200 after a 1000-step forced run without gradient
    (``train.burn_in``).  Same data (the training series), same loss (the forced MSE); the regulariser, common
    to every arm, is left out.  Besides p, each arm's mean gradient over all parameters: its norm and its
    cosine with the whole series' gradient.  Writes OUT/push-CASE.json (rows of other seeds kept)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from distdeer import config as config_mod
    from distdeer import eval as ev
    from distdeer import mesh as mesh_mod
    from distdeer.data import store
    from distdeer.train import modes

    rows = []
    for seed in seeds:
        whole_dir = os.path.join(out, case, f"whole-seed{seed}")
        win_dir = os.path.join(out, case, f"win200-seed{seed}")
        cfg, model, _, norm, _ = ev.load_run(whole_dir)
        x = (store.read_data_units(cfg.data.path) - np.asarray(norm["mean"])) / np.asarray(norm["std"])
        x = jnp.asarray(x, jnp.float32)
        T = len(x) - 1
        cfg_path = os.path.join(whole_dir, "config.yaml")
        whole_mode = modes.for_config(cfg, model, None, T)
        series = mesh_mod.whole_series_of(x)
        win = {arm: modes.for_config(config_mod.load(cfg_path, ARMS[arm]), model, None, T)
               for arm in ("win200", "win1000", "burn")}
        nu = lambda g: g["F"]["nu"]  # noqa: E731
        flat = lambda g: ravel_pytree(g)[0]  # noqa: E731

        @jax.jit
        def whole_grad(params, alpha):
            def f(p):
                mse, sol, _ = whole_mode.loss(p, alpha, series, whole_mode.initial(p, series), 0)
                return mse, sol
            (mse, sol), g = jax.value_and_grad(f, has_aux=True)(params)
            return mse, flat(g), nu(g), jnp.all(sol.converged), sol.states

        def window_grad(arm):
            mode = win[arm]

            @jax.jit
            def fn(params, alpha, step):
                g = jax.grad(lambda p: mode.loss(p, alpha, x, modes.NoState(), step)[0])(params)
                return flat(g), nu(g)
            return fn

        @jax.jit
        def carried_grad(params, alpha, states, step):
            mode = win["win200"]
            n = T // 200
            j = jax.random.randint(modes.step_key(mode.cfg, step), (16,), 0, n)
            carried = jnp.where((j == 0)[:, None], jnp.nan, states[jnp.maximum(j * 200 - 1, 0)])
            g = jax.grad(lambda p: mode.windows_loss(p, alpha, mode._windows(x, j * 200), step, carried)[0])(params)
            return flat(g), nu(g)

        grads = {arm: window_grad(arm) for arm in win}

        def alpha_at(run_dir, step):
            logged = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
            return min(logged, key=lambda r: abs(r["step"] - step))["alpha"]

        points = [("init", model.init(jax.random.PRNGKey(seed)), cfg.gtf.alpha)]
        points += [(f"whole@{s}", ev.load_run(whole_dir, s)[2], alpha_at(whole_dir, s)) for s in ev.retained_steps(whole_dir)]
        last = ev.retained_steps(win_dir)[-1]
        points.append((f"win200@{last}", ev.load_run(win_dir, last)[2], alpha_at(win_dir, last)))
        for name, params, alpha in points:
            alpha = jnp.float32(alpha)
            mse, g_whole, p_whole, converged, states = whole_grad(params, alpha)
            g_whole = np.asarray(g_whole)
            row = {"seed": seed, "params": name, "alpha": float(alpha), "whole_mse": float(mse),
                   "whole_converged": bool(converged),
                   "memory_steps": [float(v) for v in np.exp(-np.asarray(params["F"]["nu"]))],
                   "whole": [float(v) for v in np.asarray(p_whole)], "whole_grad_norm": float(np.linalg.norm(g_whole))}
            arms = {"win200": lambda k: grads["win200"](params, alpha, k),
                    "win1000": lambda k: grads["win1000"](params, alpha, k),
                    "carried": lambda k: carried_grad(params, alpha, states, k),
                    "burn1000": lambda k: grads["burn"](params, alpha, k)}
            for arm, fn in arms.items():
                out_k = [fn(k) for k in range(batches)]
                full = np.stack([np.asarray(o[0]) for o in out_k]).mean(0)
                g = np.stack([np.asarray(o[1]) for o in out_k])
                row[arm] = [float(v) for v in g.mean(0)]
                row[arm + "_se"] = [float(v) for v in g.std(0, ddof=1) / np.sqrt(batches)]
                # the mean gradient over all parameters: its size and its direction against the whole series'
                row[arm + "_grad_norm"] = float(np.linalg.norm(full))
                row[arm + "_cos_whole"] = float(full @ g_whole / (np.linalg.norm(full) * np.linalg.norm(g_whole)))
            rows.append(row)
            fmt = lambda v: " ".join(f"{e:+.1e}" for e in v)  # noqa: E731
            print(f"seed {seed} {name} α {float(alpha):.3f} τ " + " ".join(f"{t:.0f}" for t in row["memory_steps"]),
                  flush=True)
            for arm in ("whole", "win200", "win1000", "carried", "burn1000"):
                extra = f"  ± {fmt(row[arm + '_se'])}  |g| {row[arm + '_grad_norm']:.1e} cos {row[arm + '_cos_whole']:+.2f}" \
                    if arm != "whole" else f"  |g| {row['whole_grad_norm']:.1e}"
                print(f"   {arm:8s} {fmt(row[arm])}{extra}", flush=True)
    path = os.path.join(out, f"push-{case}.json")  # merged with the rows of other seeds already there
    old = [r for r in json.load(open(path)) if r["seed"] not in seeds] if os.path.exists(path) else []
    with open(path, "w") as f:
        json.dump(old + rows, f, indent=1)
    return rows


def dominant_period(x, block, channel):
    """Steps per cycle of the strongest non-zero frequency of ``x[:, channel]``'s block means (None if flat)."""
    from distdeer.metrics import block_features

    m = block_features(x, block)[:, channel]  # the block means come first
    power = np.abs(np.fft.rfft(m - m.mean())) ** 2
    if not np.all(np.isfinite(power)) or power[1:].max() == 0:
        return None
    return float(len(m) * block / (1 + np.argmax(power[1:])))


def bursts(x, threshold=2.0, gap=600):
    """Spikes of a standardised membrane potential ``x`` (T,): local maxima above ``threshold``; bursts: runs of
    spikes no more than ``gap`` steps apart.  Returns (spikes, bursts, mean steps between burst starts or None)."""
    i = np.flatnonzero((x[1:-1] > threshold) & (x[1:-1] >= x[:-2]) & (x[1:-1] > x[2:])) + 1
    starts = i[np.r_[True, np.diff(i) > gap]] if len(i) else i
    return int(len(i)), int(len(starts)), float(np.mean(np.diff(starts))) if len(starts) > 1 else None


def memories(run_dir):
    """The longest memory, in steps, of the trained model's unforced units: −1/log|μ| for the largest
    eigenvalue modulus μ of their Jacobian block, averaged over the free run's states (every 100th), and of
    their linear weights a alone; None for a model without unforced units."""
    import jax
    import jax.numpy as jnp

    from distdeer import eval as ev

    cfg, model, params, norm, _ = ev.load_run(run_dir)
    N = model.observed
    if model.latent == N or model.readout != "identity":
        return None
    g = (np.load(os.path.join(run_dir, "generated.npy")) - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    z0 = model.initial_state(params, jnp.asarray(g[0], jnp.float32))
    states = jax.lax.scan(lambda v, _: (model.F(params["F"], v), v), z0, None, length=20_000)[1][::100]
    mu = [np.abs(np.linalg.eigvals(np.asarray(model.jac(params["F"], s))[N:, N:])).max() for s in states]
    memory = lambda m: float(-1.0 / np.log(min(m, 1 - 1e-9)))  # noqa: E731
    return {"jacobian_block": memory(float(np.mean(mu))),
            "a": [memory(float(v)) for v in np.asarray(model.map_params(params["F"])["a"])[N:]]}


def periods(runs):
    """The models' slow periods per seed and the data's, in steps."""
    model = ", ".join("—" if p["slow_period_model"] is None else f"{p['slow_period_model']:.0f}" for p in runs)
    return f"{model} (data {runs[0]['slow_period_data']:.0f})"


def table(out, cases=None):
    """Per case and arm the runs' measures and diagnostics (``cases``: a list, default all) → OUT/summary.json
    (merged with what it holds for other cases) and one markdown row per case/arm."""
    path = os.path.join(out, "summary.json")
    rows = json.load(open(path)) if cases and os.path.exists(path) else {}
    for case in cases or CASES:
        if not os.path.isdir(os.path.join(out, case)):
            continue  # no runs of this case (its series may not exist either)
        data_period = {}  # per block: the test series' slow period, the same for every run of the case
        _, test, attrs = case_test(out, case)
        membrane = case in ("membrane", "membrane1m")  # one channel, the membrane potential: count its bursts
        data_bursts = bursts(test[:, 0]) if membrane else None
        for arm in [a + v for v in VARIANTS for a in (*ARMS, "win200-equal")]:
            per = []
            for name in sorted(os.listdir(os.path.join(out, case))):
                if not (name.startswith(arm + "-seed") and os.path.isdir(os.path.join(out, case, name))):
                    continue
                d = os.path.join(out, case, name)
                if not os.path.exists(os.path.join(d, "eval.json")):
                    continue
                e = json.load(open(os.path.join(d, "eval.json")))
                m = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
                lyap = e["lyapunov_max"]
                block, ch = e["D_slow"]["block"], SLOW_CHANNEL[case]
                if block not in data_period:  # the strongest line's place: the same in data units or standardised
                    data_period[block] = dominant_period(test, block, ch)
                gen = np.load(os.path.join(d, "generated.npy"))  # in the test data's units
                per.append({"slow_period_model": dominant_period(gen, block, ch),
                            "slow_period_data": data_period[block],
                            "seed": int(name.rsplit("seed", 1)[1]), "steps": m[-1]["step"],
                            "train_s": m[-1]["elapsed_s"], "D_stsp": e["D_stsp"]["value"], "D_H": e["D_H"]["value"],
                            "D_slow": e["D_slow"]["value"], "PE20": e["PE"]["value"],
                            "lyapunov_max": lyap.get("per_time_unit"), "diverged": e["diverged"],
                            "fixed_point": fixed_point(d), "final_alpha": m[-1]["alpha"],
                            "newton_iterations_2nd_half": float(np.mean([r["newton_iterations"]
                                                                         for r in m[len(m) // 2:]])),
                            "unforced_memory_steps": memories(d),
                            **({"spikes_bursts_cycle": bursts((gen[:, 0] - attrs["mean"][0]) / attrs["std"][0]),
                                "spikes_bursts_cycle_data": data_bursts} if membrane else {}),
                            "slow_in_state_r2": slow_in_state(out, case, d) if case in SLOW_TRUTH else None})
            if per:
                summary = {k: median_mad([p[k] for p in per])
                           for k in ("D_stsp", "D_H", "D_slow", "PE20", "lyapunov_max", "train_s", "steps")}
                rows[f"{case}/{arm}"] = {"summary": summary, "runs": per}
    json.dump(rows, open(path, "w"), indent=1)
    cell = lambda s, k: "—" if s[k] is None else f"{s[k]['median']:.3g} ± {s[k]['mad']:.2g}"  # noqa: E731
    for key, r in rows.items():
        if cases and key.split("/")[0] not in cases:
            continue
        s = r["summary"]
        print(f"| {key} | {len(r['runs'])} | {cell(s, 'steps')} | {cell(s, 'train_s')} | {cell(s, 'D_slow')} | "
              f"{cell(s, 'D_stsp')} | {cell(s, 'D_H')} | {cell(s, 'PE20')} | {cell(s, 'lyapunov_max')} | "
              f"{sum(p['diverged'] or p['fixed_point'] for p in r['runs'])} | {periods(r['runs'])} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["data", "probe", "run", "floor", "table", "decode", "push", "ceiling"])
    ap.add_argument("out")
    ap.add_argument("case", nargs="?", help=f"one of {', '.join(CASES)}; run: a comma-separated list")
    ap.add_argument("seeds", nargs="?", default="0")
    ap.add_argument("--whole-steps", type=int, default=1500)
    ap.add_argument("--arms", default="win200,win1000,carried,win200-equal")
    ap.add_argument("--variant", default="", choices=sorted(VARIANTS))
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "probe"), exist_ok=True)
    if a.what == "data":
        data(a.out)
    elif a.what == "probe":
        pool([(a.out, a.case, arm) for arm in ARMS], run=probe_one)
        print({arm: seconds_per_update(a.out, a.case, arm) for arm in ARMS})
    elif a.what == "run":
        # in this order (the whole series first when listed): a window arm waits for its seed's whole series
        pool([(a.out, case, arm, int(s), a.whole_steps, a.variant) for s in a.seeds.split(",")
              for arm in a.arms.split(",") for case in a.case.split(",")], run=run_one)
    elif a.what == "floor":
        floor(a.out, cases=a.case.split(",") if a.case else None)
    elif a.what == "decode":
        decode(a.out)
    elif a.what == "ceiling":
        ceiling(a.out)
    elif a.what == "push":
        push(a.out, a.case, [int(s) for s in a.seeds.split(",")])
    else:
        table(a.out, a.case.split(",") if a.case else None)
