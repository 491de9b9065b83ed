"""The ``fedplug`` command: list, info, run and new-backend.

Only light modules are imported at start-up so that ``fedplug --help`` and
``fedplug list`` stay fast; Flower and the frameworks load when a run needs them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedplug import node_backends
from fedplug.backend import Backend, BackendUnavailable, ModelError, Scalar
from fedplug.config import ConfigError, parse_overrides, resolve
from fedplug.plugins import UnknownBackend, get_registry

app = typer.Typer(
    name="fedplug",
    help="Federated learning on Flower with any ML framework: one core, one command, pluggable backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: how user mistakes end."""
    typer.echo(f"fedplug: error: {message}", err=True)
    raise typer.Exit(code)


def backend_or_exit(name: str) -> Backend:
    try:
        return get_registry().get(name)
    except UnknownBackend as error:
        fail(str(error), code=2)


@app.command("list")
def list_backends(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List installed backends, their distributions and frameworks, and broken plugins."""
    from fedplug.display import backends_rows, backends_table, console

    rows = backends_rows(get_registry())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(backends_table(rows))


@app.command()
def info(backend: Annotated[str, typer.Argument(help="Backend name, e.g. torch.")]) -> None:
    """Show a backend's models, quickstart dataset, conformance tier and default run config."""
    from fedplug.display import show_info

    show_info(backend_or_exit(backend))


def _notice_once(backend: Backend) -> None:
    """Show a backend's notice on its first run on this machine."""
    if not backend.notice:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedplug"
    marker = cache / f"notice-{backend.name}"
    if not marker.exists():
        typer.echo(backend.notice, err=True)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass


def _flags_to_overrides(**flags: Any) -> dict[str, Scalar]:
    names = {
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
    }
    return {names[key]: value for key, value in flags.items() if value is not None}


def prepare_run(backend: Backend, overrides: dict[str, Scalar]) -> dict[str, Scalar]:
    """Check everything a run needs before it starts; return the resolved run config (``out`` not yet set)."""
    from fedplug.data import DataError, check_data
    from fedplug.strategies import strategy_kwargs

    config = resolve(backend, overrides, node_backends.others(overrides))
    if ":" in str(config["model"]):  # a custom model: every process imports it from its file, wherever it runs
        from fedplug.custom import locate

        config["model"], config["model-file"] = locate(str(config["model"]), Path.cwd())
    if Path(str(config["dataset"])).expanduser().exists():  # Ray workers run elsewhere: absolute paths
        config["dataset"] = str(Path(str(config["dataset"])).expanduser().resolve())
    strategy_kwargs(config)
    try:
        check_data(config)  # the dataset and every node's partition, computed once for the whole run
    except DataError as error:
        raise ConfigError(str(error)) from error
    return config


def check_before_data(backend: Backend, overrides: dict[str, Scalar]) -> None:
    """The checks of the run config alone (names, types, ranges, strategy, partitioner), before partitioning."""
    from fedplug.config import check_partitioner
    from fedplug.data import DataError, data_spec
    from fedplug.strategies import check_strategy

    config = resolve(backend, overrides, node_backends.others(overrides))
    check_strategy(config)
    check_partitioner(config, num_classes=None)
    if config["partitioner"] == "pathological":  # classes per node against the data's classes
        try:
            check_partitioner(config, num_classes=data_spec(config).num_classes)
        except DataError as error:
            raise ConfigError(str(error)) from error


def check_before_start(backend: Backend, config: dict[str, Scalar]) -> None:
    """The model against the data spec, after the data is checked.

    The shared models are checked by their canonical shapes, without importing a framework;
    a backend's own models (e.g. ``cnn``) are built where they train: importing a framework
    here would add seconds to every run. A custom model (``module:factory``) is built here,
    once, with one dummy batch: the user's code may fail in many ways, all before anything starts.
    """
    from fedplug.data import DataError, data_spec
    from fedplug.models import canonical_shapes

    try:
        spec = data_spec(config)
    except DataError as error:
        raise ConfigError(str(error)) from error
    if config["model"] in ("mlp", "lenet"):
        canonical_shapes(str(config["model"]), spec, config)
    elif ":" in str(config["model"]):  # the user's code: import it and run one dummy batch, here and now
        from fedplug.custom import no_native_output

        os.environ.update(backend.environment(config))
        try:
            with no_native_output():
                backend.build_model(str(config["model"]), spec, config)
        except BackendUnavailable as error:
            raise ConfigError(str(error)) from error


def check_node_backends(config: dict[str, Scalar]) -> None:
    """A mixed federation's backends: each known, available, building the model, accepting the run config."""
    from fedplug.node_backends import check

    try:
        check(config)
    except ModelError as error:
        raise ConfigError(str(error)) from error
    except (Exception, SystemExit) as error:  # a plugin's bug in its own check or environment: name it
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"a backend of node-backends failed its checks ({type(error).__name__}: {error})") from error


RUNS_ROOT = Path("fedplug-runs")
"""Where runs go without ``--out``: one new folder each."""


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot become this run's results folder, creating nothing."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        fail(f"--out {str(out)!r} is not valid Unicode (undecodable bytes); choose another name", code=2)
    try:
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file, not a folder; choose a folder for the results", code=2)
        if (out / "config.json").exists():
            fail(f"{out} already holds a run; choose another --out, or continue it with --resume {out}", code=2)
        existing = out.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            fail(f"--out {out} is inside {existing}, which is a file; choose a folder path", code=2)
    except OSError as error:
        fail(f"cannot use --out {out}: {error.strerror or error}; choose another folder", code=2)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedplug-probe-", dir=existing))  # a real write test, even as root
    except OSError as error:
        fail(f"cannot write --out {out}: {existing} refuses new folders ({error.strerror}); choose a writable one", 2)


def machine_cores() -> float:
    """CPU cores this process may use: its affinity, capped by a cgroup (v2) CPU quota."""
    cores: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def count_gpus() -> int:
    """The machine's NVIDIA GPUs, as ``nvidia-smi -L`` lists them (0 without nvidia-smi)."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines())


def check_resources(client_cpus: float, client_gpus: float | None) -> None:
    """Refuse client resources Ray could never grant: the simulation would wait forever."""
    cores = machine_cores()
    if not math.isfinite(client_cpus) or client_cpus <= 0:
        fail(f"--client-cpus must be a positive number of cores, e.g. 1 or 0.5; got {client_cpus}", code=2)
    if client_cpus > cores:
        fail(f"--client-cpus {client_cpus:g} is more than this machine's {cores:g} cores; use at most {cores:g}", 2)
    if client_gpus is None:
        return
    if not math.isfinite(client_gpus) or client_gpus < 0:
        fail(f"--client-gpus must be 0 or a positive number of GPUs, e.g. 0.5; got {client_gpus}", code=2)
    if client_gpus > 0:
        gpus = count_gpus()
        if not gpus:
            fail("--client-gpus: this machine has no NVIDIA GPU (no nvidia-smi); leave it out or use 0", code=2)
        if client_gpus > gpus:
            fail(f"--client-gpus {client_gpus:g} is more than the {gpus} GPUs of this machine; use at most {gpus}", 2)


def check_backend_available(backend: Backend) -> None:
    """The backend's own check; a plugin that fails it with anything else is named in one line."""
    try:
        backend.check_available()
    except BackendUnavailable as error:
        fail(str(error))
    except (Exception, SystemExit) as error:
        entry = get_registry().backends.get(backend.name)
        origin = f"plugin '{entry.plugin}' ({entry.distribution} {entry.version})" if entry else "its plugin"
        fail(
            f"backend '{backend.name}' from {origin} failed its availability check with "
            f"{type(error).__name__}: {error}; reinstall it or report this to its authors"
        )


def check_ray_address(address: str, superlink: str | None) -> None:
    """``--ray-address``: ``auto`` or the HOST:PORT of a Ray head that answers, for a simulation."""
    from fedplug import deploy

    if superlink is not None:
        fail("--ray-address is for the Simulation Engine; a run on a SuperLink uses the SuperNodes", code=2)
    if address == "auto":
        return
    try:
        host, port = deploy.split_address(address)
    except deploy.DeployError:
        fail(f"--ray-address must be auto or HOST:PORT of a Ray head (e.g. 127.0.0.1:6379), got '{address}'", 2)
    if not deploy.port_open(host, port, timeout=3.0):
        fail(f"no Ray cluster answers at {address}: start one with `ray start --head --port {port}`", code=2)


def gpu_share(client_cpus: float) -> float:
    """GPUs per client so that the clients running in parallel share the machine's NVIDIA GPUs."""
    gpus = count_gpus()
    parallel = max(1, int((os.cpu_count() or 1) // client_cpus))
    return round(gpus / parallel, 4) if gpus else 0.0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the simulation's whole process group: SIGINT, then SIGTERM, then SIGKILL for what is left."""
    if process.poll() is None:
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5)):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class Stopped(Exception):
    """The ``fedplug`` command got SIGTERM or SIGHUP: stop the run as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def resume_config(folder: Path, rounds: int | None, backend: str | None) -> tuple[Backend, dict[str, Scalar]]:
    """The stored run config of ``folder`` to continue, with ``rounds`` if it extends the run."""
    from fedplug import checkpoint

    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a fedplug run folder (no config.json): give the --out of an earlier run")
    stored = json.loads((folder / "config.json").read_text())
    if backend is not None and backend != stored.get("backend"):
        raise ConfigError(f"{folder} holds a '{stored.get('backend')}' run, not '{backend}': drop the backend argument")
    chosen = backend_or_exit(str(stored.get("backend")))
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
    config = resolve(
        chosen,
        {**stored, "num-server-rounds": planned, "out": str(folder.resolve())},
        node_backends.others(stored),
    )
    return chosen, config


@app.command()
def run(
    backend: Annotated[str | None, typer.Argument(help="Backend name, e.g. mlx, torch, numpy.")] = None,
    run_config: Annotated[
        str,
        typer.Option(
            "--run-config", "-c", help="Overrides, flwr run syntax: 'lr=0.05 batch-size=64', or a .toml file."
        ),
    ] = "",
    rounds: Annotated[int | None, typer.Option(help="Server rounds (num-server-rounds).")] = None,
    nodes: Annotated[int | None, typer.Option(help="Simulated nodes (num-supernodes).")] = None,
    fraction_train: Annotated[float | None, typer.Option(help="Fraction of nodes sampled to train.")] = None,
    fraction_evaluate: Annotated[float | None, typer.Option(help="Fraction of nodes sampled to evaluate.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="fedavg, fedprox, fedadam, ... (strategy.<param>=... in --run-config).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model: the backend's default, mlp, lenet, or yours: my_nets:Factory, ./my_nets.py:Factory."),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="embedded, a Hugging Face id, or a .parquet/.csv file.")] = None,
    partitioner: Annotated[
        str | None, typer.Option(help="iid, dirichlet, pathological or shard (partitioner.<param>=...).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of model init, partitioning, sampling and shuffling.")] = None,
    node_backends: Annotated[
        str | None,
        typer.Option(
            help="Mixed frameworks: other backends for some nodes, e.g. '0-1:torch,2-3:jax' (the others run BACKEND)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Results folder (default: ./fedplug-runs/<time>-<backend>).")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this results folder from its last finished round (--rounds extends it)."
        ),
    ] = None,
    client_cpus: Annotated[float, typer.Option(help="CPU cores per simulated client.")] = 1.0,
    client_gpus: Annotated[
        float | None,
        typer.Option(help="GPUs per simulated client (default: parallel clients share the GPUs; 0 without GPU)."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Simulate on a running Ray cluster: auto, or HOST:PORT of its head (ray start --head); left running."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
    superlink: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a SuperLink (fedplug superlink): run there instead of simulating."),
    ] = None,
    ca_cert: Annotated[
        Path | None, typer.Option(help="With --superlink: the federation's CA certificate (ca.crt).")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="With --superlink: the SuperLink runs without TLS.")] = False,
) -> None:
    """Run a federated training on Flower's Simulation Engine (or on a SuperLink) and write a results folder."""
    from fedplug.data import DataError, share_run_data
    from fedplug.results import Results, default_out

    given = {
        "rounds": rounds,
        "nodes": nodes,
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "local_epochs": local_epochs,
        "strategy": strategy,
        "model": model,
        "dataset": dataset,
        "partitioner": partitioner,
        "seed": seed,
        "node_backends": node_backends,
    }
    flags = _flags_to_overrides(**given)
    if resume is not None and superlink is not None:
        fail("--resume continues a simulation; a run on a SuperLink cannot be resumed yet", code=2)
    check_resources(client_cpus, client_gpus)
    if ray_address is not None:
        check_ray_address(ray_address, superlink)
    if resume is not None:
        changed = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
        changed += ["--run-config"] * bool(run_config) + ["--out"] * (out is not None)
        changed = [flag for flag in changed if flag != "--rounds"]
        if changed:
            fail(
                f"{changed[0]} would change the experiment: a resumed run keeps the config stored in {resume} "
                "(only --rounds may extend it)",
                code=2,
            )
        try:
            chosen, config = resume_config(resume, rounds, backend)
            check_node_backends(config)
        except ConfigError as error:
            fail(str(error), code=2)
        out = resume
    else:
        if backend is None:
            fail("name a backend (fedplug run numpy), or continue a run with --resume DIR", code=2)
        chosen = backend_or_exit(backend)
        check_backend_available(chosen)
        if superlink is not None:
            run_on_superlink(
                chosen, {**_parse_or_exit(run_config), **flags}, out, superlink, ca_cert, insecure, verbose
            )
            return
        check_out_folder(out if out is not None else RUNS_ROOT)  # the default folder is made after the checks
        try:
            overrides = {**parse_overrides(run_config), **flags}
            check_before_data(chosen, overrides)
            config = prepare_run(chosen, overrides)
            check_before_start(chosen, config)
            check_node_backends(config)
        except (ConfigError, ModelError) as error:
            fail(str(error), code=2)
        out = out or default_out(chosen.name, RUNS_ROOT)
        config["out"] = str(out.resolve())
        _notice_once(chosen)
    Results(out, config)  # config.json: what the simulation process runs
    try:
        share_run_data(config, out)  # the run's other processes read the checked data and partitions from here
    except DataError as error:  # a resumed run whose dataset changed or went away
        fail(str(error), code=2)
    code = _simulate(chosen, config, out, client_cpus, client_gpus, verbose, resume is not None, ray_address)
    if code:
        raise typer.Exit(code)


def _simulate(
    chosen: Backend,
    config: dict[str, Scalar],
    out: Path,
    client_cpus: float,
    client_gpus: float | None,
    verbose: bool,
    resumed: bool,
    ray_address: str | None = None,
) -> int:
    """Run the simulation process for ``out``, report its rounds and how it ended; return the exit code."""
    from fedplug.data import remove_run_data
    from fedplug.display import backends_line, console, summary_table
    from fedplug.results import failure_summary, plot_metrics, read_metrics, read_status

    console.print(
        f"fedplug: {'resuming ' if resumed else ''}{chosen.name} · model {config['model']} · "
        f"{config['num-supernodes']} nodes · {config['num-server-rounds']} rounds · {config['strategy']} · "
        f"dataset {config['dataset']}"
        + (f" · nodes {str(config['node-backends']).replace(',', ' ')}" if config.get("node-backends") else ""),
        highlight=False,
        soft_wrap=True,
    )
    if client_gpus is None:
        client_gpus = gpu_share(client_cpus)
    command = [
        sys.executable,
        "-m",
        "fedplug.simulation",
        str(out),
        "--client-cpus",
        str(client_cpus),
        "--client-gpus",
        str(client_gpus),
        *(["--verbose"] if verbose else []),
        *(["--ray-address", ray_address] if ray_address else []),
    ]
    started = time.monotonic()
    log_path = out / "simulation.log"  # Flower's, Ray's and the frameworks' chatter goes here
    (out / "status.json").unlink(missing_ok=True)
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C and `kill -INT` stop the run even when a shell started it in the background (SIGINT ignored)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    process = None
    try:
        with open(log_path, "ab") as log:
            env = {
                **os.environ,
                "FEDPLUG_RUN_DIR": str(out.resolve()),  # marks every process of this run
                "FEDPLUG_PARENT_PID": str(os.getpid()),  # the simulation ends itself if this command dies
            }
            process = subprocess.Popen(command, start_new_session=True, stderr=None if verbose else log, env=env)
        code = process.wait()
    except KeyboardInterrupt:
        _say("fedplug: interrupted, stopping the simulation ...")
        code = 130
    except Stopped as stop:
        _say(f"fedplug: got {stop}, stopping the simulation ...")
        code = 128 + stop.signum
    finally:
        if process is not None:
            _stop(process)
        remove_run_data(out)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rounds_done = read_metrics(out)
    if code:  # the ServerApp plots when it finishes; an interrupted or failed run is plotted here
        plot_metrics(out, title=f"fedplug {chosen.name} · {config['model']} · {config['strategy']}")
    if rounds_done:
        _say(summary_table(rounds_done))
    if backends := backends_line(rounds_done):
        _say(backends)
    for line in failure_summary(rounds_done):
        _say(f"failed: {line}")
    _say(f"results: {out}  ({time.monotonic() - started:.1f}s)")
    finished = sum(1 for record in rounds_done if record["round"] > 0)
    status = read_status(out)
    if code == 0 and (status.get("status") != "finished" or finished < int(config["num-server-rounds"])):
        code = 1  # the Simulation Runtime gave up without raising
    if code and code < 128:
        reason = status.get("reason") or f"the simulation stopped after {finished} rounds"
        typer.echo(f"fedplug: error: {reason} (log: {log_path})", err=True)
    return code


def _say(message: Any) -> None:
    """Print to the terminal, which may be gone (SIGHUP)."""
    from fedplug.display import console

    with suppress(OSError):
        console.print(message)


def _parse_or_exit(text: str) -> dict[str, Scalar]:
    try:
        return parse_overrides(text)
    except ConfigError as error:
        fail(str(error), code=2)


def run_on_superlink(
    backend: Backend,
    overrides: dict[str, Scalar],
    out: Path | None,
    superlink: str,
    ca_cert: Path | None,
    insecure: bool,
    verbose: bool,
) -> None:
    """``fedplug run --superlink``: submit the run to a SuperLink and show its rounds as they finish."""
    import tempfile

    from fedplug import deploy
    from fedplug.display import backends_line, console, round_line, summary_table
    from fedplug.results import failure_summary
    from fedplug.simulation import write_flower_app

    if "centralized-eval" not in overrides and "dataset" not in overrides:
        # the data is on the nodes: the server has a held-out set only when the coordinator names one
        overrides["centralized-eval"] = False
    try:
        deploy.split_address(superlink)
        security = deploy.Security.of(ca_cert, insecure)
        config = prepare_run(backend, overrides)
        if ":" in str(config["model"]):  # the user's code runs on the SuperLink and the nodes: try it here first
            check_before_start(backend, config)
    except (ConfigError, ModelError, deploy.DeployError) as error:
        fail(str(error), code=2)
    config["out"] = str(out) if out else ""  # a path on the SuperLink's machine, where the ServerApp runs
    _notice_once(backend)
    held_out = (
        f"server held-out set: test split of {config['dataset']}"
        if config["centralized-eval"]
        else "no server held-out set"
    )
    console.print(
        f"fedplug: {backend.name} · model {config['model']} · {config['num-server-rounds']} rounds · "
        f"{config['strategy']} · SuperLink {superlink} · nodes train on their own data · {held_out}"
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fedplug-submit-"))
    # its paths (--out, --dataset) are the SuperLink machine's: keep them as they are
    app_dir = write_flower_app(work, config, portable=False, serverapp="fedplug.deploy_app:server_app")
    log_path = work / "flwr-run.log"

    def on_round(record: dict[str, Any]) -> None:
        console.print(round_line(record), highlight=False, soft_wrap=True)

    def on_results(where: str) -> None:
        console.print(f"results: {where} on the SuperLink's machine (written by the ServerApp)", highlight=False)

    try:
        with open(log_path, "w") as log:
            result = deploy.submit(app_dir, superlink, security, on_round, on_results, log)
    except KeyboardInterrupt:
        console.print("fedplug: interrupted; the run was stopped on the SuperLink")
        raise typer.Exit(130) from None
    if verbose:
        typer.echo(log_path.read_text(errors="replace"), err=True)
    if result.rounds:
        console.print(summary_table(result.rounds))
    if backends := backends_line(result.rounds):
        console.print(backends, highlight=False)
    for line in failure_summary(result.rounds):
        console.print(f"failed: {line}", highlight=False)
    finished = sum(1 for record in result.rounds if record["round"] > 0)
    where = f"{result.out} on the SuperLink's machine" if result.out else "none (the ServerApp did not start)"
    console.print(f"results: {where}  ({time.monotonic() - started:.1f}s)")
    if result.run_id is None or finished < int(config["num-server-rounds"]):
        reason = result.errors[-1] if result.errors else f"the run stopped after {finished} rounds"
        fail(f"{reason} (log: {log_path})")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


@app.command()
def certificates(
    folder: Annotated[Path, typer.Argument(help="Where to write the files.")] = Path("fedplug-certificates"),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A name or IP address the SuperNodes use to reach the SuperLink (repeat)."),
    ] = None,
    supernodes: Annotated[int, typer.Option(help="How many SuperNode key pairs to make.")] = 2,
) -> None:
    """Make a test federation's CA, SuperLink certificate and SuperNode key pairs."""
    from fedplug.certificates import create_federation_files

    if supernodes < 0:
        fail("--supernodes must be 0 or more", code=2)
    if (folder / "ca.crt").exists():
        fail(f"{folder} already holds a federation's certificates; choose another folder", code=2)
    hosts = host or ["localhost"]
    files = create_federation_files(folder, hosts, supernodes)
    typer.echo(f"created {folder}/ for a SuperLink reachable as {', '.join(hosts)} (and localhost, 127.0.0.1):")
    typer.echo("  ca.crt                        the CA certificate: give it to every data owner and submitter")
    typer.echo("  superlink.crt, superlink.key  the SuperLink's TLS certificate and key: keep on the coordinator")
    typer.echo("  ca.key                        the CA's key: keep it offline, nobody needs it to run")
    for index, (private, public) in enumerate(files.supernode_keys, start=1):
        typer.echo(f"  {private.name}, {public.name}  data owner {index}'s key pair: the private key goes to them only")
    address = f"{hosts[0]}:{DEFAULT_SUPERLINK_PORT}"
    if files.supernode_keys:
        typer.echo("once `fedplug superlink` runs, register the SuperNodes' public keys (on any machine with ca.crt):")
        for _, public in files.supernode_keys:
            typer.echo(f"  fedplug register {public} --superlink {address} --ca-cert {files.ca_cert}")
        typer.echo(f"  (Flower's own command: flwr supernode register {files.supernode_keys[0][1]} <connection>)")


DEFAULT_SUPERLINK_PORT = 9092


@app.command()
def superlink(
    certificates: Annotated[
        Path, typer.Option(help="Folder with ca.crt, superlink.crt, superlink.key (fedplug certificates).")
    ] = Path("fedplug-certificates"),
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="The one TCP port of the SuperLink.")] = DEFAULT_SUPERLINK_PORT,
    insecure: Annotated[bool, typer.Option(help="No TLS, no SuperNode authentication: trusted networks only.")] = False,
    node_auth: Annotated[bool, typer.Option(help="Accept only registered SuperNodes.")] = True,
    database: Annotated[
        Path | None,
        typer.Option(help="Flower's state database file, kept across restarts (default: in memory)."),
    ] = None,
    log: Annotated[Path, typer.Option(help="Where Flower's SuperLink log goes.")] = Path("fedplug-superlink.log"),
) -> None:
    """Start Flower's SuperLink (TLS, SuperNode authentication) in the foreground; Ctrl-C stops it."""
    from fedplug import deploy

    try:
        code = deploy.serve_superlink(
            host, port, certificates, insecure, node_auth, database, log.resolve(), typer.echo, _warn
        )
    except deploy.DeployError as error:
        fail(str(error), code=2)
    except KeyboardInterrupt:  # before the SuperLink was ready
        code = 130
    raise typer.Exit(code)


def _warn(message: str) -> None:
    typer.secho(message, err=True, fg=typer.colors.YELLOW if "WARNING" in message else None)


@app.command()
def supernode(
    backend: Annotated[str, typer.Argument(help="The backend this machine trains with, e.g. torch.")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink.")],
    data: Annotated[
        str, typer.Option(help="This node's data: a .parquet/.csv file or dataset folder, or 'embedded' (demo).")
    ],
    ca_cert: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt).")] = None,
    key: Annotated[Path | None, typer.Option(help="This node's private key (supernode-I.key).")] = None,
    insecure: Annotated[bool, typer.Option(help="The SuperLink runs with --insecure.")] = False,
    partition_id: Annotated[int | None, typer.Option(help="With --data embedded: this node's partition.")] = None,
    num_partitions: Annotated[int | None, typer.Option(help="With --data embedded: number of partitions.")] = None,
    image_column: Annotated[str, typer.Option(help="Image column of this node's data (default: guessed).")] = "",
    label_column: Annotated[str, typer.Option(help="Label column of this node's data (default: guessed).")] = "",
    runtime_port: Annotated[
        int, typer.Option(help="Local port of Flower's SuperNode runtime API (default: a free one).")
    ] = 0,
    log: Annotated[Path, typer.Option(help="Where Flower's SuperNode log goes.")] = Path("fedplug-supernode.log"),
) -> None:
    """Join a SuperLink with this machine's backend and data; the data never leaves this machine."""
    from fedplug import deploy
    from fedplug.data import EMBEDDED, DataError

    chosen = backend_or_exit(backend)
    try:
        chosen.check_available()
    except BackendUnavailable as error:
        fail(str(error))
    node_config: dict[str, Scalar] = {"backend": chosen.name}
    if data == EMBEDDED:
        if partition_id is None or num_partitions is None or not 0 <= partition_id < num_partitions:
            fail("--data embedded needs --partition-id I --num-partitions N with 0 <= I < N", code=2)
        node_config.update({"data": EMBEDDED, "partition-id": partition_id, "num-partitions": num_partitions})
    else:
        if not Path(data).expanduser().exists():
            fail(f"data {data} does not exist: give this node's .parquet/.csv file or dataset folder", code=2)
        node_config["data"] = str(Path(data).expanduser().resolve())
    node_config.update({k: v for k, v in (("image-column", image_column), ("label-column", label_column)) if v})
    try:
        deploy.split_address(superlink)
        security = deploy.Security.of(ca_cert, insecure)
        if not insecure:
            if key is None:
                raise deploy.DeployError("pass --key supernode-I.key (this node's private key), or --insecure")
            from fedplug.certificates import check_private_key

            check_private_key(key)
        described = deploy.check_node(chosen.name, node_config)
    except (deploy.DeployError, ValueError, DataError, ConfigError) as error:
        fail(str(error), code=2)
    typer.echo(f"fedplug: {chosen.name} backend ready; this node's data ({data}): {described}")
    try:
        code = deploy.serve_supernode(
            chosen.name,
            superlink,
            node_config,
            security,
            key.expanduser().resolve() if key and not insecure else None,
            runtime_port or deploy.free_port(),
            log.resolve(),
            typer.echo,
            _warn,
        )
    except KeyboardInterrupt:  # before it connected
        code = 130
    raise typer.Exit(code)


@app.command()
def register(
    keys: Annotated[list[Path], typer.Argument(help="SuperNode public keys (supernode-I.pub).")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink.")],
    ca_cert: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt).")] = None,
) -> None:
    """Register SuperNode public keys on a running SuperLink (Flower's `flwr supernode register`)."""
    from fedplug import deploy

    try:
        deploy.split_address(superlink)
        security = deploy.Security.of(ca_cert, insecure=False)
        code = deploy.register(keys, superlink, security, typer.echo)
    except deploy.DeployError as error:
        fail(str(error), code=2)
    raise typer.Exit(code)


@app.command("new-backend")
def new_backend(
    name: Annotated[str, typer.Argument(help="Backend name: a valid Python identifier, e.g. mything.")],
    directory: Annotated[
        Path | None, typer.Argument(help="Where to create the project (default: ./fedplug-NAME).")
    ] = None,
) -> None:
    """Create a separately installable backend plugin project that passes the conformance suite."""
    from fedplug.scaffold import ScaffoldError, scaffold

    try:
        target = scaffold(
            name, directory or Path(f"fedplug-{name.replace('_', '-')}"), installed=set(get_registry().backends)
        )
    except ScaffoldError as error:
        fail(str(error), code=2)
    typer.echo(f"created {target}: pip install -e {target} && fedplug run {name}")


def main() -> None:
    app()
