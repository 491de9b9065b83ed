"""The run config: core defaults, backend defaults, user overrides, checked before anything starts.

Keys are kebab-case and values scalars, exactly as Flower's run config. Keys
``strategy.<param>`` and ``partitioner.<param>`` pass parameters to the strategy
and the flwr-datasets partitioner; they are checked against those classes.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from fedplug.backend import Backend, Config, Scalar

CORE_DEFAULTS: dict[str, Scalar] = {
    "backend": "numpy",
    "model": "mlp",
    "num-server-rounds": 3,
    "num-supernodes": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.1,
    "hidden-dims": "128",
    "pool": "max",
    "strategy": "fedavg",
    "dataset": "embedded",
    "partitioner": "iid",
    "test-fraction": 0.2,
    "centralized-eval": True,
    "seed": 42,
    "round-timeout": 600.0,
    "max-failed-rounds": 3,
    "clip-norm": 0.0,
    "outlier-factor": 100.0,
    "image-column": "",
    "label-column": "",
    "out": "",
}
"""Defaults every backend starts from; a backend's ``defaults`` override and extend them."""

PREFIXES = ("strategy.", "partitioner.")
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class ConfigError(ValueError):
    """A run-config key or value is wrong; the message says what to write instead."""


def parse_overrides(text: str) -> dict[str, Scalar]:
    """Parse ``flwr run --run-config`` syntax (``"lr=0.05 model='lenet'"``) or a ``.toml`` file.

    Unquoted words that are not TOML values are taken as strings, so ``model=lenet`` works.
    """
    text = text.strip()
    if not text:
        return {}
    if text.endswith(".toml") and "=" not in text:
        try:
            with Path(text).expanduser().open("rb") as file:
                return _flatten(tomllib.load(file))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read run config file {text}: {error}") from error
    leftover = _PAIR.sub("", text).strip()
    if leftover:
        raise ConfigError(
            f"cannot parse '{leftover}' in --run-config: write key=value pairs, e.g. 'lr=0.05 batch-size=64'"
        )
    values: dict[str, Scalar] = {}
    for key, raw in _PAIR.findall(text):
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
        if not isinstance(values[key], bool | int | float | str):
            raise ConfigError(f"run-config value of '{key}' must be a bool, int, float or string")
    return values


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value  # type: ignore[assignment]
    return flat


def defaults_for(backend: Backend) -> dict[str, Scalar]:
    """The full default run config of ``backend``."""
    return {**CORE_DEFAULTS, **backend.defaults, "backend": backend.name}


def coerce(key: str, value: Scalar, default: Scalar) -> Scalar:
    """Check ``value`` against the type of ``default``; ints are accepted for floats."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ConfigError(f"run-config '{key}' must be {expected.__name__} (like {default!r}), got {value!r}")
    return value


def resolve(backend: Backend, overrides: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """Merge ``overrides`` over the backend's defaults and check every name, type and range."""
    config = defaults_for(backend)
    for key, value in overrides.items():
        if key.startswith(PREFIXES):
            config[key] = value
            continue
        if key not in config:
            close = difflib.get_close_matches(key, list(config), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(config))}"
            raise ConfigError(f"unknown run-config key '{key}'{hint}")
        config[key] = coerce(key, value, config[key])
    check_values(backend, config)
    return config


def check_values(backend: Backend, config: Config) -> None:
    """Range and choice checks that a type check cannot make."""
    if config["backend"] != backend.name:
        raise ConfigError(f"run-config 'backend' is '{config['backend']}' but the backend is '{backend.name}'")
    if config["model"] not in backend.models:
        raise ConfigError(
            f"backend '{backend.name}' has no model '{config['model']}'; choose one of: {', '.join(backend.models)}"
        )
    for key in ("num-server-rounds", "num-supernodes", "local-epochs", "batch-size"):
        if int(config[key]) < 1:  # type: ignore[arg-type]
            raise ConfigError(f"run-config '{key}' must be at least 1, got {config[key]}")
    if not 0.0 < float(config["round-timeout"]) < float("inf"):  # type: ignore[arg-type]
        raise ConfigError(
            f"run-config 'round-timeout' must be a positive number of seconds, got {config['round-timeout']}"
        )
    if int(config["max-failed-rounds"]) < 1:  # type: ignore[arg-type]
        raise ConfigError(f"run-config 'max-failed-rounds' must be at least 1, got {config['max-failed-rounds']}")
    if not 0.0 <= float(config["clip-norm"]) < float("inf"):  # type: ignore[arg-type]
        raise ConfigError(
            f"run-config 'clip-norm' must be 0 (off) or a positive update norm, got {config['clip-norm']}"
        )
    if not 0.0 <= float(config["outlier-factor"]) < float("inf"):  # type: ignore[arg-type]
        raise ConfigError(
            f"run-config 'outlier-factor' must be 0 (off) or a positive factor, got {config['outlier-factor']}"
        )
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= float(config[key]) <= 1.0:  # type: ignore[arg-type]
            raise ConfigError(f"run-config '{key}' must be between 0 and 1, got {config[key]}")
    if not 0.0 < float(config["test-fraction"]) < 1.0:  # type: ignore[arg-type]
        raise ConfigError(
            f"run-config 'test-fraction' must be between 0 and 1 (exclusive), got {config['test-fraction']}"
        )
    if config["pool"] not in ("max", "avg"):
        raise ConfigError(f"run-config 'pool' must be 'max' or 'avg', got '{config['pool']}'")
    backend.check_config(config)
