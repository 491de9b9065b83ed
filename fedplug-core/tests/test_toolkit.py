"""fedplug.toolkit: the helpers backends share, checked against the NumPy reference backend."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from fedplug import ModelError, toolkit
from fedplug.numpy_backend import Conv, Dense, Flatten, softmax_cross_entropy

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


def test_channels_last_is_the_nhwc_view_of_the_reference_images() -> None:
    x = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    nhwc = toolkit.channels_last(x)
    assert nhwc.shape == (2, 4, 5, 3) and nhwc.flags.c_contiguous
    assert nhwc[1, 2, 3, 0] == x[1, 0, 2, 3]


def test_eval_chunks_cover_every_example_once_in_eval_batches() -> None:
    n = 2 * toolkit.EVAL_BATCH + 5
    chunks = toolkit.eval_chunks(n)
    assert [len(range(n)[chunk]) for chunk in chunks] == [toolkit.EVAL_BATCH, toolkit.EVAL_BATCH, 5]
    assert toolkit.eval_chunks(0) == []


def test_a_custom_model_of_the_wrong_type_is_refused_naming_what_it_is() -> None:
    net = Dense(np.zeros((1, 1)), np.zeros(1))
    assert toolkit.check_custom_model(net, Dense, "a Dense", {"model": "nets:make"}) is net
    with pytest.raises(ModelError, match=r"^custom model nets:make returned a builtins\.list, not a Dense$"):
        toolkit.check_custom_model([], Dense, "a Dense", {"model": "nets:make"})


def test_held_back_stderr_shows_native_output_only_when_the_block_fails() -> None:
    code = (
        "import os\n"
        "from fedplug.toolkit import held_back_stderr\n"
        "with held_back_stderr():\n"
        "    os.write(2, b'quiet native chatter\\n')\n"
        "try:\n"
        "    with held_back_stderr():\n"
        "        os.write(2, b'why it failed\\n')\n"
        "        raise SystemExit(3)\n"
        "finally:\n"
        "    os.write(2, b'after\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr == "why it failed\nafter\n"


class FakeRay(types.ModuleType):
    """``ray`` as ``cpu_share`` sees it: initialised, with a runtime context that raises ``error`` or assigns CPUs."""

    def __init__(self, error: BaseException | None, cpus: float = 3.0) -> None:
        super().__init__("ray")
        self.error, self.cpus = error, cpus
        self.exceptions = types.SimpleNamespace(RaySystemError=type("RaySystemError", (Exception,), {}))

    def is_initialized(self) -> bool:
        return True

    def get_runtime_context(self) -> Any:
        def assigned() -> dict[str, float]:
            if self.error is not None:
                raise self.error
            return {"CPU": self.cpus}

        return types.SimpleNamespace(get_assigned_resources=assigned)


def test_cpu_share_takes_ray_s_cpus_and_only_ray_s_not_a_worker_errors_fall_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.setitem(sys.modules, "ray", FakeRay(None, 3.0))
    assert toolkit.cpu_share() == 3
    monkeypatch.setitem(sys.modules, "ray", FakeRay(AssertionError("only available when the process is a worker")))
    assert toolkit.cpu_share() == 5  # a driver: not a worker
    disconnected = FakeRay(None)
    disconnected.error = disconnected.exceptions.RaySystemError("not connected")
    monkeypatch.setitem(sys.modules, "ray", disconnected)
    assert toolkit.cpu_share() == 5
    monkeypatch.setitem(sys.modules, "ray", FakeRay(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):  # anything else is not swallowed
        toolkit.cpu_share()


@pytest.mark.parametrize("layout", ["hwio", "ohwi"])
def test_any_weight_goes_to_a_layout_and_back(layout: str) -> None:
    conv, dense, bias = RNG.normal(size=(4, 3, 5, 5)), RNG.normal(size=(6, 7)), RNG.normal(size=6)
    np.testing.assert_array_equal(toolkit.from_canonical(conv, layout), toolkit.conv_from_canonical(conv, layout))
    expected_dense = dense.T if layout == "hwio" else dense  # (in, out) kernels where conv kernels are hwio
    np.testing.assert_array_equal(toolkit.from_canonical(dense, layout), expected_dense)
    np.testing.assert_array_equal(toolkit.from_canonical(bias, layout), bias)
    flat = RNG.normal(size=(6, 16 * 3 * 5))
    np.testing.assert_array_equal(
        toolkit.from_canonical(flat, layout, (3, 5, 16)), toolkit.flat_dense_from_canonical(flat, (3, 5, 16))
    )
    for weight, feature_map in [(conv, None), (dense, None), (bias, None), (flat, (3, 5, 16))]:
        native = toolkit.from_canonical(weight, layout, feature_map)
        np.testing.assert_array_equal(toolkit.to_canonical(native, layout, feature_map), weight)


def test_evaluation_from_logits_is_the_reference_s() -> None:
    logits = RNG.normal(size=(7, 4)).astype(np.float32) * 5
    y = np.array([0, 1, 2, 3, 0, 1, 2])
    loss, _ = softmax_cross_entropy(logits, y)
    got = toolkit.evaluation(logits, y)
    assert got["num-examples"] == 7 and got["accuracy"] == float((logits.argmax(axis=1) == y).mean())
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert [type(v) for v in got.values()] == [float, float, int]
