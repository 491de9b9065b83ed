"""fedplug.toolkit: the helpers backends share, checked against the NumPy reference backend."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from fedplug import toolkit
from fedplug.numpy_backend import Conv, Dense, Flatten

pytestmark = pytest.mark.fast

RNG = np.random.default_rng(0)


def test_dense_kernel_computes_the_reference_layer() -> None:
    weight, bias = RNG.normal(size=(5, 7)).astype(np.float32), RNG.normal(size=5).astype(np.float32)
    x = RNG.normal(size=(3, 7)).astype(np.float32)
    kernel = toolkit.dense_from_canonical(weight)
    assert kernel.shape == (7, 5) and kernel.flags.c_contiguous
    np.testing.assert_allclose(x @ kernel + bias, Dense(weight, bias).forward(x), rtol=1e-6)
    np.testing.assert_array_equal(toolkit.dense_to_canonical(kernel), weight)


def channels_last_conv(x_nhwc: np.ndarray, kernel_hwio: np.ndarray) -> np.ndarray:
    """A valid convolution as a channels-last framework computes it, from its native layouts."""
    k = kernel_hwio.shape[0]
    windows = sliding_window_view(x_nhwc, (k, k), axis=(1, 2))  # (n, h, w, in, kh, kw)
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel_hwio)


@pytest.mark.parametrize("layout", ["hwio", "ohwi", "oihw"])
def test_conv_layouts_compute_the_reference_layer(layout: str) -> None:
    weight = RNG.normal(size=(4, 3, 5, 5)).astype(np.float32)
    bias = np.zeros(4, np.float32)
    x = RNG.normal(size=(2, 3, 9, 11)).astype(np.float32)
    native = toolkit.conv_from_canonical(weight, layout)
    np.testing.assert_array_equal(toolkit.conv_to_canonical(native, layout), weight)
    as_hwio = {"hwio": native, "ohwi": native.transpose(1, 2, 3, 0), "oihw": native.transpose(2, 3, 1, 0)}[layout]
    got = channels_last_conv(x.transpose(0, 2, 3, 1), as_hwio).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, Conv(weight, bias).forward(x), rtol=1e-4, atol=1e-5)


def test_channels_last_flatten_feeds_the_reference_dense_layer() -> None:
    feature_map = RNG.normal(size=(2, 16, 3, 5)).astype(np.float32)  # (N, C, H, W), odd sizes
    weight, bias = RNG.normal(size=(6, 16 * 3 * 5)).astype(np.float32), np.zeros(6, np.float32)
    reference = Dense(weight, bias).forward(Flatten().forward(feature_map))
    kernel = toolkit.flat_dense_from_canonical(weight, (3, 5, 16))
    channels_last = feature_map.transpose(0, 2, 3, 1).reshape(2, -1)
    np.testing.assert_allclose(channels_last @ kernel, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(toolkit.flat_dense_to_canonical(kernel, (3, 5, 16)), weight)


def test_example_order_is_one_permutation_per_node_round_and_epoch() -> None:
    base = toolkit.example_order(50, 42, 1, 0, 0)
    assert sorted(base) == list(range(50))
    np.testing.assert_array_equal(base, toolkit.example_order(50, 42, 1, 0, 0))
    for other in [(43, 1, 0, 0), (42, 2, 0, 0), (42, 1, 1, 0), (42, 1, 0, 1)]:
        assert not np.array_equal(base, toolkit.example_order(50, *other)), other
    with pytest.raises(ValueError, match="non-negative"):
        toolkit.example_order(5, -1, 0, 0, 0)


def test_settings_are_read_from_the_config_and_batch_every_example_each_epoch() -> None:
    config = {"lr": 0.05, "batch-size": 8, "local-epochs": 2, "seed": 3, "server-round": 4, "partition-id": 5}
    settings = toolkit.TrainSettings.from_config(config)
    assert settings == toolkit.TrainSettings(0.05, 0.0, 8, 2, 0.0, 3, 4, 5)
    batches = list(settings.batches(20))
    assert [len(b) for b in batches] == [8, 8, 4] * 2
    np.testing.assert_array_equal(np.concatenate(batches[:3]), toolkit.example_order(20, 3, 4, 5, 0))
    np.testing.assert_array_equal(np.concatenate(batches[3:]), toolkit.example_order(20, 3, 4, 5, 1))
    assert settings.round_seed != toolkit.TrainSettings.from_config({**config, "server-round": 5}).round_seed


def test_metrics_are_python_numbers() -> None:
    got = toolkit.metrics(np.float32(12.0), np.int64(6), 24, num_examples=12)
    assert got == {"loss": 0.5, "accuracy": 0.25, "num-examples": 12}
    assert [type(v) for v in got.values()] == [float, float, int]
