"""The linear recurrent unit stack (``model.kind: lru``): its initialisation, its free run against a numpy
loop of its equations, GTF on its inputs solved by DEER against the sequential loop and BPTT, training by
the exact scan (equal to GTF-BPTT at α = 1 in every mode), the CLI end to end (1 and 4 devices, resume,
evaluation) and bad configurations.  The scan on 1–8 devices in float64: tests/subproc/cases_lru.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer import config, deer, sequential
from distdeer import eval as ev
from distdeer.cli import main
from distdeer.gtf import ForcedStep
from distdeer.models import Model, lru
from distdeer.train import modes
from distdeer.train.step import init_state, make_train_step
from problems import logged_losses, lru_loop, lru_problem, rel_err, train_on_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRU = ["model.kind=lru", "gtf.mode=constant", "model.hidden=8", "model.state=4", "model.layers=2"]


def test_ring_initialisation():
    """|λ| in [r_min, r_max] and filling it (by area), arg λ in [0, max_phase], γ = √(1 − |λ|²) — also with
    the slow end the slow–fast system needs (1 − r_max = 1/20 000)."""
    for r_min, r_max, phase in [(0.4, 0.99, 0.6), (0.9, 1 - 1 / 20_000, 0.1)]:
        p = lru.init(jax.random.PRNGKey(0), 3, 8, 2000, 2, r_min, r_max, phase, "glu")
        lam = lru.eigenvalues(p)
        r = np.abs(np.asarray(lam, np.complex128))
        assert r.min() >= r_min - 1e-6 and r.max() <= r_max + 1e-7
        assert r.max() > r_max - 0.01 * (r_max - r_min) and r.min() < r_min + 0.01 * (r_max - r_min)
        # by area: the fraction with r² below the middle of [r_min², r_max²] is one half
        assert abs(np.mean(r ** 2 < (r_min ** 2 + r_max ** 2) / 2) - 0.5) < 0.03
        arg = np.angle(np.asarray(lam))
        assert arg.min() >= 0 and arg.max() <= phase + 1e-6
        np.testing.assert_allclose(np.exp(np.asarray(p["gamma_log"])), np.sqrt(1 - r ** 2), rtol=2e-3)


def test_untrained_stack_forecasts_persistence():
    cfg = config.load(None, LRU)
    model = Model.from_config(cfg.model, 3)
    params = model.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (50, 3))
    states = jax.vmap(model.F, in_axes=(None, 0))(params["F"], jax.vmap(model.initial_state, (None, 0))(params, x))
    np.testing.assert_allclose(model.observe(params, states), x, atol=1e-4)


@pytest.mark.parametrize("block", ["glu", "mlp"])
def test_free_run_equals_a_loop_of_the_equations(block):
    model, params, x = lru_problem(60, layers=2, block=block)
    gen = ev.free_run(model, params, x[0], 60)
    _, h0_re, h0_im = lru.split_state(model.initial_state(params, x[0]), 3, 2, model.state)
    h0 = np.asarray(h0_re) + 1j * np.asarray(h0_im)
    pred, _ = lru_loop(params["F"], np.asarray(x[:60]), h0, 2, block, feedback=True)
    np.testing.assert_allclose(gen, pred, rtol=1e-4, atol=1e-4)
    assert np.std(pred[30:]) > 1e-2  # the reference run moves: the comparison is not of two constants


def test_jacobians_of_a_long_batch_under_jit_equal_single_evaluations():
    """The dense Jacobian and the closed-form diagonal, jitted and mapped over 1000 states (forward mode
    went wrong past row 364 here: docs/repro/lru_jacfwd_rows.py), against one eager evaluation per state
    and against each other."""
    model, params, x = lru_problem(20, scale=0.1)
    z = jax.random.normal(jax.random.PRNGKey(5), (1000, model.latent))
    F = params["F"]
    dense = jax.jit(jax.vmap(model.jac, in_axes=(None, 0)))(F, z)
    diag = jax.jit(jax.vmap(model.jac_diag, in_axes=(None, 0)))(F, z)
    for i in (0, 363, 364, 700, 999):
        np.testing.assert_allclose(dense[i], model.jac(F, z[i]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diag, jnp.diagonal(dense, axis1=1, axis2=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_gtf_on_the_inputs_by_deer_equals_the_loop_and_bptt(alpha):
    """α x_{t−1} + (1 − α) x̂_{t−1} as the input: a nonlinear recurrence; dense DEER reaches the sequential
    states, and the gradient of a loss through it is BPTT's."""
    model, params, x = lru_problem(501, scale=0.1)  # larger block weights: Newton fails (measured, α 0.3)
    forced = ForcedStep(model.F, jnp.float32(alpha), model.forced_mask(), model.jac, model.jac_diag)

    def loss(solve, p):
        states = solve(p)
        return jnp.mean((model.observe(p, states) - x[1:]) ** 2)

    args = lambda p: (p["F"], model.initial_state(p, x[0]), model.forcing(p, x[:-1]))  # noqa: E731
    seq = lambda p: sequential(forced, *args(p))  # noqa: E731
    sol = jax.jit(lambda p: deer(forced, *args(p), throw=False))(params)  # jitted: eager dispatch is slow
    assert bool(sol.converged) and int(sol.iterations) < 40
    np.testing.assert_allclose(sol.states, seq(params), atol=2e-5, rtol=1e-4)
    g = jax.jit(jax.grad(lambda p: loss(lambda q: deer(forced, *args(q)).states, p)))(params)
    assert rel_err(g, jax.grad(lambda p: loss(seq, p))(params)) < 1e-3


def train_steps(overrides, steps=3, T=400):
    """Parameters and losses after ``steps`` updates with the config of ``overrides`` (one device)."""
    cfg = config.load(None, [f"data.steps={T + 1}", *LRU, f"train.steps={steps}", *overrides])
    from distdeer.data import loader

    source = loader.open_source(cfg)
    model = Model.from_config(cfg.model, 3)
    mode = modes.for_config(cfg, model, None, T)
    data = mode.place(source, None)
    state = init_state(model, cfg, mode, data)
    step = jax.jit(make_train_step(model, cfg, mode))
    losses = []
    for _ in range(steps):
        state, m = step(state, data)
        assert bool(m.converged) and int(m.skipped) == 0
        losses.append(float(m.loss))
    return state.params, np.array(losses)


@pytest.mark.parametrize("mode", [[], ["train.seq_len=50", "train.batch=4"],
                                  ["train.seq_len=50", "train.batch=4", "train.carry=true", "train.noise=0.1"]])
def test_teacher_forced_training_by_the_scan_equals_gtf_bptt(mode):
    """The exact scan (solver.kind scan) and GTF-BPTT at α = 1 (solver.kind sequential) train the same model
    identically, as a whole series, on windows and on carried windows with forcing noise."""
    p_scan, l_scan = train_steps(["solver.kind=scan", *mode])
    p_seq, l_seq = train_steps(["solver.kind=sequential", *mode])
    np.testing.assert_allclose(l_scan, l_seq, rtol=1e-5)
    if not mode:  # the same series every step (windows change from step to step)
        assert l_scan[-1] < l_scan[0]
    assert rel_err(p_scan, p_seq) < 1e-4


def cli_train(run_dir, devices, *extra):
    return train_on_devices(run_dir, devices, *LRU, "solver.kind=scan", "data.steps=2001", "train.log_every=5",
                            "checkpoint.every=10", *extra)


def test_lru_through_the_cli_on_1_and_4_devices_resumes_and_evaluates(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    p1 = cli_train(one, 1, "train.steps=20")
    assert p1.returncode == 0, p1.stderr[-3000:]
    res = json.load(open(one / "eval.json"))
    assert np.isfinite(res["D_stsp"]["value"]) and np.isfinite(res["lyapunov_max"]["per_step"])
    rows = [json.loads(line) for line in open(one / "metrics.jsonl")]
    assert all(r["alpha_estimate"] is None and r["newton_iterations"] == 0 for r in rows)  # no 𝒩, no Newton
    p4 = cli_train(four, 4, "train.steps=20", "mesh.devices=4")
    assert p4.returncode == 0, p4.stderr[-3000:]
    l1, l4 = logged_losses(one), logged_losses(four)
    assert sorted(l1) == sorted(l4) == [5, 10, 15, 20]
    np.testing.assert_allclose([l4[s] for s in sorted(l4)], [l1[s] for s in sorted(l1)], rtol=1e-4)
    resumed = cli_train(one, 1, "train.steps=20")
    assert resumed.returncode == 0 and "from its checkpoint at step 20" in resumed.stdout and logged_losses(one) == l1


@pytest.mark.parametrize("args,needle", [
    (["model.layers=0"], "model.layers: must be > 0"),
    (["model.state=0"], "model.state: must be > 0"),
    (["model.r_min=0.9", "model.r_max=0.9"], "r_min < r_max"),
    (["model.r_max=1.0"], "r_max < 1"),
    (["gtf.mode=adaptive"], "does not apply to model.kind lru"),
    (["solver.kind=scan", "gtf.alpha=0.5"], "solver.kind scan"),
    (["model.kind=clipped_shplrnn", "solver.kind=scan"], "solver.kind scan"),
    (["model.readout=affine"], "own readout"),
])
def test_bad_lru_config_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    run = tmp_path / "never"
    assert main(["train", os.path.join(ROOT, "configs/lorenz63.yaml"), *LRU, f"run.dir={run}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distdeer: error:") and needle in err, err
    assert not run.exists()


def test_the_ready_config_loads_and_matches_the_shplrnn_size():
    cfg = config.load(os.path.join(ROOT, "configs/lorenz63-lru.yaml"))
    model = Model.from_config(cfg.model, 3)
    n = sum(a.size for a in jax.tree.leaves(model.init(jax.random.PRNGKey(0))))
    ref = config.load(os.path.join(ROOT, "configs/lorenz63-quality.yaml"))
    m_ref = Model.from_config(ref.model, 3)
    n_ref = sum(a.size for a in jax.tree.leaves(m_ref.init(jax.random.PRNGKey(0))))
    assert 0.8 * n_ref <= n <= 1.2 * n_ref
