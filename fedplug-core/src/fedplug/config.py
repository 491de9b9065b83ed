"""The run config: core defaults, backend defaults, user overrides, checked before anything starts.

Keys are kebab-case and values scalars, exactly as Flower's run config. Keys
``strategy.<param>`` and ``partitioner.<param>`` pass parameters to the strategy
and the flwr-datasets partitioner; they are checked against those classes. A backend's
own keys live in its namespace, ``<backend>.<key>`` (e.g. ``keras.backend``), and are
checked by ``check_for_backend`` against each backend taking part.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedplug.backend import Backend, Config, ModelError, Scalar
from fedplug.custom import split
from fedplug.errors import ConfigError
from fedplug.models import hidden_dims
from fedplug.toolkit import OPTIMIZERS

CORE_DEFAULTS: dict[str, Scalar] = {
    "backend": "numpy",
    "model": "mlp",
    "model-file": "",
    "num-server-rounds": 3,
    "num-supernodes": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "local-epochs": 1,
    "batch-size": 32,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.0,
    "weight-decay": 0.0,
    "hidden-dims": "128",
    "pool": "max",
    "strategy": "fedavg",
    "dataset": "embedded",
    "partitioner": "iid",
    "test-fraction": 0.2,
    "centralized-eval": True,
    "eval-every": 1,
    "seed": 42,
    "round-timeout": 600.0,
    "max-failed-rounds": 3,
    "clip-norm": 0.0,
    "outlier-factor": 100.0,
    "image-column": "",
    "label-column": "",
    "out": "",
    "node-backends": "",
    "track": "",
    **{  # SecAgg+ (fedplug.secagg, docs/secagg.md): Flower's SecAggPlusWorkflow settings, kebab-cased
        "secagg": False,
        "secagg.num-shares": 0,
        "secagg.reconstruction-threshold": 0,
        "secagg.clipping-range": 8.0,
        "secagg.quantization-range": 4194303,
        "secagg.modulus-range": 4294967296,
    },
    # -- cohorts (issue 29): simulated SuperNodes that each serve many clients
    "cohorts": True,
    # -- a round's evaluation travels with the next round's training (fedplug.folding)
    "fold-evaluation": True,
}
"""Defaults every backend starts from; a backend's ``defaults`` override and extend them."""

# -- set by fedplug, never by the user: the data spec a run on a SuperLink ships to its nodes -----------------
SET_BY_FEDPLUG: dict[str, Scalar] = {"data.input-shape": "", "data.num-classes": 0}
"""``fedplug.plan`` computes these from the coordinator's dataset for a run on a SuperLink (``fedplug.data.SPEC_KEYS``:
the input shape ``"C,H,W"`` and the classes), so that the ServerApp and the nodes never load that dataset; empty and 0
otherwise."""
CORE_DEFAULTS.update(SET_BY_FEDPLUG)


def refuse_set_by_fedplug(overrides: Mapping[str, Scalar]) -> None:
    """A user's value for a key fedplug sets (:data:`SET_BY_FEDPLUG`) is refused: ConfigError, one line."""
    for key in SET_BY_FEDPLUG:
        if key in overrides:
            raise ConfigError(
                f"run-config '{key}' is set by fedplug from --dataset for a run on a SuperLink; leave it out "
                "(name a --dataset whose images have the nodes' shape and classes)"
            )


# -----------------------------------------------------------------------------------------------------------

# -- differential privacy (fedplug.dp, docs/privacy.md) ----------------------------------
DP_DEFAULTS: dict[str, Scalar] = {
    "dp": "off",
    "dp.noise-multiplier": 0.0,
    "dp.clipping-norm": 1.0,
    "dp.target-clipped-quantile": 0.5,
    "dp.clip-norm-lr": 0.2,
    "dp.clipped-count-stddev": 0.0,
    "dp.delta": 1e-5,
    "dp.epsilon": 0.0,
    "dp.max-epsilon": 0.0,
    "dp.noise-seed": 0,
}
"""``dp`` (off, or a mechanism of ``fedplug.dp.MODES``) and its settings."""
CORE_DEFAULTS.update(DP_DEFAULTS)


def check_dp(config: Config) -> None:
    """The DP keys' ranges, and the combinations whose privacy guarantee would not hold; ConfigError (one line)."""
    from fedplug import dp

    chosen = str(config["dp"]).strip().lower()
    if chosen not in (*dp.OFF, *dp.MODES):
        raise ConfigError(f"run-config 'dp' must be off or one of: {', '.join(dp.MODES)}; got {config['dp']!r}")
    for key in ("dp.noise-multiplier", "dp.clipped-count-stddev", "dp.epsilon", "dp.max-epsilon", "dp.noise-seed"):
        if not float(config[key]) >= 0.0:
            raise ConfigError(f"run-config '{key}' must be 0 (unset) or positive, got {config[key]}")
    if not float(config["dp.clipping-norm"]) > 0.0:
        raise ConfigError(f"run-config 'dp.clipping-norm' must be positive, e.g. 1.0, got {config['dp.clipping-norm']}")
    if not 0.0 < float(config["dp.delta"]) < 1.0:
        raise ConfigError(f"run-config 'dp.delta' must be between 0 and 1 (exclusive), got {config['dp.delta']}")
    if not 0.0 <= float(config["dp.target-clipped-quantile"]) <= 1.0:
        raise ConfigError(
            f"run-config 'dp.target-clipped-quantile' must be in [0, 1], got {config['dp.target-clipped-quantile']}"
        )
    if not float(config["dp.clip-norm-lr"]) > 0.0:
        raise ConfigError(f"run-config 'dp.clip-norm-lr' must be positive, got {config['dp.clip-norm-lr']}")
    if not dp.mode(config):
        return
    if float(config["clip-norm"]) > 0:
        raise ConfigError(
            f"clip-norm clips updates outside the DP mechanism (dp={chosen}): leave clip-norm at 0 "
            "and set dp.clipping-norm"
        )
    # whether the strategy composes with central DP is its descriptor's declaration (fedplug.strategies)
    if chosen in dp.ADAPTIVE and float(config["fraction-train"]) < 1.0:
        raise ConfigError(
            f"dp={chosen} divides the noisy clipped count by the number of replies, which Poisson sampling "
            "makes private: use fraction-train=1 or fixed clipping (dp=server-fixed or client-fixed)"
        )


PREFIXES = ("strategy.", "partitioner.")
RENAMED = {"keras-backend": "keras.backend"}
"""Former run-config keys -> their names now; the old name is refused with a one-line error naming the new one."""
MAX_SEED = 2**32 - 1
"""Seeds are unsigned 32-bit integers: every framework's generator accepts them."""
PARTITIONER_CHOICES: dict[str, tuple[str, ...]] = {
    "class-assignment-mode": ("random", "deterministic", "first-deterministic"),
}
"""Values flwr-datasets' partitioners accept for their string parameters."""
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


TRACKERS = ("tensorboard", "mlflow")
"""Where ``track`` can send every round's metrics besides the results folder (``fedplug.tracking``)."""


def parse_track(text: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` as ``("tensorboard", "mlflow")``, ``""`` as none; ConfigError for another name."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ConfigError(
                f"run-config 'track' names no tracker {name!r}: choose {', '.join(TRACKERS)} or both, "
                "comma-separated (e.g. --track tensorboard,mlflow)"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


NODE_BACKENDS = "node-backends"
"""The run-config key of a mixed federation: ``PARTITIONS:BACKEND`` entries separated by commas."""
_NODE_ENTRY = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
NODE_BACKENDS_EXAMPLE = "'0-1:torch,2-3:jax,4:mlx'"


def node_backends_error(message: str) -> ConfigError:
    return ConfigError(f"run-config '{NODE_BACKENDS}': {message}")


def parse_node_backends(text: str) -> dict[int, str]:
    """``"0-1:torch,2:jax"`` as ``{0: "torch", 1: "torch", 2: "jax"}``; ConfigError if malformed or overlapping."""
    mapping: dict[int, str] = {}
    named: dict[int, str] = {}  # partition -> the entry that named it
    if not text.strip():
        return mapping
    for entry in text.split(","):
        match = _NODE_ENTRY.match(entry)
        if match is None:
            raise node_backends_error(
                f"cannot read {entry.strip()!r}; write PARTITIONS:BACKEND entries separated by commas, "
                f"PARTITIONS a partition id or a range I-J, e.g. {NODE_BACKENDS_EXAMPLE}"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise node_backends_error(f"range {first}-{last} in {entry.strip()!r} runs backwards; write {last}-{first}")
        for partition in range(first, last + 1):
            if partition in named:
                raise node_backends_error(
                    f"partition {partition} is named twice ({named[partition]!r} and {entry.strip()!r}); "
                    "name each partition once"
                )
            named[partition], mapping[partition] = entry.strip(), match.group(3)
    return mapping


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


def own_keys(backend: Backend) -> dict[str, Scalar]:
    """The backend's own run-config keys, ``<name>.<key>``, with their defaults."""
    return {key: value for key, value in backend.defaults.items() if key.startswith(f"{backend.name}.")}


def resolve(backend: Backend, overrides: Mapping[str, Scalar], others: Iterable[Backend] = ()) -> dict[str, Scalar]:
    """Merge ``overrides`` over the backend's defaults and check every name, type and range.

    ``others`` are further backends taking part (nodes of a mixed federation): their own
    keys (``<name>.<key>``) join the config with their defaults, and the config is checked
    against each of them too (``check_for_backend``).
    """
    config = defaults_for(backend)
    others = [other for other in others if other.name != backend.name]
    for other in others:
        config.update({key: value for key, value in own_keys(other).items() if key not in config})
    for key, value in overrides.items():
        if key.startswith(PREFIXES):
            config[key] = value
            continue
        if key in RENAMED:
            raise ConfigError(f"run-config '{key}' is now '{RENAMED[key]}': write {RENAMED[key]}={value!r}")
        if key not in config:
            close = difflib.get_close_matches(key, list(config), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(config))}"
            raise ConfigError(f"unknown run-config key '{key}'{hint}")
        config[key] = coerce(key, value, config[key])
    check_values(backend, config)
    for other in others:
        check_for_backend(other, config)
    return config


def check_for_backend(backend: Backend, config: Config) -> None:
    """Check a resolved run config against one backend taking part; raise ``ConfigError`` (one line).

    Refuses a model the backend does not declare, a key of its namespace (``<name>.<key>``)
    it does not know or of the wrong type, anything it declares in ``unsupported`` that the
    config needs (``check_supported``), and what its own ``check_config`` refuses. Call it
    once per backend whose nodes train in the run (``resolve`` does, for the backends it is given).
    """
    if ":" in str(config["model"]):
        check_custom_model(backend, config)
    elif config["model"] not in backend.models:
        raise ConfigError(
            f"backend '{backend.name}' has no model '{config['model']}'; choose one of: {', '.join(backend.models)}"
        )
    own = own_keys(backend)
    for key, value in config.items():
        if key.startswith(f"{backend.name}."):
            if key not in own:
                close = difflib.get_close_matches(key, list(own), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; its keys: {', '.join(sorted(own)) or 'none'}"
                raise ConfigError(f"backend '{backend.name}' has no run-config key '{key}'{hint}")
            coerce(key, value, own[key])
    check_supported(backend, config)
    try:
        backend.check_config(config)
    except ConfigError:
        raise
    except Exception as error:  # a plugin's bug, not the user's input: name the plugin
        raise ConfigError(
            f"backend '{backend.name}' failed to check the run config ({type(error).__name__}: {error}); "
            "report this to the backend's authors"
        ) from error


def check_values(backend: Backend, config: Config) -> None:
    """Range and choice checks that a type check cannot make; then ``check_for_backend(backend, config)``."""
    if config["backend"] != backend.name:
        raise ConfigError(f"run-config 'backend' is '{config['backend']}' but the backend is '{backend.name}'")
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run-config '{key}' must be a finite number, got {value}")
        if isinstance(value, str) and not _encodable(value):
            raise ConfigError(f"run-config '{key}' is not valid Unicode: {value!r}")
    for key in ("num-server-rounds", "num-supernodes", "local-epochs", "batch-size", "eval-every"):
        if int(config[key]) < 1:
            raise ConfigError(f"run-config '{key}' must be at least 1, got {config[key]}")
    if not 0.0 < float(config["round-timeout"]) < float("inf"):
        raise ConfigError(
            f"run-config 'round-timeout' must be a positive number of seconds, got {config['round-timeout']}"
        )
    if int(config["max-failed-rounds"]) < 1:
        raise ConfigError(f"run-config 'max-failed-rounds' must be at least 1, got {config['max-failed-rounds']}")
    if not 0.0 <= float(config["clip-norm"]) < float("inf"):
        raise ConfigError(
            f"run-config 'clip-norm' must be 0 (off) or a positive update norm, got {config['clip-norm']}"
        )
    if not 0.0 <= float(config["outlier-factor"]) < float("inf"):
        raise ConfigError(
            f"run-config 'outlier-factor' must be 0 (off) or a positive factor, got {config['outlier-factor']}"
        )
    if not 0 <= int(config["seed"]) <= MAX_SEED:
        raise ConfigError(f"run-config 'seed' must be between 0 and {MAX_SEED}, got {config['seed']}")
    if not 0.0 < float(config["fraction-train"]) <= 1.0:
        raise ConfigError(
            f"run-config 'fraction-train' must be between 0 and 1 (above 0: some node must train), "
            f"got {config['fraction-train']}"
        )
    if not 0.0 <= float(config["fraction-evaluate"]) <= 1.0:
        raise ConfigError(f"run-config 'fraction-evaluate' must be between 0 and 1, got {config['fraction-evaluate']}")
    if not 0.0 < float(config["test-fraction"]) < 1.0:
        raise ConfigError(
            f"run-config 'test-fraction' must be between 0 and 1 (exclusive), got {config['test-fraction']}"
        )
    if not float(config["lr"]) > 0.0:
        raise ConfigError(f"run-config 'lr' must be a positive number like 0.05, got {config['lr']}")
    if config["optimizer"] not in OPTIMIZERS:
        choices = ", ".join(OPTIMIZERS)
        raise ConfigError(f"run-config 'optimizer' must be one of: {choices}; got '{config['optimizer']}'")
    if not 0.0 <= float(config["momentum"]) < 1.0:
        raise ConfigError(f"run-config 'momentum' must be in [0, 1), e.g. 0.9, got {config['momentum']}")
    if not float(config["weight-decay"]) >= 0.0:
        raise ConfigError(
            f"run-config 'weight-decay' must be 0 (off) or positive, e.g. 1e-4, got {config['weight-decay']}"
        )
    if config["pool"] not in ("max", "avg"):
        raise ConfigError(f"run-config 'pool' must be 'max' or 'avg', got '{config['pool']}'")
    parse_track(str(config.get("track", "")))
    check_secagg(config)
    check_dp(config)
    parse_node_backends(str(config.get(NODE_BACKENDS, "")))  # its syntax; the backends: node_backends.check
    try:
        hidden_dims(config)
    except ModelError as error:
        raise ConfigError(f"run-config 'hidden-dims': {error}") from error
    check_for_backend(backend, config)


def check_custom_model(backend: Backend, config: Config) -> None:
    """A custom ``model`` (``module:factory``): well formed, and the backend takes custom models."""
    if not backend.custom_models:
        raise ConfigError(
            f"backend '{backend.name}' cannot federate custom models ({config['model']}); "
            f"choose one of: {', '.join(backend.models)}"
        )
    try:
        split(str(config["model"]))
    except ModelError as error:
        raise ConfigError(str(error)) from error
    if config.get("node-backends"):  # nodes of several frameworks: a custom model's weights cannot map
        raise ConfigError(
            f"custom model {config['model']} cannot be federated across frameworks (node-backends): its weights "
            "have no canonical layout; drop node-backends, or use the shared mlp or lenet"
        )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from undecodable bytes in a path
        return False
    return True


def check_partitioner(config: Config, num_classes: int | None) -> None:
    """Check ``partitioner.<param>`` values against their real ranges and the data's classes (if given).

    Whether the data has enough examples for the shards or the nodes is the data layer's check.
    """
    name = str(config["partitioner"])
    params = {key.removeprefix("partitioner."): val for key, val in config.items() if key.startswith("partitioner.")}
    for key, value in params.items():
        shown = f"run-config 'partitioner.{key}'"
        if key in PARTITIONER_CHOICES and value not in PARTITIONER_CHOICES[key]:
            raise ConfigError(f"{shown} must be one of: {', '.join(PARTITIONER_CHOICES[key])}; got {value!r}")
        if key in ("shuffle", "self-balancing", "keep-incomplete-shard") and not isinstance(value, bool):
            raise ConfigError(f"{shown} must be true or false, got {value!r}")
        if key == "alpha" and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ConfigError(f"{shown} (Dirichlet concentration) must be a number above 0, e.g. 0.5; got {value!r}")
        if key in ("min-partition-size", "num-shards-per-partition", "shard-size", "num-classes-per-partition"):
            low = 0 if key == "min-partition-size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{shown} must be an integer of at least {low}, got {value!r}")
    if name == "pathological" and num_classes is not None:
        classes = params.get("num-classes-per-partition", 2)
        if isinstance(classes, int) and classes > num_classes:
            raise ConfigError(
                f"run-config 'partitioner.num-classes-per-partition' is {classes} but the dataset has only "
                f"{num_classes} classes; choose at most {num_classes}"
            )


def check_supported(backend: Backend, config: Config) -> None:
    """Refuse a run that needs something the backend declares in ``unsupported``.

    An entry ``"key"`` refuses a config that sets ``key`` to anything but 0/false/empty
    (``"proximal-mu"``: ``--strategy fedprox``); an entry ``"key=value"`` refuses that value
    only (``"optimizer=adam"``: a backend without Adam).
    """
    for entry in sorted(backend.unsupported):
        key, has_value, value = entry.partition("=")
        if has_value:
            if str(config.get(key)) == value:
                raise ConfigError(
                    f"backend '{backend.name}' does not support {key}={value}: choose another '{key}' "
                    "or a backend that supports it"
                )
            continue
        if key == "proximal-mu" and config.get("strategy") == "fedprox":
            raise ConfigError(
                f"backend '{backend.name}' does not apply FedProx's proximal term (proximal-mu): "
                "use another strategy (e.g. --strategy fedavg) or a backend that supports fedprox"
            )
        if config.get(key) not in (None, 0, 0.0, False, ""):
            raise ConfigError(f"backend '{backend.name}' does not support run-config '{key}': leave it unset")


# -- SecAgg+ (secagg=true, fedplug.secagg) ----------------------------------------------------
# which strategies compose with it is each strategy's own declaration (fedplug.strategies.check_strategy)


def check_secagg(config: Config) -> None:
    """The ``secagg.*`` values; with ``secagg=true``, refuse what needs each node's update (one line, the reason)."""
    shares, threshold = int(config["secagg.num-shares"]), int(config["secagg.reconstruction-threshold"])
    if shares != 0 and (shares < 3 or shares % 2 == 0):
        raise ConfigError(
            "run-config 'secagg.num-shares' must be 0 (every sampled node) or an odd number of at least 3 "
            f"(the node and as many neighbours on each side), got {shares}"
        )
    if threshold != 0 and not 2 <= threshold <= (shares or threshold):
        raise ConfigError(
            "run-config 'secagg.reconstruction-threshold' must be 0 (a majority of the shares) or between 2 and "
            f"secagg.num-shares ({shares}), got {threshold}"
        )
    if not float(config["secagg.clipping-range"]) > 0:
        raise ConfigError(f"run-config 'secagg.clipping-range' must be above 0, got {config['secagg.clipping-range']}")
    quantization, modulus = int(config["secagg.quantization-range"]), int(config["secagg.modulus-range"])
    if not 1 <= quantization < 2**31:
        raise ConfigError(f"run-config 'secagg.quantization-range' must be between 1 and 2**31 - 1, got {quantization}")
    if not (quantization < modulus <= 2**32 and modulus & (modulus - 1) == 0):
        raise ConfigError(
            "run-config 'secagg.modulus-range' must be a power of two above secagg.quantization-range and at most "
            f"2**32, got {modulus}"
        )
    if not config["secagg"]:
        return
    if int(config["num-supernodes"]) * quantization >= modulus:
        raise ConfigError(
            f"secagg: {config['num-supernodes']} nodes x secagg.quantization-range ({quantization}) reach "
            f"secagg.modulus-range ({modulus}), so the masked sum would wrap around: lower secagg.quantization-range"
        )
    if float(config["outlier-factor"]) not in (0.0, float(CORE_DEFAULTS["outlier-factor"])):
        raise ConfigError(
            "run-config 'outlier-factor' screens each node's update, which secagg hides from the server: "
            "leave it unset or 0, or drop secagg"
        )
    # -- secagg with differential privacy (fedplug.secagg, docs/secagg.md "Differential privacy") --
    chosen = str(config.get("dp", "")).strip().lower()
    if chosen in ("server-fixed", "server-adaptive"):
        raise ConfigError(
            f"dp={chosen} clips each update on the server, which secagg hides from it: use dp=client-fixed with secagg"
        )
    if chosen == "client-adaptive":
        raise ConfigError(
            "dp=client-adaptive needs each node's clipped bit, which secagg would show the server: "
            "use dp=client-fixed with secagg"
        )
