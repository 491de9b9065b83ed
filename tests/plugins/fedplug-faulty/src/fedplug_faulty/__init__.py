"""``faulty``: the built-in NumPy backend, except that chosen nodes misbehave on purpose.

Configured by run config, so any strategy can be tried against any fault::

    fedplug run faulty --run-config "faulty.faults='0:nan,1:shape,2:liar' faulty.rounds='1,2'"

``faulty.faults`` maps partition ids to a fault; ``faulty.rounds`` limits the faults to
some rounds (empty: every round); ``faulty.delay`` is how long a ``slow`` node sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug.backend import Config, Scalar, Weights
from fedplug.config import ConfigError
from fedplug.numpy_backend import NumpyBackend, NumpyModel

FAULTS = {
    "raise": "train raises ValueError",
    "nan": "returns NaN weights",
    "huge": "returns weights of 1e30",
    "shape": "returns a weight matrix with one row too many",
    "dtype": "returns float64 weights",
    "liar": "claims 10^9 training examples",
    "slow": "sleeps faulty.delay seconds before training",
}


def _ids(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


def faults(config: Config) -> dict[int, str]:
    """``faulty.faults`` as partition id -> fault."""
    found: dict[int, str] = {}
    for entry in str(config["faulty.faults"]).split(","):
        if entry.strip():
            partition, _, fault = entry.partition(":")
            found[int(partition)] = fault.strip()
    return found


class FaultyBackend(NumpyBackend):
    name = "faulty"
    description = "Test backend: the NumPy backend with faults injected on chosen nodes"
    defaults: ClassVar[Mapping[str, Scalar]] = {
        **NumpyBackend.defaults,
        "faulty.faults": "",
        "faulty.rounds": "",
        "faulty.delay": 30.0,
    }

    def check_config(self, config: Config) -> None:
        try:
            chosen = faults(config)
            _ids(str(config["faulty.rounds"]))
        except ValueError as error:
            raise ConfigError(f"faulty.faults must look like '0:nan,3:slow' ({error})") from error
        unknown = sorted(set(chosen.values()) - set(FAULTS))
        if unknown:
            raise ConfigError(f"unknown fault '{unknown[0]}'; choose from: {', '.join(FAULTS)}")

    def _fault(self, config: Config) -> str | None:
        rounds = _ids(str(config["faulty.rounds"]))
        if rounds and int(config.get("server-round", 0)) not in rounds:  # type: ignore[arg-type]
            return None
        return faults(config).get(int(config.get("partition-id", -1)))  # type: ignore[arg-type]

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        fault = self._fault(config)
        if fault == "raise":
            raise ValueError(f"injected fault on partition {config['partition-id']}")
        if fault == "slow":
            time.sleep(float(config["faulty.delay"]))  # type: ignore[arg-type]
        metrics = super().train(model, x, y, config)
        if fault == "liar":
            metrics["num-examples"] = 10**9
        model.fault = fault  # type: ignore[attr-defined]  # applied by the get_weights that follows
        return metrics

    def get_weights(self, model: NumpyModel) -> Weights:
        weights = super().get_weights(model)
        fault, model.fault = getattr(model, "fault", None), None  # type: ignore[attr-defined]
        first = next(iter(weights))
        if fault == "nan":
            weights[first][...] = np.nan
        elif fault == "huge":
            weights = {key: np.full_like(value, 1e30) for key, value in weights.items()}
        elif fault == "shape":
            weights[first] = np.concatenate([weights[first], weights[first][:1]])
        elif fault == "dtype":
            weights = {key: value.astype(np.float64) for key, value in weights.items()}
        return weights

    def build_model(self, model: str, spec: Any, config: Config) -> NumpyModel:
        built = super().build_model(model, spec, config)
        built.fault = None  # type: ignore[attr-defined]
        return built


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(FaultyBackend())
