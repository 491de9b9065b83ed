"""The ``fedplug`` command: list, info, run, certificates, superlink, supernode, register, new-backend/-strategy.

Typer only: each command reads its arguments and calls the function that does the work
(``fedplug.run()`` for ``run``, :mod:`fedplug.deployment` for the deployment commands).
A :class:`~fedplug.errors.FedplugError` ends in one line on stderr and its exit code (2 for
a mistake). Only light modules are imported at start-up so that ``fedplug --help`` and
``fedplug list`` stay fast; Flower and the frameworks load when a run needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedplug.errors import FedplugError, one_line
from fedplug.plugins import get_registry

app = typer.Typer(
    name="fedplug",
    help="Federated learning on Flower with any ML framework: one core, one command, pluggable backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: how user mistakes end."""
    typer.echo(f"fedplug: error: {one_line(message)}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """fedplug's errors end the command in one line with their exit code; an interrupt with 128 + its signal."""
    from fedplug.deployment.processes import Stopped

    try:
        yield
    except FedplugError as error:
        fail(str(error), error.exit_code)
    except KeyboardInterrupt as stop:
        raise typer.Exit(stop.exit_code if isinstance(stop, Stopped) else 130) from None


@app.command("list")
def list_backends(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    strategies: Annotated[bool, typer.Option("--strategies", help="Only the strategies (and broken plugins).")] = False,
) -> None:
    """List installed backends and strategies, their distributions, and broken plugins."""
    from fedplug.display import print_list

    print_list(get_registry(), as_json, strategies)


@app.command()
def info(name: Annotated[str, typer.Argument(help="Backend or strategy name, e.g. torch or fedadam.")]) -> None:
    """Show a backend's models, tier and default run config, or a strategy's parameters and their ranges."""
    from fedplug.availability import find_backend
    from fedplug.display import show_info, show_strategy

    with errors_as_exit():
        entry = get_registry().strategies.get(name)
        if entry is not None and name not in get_registry().backends:
            show_strategy(entry.strategy, f"{entry.distribution} {entry.version} (plugin '{entry.plugin}')")
        else:
            show_info(find_backend(name))


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
    preset: Annotated[
        str | None, typer.Option(help="Start from a set of values the backend ships, e.g. quickstart (fedplug info).")
    ] = None,
    track: Annotated[
        str | None,
        typer.Option(help="Also log each round to tensorboard, mlflow or both ('tensorboard,mlflow'), in the results."),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Results folder (default: ./fedplug-runs/<time>-<backend>).")] = None,
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
    check: Annotated[bool, typer.Option("--check", help="Make every check of the run and start nothing.")] = False,
) -> None:
    """Run a federated training on Flower's Simulation Engine (or on a SuperLink) and write a results folder."""
    from fedplug.api import FLAG_KEYS, overrides_of
    from fedplug.api import run as run_federation
    from fedplug.config import parse_overrides

    flags = {
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
        "track": track,
    }
    if resume is not None:  # name the flag the user gave, not its run-config key
        changed = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value is not None]
        changed += ["--run-config"] * bool(run_config) + ["--out"] * (out is not None) + ["--preset"] * bool(preset)
        changed = [flag for flag in changed if flag != "--rounds"]
        if changed:
            fail(
                f"{changed[0]} would change the experiment: a resumed run keeps the config stored in {resume} "
                "(only --rounds may extend it)",
                code=2,
            )
    with errors_as_exit():
        overrides = overrides_of(parse_overrides(run_config), {}, {k: v for k, v in flags.items() if k in FLAG_KEYS})
        run_federation(
            backend,
            run_config=overrides,
            preset=preset,
            out=out,
            resume=resume,
            client_cpus=client_cpus,
            client_gpus=client_gpus,
            ray_address=ray_address,
            superlink=superlink,
            ca_cert=ca_cert,
            insecure=insecure,
            verbose=verbose,
            check=check,
        )


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
    from fedplug.deployment.certificates import create_federation_files
    from fedplug.deployment.network import DEFAULT_PORT

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
    address = f"{hosts[0]}:{DEFAULT_PORT}"
    if files.supernode_keys:
        typer.echo("once `fedplug superlink` runs, register the SuperNodes' public keys (on any machine with ca.crt):")
        for _, public in files.supernode_keys:
            typer.echo(f"  fedplug register {public} --superlink {address} --ca-cert {files.ca_cert}")
        typer.echo(f"  (Flower's own command: flwr supernode register {files.supernode_keys[0][1]} <connection>)")


@app.command()
def superlink(
    certificates: Annotated[
        Path, typer.Option(help="Folder with ca.crt, superlink.crt, superlink.key (fedplug certificates).")
    ] = Path("fedplug-certificates"),
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="The one TCP port of the SuperLink.")] = 9092,
    insecure: Annotated[bool, typer.Option(help="No TLS, no SuperNode authentication: trusted networks only.")] = False,
    node_auth: Annotated[bool, typer.Option(help="Accept only registered SuperNodes.")] = True,
    database: Annotated[
        Path | None,
        typer.Option(help="Flower's state database file, kept across restarts (default: in memory)."),
    ] = None,
    log: Annotated[Path, typer.Option(help="Where Flower's SuperLink log goes.")] = Path("fedplug-superlink.log"),
) -> None:
    """Start Flower's SuperLink (TLS, SuperNode authentication) in the foreground; Ctrl-C stops it."""
    from fedplug.deployment.serve import serve_superlink

    with errors_as_exit():
        code = serve_superlink(
            host, port, certificates, insecure, node_auth, database, log.resolve(), typer.echo, _warn
        )
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
    max_wait: Annotated[
        float, typer.Option(help="Seconds to wait for the SuperLink to answer before giving up.")
    ] = 300,
) -> None:
    """Join a SuperLink with this machine's backend and data; the data never leaves this machine."""
    from fedplug.deployment.network import free_port
    from fedplug.deployment.serve import serve_supernode
    from fedplug.deployment.supernode import check_supernode

    with errors_as_exit():
        node_config, security, described = check_supernode(
            backend, superlink, data, ca_cert, key, insecure, partition_id, num_partitions, image_column, label_column
        )
        typer.echo(f"fedplug: {node_config['backend']} backend ready; this node's data ({data}): {described}")
        code = serve_supernode(
            str(node_config["backend"]),
            superlink,
            node_config,
            security,
            key.expanduser().resolve() if key and not insecure else None,
            runtime_port or free_port(),
            log.resolve(),
            typer.echo,
            _warn,
            max_wait,
        )
    raise typer.Exit(code)


@app.command()
def register(
    keys: Annotated[list[Path], typer.Argument(help="SuperNode public keys (supernode-I.pub).")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink.")],
    ca_cert: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt).")] = None,
) -> None:
    """Register SuperNode public keys on a running SuperLink (Flower's `flwr supernode register`)."""
    from fedplug.deployment.flower_cli import Security
    from fedplug.deployment.flower_cli import register as register_keys
    from fedplug.deployment.network import split_address

    with errors_as_exit():
        split_address(superlink)
        code = register_keys(keys, superlink, Security.of(ca_cert, insecure=False), typer.echo)
    raise typer.Exit(code)


NEW_DIRECTORY = Annotated[Path | None, typer.Argument(help="Where to create the project (default: ./fedplug-NAME).")]


@app.command("new-backend")
def new_backend(
    name: Annotated[str, typer.Argument(help="Backend name: a valid Python identifier, e.g. mything.")],
    directory: NEW_DIRECTORY = None,
) -> None:
    """Create a separately installable backend plugin project that passes the conformance suite."""
    _new("backend", name, directory, f"fedplug run {name}")


@app.command("new-strategy")
def new_strategy(
    name: Annotated[str, typer.Argument(help="Strategy name: a valid Python identifier, e.g. mystrategy.")],
    directory: NEW_DIRECTORY = None,
) -> None:
    """Create a separately installable strategy plugin project that passes the strategy suite."""
    _new("strategy", name, directory, f"fedplug run numpy --strategy {name}")


def _new(kind: str, name: str, directory: Path | None, then: str) -> None:
    from fedplug.scaffold import ScaffoldError, scaffold

    names = get_registry().backends if kind == "backend" else get_registry().strategies
    try:
        target = scaffold(name, directory or Path(f"fedplug-{name.replace('_', '-')}"), set(names), kind)
    except ScaffoldError as error:
        fail(str(error), code=2)
    typer.echo(f"created {target}: pip install -e {target} && {then}")


def main() -> None:
    app()
