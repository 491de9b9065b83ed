"""The ``fedplug`` command: list, info, run and new-backend.

Only light modules are imported at start-up so that ``fedplug --help`` and
``fedplug list`` stay fast; Flower and the frameworks load when a run needs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedplug.backend import Backend, BackendUnavailable, ModelError, Scalar
from fedplug.config import ConfigError, defaults_for, parse_overrides, resolve
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
    """Show a backend's models, quickstart dataset and default run config."""
    from rich.table import Table

    from fedplug.display import console

    chosen = backend_or_exit(backend)
    if chosen.notice:
        console.print(f"[yellow]{chosen.notice}[/]")
    console.print(f"[bold]{chosen.name}[/]: {chosen.description}")
    console.print(f"framework: {chosen.framework.import_name} ({chosen.framework.requirement})")
    console.print(f"models: {', '.join(chosen.models)}   native file: model{chosen.file_suffix}")
    console.print(f"quickstart dataset: {chosen.quickstart_dataset or '-'} (use with --dataset)")
    table = Table(title="default run config")
    table.add_column("key")
    table.add_column("default")
    for key, value in defaults_for(chosen).items():
        table.add_row(key, json.dumps(value))
    console.print(table)


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
    }
    return {names[key]: value for key, value in flags.items() if value is not None}


def prepare_run(backend: Backend, overrides: dict[str, Scalar], out: Path) -> dict[str, Scalar]:
    """Check everything a run needs before it starts; return the resolved run config."""
    from fedplug.data import DataError, data_spec, make_partitioner
    from fedplug.strategies import strategy_kwargs

    config = resolve(backend, {**overrides, "out": str(out.resolve())})
    if Path(str(config["dataset"])).expanduser().exists():  # Ray workers run elsewhere: absolute paths
        config["dataset"] = str(Path(str(config["dataset"])).expanduser().resolve())
    strategy_kwargs(config)
    try:
        data_spec(config)  # first: it decides whether the hub is used offline
    except DataError as error:
        raise ConfigError(str(error)) from error
    make_partitioner(config, int(config["num-supernodes"]))  # type: ignore[arg-type]
    return config


def gpu_share(client_cpus: float) -> float:
    """GPUs per client so that the clients running in parallel share the machine's NVIDIA GPUs."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return 0.0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    gpus = sum(line.startswith("GPU ") for line in done.stdout.splitlines())
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


@app.command()
def run(
    backend: Annotated[str, typer.Argument(help="Backend name, e.g. mlx, torch, numpy.")],
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
    model: Annotated[str | None, typer.Option(help="Model: the backend's default, mlp or lenet.")] = None,
    dataset: Annotated[str | None, typer.Option(help="embedded, a Hugging Face id, or a .parquet/.csv file.")] = None,
    partitioner: Annotated[
        str | None, typer.Option(help="iid, dirichlet, pathological or shard (partitioner.<param>=...).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of model init, partitioning and shuffling.")] = None,
    out: Annotated[Path | None, typer.Option(help="Results folder (default: ./fedplug-runs/<time>-<backend>).")] = None,
    client_cpus: Annotated[float, typer.Option(help="CPU cores per simulated client.")] = 1.0,
    client_gpus: Annotated[
        float | None,
        typer.Option(help="GPUs per simulated client (default: parallel clients share the GPUs; 0 without GPU)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a federated training on Flower's Simulation Engine and write a results folder."""
    from fedplug.display import console, summary_table
    from fedplug.results import Results, default_out, plot_metrics, read_metrics

    chosen = backend_or_exit(backend)
    try:
        chosen.check_available()
    except BackendUnavailable as error:
        fail(str(error))
    out = out or default_out(chosen.name)
    if (out / "config.json").exists():
        fail(f"{out} already holds a run; choose another --out")
    flags = _flags_to_overrides(
        rounds=rounds,
        nodes=nodes,
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        local_epochs=local_epochs,
        strategy=strategy,
        model=model,
        dataset=dataset,
        partitioner=partitioner,
        seed=seed,
    )
    try:
        config = prepare_run(chosen, {**parse_overrides(run_config), **flags}, out)
    except (ConfigError, ModelError) as error:
        fail(str(error), code=2)
    _notice_once(chosen)
    Results(out, config)
    console.print(
        f"fedplug: {chosen.name} · model {config['model']} · {config['num-supernodes']} nodes · "
        f"{config['num-server-rounds']} rounds · {config['strategy']} · dataset {config['dataset']}"
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
    ]
    started = time.monotonic()
    log_path = out / "simulation.log"  # Flower's, Ray's and the frameworks' chatter goes here
    with open(log_path, "ab") as log:
        env = {**os.environ, "FEDPLUG_RUN_DIR": str(out.resolve())}  # marks every process of this run
        process = subprocess.Popen(command, start_new_session=True, stderr=None if verbose else log, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        console.print("fedplug: interrupted, stopping the simulation ...")
        _stop(process)
        code = 130
    finally:
        _stop(process)
    rounds_done = read_metrics(out)
    if code:  # the ServerApp plots when it finishes; an interrupted or failed run is plotted here
        plot_metrics(out, title=f"fedplug {chosen.name} · {config['model']} · {config['strategy']}")
    if rounds_done:
        console.print(summary_table(rounds_done))
    console.print(f"results: {out}  ({time.monotonic() - started:.1f}s)")
    finished = sum(1 for record in rounds_done if record["round"] > 0)
    if code == 0 and finished < int(config["num-server-rounds"]):  # type: ignore[arg-type]
        code = 1  # the Simulation Runtime gave up without raising
    if code and code != 130:
        reasons = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("fedplug:")]
        reason = reasons[-1].removeprefix("fedplug: ") if reasons else f"the simulation stopped after {finished} rounds"
        fail(f"{reason} (log: {log_path})", code)
    if code:
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
