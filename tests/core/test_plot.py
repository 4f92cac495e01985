"""Pictures: the loss curve every training node shows, its smoothing and axis ticks (host-free)."""
import numpy as np
import pytest

from sefi_core.plot import loss_curve_image, nice_ticks, smoothed, smoothing_span


def test_loss_curve_draws_raw_and_smoothed_losses_on_axes():
    g = np.random.default_rng(0)
    image = loss_curve_image(list(1.0 - 0.0005 * np.arange(1000) + 0.3 * g.standard_normal(1000)), 1000)
    assert image.shape == (432, 768, 3) and image.dtype.name == "float32"
    blue = (image[..., 2] > 0.6) & (image[..., 0] < 0.3)
    grey = (np.abs(image[..., 0] - 200 / 255) < 0.02) & (np.abs(image[..., 2] - 200 / 255) < 0.02)
    assert blue.sum() > 1000 and grey.sum() > 1000


def test_smoothing_is_an_unbiased_moving_average():
    np.testing.assert_allclose(smoothed([2.5] * 50, 10), 2.5)  # bias-corrected: no pull towards 0 at the start
    values = np.random.default_rng(1).standard_normal(300)
    alpha, expected, mean = 2 / 11, [], 0.0
    for i, v in enumerate(values):  # the textbook EMA, written out
        mean = alpha * v + (1 - alpha) * mean
        expected.append(mean / (1 - (1 - alpha) ** (i + 1)))
    np.testing.assert_allclose(smoothed(values, 10), expected)
    assert smoothing_span(1000) == 50 and smoothing_span(30) == 5


@pytest.mark.parametrize("low, high, ticks", [(0, 999, [0, 200, 400, 600, 800]), (0.81, 1.27, [0.9, 1.0, 1.1, 1.2]),
                                              (0, 2, [0, 0.5, 1, 1.5, 2])])
def test_axis_ticks_are_round_numbers(low, high, ticks):
    np.testing.assert_allclose(nice_ticks(low, high), ticks)
