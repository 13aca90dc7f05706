"""The summary over runs (seeds): median ± MAD, NaN, diverged and resting runs counted, mixed protocols refused."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer import eval as eval_mod
from distdeer.models import Model


def result(run_dir, d_stsp, d_h=0.1, pe=0.01, lyap=0.9, diverged=False, test_data="test.npy", sigma=20.0):
    return {"run_dir": run_dir, "test_data": test_data, "T_test": 1000, "diverged": diverged,
            "D_stsp": {"value": d_stsp, "variant": "binning", "n_bins": 30},
            "D_H": {"value": d_h, "sigma": sigma}, "PE": {"value": pe, "n": 20, "units": "standardised"},
            "lyapunov_max": {"per_step": 0.009 if lyap is None else lyap * 0.01, "per_time_unit": lyap}}


def test_median_mad_with_nan_and_diverged_runs():
    s = eval_mod.summarise([result("/r/a-seed0", 0.1, lyap=0.8), result("/r/a-seed1", float("nan"), diverged=True),
                            result("/r/a-seed2", 0.3, lyap=1.0)])
    assert s["D_stsp"]["median"] == pytest.approx(0.2) and s["D_stsp"]["mad"] == pytest.approx(0.1)
    assert s["D_stsp"]["n"] == 3 and s["D_stsp"]["nan_runs"] == 1 and s["diverged_runs"] == 1
    assert s["D_H"]["median"] == pytest.approx(0.1) and s["D_H"]["mad"] == 0.0 and s["D_H"]["nan_runs"] == 0
    assert s["lyapunov_max_per_time_unit"]["median"] == pytest.approx(0.9)
    assert s["lyapunov_max_per_step"]["median"] == pytest.approx(0.009)
    unknown_dt = eval_mod.summarise([result("/r/a", 0.1, lyap=None), result("/r/b", 0.2)])
    assert "lyapunov_max_per_time_unit" not in unknown_dt  # not every run knows its sampling interval
    assert s["protocol"]["D_H"] == {"sigma": 20.0} and s["protocol"]["test_data"] == os.path.realpath("test.npy")
    all_nan = eval_mod.summarise([result("/r/x", float("nan")), result("/r/y", float("nan"))])
    assert np.isnan(all_nan["D_stsp"]["median"]) and all_nan["D_stsp"]["nan_runs"] == 2


def test_runs_evaluated_differently_are_refused():
    same = eval_mod.summarise([result("/r/a", 0.1), result("/r/b", 0.2, test_data=os.path.abspath("test.npy"))])
    assert same["D_stsp"]["n"] == 2  # one test file, named relatively and absolutely
    with pytest.raises(eval_mod.EvalError, match="evaluated differently"):
        eval_mod.summarise([result("/r/a", 0.1), result("/r/b", 0.2, test_data="other.npy")])
    with pytest.raises(eval_mod.EvalError, match="evaluated differently"):
        eval_mod.summarise([result("/r/a", 0.1), result("/r/b", 0.2, sigma=10.0)])


def test_test_data_compared_by_content_when_every_run_recorded_it():
    a = dict(result("/r/a", 0.1, test_data="/data/test.npy"), test_data_sha256="0f" * 32)
    copy = dict(result("/r/b", 0.2, test_data="/elsewhere/test-copy.npy"), test_data_sha256="0f" * 32)
    s = eval_mod.summarise([a, copy])  # a byte-identical copy at another path is the same test data
    assert s["D_stsp"]["n"] == 2
    assert s["protocol"]["test_data_sha256"] == "0f" * 32 and s["protocol"]["test_data"] == "/data/test.npy"
    edited = dict(result("/r/c", 0.3, test_data="/data/test.npy"), test_data_sha256="1e" * 32)
    with pytest.raises(eval_mod.EvalError, match="evaluated differently"):
        eval_mod.summarise([a, edited])  # same path, other contents (the file was rewritten between runs)
    older = result("/r/d", 0.4, test_data="/elsewhere/test-copy.npy")  # an eval.json from before the digest
    with pytest.raises(eval_mod.EvalError, match="evaluated differently"):
        eval_mod.summarise([a, older])  # without every digest the real paths decide, and these differ
    assert eval_mod.summarise([a, result("/r/e", 0.5, test_data="/data/test.npy")])["D_stsp"]["n"] == 2


def test_content_digest_is_of_the_values():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    assert eval_mod.content_digest(x) == eval_mod.content_digest(x.astype(np.float64))
    assert eval_mod.content_digest(x) == eval_mod.content_digest(np.asfortranarray(x))
    assert eval_mod.content_digest(x) != eval_mod.content_digest(x.reshape(75, 2))
    y = x.copy()
    y[17, 1] += 1e-6
    assert eval_mod.content_digest(x) != eval_mod.content_digest(y)


def test_default_summary_path():
    assert eval_mod.summary_path(["/r/l63-seed0", "/r/l63-seed1/", "/r/l63-seed12"]) == "/r/l63-summary.json"
    assert eval_mod.summary_path(["/r/a-seed0", "/r/b-seed1"]) == "/r/summary.json"
    assert eval_mod.summary_path(["/r/x/one", "/r/y/two"]) == "/r/summary.json"


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_figures_for_any_dimension(tmp_path, n):
    from distdeer import metrics, plots

    t = np.arange(3000)[:, None] * 0.02
    x = np.sin(t * (1.0 + np.arange(n)))
    gen = np.cos(t * (1.0 + np.arange(n)))
    gen[-5:] = np.nan  # a run that diverged at the end still plots its finite part
    plots.attractor_figure(x, gen, str(tmp_path / "a.png"), "title")
    plots.spectrum_figure(metrics.smoothed_spectra(x), metrics.smoothed_spectra(x[::-1]), str(tmp_path / "s.png"))
    plots.timeseries_figure(x, gen, str(tmp_path / "t.png"))
    for name in ("a.png", "s.png", "t.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_figure_of_a_fixed_point_jittering_at_float_resolution(tmp_path):
    """A long free run resting on a fixed point, its values among four neighbouring floats: the axes
    autoscale down to that bit and an unsplit path overflowed Agg's cell limit (OverflowError)."""
    from distdeer import plots

    x = np.sin(np.arange(200_000) * 3e-4)[:, None]
    # a period-4 cycle over four neighbouring floats, as a trained model's free run produced it
    u = np.float32(1.0899e-4) + np.spacing(np.float32(1.0899e-4)) * np.array([0, 3, 1, 2], np.float32)
    gen = np.tile(u, 50_000)[:, None]
    plots.attractor_figure(x, gen, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 5000


@pytest.mark.parametrize("a,expected", [((0.5, 0.8), np.log(0.8)), ((0.9, 1.02), np.log(1.02))])
def test_largest_lyapunov_of_a_linear_map_is_the_log_spectral_radius(a, expected):
    """F(z) = diag(a) z + h (a PLRNN with W = 0): every tangent vector ends on the dominant eigenvector,
    so the exponent per step is log max|a| — analytic, whatever the transient."""
    model = Model("plrnn", latent=2, observed=2)
    params = model.init(jax.random.PRNGKey(0))
    params["F"] = {"a": jnp.asarray(a, jnp.float32), "W": jnp.zeros((2, 2), jnp.float32),
                   "h": jnp.asarray([0.1, -0.2], jnp.float32)}
    for transient in (0, 300):
        lyap = eval_mod.largest_lyapunov(model, params, np.asarray([0.3, 0.4], np.float32), transient=transient,
                                         steps=2000)
        assert lyap == pytest.approx(expected, abs=2e-3)


def test_a_free_run_at_rest_on_a_fixed_point_is_flagged_and_counted():
    """``at_rest``: the last quarter's largest per-channel standard deviation against 10^-3 (standardised),
    on analytic series, on a contractive model's protocol run, and in the summary and the headline."""
    t = np.arange(4000)
    cycle = np.stack([np.sin(0.05 * t), np.cos(0.05 * t)], 1)
    assert not eval_mod.at_rest(cycle)["value"]
    settled = np.stack([np.exp(-t / 50.0), np.full(len(t), 2.0)], 1)  # at rest long before the last quarter
    rest = eval_mod.at_rest(settled)
    assert rest["value"] and rest["spread"] < 1e-9
    # the tolerance, from both sides: a cycle of amplitude A has standard deviation A / √2
    assert not eval_mod.at_rest(2e-3 * cycle)["value"] and eval_mod.at_rest(1e-3 * cycle)["value"]
    diverged = np.where(t[:, None] > 3500, np.inf, cycle)
    assert not eval_mod.at_rest(diverged)["value"] and np.isnan(eval_mod.at_rest(diverged)["spread"])
    # a PLRNN with W = 0 and |a| < 1 runs to its fixed point h / (1 − a)
    model = Model("plrnn", latent=2, observed=2)
    params = model.init(jax.random.PRNGKey(0))
    params["F"] = {"a": jnp.asarray((0.5, 0.8), jnp.float32), "W": jnp.zeros((2, 2), jnp.float32),
                   "h": jnp.asarray([0.1, -0.2], jnp.float32)}
    gen = eval_mod.protocol_run(model, params, np.asarray([0.3, 0.4], np.float32), 2000)
    np.testing.assert_allclose(gen[-1], [0.2, -1.0], rtol=1e-5)
    assert eval_mod.at_rest(gen)["value"]
    runs = [result("/r/a-seed0", 0.1), result("/r/a-seed1", 0.2), result("/r/a-seed2", 0.3)]
    for r, rests in zip(runs, (True, False, True)):
        r["fixed_point"] = {"value": rests}
    assert eval_mod.summarise(runs)["fixed_point_runs"] == 2
    assert "fixed_point_runs" not in eval_mod.summarise([result("/r/b-seed0", 0.1)])  # written before the flag
    line = lambda r: eval_mod.headline({**r, "lyapunov_max": {"per_step": 0.0, "per_time_unit": None,  # noqa: E731
                                                              "system_reference_per_time_unit": None}})
    assert line(runs[0]).endswith("rests on a fixed point") and "fixed point" not in line(runs[1])
