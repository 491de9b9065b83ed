"""The one module of fedplug that uses Flower (and flwr-datasets) outside their public API.

Flower's rule: "every component reachable by recursively following ``__init__.__all__`` from
``flwr`` is public; private APIs can change at any time, even in patch releases". fedplug pins
``flwr`` to the minor versions it was tested with, and every name it needs from outside that
public tree is used here and nowhere else (``fedplug-core/tests/test_flower_public_api.py``
scans the code for any other). Each function below has a test in
``fedplug-core/tests/test_flower_adapter.py`` that fails, naming the Flower version and this
module, when Flower changes the name, its signature or its behaviour.

The private names, why fedplug needs each, and the public alternative that is missing:

``flwr.simulation`` (:func:`import_simulation_without_tensorflow`)
    ``flwr.__all__`` lists ``agentapp``, ``app``, ``clientapp`` and ``serverapp``; ``flwr.simulation``
    is only a lazy legacy export, so everything under it is outside the public tree. Importing it
    imports TensorFlow whenever TensorFlow is installed (a deprecated GPU helper): fedplug hides
    TensorFlow from that one import through ``sys.modules``. Missing: a Simulation Engine import
    that does not import TensorFlow.
``flwr.simulation.run_simulation._run_simulation`` and ``flwr.supercore.telemetry.EventType``
    (:func:`run_simulation_engine`)
    The Simulation Engine as ``flwr run`` drives it for a Flower App folder: the nodes read their
    run config from ``app_dir`` (``is_app=True``) and the ServerApp gets a ``Context`` carrying
    the run config. The public, deprecated ``flwr.simulation.run_simulation`` takes neither
    ``app_dir``/``is_app`` nor a ServerApp ``Context``, so it cannot replace it; ``flwr run``
    needs a SuperLink and a federation config, and runs in another process. ``exit_event`` is
    a required argument, whose type lives in the private telemetry module. Missing: a public
    in-process "run this Flower App folder on the Simulation Engine".
``InMemoryGrid.pull_interval`` (:func:`set_reply_poll_interval`)
    ``flwr.superlink.grid.inmemory_grid.InMemoryGrid`` polls its LinkState for replies every
    100 ms: half of each exchange's wait in a small round. The interval is a constructor argument
    that the Simulation Engine does not expose; fedplug sets the attribute. Missing: a
    ``backend_config`` (or ``run_simulation``) option for the poll interval.
``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` (:func:`client_app_raised_exception`)
    The code of the error reply of a ClientApp that raised, as Flower's own runtimes send it.
    ``flwr.app.Error`` is public; its codes are not. Missing: public error codes.
``Message(content, metadata=...)`` (:func:`message_for_client_app`)
    How Flower's runtimes deliver a Message to a ClientApp; ``flwr.app.Metadata`` is public, but
    the constructor's ``metadata`` keyword is "for internal use only" and in none of its public
    overloads. fedplug's conformance suite calls a ClientApp with a Message as a SuperNode would.
    The public ``Message(content, dst_node_id, message_type)`` takes the run and the sender from
    a running ServerApp. Missing: a public way to build a Message as a ClientApp receives it.
``flwr.supercore.telemetry.state``/``state_lock`` and ``flwr_datasets.common.telemetry.state``
    (:func:`no_flower_source_id`, :func:`no_flwr_datasets_source_id`)
    Flower and flwr-datasets create a persistent id in ``~/.flwr/source`` (``$FLWR_HOME``) for each
    telemetry event *before* they look at ``FLWR_TELEMETRY_ENABLED=0``; fedplug gives them a
    source id first, so they never write the user's home. Missing: telemetry that, when
    disabled, touches no file.

``flwr.common.secure_aggregation`` (:func:`quantize`, :func:`dequantize`, :func:`shamir_split`,
    :func:`shamir_combine`)
    SecAgg+ (``fedplug.secagg``, ``secagg=true``) quantises updates with Flower's stochastic
    quantisation and Shamir-shares secrets with Flower's chunking of ``pycryptodome``'s 16-byte
    Shamir. Flower exports these helpers only for its legacy ``SecAggPlusWorkflow``. Missing: a
    public secure-aggregation toolkit (or SecAgg+ for Message-API strategies).

Two more private uses are being removed rather than wrapped: ``vars(strategy)`` in
``fedplug.checkpoint`` (explicit per-strategy state instead) and the scraping of ``flwr run
--stream`` output in ``fedplug.deploy``.

Every function imports Flower when called, never at import time of this module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp


def client_app_raised_exception() -> int:
    """The error code of a ClientApp's reply when it raised (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``)."""
    from flwr.common.constant import ErrorCode

    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def import_simulation_without_tensorflow() -> None:
    """Import Flower's Simulation Engine (``flwr.simulation``) without importing TensorFlow.

    ``flwr.simulation`` imports TensorFlow whenever it is installed, for a deprecated GPU helper that
    fedplug does not use: seconds of start-up and hundreds of MB in the simulation process and in
    every Ray worker, for runs that may not use TensorFlow at all. TensorFlow stays importable for
    the backends that use it. Ray's workers run this before anything else.
    """
    if "flwr.simulation" in sys.modules or "tensorflow" in sys.modules:
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` fails for this import
    try:
        import flwr.simulation  # noqa: F401
    finally:
        if sys.modules.get("tensorflow") is None:
            del sys.modules["tensorflow"]


def run_simulation_engine(
    *,
    num_supernodes: int,
    client_app: ClientApp,
    server_app: ServerApp,
    backend_config: dict[str, Any],
    app_dir: str,
    server_app_context: Any,
    verbose_logging: bool,
) -> None:
    """Run a Flower App folder on Flower's Simulation Engine in this process, as ``flwr run`` does.

    The simulated nodes read their run config from ``app_dir``'s ``pyproject.toml`` (``is_app``);
    the ServerApp gets ``server_app_context``. Wraps ``flwr.simulation.run_simulation._run_simulation``.
    """
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        app_dir=app_dir,
        server_app_context=server_app_context,
        is_app=True,  # nodes read their run config from the app folder, as under `flwr run`
        verbose_logging=verbose_logging,
    )


def set_reply_poll_interval(grid: Any, seconds: float) -> bool:
    """Make the Simulation Engine's Grid poll for replies every ``seconds`` (Flower's default: 0.1).

    The interval is the ``pull_interval`` attribute of Flower's ``InMemoryGrid``; on any other Grid
    (the Deployment Engine's) nothing is changed. Returns whether it was set.
    """
    if isinstance(getattr(grid, "pull_interval", None), float):
        grid.pull_interval = seconds
        return True
    return False


def message_for_client_app(
    content: RecordDict,
    *,
    message_type: str,
    run_id: int,
    message_id: str,
    dst_node_id: int,
    group_id: str,
    src_node_id: int = 0,
    ttl: float = 3600.0,
) -> Message:
    """A Message as Flower's runtimes deliver it to a ClientApp: the content with complete metadata."""
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=run_id,
        message_id=message_id,
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=0.0,
        ttl=ttl,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload,no-any-return]


def no_flwr_datasets_source_id() -> None:
    """Keep flwr-datasets from writing a persistent id to ``~/.flwr/source``.

    flwr-datasets builds each telemetry event, and so reads or creates ``~/.flwr/source``,
    before it looks at ``FLWR_TELEMETRY_ENABLED`` (it never sends the event when that is
    0). Giving it a source id first means it never touches ``~/.flwr``. Call this before
    using ``FederatedDataset``.
    """
    from flwr_datasets.common import telemetry

    _give_source_id(telemetry.state)


def no_flower_source_id() -> None:
    """Keep Flower from writing a persistent id to ``$FLWR_HOME/source``, as flwr-datasets above.

    Flower's exit event runs on a thread of its own that may outlive the simulation and
    recreate a removed ``FLWR_HOME``; with a source id given, it writes nothing.
    """
    from flwr.supercore import telemetry

    with telemetry.state_lock:
        _give_source_id(telemetry.state)


def _give_source_id(state: dict[str, Any]) -> None:
    if state.get("source") is None:
        state["source"] = "disabled"


# -- SecAgg+ (fedplug.secagg): Flower's secure-aggregation helpers ----------------------------


def quantize(vector: Any, clipping_range: float, target_range: int, *, seed: int) -> Any:
    """``vector`` clipped to ``[-clipping_range, clipping_range]`` and stochastically rounded onto ``0..target_range``.

    Wraps ``flwr.common.secure_aggregation.quantization.quantize``, whose stochastic rounding draws from
    NumPy's global generator: it is seeded with ``seed`` here and restored after, so the result is
    reproducible and nothing else's random stream moves. Returns int64.
    """
    import numpy as np
    from flwr.common.secure_aggregation.quantization import quantize as flower_quantize

    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        return flower_quantize([np.asarray(vector, dtype=np.float64)], clipping_range, target_range)[0].astype(np.int64)
    finally:
        np.random.set_state(saved)


def dequantize(vector: Any, clipping_range: float, target_range: int) -> Any:
    """Integers on ``0..target_range`` back to floats: ``v * 2 * clipping_range / target_range - clipping_range``.

    Wraps ``flwr.common.secure_aggregation.quantization.dequantize``.
    """
    import numpy as np
    from flwr.common.secure_aggregation.quantization import dequantize as flower_dequantize

    return flower_dequantize([np.asarray(vector)], clipping_range, target_range)[0]


def shamir_split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it (``pycryptodome``, 16-byte chunks).

    Wraps ``flwr.common.secure_aggregation.crypto.shamir.create_shares``.
    """
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    return create_shares(secret, threshold, count)


def shamir_combine(shares: list[bytes]) -> bytes:
    """The secret that ``shares`` (at least the threshold of them) rebuild; ValueError if they do not.

    Wraps ``flwr.common.secure_aggregation.crypto.shamir.combine_shares``.
    """
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    return combine_shares(shares)


@contextmanager
def server_app_identity(run_id: int) -> Iterator[None]:
    """Within the block, this process is a ServerApp of run ``run_id``: ``Message(content, dst_node_id, type)`` works.

    For tests that drive server-side code over an in-process Grid (``fedplug-core/tests/test_secagg.py``).
    Sets ``flwr.supercore.task_identity.TaskIdentity`` as Flower's ServerApp runtimes do, and restores it.
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# -- the Deployment Engine's SuperExec: how often it looks for tasks (fedplug superlink, fedplug supernode) ----------
#
# ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (``flwr.supercore.superexec.run_superexec._TASK_POLL_INTERVAL_ENV``)
#     Flower's SuperExec (started by ``flower-superlink`` for the ServerApp and by ``flower-supernode`` for
#     each message's ClientApp) asks its runtime API for a new task every second by default: each message
#     to a SuperNode waits 0.5 s on average before its ClientApp process even starts. The interval is read
#     from this environment variable only, which no public API or command-line option names. Missing: a
#     ``flower-supernode``/``flower-superlink`` option for it.


def superexec_poll_environment(seconds: float) -> dict[str, str]:
    """The environment that makes Flower's SuperExec look for new tasks every ``seconds`` (Flower's default: 1.0)."""
    from flwr.supercore.superexec import run_superexec

    return {run_superexec._TASK_POLL_INTERVAL_ENV: f"{seconds:g}"}
