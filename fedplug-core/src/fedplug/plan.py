"""Planning a run: every check that can be made before anything starts, made once, and the resolved run config.

:func:`plan_run` is the one pre-flight pipeline of ``fedplug run`` and ``fedplug.run()``.
It resolves the run config once (core defaults, the backend's defaults, the user's
overrides, the backends of ``node-backends``) and checks, in this order: the machine's
resources and the Ray address, the backend, the results folder, the run config's names,
types and ranges, the strategy and partitioner parameters, the dataset and every node's
partition, the model against the data, and each backend of a mixed federation. A mistake
raises a :class:`~fedplug.errors.FedplugError` whose message is one line; nothing has been
started or written then. The result, a :class:`RunPlan`, is what the engines run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedplug import checkpoint, dp, machine, node_backends
from fedplug.availability import check_backend_available, find_backend
from fedplug.backend import Backend, BackendUnavailable, ModelError, Scalar
from fedplug.config import check_partitioner, refuse_set_by_fedplug, resolve
from fedplug.custom import is_custom, locate, no_native_output
from fedplug.data import DataError, check_data, data_spec, held_out, spec_config
from fedplug.data.sources import dataset_problem
from fedplug.deployment.flower_cli import Security
from fedplug.deployment.network import port_open, split_address
from fedplug.errors import ConfigError, DeployError, shown
from fedplug.models import SHARED_MODELS, canonical_shapes
from fedplug.results import default_out
from fedplug.strategies import check_strategy, strategy_kwargs
from fedplug.tracking import missing_library

RUNS_ROOT = Path("fedplug-runs")
"""Where runs go without ``out``: one new folder each."""


@dataclass(frozen=True)
class Engine:
    """Where a run executes: Flower's Simulation Engine on this machine, or a SuperLink's Deployment Engine."""

    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None
    superlink: str | None = None
    security: Security | None = None

    @property
    def deployed(self) -> bool:
        return self.superlink is not None


@dataclass(frozen=True)
class RunPlan:
    """A checked run: its backend, its resolved run config, where its results go and which engine runs it.

    ``out`` is the results folder on this machine (a simulation); on a SuperLink it is
    ``None`` and ``config["out"]`` is a path on the SuperLink's machine, or empty.
    """

    backend: Backend
    config: dict[str, Scalar]
    engine: Engine
    out: Path | None
    resumed: bool = False
    notes: tuple[str, ...] = ()
    """What the plan decided that the user should know (e.g. centralized evaluation turned off)."""


def plan_run(
    backend: str | None,
    overrides: Mapping[str, Scalar],
    *,
    out: Path | None = None,
    resume: Path | None = None,
    client_cpus: float = 1.0,
    client_gpus: float | None = None,
    ray_address: str | None = None,
    superlink: str | None = None,
    ca_cert: Path | None = None,
    insecure: bool = False,
    create: bool = True,
    preset: str | None = None,
) -> RunPlan:
    """Check everything a run needs before it starts; the :class:`RunPlan` to execute, or a one-line error.

    ``overrides`` are run-config values over the backend's defaults. ``resume`` continues the
    run in that results folder (only ``num-server-rounds`` may be given, to extend it). ``preset``
    names a set of run-config values the backend ships (``quickstart``: its Flower quickstart's
    settings), applied over its defaults and under ``overrides``. The
    results folder of a simulation is created last, when every check has passed (``create=False``:
    not at all, for a check of the run alone).
    """
    refuse_set_by_fedplug(overrides)
    if superlink is not None:
        if resume is not None:
            raise ConfigError("--resume continues a simulation; a run on a SuperLink cannot be resumed yet")
        if ray_address is not None:
            raise ConfigError("--ray-address is for the Simulation Engine; a run on a SuperLink uses the SuperNodes")
        chosen = find_backend(backend) if backend is not None else None
        return _plan_deployed(chosen, with_preset(chosen, preset, overrides), out, superlink, ca_cert, insecure)
    if ray_address is None:
        machine.check_resources(client_cpus, client_gpus)
        gpus = machine.gpu_share(client_cpus) if client_gpus is None else client_gpus
    else:
        check_ray_address(ray_address)
        gpus = check_cluster_resources(ray_address, client_cpus, client_gpus)
    engine = Engine(client_cpus=client_cpus, client_gpus=gpus, ray_address=ray_address)
    if resume is not None:
        if preset:
            raise ConfigError(
                f"--preset would change the experiment: a resumed run keeps the config stored in {resume}"
            )
        extra = sorted(set(overrides) - {"num-server-rounds"})
        if extra:
            raise ConfigError(
                f"'{extra[0]}' would change the experiment: a resumed run keeps the config stored in {resume} "
                "(only the number of rounds may extend it)"
            )
        if out is not None:
            raise ConfigError(f"--out would change the experiment: a resumed run writes to {resume}")
        rounds = overrides.get("num-server-rounds")
        chosen, config = resume_config(resume, int(rounds) if rounds is not None else None, backend)
        _check_node_backends(config)
        check_trackers(config)
        return RunPlan(chosen, config, engine, resume, resumed=True)
    if backend is None:
        raise ConfigError("name a backend (fedplug run numpy), or continue a run with --resume DIR")
    chosen = find_backend(backend)
    check_backend_available(chosen)
    check_out_folder(out if out is not None else RUNS_ROOT)
    config = resolve_and_check(chosen, with_preset(chosen, preset, overrides))
    check_backend_available(chosen, config)  # now with the run config it runs (keras.backend=jax needs jax)
    check_trackers(config)
    notes = check_held_out(config, overrides)
    notes += dp.plan(config, overrides)  # differential privacy: the accountant's checks, a target epsilon's noise
    check_model(chosen, config)
    _check_node_backends(config)
    if out is None:  # made now: every check has passed
        out = default_out(chosen.name, RUNS_ROOT) if create else RUNS_ROOT / f"<time>-{chosen.name}"
    folder = out
    config["out"] = str(folder.resolve())
    return RunPlan(chosen, config, engine, folder, notes=notes)


def with_preset(backend: Backend | None, preset: str | None, overrides: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """``overrides`` over the values of the backend's ``preset`` (none: ``overrides`` alone)."""
    if not preset:
        return dict(overrides)
    presets = backend.presets if backend is not None else {}
    if preset not in presets:
        shipped = f"its presets: {', '.join(presets)}" if presets else "it ships none"
        name = backend.name if backend is not None else "?"
        raise ConfigError(f"backend '{name}' has no preset '{preset}'; {shipped} (fedplug info {name} shows them)")
    return {**presets[preset], **overrides}


def _plan_deployed(
    chosen: Backend | None,
    overrides: dict[str, Scalar],
    out: Path | None,
    superlink: str,
    ca_cert: Path | None,
    insecure: bool,
) -> RunPlan:
    """A run on a SuperLink: the nodes hold the data; the run config is checked here, as far as it can be."""
    if chosen is None:
        raise ConfigError("name the server's backend (fedplug run numpy --superlink HOST:PORT)")
    check_backend_available(chosen)
    split_address(superlink)
    security = Security.of(ca_cert, insecure)
    if "centralized-eval" not in overrides and "dataset" not in overrides:
        # the data is on the nodes: the server has a held-out set only when the coordinator names one
        overrides["centralized-eval"] = False
    config = resolve_and_check(chosen, overrides, deployed=True)
    notes = check_held_out(config, overrides) + dp.plan(config, overrides)  # dp: the accountant's checks
    check_model(chosen, config)  # a custom model runs on the SuperLink and the nodes: it is tried here first
    config["out"] = str(out) if out else ""  # a path on the SuperLink's machine, where the ServerApp runs
    return RunPlan(chosen, config, Engine(superlink=superlink, security=security), None, notes=notes)


def check_trackers(config: Mapping[str, Scalar]) -> None:
    """The libraries of ``track`` (TensorBoard, MLflow) are installed where the ServerApp runs: here, in a simulation.

    A run on a SuperLink is not checked here: its ServerApp runs on the SuperLink's machine, and
    ends the run with the same one-line reason there if a library is missing.
    """
    if problem := missing_library(str(config.get("track", ""))):
        raise ConfigError(problem)


def check_ray_address(address: str) -> None:
    """``auto``, or the HOST:PORT of a Ray head that answers."""
    if address == "auto":
        return
    try:
        host, port = split_address(address)
    except DeployError:
        raise ConfigError(
            f"--ray-address must be auto or HOST:PORT of a Ray head (e.g. 127.0.0.1:6379), got '{address}'"
        ) from None
    if not port_open(host, port, timeout=3.0):
        raise ConfigError(f"no Ray cluster answers at {address}: start one with `ray start --head --port {port}`")


def cluster_resources(address: str) -> tuple[float, float]:
    """``(CPUs, GPUs)`` of the running Ray cluster at ``address`` (``ray.cluster_resources()``): connect, read,
    disconnect (the cluster keeps running)."""
    import logging
    import warnings

    import ray

    try:
        with warnings.catch_warnings():  # Ray's FutureWarning about accelerators: a mistake is one line on stderr
            warnings.simplefilter("ignore")
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot connect to the Ray cluster at {address} ({error}); check --ray-address") from None
    try:
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))


def check_cluster_resources(address: str, client_cpus: float, client_gpus: float | None) -> float:
    """``--client-cpus``/``--client-gpus`` against the Ray cluster at ``address``, not this machine; the GPUs per
    client: ``client_gpus``, or (``None``) the cluster's GPUs shared by the clients that run at once."""
    if not math.isfinite(client_cpus) or client_cpus <= 0:
        raise ConfigError(f"--client-cpus must be a positive number of cores, e.g. 1 or 0.5; got {client_cpus}")
    if client_gpus is not None and (not math.isfinite(client_gpus) or client_gpus < 0):
        raise ConfigError(f"--client-gpus must be 0 or a positive number of GPUs, e.g. 0.5; got {client_gpus}")
    cpus, gpus = cluster_resources(address)
    if client_cpus > cpus:
        raise ConfigError(
            f"--client-cpus {client_cpus:g} is more than the {cpus:g} CPUs of the Ray cluster at {address}; "
            f"use at most {cpus:g}"
        )
    if client_gpus is None:
        return round(gpus / max(1, int(cpus // client_cpus)), 4) if gpus else 0.0
    if client_gpus > gpus:
        have = f"has only {gpus:g} GPUs; use at most {gpus:g}" if gpus else "has no GPU; leave it out or use 0"
        raise ConfigError(f"--client-gpus {client_gpus:g}: the Ray cluster at {address} {have}")
    return client_gpus


def check_out_folder(out: Path) -> None:
    """Refuse an ``out`` that cannot become this run's results folder, creating nothing."""
    name = shown(out)
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"--out {str(out)!r} is not valid Unicode (undecodable bytes); choose another name") from None
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {name} is a file, not a folder; choose a folder for the results")
        if (out / "config.json").exists():
            raise ConfigError(f"{name} already holds a run; choose another --out, or continue it with --resume {name}")
        existing = out.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"--out {name} is inside {shown(existing)}, which is a file; choose a folder path")
    except OSError as error:
        raise ConfigError(f"cannot use --out {name}: {error.strerror or error}; choose another folder") from error
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedplug-probe-", dir=existing))  # a real write test, even as root
    except OSError as error:
        raise ConfigError(
            f"cannot write --out {name}: {shown(existing)} refuses new folders ({error.strerror}); "
            "choose a writable one"
        ) from error


def resolve_and_check(backend: Backend, overrides: Mapping[str, Scalar], deployed: bool = False) -> dict[str, Scalar]:
    """The run config, resolved once, with its strategy, partitioner and data checked.

    ``deployed``: the nodes hold the data and join when they will, so the partitioner, the partitions
    of simulated nodes and the strategy's needs in nodes are not checked (its parameters' ranges are);
    the dataset is loaded here once for its data spec, which the run config ships to the nodes
    (``fedplug.data.SPEC_KEYS``): no node loads the coordinator's dataset, and each node's own data
    must fit it.
    """
    config = resolve(backend, overrides, node_backends.others(overrides))
    if problem := dataset_problem(str(config["dataset"])):  # '' would read as the current folder
        raise ConfigError(problem)
    check_strategy(config, nodes_known=not deployed)
    if not deployed:
        check_partitioner(config, num_classes=None)
    if is_custom(config["model"]):  # a custom model: every process imports it from its file, wherever it runs
        config["model"], config["model-file"] = locate(str(config["model"]), Path.cwd())
    if Path(str(config["dataset"])).expanduser().exists():  # Ray workers run elsewhere: absolute paths
        config["dataset"] = str(Path(str(config["dataset"])).expanduser().resolve())
    strategy_kwargs(config)
    try:
        if not deployed and config["partitioner"] == "pathological":  # classes per node against the data's
            check_partitioner(config, num_classes=data_spec(config).num_classes)
        if deployed:
            config.update(spec_config(data_spec(config)))
        else:
            check_data(config)  # the dataset and every node's partition, computed once for the whole run
    except DataError as error:
        raise ConfigError(str(error)) from error
    return config


def check_held_out(config: dict[str, Scalar], overrides: Mapping[str, Scalar]) -> tuple[str, ...]:
    """Centralized evaluation needs the dataset's test split: refused when asked for, else turned off and said."""
    if not config["centralized-eval"] or held_out(config):
        return ()
    if overrides.get("centralized-eval") is True:
        raise ConfigError(
            f"dataset {config['dataset']} has no test split: centralized-eval=true has nothing to evaluate on; "
            "leave it out (nodes still evaluate on their own held-out 20%) or use a dataset with a test split"
        )
    config["centralized-eval"] = False
    return (f"no server held-out set (dataset {config['dataset']} has no test split): centralized evaluation off",)


def check_model(backend: Backend, config: dict[str, Scalar]) -> None:
    """The model against the data spec, after the data is checked.

    The shared models are checked by their canonical shapes, without importing a framework;
    a backend's own models (e.g. ``cnn``) are built where they train: importing a framework
    here would add seconds to every run. A custom model (``module:factory``) is built here,
    once, with one dummy batch: the user's code may fail in many ways, all before anything starts.
    """
    try:
        spec = data_spec(config)
    except DataError as error:
        raise ConfigError(str(error)) from error
    try:
        if config["model"] in SHARED_MODELS:
            canonical_shapes(str(config["model"]), spec, config)
        elif is_custom(config["model"]):
            os.environ.update(backend.environment(config))
            with no_native_output():
                backend.build_model(str(config["model"]), spec, config)
    except (ModelError, BackendUnavailable) as error:
        raise ConfigError(str(error)) from error


def _check_node_backends(config: dict[str, Scalar]) -> None:
    """A mixed federation's backends: each known, available, building the model, accepting the run config."""
    try:
        node_backends.check(config)
    except ModelError as error:
        raise ConfigError(str(error)) from error
    except ConfigError:
        raise
    except (Exception, SystemExit) as error:  # a plugin's bug in its own check or environment: name it
        raise ConfigError(f"a backend of node-backends failed its checks ({type(error).__name__}: {error})") from error


def resume_config(folder: Path, rounds: int | None, backend: str | None) -> tuple[Backend, dict[str, Scalar]]:
    """The stored run config of ``folder`` to continue, with ``rounds`` if it extends the run."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a fedplug run folder (no config.json): give the --out of an earlier run")
    stored = json.loads((folder / "config.json").read_text())
    if backend is not None and backend != stored.get("backend"):
        raise ConfigError(f"{folder} holds a '{stored.get('backend')}' run, not '{backend}': drop the backend argument")
    chosen = find_backend(str(stored.get("backend")))
    saved = checkpoint.latest(folder)
    if saved is None:
        raise ConfigError(f"{folder} has no checkpoint (it stopped before its first round finished): start it anew")
    planned = int(stored["num-server-rounds"])
    if rounds is not None:
        if rounds <= saved.round:
            raise ConfigError(f"{folder} has finished {saved.round} rounds already: --rounds must be more than that")
        planned = rounds
    if saved.round >= planned:
        raise ConfigError(
            f"{folder} holds a finished run ({saved.round} rounds): extend it with --rounds N (N > {saved.round})"
        )
    # the folder may have moved since: results go where it is now
    overrides = {**stored, "num-server-rounds": planned, "out": str(folder.resolve())}
    return chosen, resolve(chosen, overrides, node_backends.others(stored))
