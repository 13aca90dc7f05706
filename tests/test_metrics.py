"""DSR measures: exact reference definitions, checked on hand-computable cases and the published floors."""

import numpy as np
import pytest

from distdeer import metrics
from distdeer.data import reference


def reference_series(*names: str) -> list[np.ndarray]:
    """Fetched reference files (``distdeer data fetch``); the test skips, naming the command, without them."""
    missing = [n for n in names if reference.local(n) is None]
    if missing:
        pytest.skip(f"reference series not in {reference.data_dir()}: run `{reference.fetch_command(missing[0])}`")
    return [np.load(reference.local(n)) for n in names]


def test_identical_series():
    x = np.random.default_rng(0).normal(size=(5000, 3))
    assert metrics.power_spectrum_distance(x, x) == 0.0
    assert abs(metrics.state_space_divergence(x, x)) < 1e-12
    assert abs(metrics.state_space_divergence_gmm(x, x)) < 1e-12


def test_disjoint_supports_are_far():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 2))
    b = rng.normal(size=(4000, 2)) * 0.05 + 2.5  # a small blob in a corner of the true box
    assert metrics.state_space_divergence(a, b, n_bins=10) > 3.0
    assert metrics.state_space_divergence_gmm(a, b + 20.0) > 50.0


def test_hand_computed_histogram():
    # 1-D, 2 bins.  True: 3 points in the left bin, 1 in the right.  Generated: 1 left, 3 right.
    x_true = np.array([[0.0], [0.1], [0.2], [1.0]])
    x_gen = np.array([[0.0], [0.9], [0.95], [1.0]])
    eps, cells = 1e-5, 2.0
    p = (np.array([3, 1]) + eps) / (4 + eps * cells)
    q = (np.array([1, 3]) + eps) / (4 + eps * cells)
    expected = float(np.sum(p * np.log(p / q)))
    np.testing.assert_allclose(metrics.state_space_divergence(x_true, x_gen, n_bins=2), expected, rtol=1e-12)


def test_hand_computed_histogram_2d_with_a_point_outside_the_box():
    # 2-D, 2 × 2 bins over the true box (min/max ± 0.1·std, ddof=1; both dims split at 0.5).  True: two
    # points in (lo, lo), one in each other cell.  Generated: one in (lo, lo), three in (hi, hi), one far
    # outside the box — dropped, the histogram normalised over the four inside.
    x_true = np.array([[0.0, 0.0], [0.1, 0.1], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x_gen = np.array([[0.05, 0.05], [0.9, 0.9], [0.95, 0.8], [1.0, 1.0], [50.0, 0.5]])
    eps, cells = 1e-5, 4.0
    p = (np.array([2, 1, 1, 1]) + eps) / (5 + eps * cells)  # cells (lo,lo), (lo,hi), (hi,lo), (hi,hi)
    q = (np.array([1, 0, 0, 3]) + eps) / (4 + eps * cells)
    expected = float(np.sum(p * np.log(p / q)))
    np.testing.assert_allclose(metrics.state_space_divergence(x_true, x_gen, n_bins=2), expected, rtol=1e-12)


def test_a_fixed_point_has_the_flat_spectrum_not_nan():
    t = np.arange(4096)[:, None] * 0.05
    x = np.hstack([np.sin(t), np.cos(1.3 * t)])
    still = np.repeat(x[:1], len(x), axis=0)  # a model that settled exactly on a point
    d = metrics.power_spectrum_distance(x, still)
    flat = np.full(len(x) // 2 + 1, 1.0 / (len(x) // 2 + 1))
    p = metrics.smoothed_spectra(x)
    expected = np.mean(np.linalg.norm(np.sqrt(p) - np.sqrt(flat), axis=1) / np.sqrt(2.0))
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    assert 0.5 < d < 1.0
    np.testing.assert_allclose(metrics.smoothed_spectra(still), np.vstack([flat, flat]), rtol=1e-12)
    assert np.isnan(metrics.power_spectrum_distance(x, np.where(t > 10, np.nan, x)))  # a diverged run


def test_no_generated_point_in_the_box_is_nan():
    x = np.random.default_rng(2).normal(size=(100, 2))
    assert np.isnan(metrics.state_space_divergence(x, x + 100.0))


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.state_space_divergence(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.power_spectrum_distance(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.state_space_divergence_gmm(np.zeros((10, 6)), np.zeros((11, 6)))


def test_gmm_is_deterministic_by_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2000, 6)), rng.normal(size=(2000, 6)) * 1.3
    assert metrics.state_space_divergence_gmm(a, b, seed=5) == metrics.state_space_divergence_gmm(a, b, seed=5)
    assert metrics.state_space_divergence_gmm(a, b, seed=5) != metrics.state_space_divergence_gmm(a, b, seed=6)


def test_spectrum_distance_of_shifted_frequency():
    t = np.arange(8192)[:, None]
    slow, fast = np.sin(2 * np.pi * t / 100.0), np.sin(2 * np.pi * t / 25.0)
    d = metrics.power_spectrum_distance(slow, fast, sigma=2.0)
    assert 0.9 < d <= 1.0  # disjoint spectral peaks: Hellinger distance near its maximum 1


def test_prediction_error_of_an_exact_model():
    x = np.cumsum(np.ones((50, 2)), axis=0)  # x_t = t + 1: the map x ↦ x + 1
    assert metrics.prediction_error(lambda x0, n: x0 + n, x, n=5) == 0.0
    assert metrics.prediction_error(lambda x0, n: x0, x, n=5) == 25.0


@pytest.mark.parametrize("name,dstsp,dh", [("lorenz63", 0.119, 0.070), ("ECG", 0.294, 0.060),
                                           ("fixed point", 16.4, 0.877)])
def test_reference_floors(name, dstsp, dh):
    """The floors measured with the reference definitions: test vs (noisy) train; Lorenz-63 test vs a
    model that sits on a point (its first test point: 16.44 / 0.8761 — design §5 quotes 16.4 / 0.877, whose
    point is not stated; any exactly constant series has the same, flat, spectrum)."""
    if name == "lorenz63":
        train, test = reference_series("lorenz63_on0.05_train.npy", "lorenz63_test.npy")
    elif name == "fixed point":
        (test,) = reference_series("lorenz63_test.npy")
        train = np.repeat(test[:1], len(test), axis=0)
    else:
        train, test = reference_series("ECG_pecuzal_5d_train.npy", "ECG_pecuzal_5d_test.npy")
    if name == "fixed point":
        assert abs(metrics.state_space_divergence(test, train) - dstsp) < 0.05
        assert abs(metrics.power_spectrum_distance(test, train) - dh) < 2e-3
        return
    assert round(metrics.state_space_divergence(test, train), 3) == dstsp
    assert round(metrics.power_spectrum_distance(test, train), 3) == dh
