"""DSR measures: exact reference definitions, checked on hand-computable cases and the published floors."""

import os

import numpy as np
import pytest

from distdeer import metrics

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


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


def test_no_generated_point_in_the_box_is_nan():
    x = np.random.default_rng(2).normal(size=(100, 2))
    assert np.isnan(metrics.state_space_divergence(x, x + 100.0))


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.state_space_divergence(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.power_spectrum_distance(np.zeros((10, 2)), np.zeros((10, 3)))


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


@pytest.mark.skipif(not os.path.isdir(DATA), reason="reference benchmark data ../shared/data not present")
@pytest.mark.parametrize("name,dstsp,dh", [("lorenz63", 0.119, 0.070), ("ECG", 0.294, 0.060)])
def test_reference_floors(name, dstsp, dh):
    """The floors measured with the reference definitions: test vs (noisy) train."""
    if name == "lorenz63":
        train, test = np.load(f"{DATA}/lorenz63_on0.05_train.npy"), np.load(f"{DATA}/lorenz63_test.npy")
    else:
        train, test = np.load(f"{DATA}/ECG_pecuzal_5d_train.npy"), np.load(f"{DATA}/ECG_pecuzal_5d_test.npy")
    assert round(metrics.state_space_divergence(test, train), 3) == dstsp
    assert round(metrics.power_spectrum_distance(test, train), 3) == dh
