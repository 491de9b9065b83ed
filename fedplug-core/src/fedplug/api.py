"""fedplug's Python API: ``fedplug.run()`` federates a model from a script or a notebook, no subprocess to manage.

It makes the same checks as ``fedplug run`` (:func:`fedplug.plan.plan_run`), raises the same
one-line errors as exceptions (:class:`~fedplug.errors.FedplugError`, before anything starts),
runs on the same engines, writes the same results folder and returns a :class:`RunResult`
with every round's metrics::

    import fedplug

    result = fedplug.run("numpy", rounds=3, nodes=4, lr=0.05, quiet=True)
    print(result.accuracy, result.out)

The ``fedplug`` command is a thin caller of this function.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedplug.backend import Backend, Scalar
from fedplug.config import parse_overrides
from fedplug.errors import ConfigError, RunError
from fedplug.plan import RunPlan, plan_run

FLAG_KEYS = {
    "rounds": "num-server-rounds",
    "nodes": "num-supernodes",
    "fraction_train": "fraction-train",
    "fraction_evaluate": "fraction-evaluate",
    "local_epochs": "local-epochs",
    "strategy": "strategy",
    "model": "model",
    "dataset": "dataset",
    "partitioner": "partitioner",
    "seed": "seed",
    "node_backends": "node-backends",
    "track": "track",
}
"""Keyword arguments of :func:`run` (and flags of ``fedplug run``) that set a run-config key."""


@dataclass(frozen=True)
class RunResult:
    """A finished run: its results folder, how it ended, its resolved run config and every round's record.

    Each record of ``rounds`` is a round of ``metrics.json``: ``round``, ``train-loss``,
    ``evaluate-accuracy``, ``centralized-accuracy``, ``seconds``, which partitions trained, ...
    Round 0 evaluates the initial model.
    """

    out: Path | str
    """The results folder (on a SuperLink: its path on the SuperLink's machine)."""
    status: str
    """``finished`` (every round done) or ``failed`` (see ``reason``; the folder keeps the finished rounds)."""
    config: dict[str, Scalar]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    @property
    def accuracy(self) -> float | None:
        """The final model's accuracy: on the server's held-out set, else the nodes' federated evaluation."""
        for record in reversed(self.rounds):
            for key in ("centralized-accuracy", "evaluate-accuracy"):
                if record.get(key) is not None:
                    return float(record[key])
        return None

    def metric(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` of one metric, e.g. ``result.metric("train-loss")``, for the rounds that have it."""
        return [(int(r["round"]), float(r[key])) for r in self.rounds if r.get(key) is not None]


def run(
    backend: str | None = None,
    *,
    rounds: int | None = None,
    nodes: int | None = None,
    fraction_train: float | None = None,
    fraction_evaluate: float | None = None,
    local_epochs: int | None = None,
    strategy: str | None = None,
    model: str | None = None,
    dataset: str | None = None,
    partitioner: str | None = None,
    seed: int | None = None,
    node_backends: str | None = None,
    track: str | None = None,
    preset: str | None = None,
    run_config: Mapping[str, Scalar] | str | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    client_cpus: float = 1.0,
    client_gpus: float | None = None,
    ray_address: str | None = None,
    superlink: str | None = None,
    ca_cert: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    verbose: bool = False,
    quiet: bool = False,
    check: bool = False,
    **config: Scalar,
) -> RunResult:
    """Run a federated training of ``backend`` on Flower's Simulation Engine (or on a SuperLink) and return its result.

    Every run-config key can be given: the common ones as keyword arguments (``rounds``,
    ``nodes``, ``strategy``, ...), any other with underscores for dashes (``lr=0.05``,
    ``batch_size=64``), and namespaced ones in ``run_config`` (``{"strategy.proximal-mu": 0.1}``,
    or the ``flwr run`` syntax ``"strategy.proximal-mu=0.1 lr=0.05"``). ``preset`` starts from a set of
    values the backend ships (``"quickstart"``: its Flower quickstart's settings). ``resume`` continues the
    run in that results folder (``rounds`` may extend it). ``quiet`` prints nothing; otherwise
    the run's header, one line per round and a summary are printed, as by ``fedplug run``. ``check``
    makes every check and starts nothing: the result's ``status`` is ``checked``, its ``config`` the
    resolved run config, and no results folder is made.

    Raises :class:`~fedplug.errors.FedplugError` (``ConfigError``, ``DeployError``) for a mistake,
    before anything starts; :class:`~fedplug.errors.RunError` when the run started but could not
    finish (its ``out`` keeps the finished rounds); ``KeyboardInterrupt`` when interrupted, once
    every process of the run is gone.
    """
    given = {name: value for name, value in locals().items() if name in FLAG_KEYS}  # the run-config flags
    overrides = overrides_of(run_config, config, given)
    started = time.monotonic()
    plan = plan_run(
        backend,
        overrides,
        out=_path("--out", out),
        resume=_path("--resume", resume),
        client_cpus=client_cpus,
        client_gpus=client_gpus,
        ray_address=ray_address,
        superlink=superlink,
        ca_cert=_path("--ca-cert", ca_cert),
        insecure=insecure,
        create=not check,
        preset=preset,
    )
    if check:
        _say(f"fedplug: {_header(plan)}", quiet)
        for note in plan.notes:
            _say(f"fedplug: {note}", quiet)
        _say("fedplug: every check passed; nothing was started or written (--check)", quiet)
        return RunResult(plan.out or str(plan.config["out"]), "checked", plan.config)
    if not plan.resumed:
        _notice_once(plan.backend, quiet)
    if plan.engine.deployed:
        return _run_deployed(plan, verbose, quiet, started)
    return _run_simulated(plan, verbose, quiet, started)


def _path(flag: str, value: str | os.PathLike[str] | None) -> Path | None:
    """A path argument; an empty one is a mistake (``Path("")`` would silently mean the current folder)."""
    from fedplug.results import out_problem

    if value is None:
        return None
    if flag == "--out" and (problem := out_problem(os.fspath(value))):
        raise ConfigError(problem)
    if not os.fspath(value).strip():
        raise ConfigError(f"{flag} is empty; give a path, or leave {flag} out")
    return Path(value)


def overrides_of(
    run_config: Mapping[str, Scalar] | str | None, config: Mapping[str, Scalar], flags: Mapping[str, Any]
) -> dict[str, Scalar]:
    """The run-config overrides of a call: ``run_config`` (a mapping, or ``flwr run`` text), then keyword
    arguments with underscores for dashes, then the named flags."""
    overrides = parse_overrides(run_config) if isinstance(run_config, str) else dict(run_config or {})
    for key, value in config.items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"run-config value of '{key}' must be a bool, int, float or string, got {value!r}")
        overrides[key.replace("_", "-")] = value
    overrides.update({FLAG_KEYS[name]: value for name, value in flags.items() if value is not None})
    return overrides


def _say(message: Any, quiet: bool) -> None:
    """Print to the terminal, which may be gone (SIGHUP)."""
    if quiet:
        return
    from fedplug.display import console

    with suppress(OSError):
        if isinstance(message, str):
            console.print(message, highlight=False, soft_wrap=True)
        else:
            console.print(message)


def _notice_once(backend: Backend, quiet: bool) -> None:
    """Show a backend's notice on its first run on this machine."""
    if not backend.notice or quiet:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedplug"
    marker = cache / f"notice-{backend.name}"
    if not marker.exists():
        import sys

        print(backend.notice, file=sys.stderr)
        with suppress(OSError):
            cache.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _report(rounds: list[dict[str, Any]], quiet: bool) -> None:
    """The summary table, the backends of a mixed federation and the failures, as ``fedplug run`` prints them."""
    from fedplug.display import backends_line, summary_table
    from fedplug.results import failure_summary

    if rounds:
        _say(summary_table(rounds), quiet)
    if backends := backends_line(rounds):
        _say(backends, quiet)
    for line in failure_summary(rounds):
        _say(f"failed: {line}", quiet)


def _header(plan: RunPlan) -> str:
    """What the run is, in one line: backend, model, nodes, rounds, strategy, data, engine."""
    config = plan.config
    if plan.engine.deployed:
        held_out = (
            f"server held-out set: test split of {config['dataset']}"
            if config["centralized-eval"]
            else "no server held-out set"
        )
        return (
            f"{plan.backend.name} · model {config['model']} · {config['num-server-rounds']} rounds · "
            f"{config['strategy']} · SuperLink {plan.engine.superlink} · nodes train on their own data · {held_out}"
        )
    mixed = str(config["node-backends"]).replace(",", " ") if config.get("node-backends") else ""
    return (
        f"{plan.backend.name} · model {config['model']} · {config['num-supernodes']} nodes · "
        f"{config['num-server-rounds']} rounds · {config['strategy']} · dataset {config['dataset']}"
        + (f" · nodes {mixed}" if mixed else "")
    )


def _run_simulated(plan: RunPlan, verbose: bool, quiet: bool, started: float) -> RunResult:
    from fedplug.data import DataError, share_run_data
    from fedplug.results import Results, plot_metrics, read_metrics, read_status
    from fedplug.simulation import launch

    config, out = plan.config, plan.out
    assert out is not None
    _say(f"fedplug: {'resuming ' if plan.resumed else ''}{_header(plan)}", quiet)
    for note in plan.notes:
        _say(f"fedplug: {note}", quiet)
    Results(out, config)  # config.json: what the simulation process runs
    try:
        share_run_data(config, out)  # the run's other processes read the checked data and partitions from here
    except DataError as error:  # a resumed run whose dataset changed or went away
        raise ConfigError(str(error)) from error
    engine = plan.engine
    interrupted: KeyboardInterrupt | None = None

    def stopping(stop: KeyboardInterrupt) -> None:
        cause = "interrupted" if str(stop) in ("", "SIGINT") else f"got {stop}"
        _say(f"fedplug: {cause}, stopping the simulation ...", quiet)

    try:
        code = launch(out, engine.client_cpus, engine.client_gpus, verbose, engine.ray_address, quiet, stopping)
    except KeyboardInterrupt as stop:
        interrupted, code = stop, 130
    rounds_done = read_metrics(out)
    if code:  # the ServerApp plots when it finishes; an interrupted or failed run is plotted here
        plot_metrics(out, title=f"fedplug {plan.backend.name} · {config['model']} · {config['strategy']}")
    _report(rounds_done, quiet)
    _say(f"results: {out}  ({time.monotonic() - started:.1f}s)", quiet)
    if interrupted is not None:
        raise interrupted
    finished = sum(1 for record in rounds_done if record["round"] > 0)
    status = read_status(out)
    budget_spent = bool(rounds_done) and "privacy-stop" in rounds_done[-1]  # dp.max-epsilon stopped it (fedplug.dp)
    if code or status.get("status") != "finished" or (finished < int(config["num-server-rounds"]) and not budget_spent):
        reason = status.get("reason") or f"the simulation stopped after {finished} rounds"
        raise RunError(f"{reason} (log: {out / 'simulation.log'})", out=out)
    return RunResult(out, "finished", config, rounds_done, seconds=time.monotonic() - started)


def _run_deployed(plan: RunPlan, verbose: bool, quiet: bool, started: float) -> RunResult:
    import shutil
    import sys

    from fedplug.deployment.flower_cli import submit
    from fedplug.display import round_line
    from fedplug.flower_app import write_flower_app

    config, engine = plan.config, plan.engine
    assert engine.superlink is not None and engine.security is not None
    _say(f"fedplug: {_header(plan)}", quiet)
    for note in plan.notes:
        _say(f"fedplug: {note}", quiet)
    work = Path(tempfile.mkdtemp(prefix="fedplug-submit-"))
    # its paths (--out, --dataset) are the SuperLink machine's: keep them as they are
    app_dir = write_flower_app(work, config, portable=False, serverapp="fedplug.deploy_app:server_app")
    log_path = work / "flwr-run.log"
    with open(log_path, "w") as log:
        try:
            result = submit(
                app_dir,
                engine.superlink,
                engine.security,
                lambda record: _say(round_line(record), quiet),
                lambda where: _say(f"results: {where} on the SuperLink's machine (written by the ServerApp)", quiet),
                log,
            )
        except KeyboardInterrupt:
            _say("fedplug: interrupted; the run was stopped on the SuperLink", quiet)
            raise
    if verbose:
        print(log_path.read_text(errors="replace"), file=sys.stderr)
    _report(result.rounds, quiet)
    finished = sum(1 for record in result.rounds if record["round"] > 0)
    where = f"{result.out} on the SuperLink's machine" if result.out else "none (the ServerApp did not start)"
    _say(f"results: {where}  ({time.monotonic() - started:.1f}s)", quiet)
    budget_spent = bool(result.rounds) and "privacy-stop" in result.rounds[-1]  # dp.max-epsilon (fedplug.dp)
    if result.status != "finished" or (finished < int(config["num-server-rounds"]) and not budget_spent):
        reason = result.reason or f"the run stopped after {finished} rounds"
        raise RunError(f"{reason} (log: {log_path})", out=result.out or None)
    shutil.rmtree(work, ignore_errors=True)
    return RunResult(result.out, "finished", config, result.rounds, seconds=time.monotonic() - started)
