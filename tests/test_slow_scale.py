"""Long time scales: the slow–fast and bursting systems, delay embedding, and the slow-scale measure D_slow
against surrogates (an independent true series scores near the floor; a frozen or wrong-period slow
variable scores badly)."""

import json
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer import metrics
from distdeer.data import embed, store, systems

SF_BLOCK, HR_BLOCK = 1000, 300  # the configs' eval.slow_block (configs/slowfast*.yaml, configs/bursting*.yaml)


def integrate_from(field, x0, steps, dt, observed, seed):
    """A series of ``field`` from ``x0`` with its first three variables perturbed by ``seed`` (as generate)."""
    x0 = jnp.asarray(x0).at[:3].add(0.1 * jax.random.normal(jax.random.PRNGKey(seed), (3,)))
    return np.asarray(systems.integrate(field, x0, steps, dt, transient=2000))[:, :observed]


def test_slowfast_drive_is_the_hidden_systems_trajectory_with_its_analytic_drive():
    steps, dt = 3000, 0.01
    shown = np.asarray(systems.generate("slowfast_drive", steps, dt, seed=3))
    hidden = np.asarray(systems.generate("slowfast", steps, dt, seed=3))
    assert shown.shape == (steps, 4)
    np.testing.assert_array_equal(shown[:, :3], hidden)
    # u' = −ω v, v' = ω u from (1, 0): u = cos(ω t); sample k is taken at t = (2000 + k + 1) dt
    t = (2000 + np.arange(steps) + 1) * dt
    np.testing.assert_allclose(shown[:, 3], np.cos(2 * np.pi * t / systems.SLOW_PERIOD), atol=1e-4)


def test_hindmarsh_rose_field_and_its_chaotic_bursts():
    v = jnp.array([0.5, -1.0, 3.1])
    expect = [-1.0 - 0.125 + 0.75 - 3.1 + 3.25, 1.0 - 1.25 + 1.0, 0.005 * (4 * 2.1 - 3.1)]
    np.testing.assert_allclose(systems.hindmarsh_rose_field(v), expect, rtol=1e-6)
    x, _, z = np.asarray(systems.generate("hindmarsh_rose", 60_000, 0.05, seed=0)).T
    spikes = np.where((x[:-1] < 0.5) & (x[1:] >= 0.5))[0]
    # burst cycles: the slow variable z rises while the cell bursts and falls while it rests — one cycle
    # per rise through its mean + σ/4 after a fall below mean − σ/4 (the band ignores the spikes' ripple)
    high, low, ups, armed = z.mean() + z.std() / 4, z.mean() - z.std() / 4, [], False
    for t, v in enumerate(z):
        if armed and v > high:
            ups.append(t)
        armed = v < low or (armed and v <= high)
    ups = np.array(ups)
    cycles = np.diff(ups)
    per_cycle = np.diff(np.searchsorted(spikes, ups))
    assert len(cycles) >= 10
    assert 1000 <= np.median(cycles) <= 10_000  # one burst cycle spans thousands of steps at dt 0.05
    assert np.median(cycles) > 5 * np.median(np.diff(spikes))  # slow cycle ≫ the spikes
    assert per_cycle.min() >= 2 and len(set(per_cycle.tolist())) >= 2  # bursts, of varying length (chaotic)


def test_delay_embedding_rows_and_the_rule_on_a_sine_and_lorenz():
    s = np.arange(20.0)
    y = embed.delay_embed(s, lag=3, dim=3)
    assert y.shape == (14, 3)
    np.testing.assert_array_equal(y[0], [6, 3, 0])
    np.testing.assert_array_equal(y[-1], [19, 16, 13])
    with pytest.raises(ValueError, match="too short"):
        embed.delay_embed(s, lag=10, dim=3)
    # a sine of period 200: s_t and s_{t+50} are (cos, sin), independent — the mutual information's first
    # minimum lies at a quarter period (its histogram estimate ripples ~5 % from lag to lag before it)
    sine = np.sin(2 * np.pi * np.arange(40_000) / 200 + 0.3)
    assert abs(embed.choose_lag(sine)[0] - 50) <= 2
    # Lorenz-63 x: its attractor (dimension 2.06) is not planar, and Takens' bound is 5
    x = np.asarray(systems.generate("lorenz63", 50_000, 0.01, seed=0))[:, 0]
    lag, _ = embed.choose_lag(x)
    dim, fractions = embed.choose_dim(x, lag)
    assert 10 <= lag <= 25 and 3 <= dim <= 5 and fractions[1] > 0.05


def test_block_features_are_block_means_and_spreads():
    x = np.stack([np.repeat([0.0, 2.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 5.0], 4), np.tile([1.0, -1.0], 18)], 1)
    f = metrics.block_features(x, 4)
    np.testing.assert_allclose(f[:, 0], [0, 2, 0, 2, 1, 1, 1, 1, 5])
    np.testing.assert_allclose(f[:, 2], 0.0)
    np.testing.assert_allclose(f[:, 1], 0.0)
    np.testing.assert_allclose(f[:, 3], 1.0)
    with pytest.raises(ValueError, match="at least 8"):
        metrics.block_features(x, 5)


def assert_surrogates_score_badly(true, surrogates, block):
    """Every pair of independent true series scores 1.5× below every surrogate against them (the floor
    spreads: 0.12–0.32 over slow–fast pairs of random drive phase, docs/results.md)."""
    floor = [metrics.slow_scale_distance(a, b, block) for i, a in enumerate(true) for b in true[i + 1:]]
    bad = [metrics.slow_scale_distance(true[0], s, block) for s in surrogates]
    assert 1.5 * max(floor) < min(bad), (floor, bad)
    return floor, bad


@pytest.mark.parametrize("observed", [3, 4])  # the drive hidden (slowfast) and observed (slowfast_drive)
def test_slow_scale_distance_of_slowfast_surrogates(observed):
    steps = 200_000  # 10 slow periods
    gen = partial(integrate_from, steps=steps, dt=0.01, observed=observed)
    phase = lambda p: [1.0, 1.0, 20.0, np.cos(p), np.sin(p)]  # noqa: E731 — independent series: any drive phase
    true = [gen(systems.slowfast_field, phase(p), seed=s) for s, p in enumerate((0.0, 2.0, 4.0))]
    frozen = gen(partial(systems.slowfast_field, depth=0.0), phase(0.0), seed=2)  # ρ held at 28
    wrong = gen(partial(systems.slowfast_field, period=100.0), phase(0.0), seed=3)  # half the slow period
    floor, bad = assert_surrogates_score_badly(true, [frozen, wrong], SF_BLOCK)
    assert metrics.power_spectrum_distance(true[0], wrong) < bad[1]  # D_H (σ = 20) hardly sees the period
    # a model's free run that diverged has no envelope
    assert np.isnan(metrics.slow_scale_distance(true[0], np.full_like(true[0], np.nan), SF_BLOCK))


def test_slow_scale_distance_of_bursting_surrogates():
    gen = partial(integrate_from, steps=100_000, dt=0.05, observed=3)  # ≈ 30 burst cycles
    x0 = [-1.0, 0.0, 3.0]
    true = [gen(systems.hindmarsh_rose_field, x0, seed=s) for s in (0, 1, 4)]
    z_mean = float(true[0][:, 2].mean())
    frozen_field = lambda v: systems.hindmarsh_rose_field(v).at[2].set(0.0)  # noqa: E731 — z held: no bursts
    frozen = gen(frozen_field, [-1.0, 0.0, z_mean], seed=2)
    slower = gen(partial(systems.hindmarsh_rose_field, r=0.0025), x0, seed=3)  # slow variable at half the rate
    assert_surrogates_score_badly(true, [frozen, slower], HR_BLOCK)
    # the membrane variable alone, delay-embedded: the measure works on the embedding as well
    emb = [embed.delay_embed(x[:, 0], 20, 3) for x in (*true, frozen, slower)]
    assert_surrogates_score_badly(emb[:3], emb[3:], HR_BLOCK)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distdeer.cli", *args], capture_output=True, text=True)


def test_data_embed_command(tmp_path):
    src = tmp_path / "hr.zarr"
    assert run_cli("data", "generate", "hindmarsh_rose", "--steps", "20000", "--dt", "0.05",
                   "--out", str(src)).returncode == 0
    out = tmp_path / "emb.zarr"
    proc = run_cli("data", "embed", str(src), "--channel", "0", "--lag", "7", "--dim", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    x = store.read_data_units(str(out))
    raw = store.read_data_units(str(src))[:, 0]
    np.testing.assert_allclose(x, embed.delay_embed(raw, 7, 4), rtol=1e-5, atol=1e-5)
    attrs = store.attributes(store.open_series(str(out)))
    assert attrs["dt"] == 0.05 and attrs["system"] == "hindmarsh_rose"
    assert attrs["embedding"]["lag"] == 7 and attrs["embedding"]["dim"] == 4
    like = tmp_path / "like.zarr"
    assert run_cli("data", "embed", str(src), "--channel", "0", "--like", str(out), "--out", str(like)).returncode == 0
    assert store.read_data_units(str(like)).shape == (20000 - 21, 4)
    by_rule = tmp_path / "rule.zarr"
    assert run_cli("data", "embed", str(src), "--channel", "0", "--out", str(by_rule)).returncode == 0
    rule = store.attributes(store.open_series(str(by_rule)))["embedding"]
    assert rule["lag"] == embed.choose_lag(raw)[0] and len(rule["false_neighbours"]) >= rule["dim"]
    for argv, needle in [(["--channel", "3"], "channels 0..2"),
                         (["--channel", "1", "--like", str(out)], "embeds channel 0"),
                         (["--channel", "0", "--like", str(out), "--lag", "3"], "drop --lag"),
                         (["--channel", "0", "--like", str(src)], "not a series written by")]:
        bad = tmp_path / "bad.zarr"
        proc = run_cli("data", "embed", str(src), *argv, "--out", str(bad))
        assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not bad.exists()
    json.dumps(attrs)  # the recorded attributes are plain JSON
