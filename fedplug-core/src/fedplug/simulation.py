"""Run the fedplug apps on Flower's Simulation Engine (Ray), quietly, in a child process.

:func:`launch` (``fedplug run``, ``fedplug.run()``) starts ``python -m fedplug.simulation OUT``
under the process supervisor (:mod:`fedplug.deployment.processes`), which ends its process
group and every process it started when the run ends, fails or is interrupted, so no Ray
process outlives the command. If the command itself dies without a chance to clean up (SIGKILL), the
kernel tells this process (Linux's parent-death signal) and it kills its own group.
The child writes a Flower App (``OUT/flower-app/pyproject.toml``: the apps
and the resolved run config) and hands it to the Simulation Engine, exactly as
``flwr run`` does; the same folder runs on the Deployment Engine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from fedplug.backend import Scalar
from fedplug.deployment.processes import FLWR_HOME_PREFIX, supervised
from fedplug.flower_app import write_flower_app
from fedplug.privacy import NO_TELEMETRY_ENV
from fedplug.results import mark

QUIET_ENV = {
    "RAY_DEDUP_LOGS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "PYTHONWARNINGS": "ignore",
}
"""Set in the simulation process (and so in Ray's workers) unless ``--verbose``."""
ALWAYS_ENV = {
    **NO_TELEMETRY_ENV,
    # clients with 0 GPUs keep seeing the machine's GPUs, as Ray will do by default: verbose or not
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
"""Set in the simulation process (and so in Ray's workers) always."""


def quiet_logs(verbose: bool) -> None:
    """Keep Flower's and Ray's logs and deprecation warnings out of sight unless verbose."""
    if verbose:
        return
    os.environ.update(QUIET_ENV)
    warnings.simplefilter("ignore")
    for name in ("flwr", "ray", "datasets", "filelock", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def worker_threads(client_cpus: float) -> str:
    """``OMP_NUM_THREADS`` of every Ray worker process: Ray's own rule (the floor of a client's CPUs, at least
    1), or the value the user set.

    Ray sets this variable when it runs an actor's first task, which is too late for a library loaded
    earlier: NumPy's OpenBLAS reads it when NumPy is imported, and the worker's set-up imports NumPy
    (with Flower). Without it every worker's BLAS starts one thread per core of the machine, and two
    workers on two cores make each small matrix product several times slower (the 1,000-node scale run:
    97 ms per node step, 8 to 14 ms with this). Set in the runtime environment, it is in place before
    any import.
    """
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, math.floor(client_cpus)))


# -- --client-gpus 0: no GPU for the simulated clients (issue 26) ---------------------------------------------------
def hidden_gpus(client_gpus: float | None) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES=""`` for every Ray worker when the clients get no GPU (``client_gpus`` 0), from the
    worker's start. Ray 2.55 empties it only when a task that asks for no GPU begins, and has announced that it will
    stop doing so (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` stops it today): PyTorch, JAX and TensorFlow would then
    see and use every GPU of the machine. Nothing otherwise: Ray gives each client that asks for GPUs its own."""
    return {"CUDA_VISIBLE_DEVICES": ""} if client_gpus is not None and client_gpus <= 0 else {}


# -----------------------------------------------------------------------------------------------------------------


def start_ray(client_cpus: float, client_gpus: float | None = None, **init_args: Any) -> None:
    """Start Ray for Flower's Simulation Engine, as Flower's Ray backend would (it then uses this one),
    or connect to a running Ray cluster (``address``: ``auto`` or its head's HOST:PORT).

    The same runtime environment as Flower's (this process's ``sys.path`` for the workers), plus
    fedplug's set-up of each worker process: Flower's Simulation Engine imported without TensorFlow
    (:func:`fedplug.flower_adapter.import_simulation_without_tensorflow`), and their native thread
    pools sized by :func:`worker_threads`. A cluster this run connected to keeps running when the run
    ends: ``ray.shutdown`` only disconnects from it, and its processes are not in this run's process group.
    ``client_gpus`` 0: the workers see no GPU (:func:`hidden_gpus`).
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {
        "env_vars": {
            "PYTHONPATH": pythonpath,
            "OMP_NUM_THREADS": worker_threads(client_cpus),
            **hidden_gpus(client_gpus),  # --client-gpus 0
        },
        "worker_process_setup_hook": "fedplug.flower_adapter.import_simulation_without_tensorflow",
    }
    ray.init(runtime_env=runtime_env, **init_args)


PULL_INTERVAL = 0.01
"""Seconds between the ServerApp's polls for replies on the Simulation Engine (Flower's default: 0.1)."""


COHORTS_PER_WORKER = 4
"""Cohorts (simulated SuperNodes serving many clients each) per Ray worker: a few, so that the workers stay
busy while one cohort's clients take longer than another's, and a round's messages stay few."""


def cohort_count(clients: int, workers: int) -> int:
    """How many SuperNodes the Simulation Engine runs for ``clients`` clients on ``workers`` Ray workers.

    ``cohorts=true`` (the default): :data:`COHORTS_PER_WORKER` per worker, at most one per client.
    Each serves the clients ``p`` with ``p % cohorts == index`` (:class:`fedplug.rounds.Cohorts`): a
    round costs one message per cohort, not per client, and the engine's per-node polling stays small.
    """
    return max(1, min(clients, COHORTS_PER_WORKER * max(workers, 1)))


def ray_workers(client_cpus: float) -> int:
    """How many clients Ray runs at once: the cluster's CPUs over each client's."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
    return max(1, int(cpus // max(client_cpus, 1e-9)))


def simulation_server_app(cohorts: bool = False, finish: Callable[[Path, str], None] | None = None) -> Any:
    """fedplug's ServerApp (``fedplug.apps.main``), polling the Simulation Engine for replies every 10 ms.

    Flower's in-memory Grid polls its LinkState every 100 ms, so each exchange of a round (train,
    evaluate) waits 50 ms on average after the last reply arrived: most of a small round's wall time.
    The interval is an attribute of Flower's ``InMemoryGrid`` (a constructor argument that the
    Simulation Engine does not expose); on any other Grid nothing is changed.
    ``finish(out, title)``: draws the plot and writes status ``finished`` once the rest of a finished run's
    results are written (:func:`fedplug.results.finish_results` by default; :func:`finish_and_exit` for a run that
    started its own Ray).
    """
    from flwr.serverapp import Grid, ServerApp

    from fedplug import apps, flower_adapter
    from fedplug.results import finish_results

    served = ServerApp()

    @served.main()
    def main(grid: Grid, context: Any) -> None:
        flower_adapter.set_reply_poll_interval(grid, PULL_INTERVAL)
        apps.run_server(grid, context, cohorts=cohorts, finish=finish or finish_results)

    return served


# -- Teardown: once the results are safe, the simulation process ends at once (issue 29) ----------------------------
SIMULATION_EXIT = "simulation-exit"
"""Timeline event: the simulation process ended Ray's processes (its own) and exits, right after the results were
written (:func:`finish_and_exit`); a run that stopped Ray gracefully marks ``engine-stopped`` instead."""


PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux): Ray's workers, whose raylet ended first,
    become its children, so :func:`end_ray_processes` reaps them at once instead of leaving them to the machine's
    init (which, in some containers, reaps every 2 s: the command would wait for it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def end_ray_processes(grace: float = 0.0) -> list[int]:
    """End every process this one started, and theirs (Ray's GCS, raylet, agents and workers): SIGKILL, as
    ``ray stop --force`` does, and reap them; with ``grace`` seconds, SIGTERM first, as ``ray stop`` does. Returns
    their pids.

    No grace by default: the results are written and Ray's processes hold nothing of them, and on SIGTERM the
    raylet, the GCS and the ClientApp actors did not end within 0.2 s anyway (the actors wait about 3 s), so a grace
    was only a wait before the SIGKILL.
    """
    import psutil

    processes = psutil.Process().children(recursive=True)
    alive = processes
    if grace > 0:
        for process in processes:
            with suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5.0)
    return [process.pid for process in processes]


def finish_and_exit(flwr_home: str, out: Path, title: str) -> None:
    """Finish a run that started its own Ray, then end the simulation process now (the ServerApp's ``finish``).

    The rest of the results (metrics, weights, model) is written: while this thread draws the plot and writes status
    ``finished`` (:func:`fedplug.results.finish_results`), another ends Ray's processes (:func:`end_ray_processes`;
    the driver, this process, keeps running without its raylet and GCS), and the process exits once both are done,
    without Flower's stopping of its Simulation Runtime and ``ray.shutdown()`` (1.9 s of a 2.5 s teardown). Not for a
    run on a Ray cluster (``--ray-address``): its processes are not this run's, and the graceful path disconnects
    from it. Timeline: ``simulation-exit`` when Ray's processes are gone, instead of ``engine-stopped``. If the plot
    fails, the run fails as any ServerApp error fails it: status ``failed`` and one line on stderr, exit code 1.
    """
    from fedplug.results import finish_results, write_status

    ending = threading.Thread(target=end_ray_processes, name="fedplug-end-ray", daemon=True)
    ending.start()
    code = 0
    try:
        finish_results(out, title)
    except Exception as error:
        write_status(out, "failed", f"{type(error).__name__}: {error}")
        print(f"fedplug: run failed: {type(error).__name__}: {error}", file=sys.stderr)
        code = 1
    ending.join()
    shutil.rmtree(flwr_home, ignore_errors=True)
    mark(out, SIMULATION_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -----------------------------------------------------------------------------------------------------------------


def simulate(out: Path, verbose: bool, client_cpus: float, client_gpus: float, ray_address: str = "") -> None:
    """Run the federation described by ``out/config.json`` on the Simulation Engine."""
    mark(out, "simulation-start")
    config: dict[str, Scalar] = json.loads((out / "config.json").read_text(encoding="utf-8"))
    os.environ.update(ALWAYS_ENV)
    quiet_logs(verbose)
    from fedplug.node_backends import environment

    # before Flower is imported: it imports TensorFlow (and so Keras) when installed. A Ray worker
    # serves nodes of every backend of the run in turn: each taking-part backend's environment is set.
    os.environ.update(environment(config))
    # Flower keeps state under FLWR_HOME: point it away from the user's ~/.flwr
    flwr_home = os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix=FLWR_HOME_PREFIX)
    from fedplug import flower_adapter

    flower_adapter.import_simulation_without_tensorflow()
    from flwr.app import Context, RecordDict

    from fedplug.apps import client_app
    from fedplug.strategies import use_cohorts

    flower_adapter.no_flower_source_id()

    quiet_logs(verbose)  # again: importing Flower resets its logger's level
    write_flower_app(out, config)  # the results' portable copy
    # the simulated nodes read the run config from the app folder: this one keeps absolute paths
    app_dir = write_flower_app(Path(os.environ["FLWR_HOME"]), config, portable=False)
    start_ray(
        client_cpus,
        client_gpus,
        address=ray_address or None,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    mark(out, "engine-ready")
    clients = int(config["num-supernodes"])
    cohorts = cohort_count(clients, ray_workers(client_cpus)) if use_cohorts(config) else 0
    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
    finish = partial(finish_and_exit, flwr_home)
    try:
        # Flower's own simulation runtime, as ``flwr run`` drives it for a Flower App folder
        flower_adapter.run_simulation_engine(
            num_supernodes=cohorts or clients,  # cohorts serve the clients, or one SuperNode per client
            client_app=client_app,
            # a run that started its own Ray ends without stopping it (finish_and_exit), a cluster's keeps running
            server_app=simulation_server_app(bool(cohorts), None if ray_address else finish),
            backend_config=backend_config,
            app_dir=str(app_dir),  # the nodes read their run config from it, as under `flwr run`
            server_app_context=context,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(flwr_home, ignore_errors=True)
        mark(out, "engine-stopped")


def launch(
    out: Path,
    client_cpus: float,
    client_gpus: float,
    verbose: bool,
    ray_address: str | None,
    quiet: bool,
    on_interrupt: Callable[[KeyboardInterrupt], None] = lambda stop: None,
) -> int:
    """Run the simulation of ``out/config.json`` in a supervised child process; return its exit code.

    Its standard output (the round lines) is this process's; Flower's, Ray's and the frameworks'
    logs go to ``out/simulation.log`` unless ``verbose``. Raises ``Stopped`` (a ``KeyboardInterrupt``)
    on SIGINT, SIGTERM or SIGHUP, once the child and everything it started is gone (``on_interrupt`` is
    called first, when the stopping begins).
    """
    from fedplug.data import remove_run_data

    command = [sys.executable, "-m", "fedplug.simulation", str(out), "--client-cpus", str(client_cpus)]
    command += ["--client-gpus", str(client_gpus)]
    command += ["--verbose"] * verbose + ["--quiet"] * quiet + (["--ray-address", ray_address] if ray_address else [])
    (out / "status.json").unlink(missing_ok=True)
    env = {
        "FEDPLUG_RUN_DIR": str(out.resolve()),  # marks every process of this run
        PARENT_ENV: str(os.getpid()),  # the simulation ends itself if this process dies
    }
    try:
        with supervised(extra_env=env) as group:
            process = group.start(command, log=out / "simulation.log", keep_stdout=True, keep_stderr=verbose)
            try:
                return process.wait()
            except KeyboardInterrupt as stop:
                on_interrupt(stop)
                raise
    finally:
        remove_run_data(out)


PARENT_ENV = "FEDPLUG_PARENT_PID"
"""The pid of the ``fedplug`` command that started this simulation."""
PR_SET_PDEATHSIG = 1


def _end_group(signum: int, frame: object) -> None:
    """Kill this process group at once: Ray's processes and this one. Results files are written atomically."""
    home = os.environ.get("FLWR_HOME", "")
    if Path(home).name.startswith(FLWR_HOME_PREFIX):  # the temporary Flower home of this run
        shutil.rmtree(home, ignore_errors=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def die_with_parent() -> None:
    """End this simulation and everything it started when the ``fedplug`` command is gone, however it ended.

    On Linux the kernel says so at once (the parent-death signal); everywhere (macOS included) a
    watchdog thread checks every second that the command is still this process's parent.
    """
    signal.signal(signal.SIGTERM, _end_group)
    signal.signal(signal.SIGHUP, _end_group)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the command's SIGINT, even if inherited ignored
    if sys.platform.startswith("linux"):
        with_errno = ctypes.CDLL(None, use_errno=True)
        with_errno.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return
    if os.getppid() != int(parent):  # the command died before prctl took effect
        _end_group(signal.SIGTERM, None)

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        _end_group(signal.SIGTERM, None)

    threading.Thread(target=watch, name="fedplug-parent-watchdog", daemon=True).start()


def main(argv: list[str]) -> int:
    die_with_parent()
    adopt_orphans()
    out, verbose = Path(argv[0]), "--verbose" in argv
    cpus = float(argv[argv.index("--client-cpus") + 1]) if "--client-cpus" in argv else 1.0
    gpus = float(argv[argv.index("--client-gpus") + 1]) if "--client-gpus" in argv else 0.0
    ray_address = argv[argv.index("--ray-address") + 1] if "--ray-address" in argv else ""
    from fedplug.display import RoundPrinter
    from fedplug.results import progress_log, read_status, write_status

    if "--quiet" not in argv:
        progress_log.addHandler(RoundPrinter())
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False
    try:
        simulate(out, verbose, cpus, gpus, ray_address)
    except KeyboardInterrupt:
        write_status(out, "interrupted")
        return 130
    except Exception as error:
        cause = error.__cause__ or error
        if read_status(out).get("status") != "failed":  # the ServerApp did not say why: say what we know
            write_status(out, "failed", f"{type(cause).__name__}: {cause}")
        print(f"fedplug: run failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        if verbose:
            import traceback

            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # A crashed Simulation Runtime can leave Flower's ServerApp thread waiting for replies:
    # end the process now instead of joining it.
    os._exit(code)
