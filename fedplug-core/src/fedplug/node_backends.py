"""Mixed-framework federations: which backend each node trains with.

The run config's ``backend`` is the ServerApp's (initial weights, centralized evaluation,
the native model file) and every node's default. ``node-backends`` names other backends
for some partitions, e.g. ``"0-1:torch,2-3:jax,4:mlx"``; on the Deployment Engine a node's
own node config ``backend`` wins over both. Every backend builds the shared ``mlp`` and
``lenet`` with one canonical weight layout, so their nodes train one global model together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import suppress

from fedplug.backend import Backend, BackendUnavailable, Config, Scalar, require_available
from fedplug.config import NODE_BACKENDS, PREFIXES, check_for_backend, defaults_for, node_backends_error
from fedplug.config import parse_node_backends as parse
from fedplug.custom import check_same_backend
from fedplug.plugins import UnknownBackend, get_backend

KEY = NODE_BACKENDS
"""The run-config key: ``PARTITIONS:BACKEND`` entries separated by commas (syntax: :func:`parse`)."""


def compact(assignment: Mapping[int, str]) -> str:
    """``{0: "torch", 1: "torch", 2: "jax"}`` as ``"0-1:torch,2:jax"`` (runs of one backend become ranges)."""
    parts: list[str] = []
    ids = sorted(assignment)
    start = 0
    for index in range(1, len(ids) + 1):
        end_of_run = (
            index == len(ids) or ids[index] != ids[index - 1] + 1 or assignment[ids[index]] != assignment[ids[start]]
        )
        if end_of_run:
            first, last = ids[start], ids[index - 1]
            parts.append(f"{first}{'' if first == last else f'-{last}'}:{assignment[first]}")
            start = index
    return ",".join(parts)


def backend_of(config: Config, node_config: Config) -> str:
    """The backend a node trains with: node config ``backend`` > ``node-backends`` > run config ``backend``."""
    if node_config.get("backend"):
        return str(node_config["backend"])
    server = str(config.get("backend", "numpy"))
    if "partition-id" in node_config and config.get(KEY):
        return parse(str(config[KEY])).get(int(node_config["partition-id"]), server)
    return server


def assignment(config: Config) -> dict[int, str]:
    """Every simulated node's backend (partitions ``0..num-supernodes-1``)."""
    mapping = parse(str(config.get(KEY, "")))
    server = str(config["backend"])
    return {p: mapping.get(p, server) for p in range(int(config["num-supernodes"]))}


def taking_part(config: Config) -> list[str]:
    """The backends of a simulated run, the server's first, each once."""
    return list(dict.fromkeys([str(config["backend"]), *assignment(config).values()]))


def others(config: Mapping[str, Scalar]) -> list[Backend]:
    """The installed backends that ``node-backends`` names besides the server's, for ``config.resolve``'s
    ``others`` (their own keys join the run config). Names that are unknown here are left to :func:`check`."""
    found = []
    for name in dict.fromkeys(parse(str(config.get(KEY, ""))).values()):
        if name != config.get("backend"):
            with suppress(UnknownBackend):
                found.append(get_backend(name))
    return found


def check_mixable(backend: Backend, where: str) -> None:
    """Refuse a backend that declares the basic conformance tier (it works alone) in a federation of several."""
    if getattr(backend, "conformance", "mixable") != "mixable":
        raise node_backends_error(
            f"backend '{backend.name}' ({where}) declares conformance '{backend.conformance}' (it works alone): it "
            "cannot join a mixed federation; run it alone, or use backends of the mixable tier"
        )


def node_run_config(run_config: Config, node_config: Config) -> dict[str, Scalar]:
    """The run config as this node runs it: its own backend and data columns.

    The node's backend is its node config's ``backend``, else its partition's entry in the
    run config's ``node-backends``, else the run config's ``backend``. Backends share the
    ``mlp`` and ``lenet`` weight layouts, so a node may train with another framework than
    the ServerApp's; keys the node's backend does not know are dropped.
    """
    config = dict(run_config)
    for key in ("image-column", "label-column"):
        if node_config.get(key):
            config[key] = node_config[key]
    backend = backend_of(config, node_config)
    if backend != config.get("backend"):
        check_same_backend(config, backend)  # a custom model's weights have no canonical layout
        check_mixable(get_backend(backend), "this node")
        known = defaults_for(get_backend(backend))
        config = {k: v for k, v in config.items() if k in known or k.startswith(PREFIXES)}
        config["backend"] = backend
    return config


def node_config_for(config: Config, backend: str) -> dict[str, Scalar]:
    """The run config as a node of ``backend`` runs it (:func:`node_run_config`)."""
    return node_run_config(config, {"backend": backend})


def _nodes_of(config: Config, backend: str) -> str:
    """``node 3`` or ``nodes 0-1,4``: the simulated nodes that run ``backend``."""
    ids = compact({p: "" for p, b in assignment(config).items() if b == backend}).replace(":", "")
    return f"node {ids}" if ids.isdigit() else f"nodes {ids}"


def check(config: dict[str, Scalar]) -> list[Backend]:
    """Check a simulated run's ``node-backends`` before anything starts; return the taking-part backends.

    Refuses (ConfigError, one line) malformed or overlapping entries, partition ids that are
    not nodes of the run, unknown or unavailable backends, a model that one of them does not
    build, a run config one of them refuses (each backend's own check, once per backend), and
    environments that contradict each other. Writes the full assignment back into ``config``
    (``"0-1:torch,2-9:numpy"``), or ``""`` when every node runs the server's backend.
    """
    nodes = int(config["num-supernodes"])
    mapping = parse(str(config.get(KEY, "")))
    beyond = sorted(p for p in mapping if p >= nodes)
    if beyond:
        raise node_backends_error(
            f"partition {beyond[0]} is not a node of this run: it has {nodes} nodes, ids 0-{nodes - 1}"
        )
    backends: list[Backend] = []
    mixed = len(taking_part(config)) > 1
    for name in taking_part(config):
        where = _nodes_of(config, name)
        try:
            backend = get_backend(name)
            if mixed:
                check_mixable(backend, where)
            if name != config["backend"]:
                require_available(backend, node_config_for(config, name))
        except (UnknownBackend, BackendUnavailable) as error:
            raise node_backends_error(f"{error} ({where})") from error
        if name != config["backend"]:
            if config["model"] not in backend.models:
                raise node_backends_error(
                    f"backend '{name}' ({where}) has no model '{config['model']}'; in a mixed federation choose a "
                    f"model every backend builds, e.g. --model mlp or --model lenet"
                )
            try:
                check_for_backend(backend, node_config_for(config, name))
            except ValueError as error:
                raise node_backends_error(f"backend '{name}' of {where} refuses this run config: {error}") from error
        backends.append(backend)
    environment(config, backends)
    full = assignment(config)
    config[KEY] = compact(full) if len(set(full.values())) > 1 else ""
    return backends


def environment(config: Config, backends: Iterable[Backend] | None = None) -> dict[str, str]:
    """The environment variables of every taking-part backend, merged; ConfigError if two contradict."""
    merged: dict[str, str] = {}
    setter: dict[str, str] = {}
    for backend in backends if backends is not None else [get_backend(n) for n in taking_part(config)]:
        wanted = backend.environment(
            config if backend.name == config["backend"] else node_config_for(config, backend.name)
        )
        for variable, value in wanted.items():
            if variable in merged and merged[variable] != value:
                raise node_backends_error(
                    f"backends '{setter[variable]}' and '{backend.name}' need {variable}={merged[variable]} and "
                    f"{variable}={value} in one simulation; run them in separate federations"
                )
            merged[variable], setter[variable] = value, backend.name
    return merged


def counts(backends: Iterable[str]) -> dict[str, int]:
    """How many nodes of each backend, in first-seen order."""
    found: dict[str, int] = {}
    for name in backends:
        found[name] = found.get(name, 0) + 1
    return found
