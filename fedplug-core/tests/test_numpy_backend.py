"""The built-in NumPy backend: its own checks and the conformance suite every backend passes."""

from __future__ import annotations

import numpy as np
import pytest

from fedplug.backend import DataSpec
from fedplug.config import resolve
from fedplug.numpy_backend import Conv, NumpyBackend, Pool, ReferenceOptimizer
from fedplug.testing import BackendConformance
from fedplug.toolkit import TrainSettings

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()


class TestConformance(BackendConformance):
    backend_name = "numpy"


def _numeric_grad(layer, x, grad_out, array, index):
    eps = 1e-3
    old = array[index]
    array[index] = old + eps
    plus = (layer.forward(x) * grad_out).sum()
    array[index] = old - eps
    minus = (layer.forward(x) * grad_out).sum()
    array[index] = old
    return (plus - minus) / (2 * eps)


def test_conv_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    conv = Conv(rng.normal(size=(2, 3, 3, 3)), rng.normal(size=2))
    x = rng.normal(size=(2, 3, 6, 6))
    grad_out = rng.normal(size=(2, 2, 4, 4))
    conv.forward(x)
    d_x, (d_w, d_b) = conv.backward(grad_out)
    assert np.isclose(d_w[1, 2, 0, 1], _numeric_grad(conv, x, grad_out, conv.params[0], (1, 2, 0, 1)), atol=1e-5)
    assert np.isclose(d_x[1, 0, 3, 2], _numeric_grad(conv, x, grad_out, x, (1, 0, 3, 2)), atol=1e-5)
    assert np.isclose(d_b[0], grad_out[:, 0].sum())


def test_pooling_backward_routes_the_gradient() -> None:
    x = np.arange(2 * 1 * 5 * 5, dtype=float).reshape(2, 1, 5, 5)
    for kind in ("max", "avg"):
        pool = Pool(kind)
        out = pool.forward(x)
        assert out.shape == (2, 1, 2, 2)
        d_x, _ = pool.backward(np.ones_like(out))
        assert d_x.sum() == out.size and d_x[:, :, 4].sum() == 0


def test_lenet_trains_on_colour_images() -> None:
    spec = DataSpec((3, 32, 32), 3)
    config = resolve(BACKEND, {"model": "lenet", "lr": 0.05})
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = (rng.uniform(0, 1, (3, 3, 32, 32))[y] + rng.normal(0, 0.05, (48, 3, 32, 32))).astype(np.float32)
    model = BACKEND.build_model("lenet", spec, config)
    before = BACKEND.evaluate(model, x, y, config)["loss"]
    BACKEND.train(model, x, y, {**config, "local-epochs": 5, "batch-size": 8})
    assert BACKEND.evaluate(model, x, y, config)["loss"] < before


def test_fedprox_term_pulls_towards_the_global_weights() -> None:
    spec = DataSpec((1, 28, 28), 10)
    config = resolve(BACKEND, {})
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64)
    drift = {}
    for mu in (0.0, 10.0):
        model = BACKEND.build_model("mlp", spec, config)
        start = BACKEND.get_weights(model)
        BACKEND.train(model, x, y, {**config, "proximal-mu": mu, "local-epochs": 3})
        end = BACKEND.get_weights(model)
        drift[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start)
    assert drift[10.0] < drift[0.0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # sgd: g = grad + wd * w; v = m * v + g; w -= lr * v
        ({"optimizer": "sgd", "momentum": 0.9, "weight-decay": 0.1}, [0.94, 0.9016]),
        # adam (wd 0): w -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - 0.9^t), v_hat = v / (1 - 0.999^t)
        ({"optimizer": "adam"}, [0.9, 0.9 - 0.1 * (0.02 / 0.19) / ((0.00031225 / (1 - 0.999**2)) ** 0.5 + 1e-8)]),
        # FedProx: g += mu * (w - w_start), w_start = 1
        ({"optimizer": "sgd", "proximal-mu": 2.0}, [0.95, 0.95 + 0.025 - 0.1 * 2.0 * (0.95 - 1.0)]),
    ],
    ids=["sgd-momentum-decay", "adam", "fedprox"],
)
def test_reference_optimizer_is_the_documented_update(overrides: dict, expected: list[float]) -> None:
    """Two hand-computed steps on one weight (w = 1, gradients 0.5 then -0.25, lr 0.1)."""
    config = {"lr": 0.1, "batch-size": 1, "local-epochs": 1, "momentum": 0.0, **overrides}
    settings = TrainSettings.from_config(config)
    weight = np.ones(1, np.float32)
    optimizer = ReferenceOptimizer(settings, [weight])
    for grad, want in zip((0.5, -0.25), expected, strict=True):
        optimizer.step([weight], [np.full(1, grad, np.float32)])
        assert weight[0] == pytest.approx(want, abs=1e-6)
    assert weight.dtype == np.float32
