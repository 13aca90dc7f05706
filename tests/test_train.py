"""Training end to end through the real CLI: loss decreases, resume is bitwise (after SIGKILL, also
during asynchronous saves), SIGTERM checkpoints and exits cleanly, bad input exits 2 writing nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from distdeer.cli import main

SMALL = {
    "seed": 3,
    "data": {"system": "lorenz63", "steps": 1500, "noise": 0.05},
    "model": {"kind": "clipped_shplrnn", "latent": 3, "hidden": 16},
    "gtf": {"mode": "adaptive", "every": 5, "decay": 0.2},
    "train": {"steps": 60, "log_every": 1, "lr": 1.0e-3, "lr_end": 1.0e-4},
    "checkpoint": {"every": 7, "keep": 2},
}
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def write_config(tmp_path, run_dir, **changes):
    cfg = json.loads(json.dumps(SMALL))
    cfg["run"] = {"dir": str(run_dir)}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    path = tmp_path / f"cfg-{os.path.basename(str(run_dir))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "distdeer.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def inspect(run_dir):
    proc = cli("inspect", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def cli_on_devices(devices, *args, timeout=600):
    """The CLI in a subprocess that sees ``devices`` simulated CPU devices."""
    env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "distdeer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def plain_gtf_run(model, params, alpha, zhat, z):
    """A plain Python GTF recurrence, written out: from state ``z``, forced towards ``zhat[t]`` (the data's
    forcing states) with strength ``alpha`` on the forced units, ``len(zhat)`` steps → states (S, M)."""
    import jax.numpy as jnp

    p = np.asarray(model.forced_mask())
    states = []
    for zh in np.asarray(zhat):
        z = np.asarray(model.F(params["F"], jnp.asarray(z - alpha * p * (z - zh), jnp.float32)))
        states.append(z)
    return np.stack(states)


def start_and_kill(cfg, run_dir, at_step, sig=signal.SIGKILL):
    proc = subprocess.Popen([sys.executable, "-m", "distdeer.cli", "train", cfg], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(metrics(run_dir)) >= at_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    run = tmp / "run"
    proc = cli("train", write_config(tmp, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, inspect(run), metrics(run), proc.stdout


def test_training_runs_and_writes_the_run_directory(straight):
    run, info, rows, out = straight
    assert info["step"] == 60 and len(info["params_sha256"]) == 64
    for name in ("config.yaml", "metrics.jsonl", "normalisation.json", "loss.png"):
        assert os.path.getsize(run / name) > 0
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("step", "loss", "alpha", "newton_iterations", "newton_residual", "converged", "step_time_s", "lr"):
        assert key in rows[-1]
    assert all(r["converged"] for r in rows)
    assert rows[-1]["alpha"] < rows[0]["alpha"] == 1.0  # adaptive α decays from 1
    assert (f"results in {run} (eval.json, attractor.png, spectrum.png, timeseries.png, generated.npy, loss.png, "
            "metrics.jsonl, checkpoints/);") in out


def test_adaptive_alpha_floor(tmp_path):
    """``gtf.alpha_min``: the logged α follows α ← α_est if α_est > α, else max(α_min, γα + (1 − γ) α_est), every
    ``gtf.every`` steps (recomputed here from the logged estimates), never falls below the floor, and the floor
    binds: a fast decay would have taken α below it."""
    run, floor, every, decay, steps = tmp_path / "floor", 0.6, 5, 0.05, 60
    proc = cli("train", write_config(tmp_path, run, gtf__alpha_min=floor, gtf__decay=decay, train__steps=steps,
                                     eval__at_end=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run)
    g = np.exp(-every / (decay * steps))
    alpha, bound = 1.0, False
    for r in rows:
        assert r["alpha"] == pytest.approx(alpha, rel=1e-5) and r["alpha"] >= floor * (1 - 1e-6)
        if (r["step"] - 1) % every == 0 and r["converged"]:  # as the step does: never from a failed solve
            est, free = r["alpha_estimate"], g * alpha + (1 - g) * r["alpha_estimate"]
            bound |= est <= alpha and free < floor
            alpha = est if est > alpha else max(floor, free)
    assert bound


def test_loss_decreases_with_constant_forcing(tmp_path):
    run = tmp_path / "const"
    cfg = write_config(tmp_path, run, gtf__mode="constant", gtf__alpha=0.3, train__steps=80, train__lr=3e-3,
                       train__lr_end=1e-3, eval__at_end=False)
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no evaluation: the last line names no figures nor eval.json
    assert f"results in {run} (loss.png, metrics.jsonl, checkpoints/);" in proc.stdout
    rows = metrics(run)
    first, last = np.mean([r["mse"] for r in rows[:5]]), np.mean([r["mse"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)


def test_resume_after_sigkill_is_bitwise(tmp_path, straight):
    run = tmp_path / "killed"
    cfg = write_config(tmp_path, run)
    code, _ = start_and_kill(cfg, run, at_step=25)
    assert code == -signal.SIGKILL
    mid = inspect(run)
    assert mid["step"] is not None and mid["step"] < 60
    proc = cli("train", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert inspect(run)["params_sha256"] == straight[1]["params_sha256"]
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 61))  # cut back, then continued: no duplicates
    ref = straight[2]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]


def test_kill_during_async_saves_leaves_a_restorable_checkpoint(tmp_path, straight):
    run = tmp_path / "busy"
    cfg = write_config(tmp_path, run, checkpoint__every=1)  # a save in flight at almost every moment
    start_and_kill(cfg, run, at_step=18)
    assert inspect(run)["step"] is not None
    cfg_done = write_config(tmp_path, run, checkpoint__every=1)
    proc = cli("train", cfg_done)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert inspect(run)["params_sha256"] == straight[1]["params_sha256"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "term"
    cfg = write_config(tmp_path, run, checkpoint__every=1000)
    code, out = start_and_kill(cfg, run, at_step=10, sig=signal.SIGTERM)
    assert code == 0, out[-2000:]
    info = inspect(run)
    assert info["step"] == metrics(run)[-1]["step"] >= 10  # saved at the step boundary it stopped on
    assert "stopped" in out


def test_sigterm_during_the_final_evaluation_keeps_the_finished_run(tmp_path):
    run = tmp_path / "evterm"
    cfg = write_config(tmp_path, run, train__steps=20, eval__at_end=True)
    proc = subprocess.Popen([sys.executable, "-m", "distdeer.cli", "train", cfg], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and metrics(run) and metrics(run)[-1]["step"] == 20:
            break  # training is done; the last checkpoint commits, then the evaluation (seconds) runs
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "evaluation interrupted" in out and "finished at step 20" in out, out[-2000:]
    assert not (run / "eval.json").exists() and inspect(run)["step"] == 20
    again = cli("eval", str(run))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["step"] == 20


@pytest.mark.parametrize("setup,args,needle", [
    ("nan", [], "NaN/inf"),
    ("1d", [], "2-D"),
    ("short", ["train.seq_len=500"], "at least 501"),
    ("short", ["train.seq_len=200", "train.burn_in=150"], "train.burn_in=150 needs a series of at least 351"),
    (None, ["train.burn_in=-1"], "train.burn_in: must be >= 0"),
    (None, ["train.burn_in=10"], "train.burn_in: a burn-in (10 steps) applies to random windows"),
    (None, ["train.burn_in=10", "train.seq_len=50", "train.carry=true"], "train.burn_in: a burn-in"),
    (None, ["train.bogus=1"], "unknown config key train.bogus"),
    (None, ["train.steps=abc"], "train.steps: expected int"),
    (None, ["train.steps=-5"], "train.steps: must be > 0"),
    (None, ["train.lr=-0.1"], "train.lr: must be > 0"),
    (None, ["data.path=/nonexistent/x.npy"], "not found"),
    (None, ["model.latent=2"], "smaller than the observed"),
    (None, ["model.unforced_init=-0.1"], "model.unforced_init: must be >= 0"),
    (None, ["model.unforced_timescale=5"], "model.unforced_timescale: a time scale >= 10"),
    (None, ["model.unforced_timescale=1000", "model.readout=affine"], "model.unforced_timescale"),
    (None, ["model.unforced_decay=exp", "model.kind=lru"], "model.unforced_decay: exp applies"),
    (None, ["model.unforced_decay=log"], "model.unforced_decay: must be one of linear, exp"),
    (None, ["eval.slow_block=0"], "eval.slow_block: must be > 0"),
    (None, ["mesh.devices=64"], "devices"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, setup, args, needle):
    run = tmp_path / "never"
    extra = []
    if setup is not None:
        x = {"nan": np.array([[0.0, 1.0, 2.0]] * 50 + [[np.nan, 0.0, 1.0]]) + np.arange(51)[:, None],
             "1d": np.arange(100.0), "short": np.random.default_rng(0).normal(size=(300, 3))}[setup]
        np.save(tmp_path / "d.npy", x)
        extra = [f"data.path={tmp_path / 'd.npy'}"]
    assert main(["train", write_config(tmp_path, run), *extra, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distdeer: error:") and needle in err, err
    assert not run.exists()


def test_other_config_and_corrupt_checkpoint_are_refused(tmp_path, straight, capsys):
    run = straight[0]
    before = {p: os.path.getmtime(os.path.join(run, p)) for p in os.listdir(run)}
    assert main(["train", write_config(tmp_path, run, model__hidden=32)]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert {p: os.path.getmtime(os.path.join(run, p)) for p in os.listdir(run)} == before
    # damage the latest checkpoint's array data of a copy of the run
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load(open(copy / "config.yaml"))
    cfg["run"]["dir"] = str(copy)
    cfg["train"]["steps"] = 61
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    latest = copy / "checkpoints" / "60"
    for item in ("params", "optimizer"):
        for root, _, files in os.walk(latest / item):
            for f in files:
                if not f.endswith(".json"):
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(b"garbage")
    cfg_path = tmp_path / "copy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 2
    assert "cannot be restored" in capsys.readouterr().err


def test_the_same_data_file_named_differently_is_the_same_run(tmp_path, monkeypatch, capsys):
    from distdeer.data import systems

    np.save(tmp_path / "d.npy", np.asarray(systems.generate("lorenz63", 600, seed=1)))
    np.save(tmp_path / "other.npy", np.load(tmp_path / "d.npy"))
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, tmp_path / "named", train__steps=3, checkpoint__every=3)
    assert main(["train", cfg, "data.path=d.npy"]) == 0
    assert main(["train", cfg, f"data.path={tmp_path / 'd.npy'}"]) == 0  # resumes (already finished)
    # Generator keys and the sampling interval do not change what a run on a file computes.
    assert main(["train", cfg, "data.path=d.npy", "data.system=rossler", "data.dt=0.5", "data.noise=0"]) == 0
    capsys.readouterr()
    assert main(["train", cfg, f"data.path={tmp_path / 'other.npy'}"]) == 2
    assert "data.path differ" in capsys.readouterr().err


def test_the_data_systems_lyapunov_exponent_is_known_where_it_can_be(tmp_path):
    from distdeer import config
    from distdeer import eval as eval_mod
    from distdeer.data import store

    x = np.random.default_rng(0).normal(size=(100, 3))
    store.write(str(tmp_path / "r.zarr"), x, mean=np.zeros(3), std=np.ones(3), attrs={"system": "rossler"})
    np.save(tmp_path / "r.npy", x)
    ref = lambda *o: eval_mod.reference_lyapunov(config.load(None, list(o)))  # noqa: E731
    assert ref("data.system=lorenz63") == pytest.approx(0.9056)  # generated in the run
    assert ref(f"data.path={tmp_path / 'r.zarr'}") == pytest.approx(0.0714)  # stored by data generate
    assert ref(f"data.path={tmp_path / 'r.npy'}") is None  # a plain file: unknown
    assert ref(f"data.path={tmp_path / 'r.npy'}", "eval.lyapunov_reference=0.906") == 0.906


def test_the_sampling_interval_is_known_where_it_can_be(tmp_path):
    """λ_max per time unit needs the series' dt: set for generated runs, stored by `data generate`, given
    by data.dt — otherwise unknown (None), never silently the generator's default."""
    from distdeer import config
    from distdeer import eval as eval_mod
    from distdeer.data import store

    x = np.random.default_rng(0).normal(size=(100, 3))
    store.write(str(tmp_path / "r.zarr"), x, mean=np.zeros(3), std=np.ones(3), attrs={"dt": 0.05})
    np.save(tmp_path / "r.npy", x)
    dt = lambda *o: eval_mod.sampling_interval(config.load(None, list(o)))  # noqa: E731
    assert dt() == config.GENERATOR_DT and dt("data.dt=0.002") == 0.002  # generated in the run
    assert dt(f"data.path={tmp_path / 'r.zarr'}") == 0.05  # stored by data generate
    assert dt(f"data.path={tmp_path / 'r.npy'}") is None  # a plain file: unknown
    assert dt(f"data.path={tmp_path / 'r.npy'}", "data.dt=0.004") == 0.004
    res = {"D_stsp": {"value": 1.0, "variant": "binning"}, "D_H": {"value": 0.5, "sigma": 20.0},
           "PE": {"value": 0.1, "n": 20}, "lyapunov_max": {"per_step": 0.0123, "per_time_unit": None,
                                                           "system_reference_per_time_unit": None}}
    assert "λ_max 0.0123 per step" in eval_mod.headline(res)


@pytest.mark.parametrize("carry", [False, True], ids=["drawn", "carried"])
def test_window_mode_trains_and_resumes_bitwise(tmp_path, carry):
    """Batches of windows (train.seq_len) drawn from (seed, step), or carried windows whose streams'
    end states live in the checkpoint: a killed and resumed run equals the uninterrupted one."""
    changes = dict(train__seq_len=50, train__batch=4, train__steps=40, checkpoint__every=5, train__carry=carry)
    a, b = tmp_path / "wa", tmp_path / "wb"
    proc = cli("train", write_config(tmp_path, a, **changes))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(a)
    assert len(rows) == 40 and all(r["converged"] for r in rows)
    cfg_b = write_config(tmp_path, b, **changes)
    start_and_kill(cfg_b, b, at_step=12)
    assert cli("train", cfg_b).returncode == 0
    assert inspect(b)["params_sha256"] == inspect(a)["params_sha256"]


def test_carried_windows_follow_a_plain_forced_recurrence():
    """train.carry: each step's windows start where their stream's previous window ended (or from
    initial_state at row 0), checked against a plain Python GTF recurrence over the same rows with the
    parameters and α each step used — through a wrap of every stream (n = 4 windows per pass)."""
    import jax
    import jax.numpy as jnp

    from distdeer import config as config_mod
    from distdeer.models import Model
    from distdeer.train import modes
    from distdeer.train.step import init_state, make_train_step

    cfg = config_mod.load(None, ["model.kind=clipped_shplrnn", "model.latent=5", "model.hidden=8",
                                 "model.readout=identity", "train.seq_len=10", "train.batch=2",
                                 "train.carry=true", "train.steps=10", "gtf.mode=constant", "gtf.alpha=0.3",
                                 "train.lr=1e-2", "train.lr_end=1e-3", "train.lambda_lat=0", "solver.kind=sequential"])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((41, 3)), jnp.float32)  # n = (41 - 1) // 10 = 4
    model = Model.from_config(cfg.model, 3)
    mode = modes.for_config(cfg, model)
    state = init_state(model, cfg, mode, x)
    assert state.mode_state.states.shape == (2, 5)
    step = jax.jit(make_train_step(model, cfg, mode))
    ends = [None, None]
    for k in range(6):
        params, alpha = state.params, float(state.alpha)
        sq = []
        for b, offset in enumerate((0, 2)):  # ⌊b·n/B⌋ for B = 2, n = 4
            j = (k + offset) % 4
            xs = x[10 * j: 10 * j + 11]
            z = np.asarray(model.initial_state(params, xs[0])) if (j == 0 or k == 0) else ends[b]
            states = plain_gtf_run(model, params, alpha, model.forcing(params, xs)[:-1], z)
            ends[b] = states[-1]
            sq.append((np.asarray(model.observe(params, jnp.asarray(states))) - np.asarray(xs[1:])) ** 2)
        state, m = step(state, x)
        np.testing.assert_allclose(np.asarray(state.mode_state.states), np.stack(ends), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(m.mse), np.mean(sq), rtol=1e-4)
    # the carry is what differs from drawn windows: restarting every window from initial_state would not match
    assert not np.allclose(np.asarray(model.initial_state(params, x[20])), ends[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["windows", "whole"])
def test_noise_perturbs_the_forcing_not_the_targets(mode):
    """train.noise = σ: the forcing observations (teacher signal and initial state) are x + σ ε, the loss
    targets stay x — checked against a plain Python GTF recurrence, for drawn windows (GTF-BPTT; ε drawn
    over the batch from key = fold_in(fold_in(seed, step), 1)) and for the whole series (GTF-DEER; row r's
    ε from fold_in(key, r), so that the draw does not depend on how the series is sharded)."""
    import jax
    import jax.numpy as jnp

    from distdeer import config as config_mod
    from distdeer.models import Model
    from distdeer.mesh import whole_series_of
    from distdeer.train import modes
    from distdeer.train.step import init_state, make_train_step

    S, T, sigma = 10, 41, 0.3
    opts = ["seed=3", "model.kind=clipped_shplrnn", "model.latent=5", "model.hidden=8", "model.readout=identity",
            "gtf.mode=constant", "gtf.alpha=0.3", "train.lambda_lat=0", f"train.noise={sigma}"]
    opts += [f"train.seq_len={S}", "train.batch=2", "solver.kind=sequential"] if mode == "windows" else []
    cfg = config_mod.load(None, opts)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((T, 3)), jnp.float32)
    model = Model.from_config(cfg.model, 3)
    data = whole_series_of(x) if mode == "whole" else x
    training = modes.for_config(cfg, model, None, T - 1)
    state = init_state(model, cfg, training, data)
    step = jax.jit(make_train_step(model, cfg, training))

    def reference_mse(params, alpha, k, clean):
        if mode == "windows":
            starts = jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(3), k), (2,), 0, T - S)
            xs = np.stack([np.asarray(x[s: s + S + 1]) for s in np.asarray(starts)])
        else:
            xs = np.asarray(x)[None]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), k), 1)
        if mode == "whole":
            eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, r), (3,))) for r in range(T)])
        else:
            eps = np.asarray(jax.random.normal(key, xs.shape))
        xf = xs if clean else xs + sigma * eps.reshape(xs.shape)
        sq = []
        for xw, xfw in zip(xs, jnp.asarray(xf, jnp.float32)):
            z = np.asarray(model.initial_state(params, xfw[0]))
            states = plain_gtf_run(model, params, alpha, model.forcing(params, xfw)[:-1], z)
            sq.append((np.asarray(model.observe(params, jnp.asarray(states))) - xw[1:]) ** 2)
        return np.mean(sq)

    for k in range(3):
        params, alpha = state.params, float(state.alpha)
        state, m = step(state, data)
        np.testing.assert_allclose(float(m.mse), reference_mse(params, alpha, k, clean=False), rtol=2e-4)
        # the noise is what differs: the clean forcing gives another loss
        assert abs(float(m.mse) - reference_mse(params, alpha, k, clean=True)) > 1e-3 * float(m.mse)


def test_the_state_fingerprint_covers_carried_states_only_when_they_are_carried():
    """Resume checks state_sha256: with carried windows the streams' end states decide the next step, so
    they are in it (the carried mode says so); a Newton warm start is not (it changes iterations, not
    the solution)."""
    from distdeer import config as config_mod
    from distdeer.mesh import whole_series_of
    from distdeer.models import Model
    from distdeer.train import modes
    from distdeer.train.checkpoint import state_sha256
    from distdeer.train.step import init_state

    x = np.zeros((41, 3), np.float32)
    for opts, fingerprinted in ((["train.seq_len=10", "train.carry=true"], True), (["train.seq_len=null"], False)):
        cfg = config_mod.load(None, ["model.latent=3", "model.hidden=4", *opts])
        model = Model.from_config(cfg.model, 3)
        mode = modes.for_config(cfg, model, None, 40)
        assert mode.fingerprinted is fingerprinted
        data = x if cfg.train.seq_len else whole_series_of(x)
        state = init_state(model, cfg, mode, data)
        moved = state._replace(mode_state=type(state.mode_state)(state.mode_state.states + 1.0))
        same = state_sha256(state, mode.fingerprinted) == state_sha256(moved, mode.fingerprinted)
        assert same is not fingerprinted


def test_burn_in_starts_each_window_where_the_data_drove_the_model():
    """train.burn_in = K: each drawn window starts from the state a plain forced recurrence reaches over the K
    rows before it (from initial_state at their first row); the loss is the window's alone, and its gradient
    does not flow into the burn-in — checked against plain Python recurrences and jax.grad of a loop that
    holds the burn-in's end state constant."""
    import jax
    import jax.numpy as jnp

    from distdeer import config as config_mod
    from distdeer.models import Model
    from distdeer.train import modes

    S, K, B, alpha = 10, 25, 3, 0.3
    cfg = config_mod.load(None, ["model.kind=clipped_shplrnn", "model.latent=5", "model.hidden=8", f"train.seq_len={S}",
                                 f"train.burn_in={K}", f"train.batch={B}", "gtf.mode=constant", f"gtf.alpha={alpha}",
                                 "solver.kind=sequential"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((120, 3)), jnp.float32)
    model = Model.from_config(cfg.model, 3)
    params = model.init(jax.random.PRNGKey(2))
    mode = modes.for_config(cfg, model)
    step = 7
    mse, sol, _ = mode.loss(params, alpha, x, modes.NoState(), step)
    assert bool(jnp.all(sol.converged))
    # the window starts: the mode's documented draw
    starts = np.asarray(jax.random.randint(modes.step_key(cfg, step), (B,), 0, len(x) - S - K))
    p = model.forced_mask()

    def window_loss(prm, z_in):
        sq = []
        for s, z in zip(starts, z_in):
            zhat = model.forcing(prm, x[s + K: s + K + S + 1])
            for t in range(S):
                z = model.F(prm["F"], z - alpha * p * (z - zhat[t]))
                sq.append((model.observe(prm, z) - x[s + K + t + 1]) ** 2)
        return jnp.mean(jnp.stack(sq))

    z_in = []
    for s in starts:
        states = plain_gtf_run(model, params, alpha, model.forcing(params, x[s: s + K + 1])[:-1],
                               np.asarray(model.initial_state(params, x[s])))
        z_in.append(jnp.asarray(states[-1]))
    np.testing.assert_allclose(float(mse), float(window_loss(params, z_in)), rtol=1e-5)
    grad = jax.grad(lambda prm: mode.loss(prm, alpha, x, modes.NoState(), step)[0])(params)
    ref = jax.grad(lambda prm: window_loss(prm, z_in))(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)
    # what the burn-in changes: from initial_state at the window's own first row the loss differs
    fresh = [model.initial_state(params, x[s + K]) for s in starts]
    assert abs(float(window_loss(params, fresh)) - float(mse)) > 1e-3 * float(mse)


def test_carried_windows_need_a_window_length(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", write_config(tmp_path, run, train__carry=True)]) == 2
    err = capsys.readouterr().err
    assert "train.carry" in err and err.count("\n") == 1 and not run.exists()


@pytest.mark.parametrize("start", [dict(train__carry=True), dict(train__burn_in=60)], ids=["carried", "burn-in"])
def test_windows_starting_from_a_driven_state_on_two_devices_match_one_device(tmp_path, start):
    """Carried windows, and drawn windows after a burn-in, split over a 2-device "data" axis (GTF-DEER
    batch solve) follow the 1-device run: the state each window starts from is the same whichever device
    solved it."""
    one, two = tmp_path / "one", tmp_path / "two"
    changes = dict(train__seq_len=40, train__batch=4, train__steps=15, data__steps=401, **start)
    assert cli("train", write_config(tmp_path, one, **changes, mesh__devices=1)).returncode == 0
    proc = cli_on_devices(2, "train", write_config(tmp_path, two, **changes, mesh__devices=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 15
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-3)


def test_time_sharded_training_matches_one_device(tmp_path):
    """Whole-series training sharded over 3 simulated devices follows the 1-device run (same losses to
    float tolerance: only the order of floating-point reductions differs)."""
    one, three = tmp_path / "one", tmp_path / "three"
    changes = dict(train__steps=25, data__steps=1001)
    assert cli("train", write_config(tmp_path, one, **changes, mesh__devices=1)).returncode == 0
    proc = cli_on_devices(3, "train", write_config(tmp_path, three, **changes, mesh__devices=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(three)
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-3)
    # too few steps for the devices: one line, exit 2, nothing written
    short = tmp_path / "short"
    proc = cli_on_devices(3, "train", write_config(tmp_path, short, data__steps=3, mesh__devices=3))
    assert proc.returncode == 2 and "shorter than the 3 devices" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not short.exists()


def test_evaluation_at_the_end_and_summary_over_runs(straight, tmp_path):
    run = straight[0]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["D_stsp"]["variant"] == "binning" and ev["D_stsp"]["n_bins"] == 30
    assert ev["D_H"]["sigma"] == 20.0 and ev["PE"]["n"] == 20
    assert ev["T_test"] == 1500 and ev["protocol"]["free_run_steps"] == 1500 + 375
    assert ev["lyapunov_max"]["system_reference_per_time_unit"] == pytest.approx(0.9056)
    assert ev["lyapunov_max"]["transient"] == 375  # measured on the stretch the protocol compares
    for name in ("attractor.png", "spectrum.png", "timeseries.png"):
        assert os.path.getsize(run / name) > 10_000
    gen = np.load(run / "generated.npy")
    assert gen.shape == (1500, 3)
    # the fixed-point flag, recomputed from the saved free run (test-data units → standardised)
    norm = json.loads((run / "normalisation.json").read_text())
    tail = ((gen - np.asarray(norm["mean"])) / np.asarray(norm["std"]))[-375:]
    assert ev["fixed_point"]["spread"] == pytest.approx(float(np.max(np.std(tail, axis=0))), rel=1e-3)
    assert ev["fixed_point"]["value"] == (ev["fixed_point"]["spread"] < 1e-3)
    summary = tmp_path / "summary.json"
    proc = cli("eval", str(run), str(run), "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("λ_max") == 2 and "(data system 0.906)" in proc.stdout
    s = json.loads(summary.read_text())
    for key in ("D_stsp", "D_H", "PE"):
        assert s[key]["n"] == 2 and s[key]["mad"] == 0.0 or s[key]["nan_runs"] == 2
    assert s["fixed_point_runs"] == 2 * ev["fixed_point"]["value"]
    bad = cli("eval", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_slow_scale_measure_in_the_evaluation(straight, tmp_path):
    """eval.slow_block adds D_slow (the envelope spectra) on a fresh test series eval.test_steps long."""
    import shutil

    from distdeer import config, eval as eval_mod, metrics as metrics_mod

    copy = tmp_path / "copy"
    shutil.copytree(straight[0], copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["eval"].update(slow_block=100, slow_sigma=2.0, test_steps=2000)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("eval", str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((copy / "eval.json").read_text())
    assert ev["T_test"] == 2000 and ev["D_slow"]["block"] == 100 and ev["D_slow"]["sigma"] == 2.0
    norm = json.loads((copy / "normalisation.json").read_text())
    x_test, _, _ = eval_mod.test_series(config.load(str(copy / "config.yaml")), norm, None)
    # the free run itself (generated.npy is rounded to float32 in data units: a model resting near a fixed
    # point has block spreads of rounding size, whose z-scored spectra that rounding changes)
    _, model, params, _, _ = eval_mod.load_run(str(copy))
    gen = eval_mod.protocol_run(model, params, x_test[0], len(x_test))
    expect = metrics_mod.slow_scale_distance(x_test, gen, 100, 2.0)
    assert ev["D_slow"]["value"] == pytest.approx(expect, rel=1e-4, nan_ok=True)
    assert "D_slow" in proc.stdout and (ev["diverged"] or os.path.getsize(copy / "slow.png") > 10_000)
    cfg["eval"]["slow_block"] = 300  # 2000 steps hold 6 blocks: refused in one line before any free run
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    bad = cli("eval", str(copy))
    assert bad.returncode == 2 and "fewer than 8 blocks" in bad.stderr and bad.stderr.count("\n") == 1


def test_checkpoint_selection_by_the_training_series(straight, tmp_path):
    """eval.select=train: every retained checkpoint is scored on the training series (never the test series)
    and the best is evaluated; --select latest overrides the run's choice."""
    import shutil

    from distdeer import config, eval as eval_mod, metrics as metrics_mod
    from distdeer.train import loop

    run = straight[0]
    copy = tmp_path / "copy"  # eval writes into the copy; its config still names the run's checkpoints
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["eval"]["select"] = "train"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("eval", str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((copy / "eval.json").read_text())
    sel = ev["checkpoint"]["selection"]
    steps = eval_mod.retained_steps(str(run))
    assert [c["step"] for c in sel["candidates"]] == steps and len(steps) == 2
    # lowest D_stsp; a NaN one (some free run left the data's box: likely for a 60-step model) ranks last,
    # then D_H, then the later step decide
    rank = [(np.nan_to_num(c["D_stsp"], nan=np.inf), np.nan_to_num(c["D_H"], nan=np.inf), -c["step"])
            for c in sel["candidates"]]
    assert sel["chosen"] == -min(rank)[2]
    assert ev["step"] == sel["chosen"] and ev["checkpoint"]["select"] == "train"
    # each candidate's numbers are the worst over free runs from 3 evenly spaced training points
    x_train, _ = loop.load_series(config.load(str(copy / "config.yaml")))
    _, model, params, _, _ = eval_mod.load_run(str(copy), sel["chosen"])
    chosen = next(c for c in sel["candidates"] if c["step"] == sel["chosen"])
    assert [s["start"] for s in chosen["per_start"]] == [0, 500, 1000]
    runs = [eval_mod.protocol_run(model, params, x_train[s], 1500) for s in (0, 500, 1000)]
    worst = lambda v: np.nan if np.isnan(v).any() else max(v)  # noqa: E731
    assert chosen["D_H"] == pytest.approx(worst([metrics_mod.power_spectrum_distance(x_train, g) for g in runs]),
                                          nan_ok=True)
    assert chosen["D_stsp"] == pytest.approx(worst([metrics_mod.state_space_divergence(x_train, g) for g in runs]),
                                             nan_ok=True)
    assert sel["steps_compared"] == len(x_train) == 1500

    # without --data the run's eval.data is the test series (here 1000 held-out rows in data units)
    norm = json.loads((copy / "normalisation.json").read_text())
    held = tmp_path / "held.npy"
    np.save(held, x_train[:1000] * np.asarray(norm["std"]) + np.asarray(norm["mean"]))
    cfg["eval"]["data"] = str(held)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    latest = cli("eval", str(copy), "--select", "latest")
    assert latest.returncode == 0, latest.stderr[-2000:]
    ev = json.loads((copy / "eval.json").read_text())
    assert ev["step"] == max(steps) and ev["checkpoint"] == {"select": "latest"}
    assert ev["test_data"] == os.path.realpath(held) and ev["T_test"] == 1000
    assert ev["test_data_sha256"] == eval_mod.content_digest(np.load(held))
    bad = cli("eval", str(copy), "--select", "best")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_sweep_reuses_a_finished_runs_evaluation_also_of_a_selected_checkpoint(straight, tmp_path):
    """The sweep summarises a finished run by its eval.json — also when eval.select=train evaluated an
    earlier checkpoint than the final one — and evaluates anew only an eval.json made before the final
    step or with another checkpoint selection."""
    import shutil

    from distdeer import config, eval as eval_mod, run

    copy = tmp_path / "run"
    shutil.copytree(straight[0], copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["run"]["dir"], cfg["eval"]["select"] = str(copy), "train"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    cfg = config.load(str(copy / "config.yaml"))
    path = copy / "eval.json"
    at_end = json.loads(path.read_text())  # training's own evaluation: the latest checkpoint
    assert at_end["step"] == at_end["latest_step"] == 60 and at_end["checkpoint"] == {"select": "latest"}
    earlier = eval_mod.retained_steps(str(copy))[0]
    assert earlier < 60
    # what eval.select=train writes when it chooses an earlier checkpoint, tagged to tell reuse from recompute
    chosen = dict(at_end, step=earlier, checkpoint={"select": "train", "selection": {"chosen": earlier}}, tag=1)
    path.write_text(json.dumps(chosen))
    reused = run.evaluation_of(cfg)
    assert reused["tag"] == 1 and reused["step"] == earlier
    for stale in (dict(chosen, latest_step=earlier),  # made before the run's final step
                  dict(at_end, tag=1)):  # made with another selection (latest) than the run's (train)
        path.write_text(json.dumps(stale))
        fresh = run.evaluation_of(cfg)
        assert "tag" not in fresh and fresh["latest_step"] == 60 and fresh["checkpoint"]["select"] == "train"
        written = json.loads(path.read_text())
        assert "tag" not in written and written["checkpoint"]["selection"]["chosen"] == fresh["step"]


def test_sweep_over_seeds_writes_a_summary(tmp_path, two_cpus):
    base = tmp_path / "sw"
    cfg = write_config(tmp_path, base, train__steps=12, data__steps=800)
    proc = cli("sweep", cfg, "--seeds", "4,5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (4, 5):  # each seed ends with its evaluation and its results, as `distdeer train` does
        assert f"finished at step 12; results in {tmp_path / f'sw-seed{k}'}" in proc.stdout
    assert proc.stdout.count("distdeer: evaluation: D_stsp") == 2
    summary = json.loads((tmp_path / "sw-summary.json").read_text())
    assert summary["runs"] == [str(tmp_path / "sw-seed4"), str(tmp_path / "sw-seed5")]
    for key in ("D_stsp", "D_H", "PE"):
        assert summary[key]["n"] == 2 and "median" in summary[key] and "mad" in summary[key]
    assert inspect(tmp_path / "sw-seed4")["params_sha256"] != inspect(tmp_path / "sw-seed5")["params_sha256"]

    # the same seeds two at a time, each in its own pinned process: the same training, the same summary
    par = write_config(tmp_path, tmp_path / "par", train__steps=12, data__steps=800)
    proc = cli("sweep", par, "--seeds", "4,5", "--parallel", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cpus = sorted(os.sched_getaffinity(0))
    assert f"seed 4 started on CPUs {cpus[:max(1, len(cpus) // 2)]}" in proc.stdout
    assert "[seed 5] step 12/12" in proc.stdout
    assert "fork" not in proc.stdout + proc.stderr  # no fork of the JAX-threaded parent
    parallel = json.loads((tmp_path / "par-summary.json").read_text())
    assert parallel["runs"] == [str(tmp_path / "par-seed4"), str(tmp_path / "par-seed5")]
    for k in (4, 5):
        seq, par_run = metrics(tmp_path / f"sw-seed{k}"), metrics(tmp_path / f"par-seed{k}")
        assert [m["step"] for m in seq] == [m["step"] for m in par_run]
        np.testing.assert_allclose([m["loss"] for m in par_run], [m["loss"] for m in seq], rtol=1e-5)
    for key in ("D_stsp", "D_H", "PE"):
        np.testing.assert_allclose(parallel[key]["values"], summary[key]["values"], rtol=1e-3)
    too_many = cli("sweep", par, "--seeds", ",".join(map(str, range(len(cpus) + 1))),
                   "--parallel", str(len(cpus) + 1))
    assert too_many.returncode == 2 and "exceeds" in too_many.stderr and too_many.stderr.count("\n") == 1


def test_parallel_sweep_stops_every_seed_on_sigterm_and_resumes(tmp_path, two_cpus):
    cfg = write_config(tmp_path, tmp_path / "st", train__steps=1500, data__steps=800, checkpoint__every=500)
    proc = subprocess.Popen([sys.executable, "-m", "distdeer.cli", "sweep", cfg, "--seeds", "1,2", "--parallel", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [tmp_path / "st-seed1", tmp_path / "st-seed2"]

    def seed_pids():
        """{run dir: pid} of the sweep's training children (their command lines name the run dir)."""
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
        found = {}
        for pid in pids:
            with open(f"/proc/{pid}/cmdline") as f:
                args = f.read().split("\0")
            found.update({r: pid for r in runs if f"run.dir={r}" in args})
        return found

    # A seed that has trained 5 steps is held (SIGSTOP) until the other has too: on a loaded machine one
    # seed can otherwise finish all its steps before the other has compiled, and the test would signal a
    # sweep with one seed already done.
    held = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ready = {r for r in runs if (r / "metrics.jsonl").exists() and len(metrics(r)) >= 5}
        if ready == set(runs):
            break
        pids = seed_pids()
        for r in ready - held:
            os.kill(pids[r], signal.SIGSTOP)
            held.add(r)
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted:\n" + proc.communicate()[0][-3000:]
    # each seed's process runs pinned to its own share of the CPUs
    pids = seed_pids()
    shares = [sorted(os.sched_getaffinity(pid)) for pid in pids.values()]
    cpus = sorted(os.sched_getaffinity(0))
    assert len(shares) == 2 and all(shares) and sorted(sum(shares, [])) == cpus, shares
    assert not set(shares[0]) & set(shares[1])
    for r in held:
        os.kill(pids[r], signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "sweep stopped" in out and not (tmp_path / "st-summary.json").exists()
    for r in runs:
        step = inspect(r)["step"]
        assert step is not None and 5 <= step < 1500  # each seed checkpointed where it stopped
    again = cli("sweep", cfg, "--seeds", "1,2", "--parallel", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [inspect(r)["step"] for r in runs] == [1500, 1500]
    assert json.loads((tmp_path / "st-summary.json").read_text())["D_H"]["n"] == 2


def test_a_failed_solve_skips_the_update_and_never_seeds_a_carried_window():
    """Newton with one iteration and no fallback cannot converge: the update is skipped and counted,
    parameters, optimizer state and α stay (α is adaptive, re-estimated every step otherwise), and the
    carried streams restart from ``initial_state`` (non-finite carry) instead of continuing from the
    unconverged end states; the same step with enough iterations does update and carry."""
    import jax
    import jax.numpy as jnp

    from distdeer import config as config_mod
    from distdeer.models import Model
    from distdeer.train import modes
    from distdeer.train.checkpoint import params_sha256
    from distdeer.train.step import init_state, make_train_step

    opts = ["model.latent=3", "model.hidden=8", "train.seq_len=40", "train.batch=2", "train.carry=true",
            "gtf.mode=adaptive", "gtf.every=1", "gtf.alpha=0.05", "solver.fallback=false"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((161, 3)), jnp.float32)
    model = Model.from_config(config_mod.load(None, opts).model, 3)
    for max_iter, fails in ((1, True), (50, False)):
        cfg = config_mod.load(None, opts + [f"solver.max_iter={max_iter}"])
        mode = modes.for_config(cfg, model)
        state = init_state(model, cfg, mode, x)
        new, m = jax.jit(make_train_step(model, cfg, mode))(state, x)
        assert bool(m.converged) is not fails and int(m.skipped) == int(new.skipped) == int(fails)
        same = params_sha256((new.params, new.opt_state)) == params_sha256((state.params, state.opt_state))
        assert same is fails
        assert (float(new.alpha) == float(state.alpha)) is fails
        assert bool(np.all(np.isnan(np.asarray(new.mode_state.states)))) == fails
        assert bool(np.all(np.isfinite(np.asarray(new.mode_state.states)))) == (not fails)


def test_a_burn_in_that_overflows_skips_the_update():
    """Expansive unforced units (ALRNN without ReLU units, weights × 50) leave float range over a 300-step
    burn-in but not over a 10-step window: the update is skipped and counted, not trained on windows that
    quietly start from initial_state instead; without the burn-in the same step updates."""
    import jax
    import jax.numpy as jnp

    from distdeer import config as config_mod
    from distdeer.models import Model
    from distdeer.solver import Result
    from distdeer.train import modes
    from distdeer.train.checkpoint import params_sha256
    from distdeer.train.step import init_state, make_train_step

    opts = ["model.kind=alrnn", "model.nonlinear=0", "model.latent=6", "model.unforced_init=50.0", "train.seq_len=10",
            "train.batch=2", "gtf.mode=constant", "gtf.alpha=0.5", "solver.kind=sequential"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((400, 3)), jnp.float32)
    for burn_in, fails in ((300, True), (0, False)):
        cfg = config_mod.load(None, opts + [f"train.burn_in={burn_in}"])
        model = Model.from_config(cfg.model, 3)
        mode = modes.for_config(cfg, model)
        state = init_state(model, cfg, mode, x)
        new, m = jax.jit(make_train_step(model, cfg, mode))(state, x)
        assert bool(m.converged) is not fails and int(new.skipped) == int(fails)
        assert (params_sha256(new.params) == params_sha256(state.params)) is fails
        assert (int(m.result) == Result.NONFINITE) is fails


def test_too_many_skipped_updates_stop_the_run_with_one_line(tmp_path):
    """A run whose solves all fail (no fallback, one Newton iteration) counts its skips in metrics.jsonl
    and the checkpoint, and stops once they exceed train.max_skipped × steps: exit 1, one line on stderr,
    the state saved (parameters unchanged from the start); raising the budget resumes it."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path, run, solver__fallback=False, solver__max_iter=1, train__steps=40,
                       train__max_skipped=0.1, gtf__mode="constant", gtf__alpha=0.0)
    proc = cli("train", cfg)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("distdeer")]
    assert len(err) == 1 and "5 of 5 updates skipped" in err[0] and "train.max_skipped" in err[0], proc.stderr
    assert "Newton solve failed" in err[0] and "solver.max_iter" in err[0]  # the cause named: no convergence
    rows = metrics(run)
    assert [r["skipped"] for r in rows] == [1, 2, 3, 4, 5] and not any(r["converged"] for r in rows)
    info = inspect(run)
    assert info["step"] == 5 and info["skipped"] == 5
    fresh = tmp_path / "fresh"
    assert cli("train", write_config(tmp_path, fresh, train__steps=40, checkpoint__every=1,
                                     train__max_skipped=0.0, solver__max_iter=1, solver__fallback=False,
                                     gtf__mode="constant", gtf__alpha=0.0)).returncode == 1
    assert inspect(fresh)["params_sha256"] == info["params_sha256"]  # step 1 of the same start: untouched
    proc = cli("train", cfg, "train.max_skipped=0.5")
    assert proc.returncode == 1 and "21 of 21 updates skipped" in proc.stderr


def test_an_overflowing_trajectory_is_named_as_the_cause_not_the_solver(tmp_path):
    """Unforced linear units made expansive (ALRNN without ReLU units, their weights × 50): their state
    grows ~e^k and leaves float range within the 1500 steps.  With the fallback on, the step-by-step
    recurrence overflows as well, so the stop names the trajectory and the remedies that apply — not
    the solver settings that are already on."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path, run, model__kind="alrnn", model__nonlinear=0, model__latent=6,
                       model__unforced_init=50.0, train__steps=20, train__max_skipped=0.1)
    proc = cli("train", cfg)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("distdeer")]
    assert len(err) == 1 and "the forced trajectory is non-finite" in err[0], proc.stderr[-2000:]
    assert "model.unforced_decay=exp" in err[0] and "solver.fallback=true" not in err[0]
    assert metrics(run)[-1]["result"] == 2  # Result.NONFINITE


def test_a_sharded_warm_start_restores_onto_other_device_counts(tmp_path):
    """Whole series on 4 devices, checkpoints every 5 steps: the warm start is saved as exactly (T, M)
    (no padding), and a resume from step 10 on 3 devices and on 1 device continues as the uninterrupted
    4-device run does — the same losses and the same Newton iterations, which a warm start other than
    the saved solution would change."""
    import shutil

    import tensorstore as ts

    full = tmp_path / "full"
    changes = dict(train__steps=15, checkpoint__every=5, checkpoint__keep=5, solver__fallback=False,
                   gtf__every=1, eval__at_end=False)
    proc = cli_on_devices(4, "train", write_config(tmp_path, full, **changes, mesh__devices=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                   "path": str(full / "checkpoints" / "10" / "warm" / "warm.zarr")}},
                   open=True).result()
    assert warm.shape == (SMALL["data"]["steps"] - 1, 3)
    assert np.all(np.isfinite(warm.read().result()))
    ref = metrics(full)
    assert max(r["newton_iterations"] for r in ref[10:]) >= 1
    for devices in (3, 1):
        run = tmp_path / f"on{devices}"
        shutil.copytree(full, run)
        shutil.rmtree(run / "checkpoints" / "15")
        cfg = write_config(tmp_path, run, **changes, mesh__devices=devices)
        proc = cli_on_devices(devices, "train", cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = metrics(run)
        assert [r["step"] for r in got] == list(range(1, 16))
        assert [r["newton_iterations"] for r in got[10:]] == [r["newton_iterations"] for r in ref[10:]]
        np.testing.assert_allclose([r["loss"] for r in got[10:]], [r["loss"] for r in ref[10:]], rtol=1e-5)
