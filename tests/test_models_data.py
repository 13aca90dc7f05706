"""Models (Jacobians vs autodiff, readout inversion), GTF α rule, generators and the zarr store."""

import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer import gtf
from distdeer.config import ModelConfig
from distdeer.data import store, systems
from distdeer.models import Model
from distdeer.train.modes import jacobian_norm


@pytest.mark.parametrize("kind", ["shplrnn", "clipped_shplrnn", "alrnn", "plrnn"])
def test_jacobians_match_autodiff(kind):
    model = Model(kind, latent=6, observed=3, hidden=12, nonlinear=3)
    params = model.init(jax.random.PRNGKey(1))
    for i in range(5):
        z = 2 * jax.random.normal(jax.random.PRNGKey(10 + i), (6,))
        auto = jax.jacfwd(lambda v: model.F(params["F"], v))(z)
        np.testing.assert_allclose(model.jac(params["F"], z), auto, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.jac_diag(params["F"], z), jnp.diagonal(auto), rtol=1e-5, atol=1e-6)


def test_forced_step_jacobian_matches_autodiff():
    model = Model("clipped_shplrnn", latent=5, observed=2, hidden=8)
    params = model.init(jax.random.PRNGKey(0))
    step = gtf.ForcedStep(model.F, 0.3, model.forced_mask(), model.jac, model.jac_diag)
    z, zhat = jax.random.normal(jax.random.PRNGKey(1), (5,)), jax.random.normal(jax.random.PRNGKey(2), (5,))
    auto = jax.jacfwd(lambda v: step(params["F"], v, zhat))(z)
    np.testing.assert_allclose(step.jac(params["F"], z, zhat), auto, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.jac_diag(params["F"], z, zhat), jnp.diagonal(auto), rtol=1e-5, atol=1e-6)
    # only the forced (first two) columns are damped
    np.testing.assert_allclose(step.jac(params["F"], z, zhat)[:, 2:], model.jac(params["F"], step.forced_state(z, zhat))[:, 2:])


def test_readout_inversion():
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    affine = Model("shplrnn", latent=5, observed=3, hidden=8, readout="affine")
    p = affine.init(jax.random.PRNGKey(1))
    zhat = affine.forcing(p, x)
    assert zhat.shape == (20, 5)
    np.testing.assert_allclose(affine.observe(p, zhat), x, atol=1e-5)  # G(pinv(B)(x − b)) = x
    np.testing.assert_allclose(affine.initial_state(p, x[0]), zhat[0], atol=1e-6)
    ident = Model("shplrnn", latent=5, observed=3, hidden=8)
    q = ident.init(jax.random.PRNGKey(1))
    zi = ident.forcing(q, x)
    np.testing.assert_array_equal(zi[:, :3], x)
    np.testing.assert_array_equal(zi[:, 3:], 0.0)
    q["readout"]["L"] = jnp.ones((2, 3))
    np.testing.assert_allclose(ident.initial_state(q, x[0]), jnp.concatenate([x[0], jnp.full(2, x[0].sum())]), atol=1e-6)
    np.testing.assert_array_equal(ident.forced_mask(), [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="smaller than the observed"):
        Model.from_config(ModelConfig(latent=2), observed=3)


@pytest.mark.parametrize("kind", ["clipped_shplrnn", "alrnn"])
def test_unforced_init_scales_only_the_unforced_rows(kind):
    """model.unforced_init: the unforced units' weight rows start scaled, so their Jacobian block starts
    within 0.1·‖W-block‖ of diag(a) (contractive); forced rows, a, h and the other parameters unchanged."""
    base = Model(kind, latent=6, observed=3, hidden=50, nonlinear=3)
    small = Model.from_config(ModelConfig(kind=kind, latent=6, hidden=50, nonlinear=3, unforced_init=0.1), 3)
    p, q = base.init(jax.random.PRNGKey(2)), small.init(jax.random.PRNGKey(2))
    W = "W1" if "W1" in p["F"] else "W"
    np.testing.assert_allclose(q["F"][W][3:], 0.1 * p["F"][W][3:], rtol=1e-6)
    np.testing.assert_array_equal(q["F"][W][:3], p["F"][W][:3])
    for k in p["F"]:
        if k != W:
            np.testing.assert_array_equal(q["F"][k], p["F"][k])
    for i in range(5):
        z = 2 * jax.random.normal(jax.random.PRNGKey(10 + i), (6,))
        block = np.asarray(small.jac(q["F"], z))[3:, 3:]
        a = np.asarray(q["F"]["a"])[3:]
        assert np.linalg.norm(block - np.diag(a), 2) <= 0.1 * np.linalg.norm(np.asarray(base.jac(p["F"], z))[3:, 3:] - np.diag(a), 2) + 1e-6
        assert np.max(np.abs(np.linalg.eigvals(block))) < 1.0
    # an affine readout forces every unit: nothing to scale
    aff = Model.from_config(ModelConfig(kind=kind, latent=6, hidden=50, nonlinear=3, readout="affine", unforced_init=0.1), 3)
    np.testing.assert_array_equal(aff.init(jax.random.PRNGKey(2))["F"][W], p["F"][W])


@pytest.mark.parametrize("kind", ["clipped_shplrnn", "alrnn"])
def test_unforced_timescale_sets_the_unforced_units_memories(kind):
    """model.unforced_timescale: the unforced units' a start at 1 − 1/τ, τ log-spaced from 10 to it — their
    free decay z_k ∝ a^k lasts τ steps; forced units and every other parameter as by default."""
    base = Model(kind, latent=8, observed=3, hidden=50, nonlinear=3)
    slow = Model.from_config(ModelConfig(kind=kind, latent=8, hidden=50, nonlinear=3, unforced_timescale=1e5), 3)
    p, q = base.init(jax.random.PRNGKey(4)), slow.init(jax.random.PRNGKey(4))
    a = np.asarray(q["F"]["a"], np.float64)
    np.testing.assert_allclose(-1.0 / np.log(a[3:]), [10, 100, 1000, 10_000, 100_000], rtol=0.06)
    np.testing.assert_array_equal(q["F"]["a"][:3], p["F"]["a"][:3])
    for k in p["F"]:
        if k != "a":
            np.testing.assert_array_equal(q["F"][k], p["F"][k])


@pytest.mark.parametrize("kind", ["clipped_shplrnn", "alrnn"])
def test_exp_decay_is_the_same_map_with_the_chain_rule_gradient(kind):
    """model.unforced_decay exp: the unforced units' a = exp(−exp ν).  At the same initialisation it is the
    linear parametrisation's map (outputs, Jacobians, regulariser); the gradient of a 60-step free run's loss
    (lax.scan) with respect to ν is the linear model's gradient with respect to those a times da/dν =
    −exp(ν) a."""
    cfg = dict(kind=kind, latent=7, hidden=20, nonlinear=3, unforced_timescale=1e3)
    lin = Model.from_config(ModelConfig(**cfg), 3)
    exp = Model.from_config(ModelConfig(**cfg, unforced_decay="exp"), 3)
    p, q = lin.init(jax.random.PRNGKey(5))["F"], exp.init(jax.random.PRNGKey(5))["F"]
    assert q["a"].shape == (3,) and q["nu"].shape == (4,)
    np.testing.assert_allclose(exp.map_params(q)["a"], p["a"], rtol=1e-6)
    z = jax.random.normal(jax.random.PRNGKey(6), (7,))
    np.testing.assert_allclose(exp.F(q, z), lin.F(p, z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.jac(q, z), lin.jac(p, z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.regulariser({"F": q, "readout": {}}, 0.1),
                               lin.regulariser({"F": p, "readout": {}}, 0.1), rtol=1e-5)

    def loss(model, F):
        zs = jax.lax.scan(lambda v, _: (model.F(F, v), v), z, None, length=60)[1]
        return jnp.sum(zs ** 2)

    g_lin, g_exp = jax.grad(partial(loss, lin))(p), jax.grad(partial(loss, exp))(q)
    a = np.asarray(p["a"][3:], np.float64)
    np.testing.assert_allclose(g_exp["nu"], np.asarray(g_lin["a"][3:]) * (-np.exp(np.asarray(q["nu"])) * a),
                               rtol=1e-3)
    np.testing.assert_allclose(g_exp["a"], g_lin["a"][:3], rtol=1e-4)


def test_alpha_rule_and_norm_estimates():
    assert float(gtf.alpha_from_norm(jnp.float32(0.5))) == 0.0
    np.testing.assert_allclose(gtf.alpha_from_norm(jnp.float32(4.0)), 0.75)
    model = Model("plrnn", latent=3, observed=3)
    params = {"F": {"a": jnp.array([2.0, 0.5, 0.5]), "W": jnp.zeros((3, 3)), "h": jnp.zeros(3)}}
    zt = jnp.ones((10, 3))
    # J = diag(2, .5, .5): spectral norm 2 at every step
    np.testing.assert_allclose(jacobian_norm(model, params, zt, "geometric", 100), 2.0, rtol=1e-6)
    np.testing.assert_allclose(jacobian_norm(model, params, zt, "mean", 100), 2.0, rtol=1e-6)
    params2 = {"F": {"a": jnp.array([1.0, 0.5, 0.5]), "W": jnp.zeros((3, 3)), "h": jnp.zeros(3)}}
    both = jnp.stack([zt, zt])
    # batch maximum takes the larger of two sequences' geometric means: mix via a per-batch model is
    # not expressible with shared params, so check the reduction on identical sequences
    np.testing.assert_allclose(jacobian_norm(model, params2, both, "max", 100), 1.0, rtol=1e-6)


@pytest.mark.parametrize("K,m", [(5, 3), (2000, 3), (371, 3), (50, 16), (7, 40)])
def test_spectral_norms_match_numpy_and_stay_below_lapack_split_on_cpu(K, m):
    """‖A_k‖₂ as numpy's SVD gives it, and on CPU no LAPACK call in the compiled program is big enough for
    jaxlib to hand chunks of it to the thread pool it runs on (cost 10·m³ per matrix reaching 2·10^5 FLOP):
    such calls, one per simulated device, deadlocked 2 processes × 2 CPU devices at T = 2·10^4."""
    a = jax.random.normal(jax.random.PRNGKey(K), (K, m, m))
    ref = np.linalg.norm(np.asarray(a, np.float64), 2, axis=(1, 2))
    np.testing.assert_allclose(jax.jit(gtf.spectral_norms)(a), ref, rtol=2e-6)
    hlo = jax.jit(gtf.spectral_norms).lower(a).compile().as_text()
    calls = [line for line in hlo.splitlines() if "lapack_sgesdd" in line]
    assert calls, "no SVD call found"
    for line in calls:
        batch = int(re.search(r"f32\[(\d+),%d,%d\]" % (m, m), line).group(1))
        assert batch * 10 * m ** 3 < 200_000 or batch == 1, line[:200]


@pytest.mark.parametrize("system,dim", [("lorenz63", 3), ("rossler", 3), ("lorenz96", 6), ("slowfast", 3)])
def test_generators_are_seeded_and_finite(system, dim):
    a = np.asarray(systems.generate(system, 3000, seed=1, dim=dim))
    b = np.asarray(systems.generate(system, 3000, seed=1, dim=dim))
    c = np.asarray(systems.generate(system, 3000, seed=2, dim=dim))
    assert a.shape == (3000, dim) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_lorenz63_statistics():
    x = np.asarray(systems.generate("lorenz63", 100_000, dt=0.01, seed=0))
    # long-run statistics of the standard Lorenz attractor: mean z ≈ 23.5, x and y symmetric about 0
    assert 22.5 < x[:, 2].mean() < 24.5
    assert abs(x[:, 0].mean()) < 1.5 and abs(x[:, 1].mean()) < 1.5
    assert 7.0 < x[:, 0].std() < 9.0


def test_slowfast_has_a_slow_time_scale():
    x = np.asarray(systems.generate("slowfast", 60_000, dt=0.01, seed=0))
    # the slow drive modulates the mean of z with period 200 time units (20 000 samples)
    window = x[:, 2].reshape(-1, 2000).mean(1)
    assert window.max() - window.min() > 5.0


def test_zarr_round_trip_and_slices(tmp_path):
    raw = np.asarray(systems.generate("lorenz63", 5000, seed=3), np.float64)
    z, mean, std = store.standardise(raw)
    path = str(tmp_path / "l63.zarr")
    store.write(path, z, mean=mean, std=std, attrs={"system": "lorenz63"})
    x, attrs = store.read(path, 1234, 2345)
    np.testing.assert_array_equal(x, z[1234:2345])
    np.testing.assert_allclose(np.asarray(attrs["mean"]), mean)
    full, info = store.load(path)
    np.testing.assert_array_equal(full, z)
    np.testing.assert_allclose(full * np.asarray(info["std"]) + np.asarray(info["mean"]), raw, rtol=1e-5, atol=1e-4)
    with pytest.raises(store.DataError, match="already exists"):
        store.write(path, z, mean=mean, std=std)
    meta = open(os.path.join(path, "zarr.json")).read()
    assert '"zstd"' in meta and '"chunk_shape":[5000,3]' in meta.replace(" ", "")


@pytest.mark.parametrize("x,match", [
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 0.0]]), "NaN/inf"),
    (np.arange(10.0), "2-D"),
    (np.ones((1, 3)), "at least 2"),
    (np.stack([np.arange(5.0), np.ones(5)], 1), "constant"),
])
def test_bad_series_rejected(x, match):
    with pytest.raises(store.DataError, match=match):
        store.check_series(x, "test")


@pytest.mark.parametrize("nonlinear", [2, 10])
@pytest.mark.parametrize("guess", ["data", "default"])
def test_partial_forcing_newton_converges_alrnn_m20_n3(nonlinear, guess):
    """Identity readout, M = 20 > N = 3: α damps only the 3 forced units; Newton must still converge
    on the free ones (reported in docs/benchmarks.md)."""
    from distdeer import deer, sequential

    x = jnp.asarray(store.standardise(np.asarray(systems.generate("lorenz63", 10_001, noise=0.05)))[0])
    model = Model("alrnn", latent=20, observed=3, nonlinear=nonlinear)
    params = model.init(jax.random.PRNGKey(0))
    zhat, z0 = model.forcing(params, x), model.initial_state(params, x[0])
    alpha = gtf.alpha_from_norm(jacobian_norm(model, params, zhat[:-1], "geometric", 4096))
    step = gtf.ForcedStep(model.F, alpha, model.forced_mask(), model.jac, model.jac_diag)
    sol = deer(step, params["F"], z0, zhat[:-1], init=zhat[1:] if guess == "data" else None, max_iter=30)
    assert bool(sol.converged) and int(sol.iterations) <= 10
    np.testing.assert_allclose(sol.states, sequential(step, params["F"], z0, zhat[:-1]), atol=2e-5)
