"""Each private Flower name that ``fedplug.flower_adapter`` uses, exercised against the installed Flower.

A test fails with "Flower X.Y changed <name>: <what>; update fedplug/flower_adapter.py" when Flower
renames the name, changes its signature or its behaviour. The test that runs the Simulation Engine is the
only one that is not ``fast``. Flower runs in subprocesses with a temporary ``HOME`` and ``FLWR_HOME``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import flwr
import pytest

from fedplug import flower_adapter

FLOWER = flwr.__version__  # the distribution is flwr, or flwr-nightly for a nightly
DATASETS = version("flwr-datasets")


def changed(name: str, what: str, package: str = "Flower") -> str:
    installed = FLOWER if package == "Flower" else DATASETS
    return f"{package} {installed} changed {name}: {what}; update fedplug/flower_adapter.py"


def run_python(code: str, home: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose home and Flower home are under ``home``."""
    environment = {
        **os.environ,
        "HOME": str(home),
        "FLWR_HOME": str(home / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def flower_files(home: Path) -> list[str]:
    """The files under ``home``'s ``.flwr`` and its ``flwr-home`` (the subprocess's FLWR_HOME)."""
    found = [path for folder in (".flwr", "flwr-home") for path in (home / folder).rglob("*") if path.is_file()]
    return sorted(str(path.relative_to(home)) for path in found)


# -- flwr.common.constant.ErrorCode ---------------------------------------------------------------


@pytest.mark.fast
def test_client_app_raised_exception_is_flowers_error_code() -> None:
    name = "flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION"
    try:
        code = flower_adapter.client_app_raised_exception()
    except (ImportError, AttributeError) as error:
        pytest.fail(changed(name, f"{type(error).__name__}: {error}"))
    # the value travels between nodes and SuperLinks, which may run other Flower versions
    assert code == 2, changed(name, f"its value is {code!r}, not 2")


# -- flwr.simulation (without TensorFlow) ---------------------------------------------------------

FAKE_TENSORFLOW = """\
import os
open(os.environ["TF_IMPORTED"], "w").close()
"""


@pytest.mark.fast
def test_import_simulation_without_tensorflow(tmp_path: Path) -> None:
    """``flwr.simulation`` imports TensorFlow when installed; the adapter imports it without, and
    ``import tensorflow`` works afterwards. A stand-in ``tensorflow`` package records each import."""
    name = "flwr.simulation"
    (tmp_path / "site" / "tensorflow").mkdir(parents=True)
    (tmp_path / "site" / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    marker = tmp_path / "tensorflow-imported"
    pythonpath = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": pythonpath, "TF_IMPORTED": str(marker)}

    plain = run_python("import flwr.simulation", tmp_path, **env)
    assert plain.returncode == 0, changed(name, f"importing it failed: {plain.stderr.strip()[-400:]}")
    assert marker.exists(), changed(
        name, "importing it no longer imports TensorFlow: import it plainly in import_simulation_without_tensorflow"
    )
    marker.unlink()

    hidden = run_python(
        """
        import sys
        from fedplug import flower_adapter

        flower_adapter.import_simulation_without_tensorflow()
        assert "flwr.simulation" in sys.modules
        assert "tensorflow" not in sys.modules, "TensorFlow left hidden or imported"
        from flwr.simulation import run_simulation  # the Simulation Engine is usable
        """,
        tmp_path,
        **env,
    )
    assert hidden.returncode == 0, changed(
        name, f"it does not import with TensorFlow hidden: {hidden.stderr.strip()[-600:]}"
    )
    assert not marker.exists(), changed(name, "it imported TensorFlow although sys.modules hid it")

    later = run_python(
        "from fedplug import flower_adapter\nflower_adapter.import_simulation_without_tensorflow()\nimport tensorflow",
        tmp_path,
        **env,
    )
    assert later.returncode == 0 and marker.exists(), "TensorFlow must stay importable after the hidden import"


# -- flwr.simulation.run_simulation._run_simulation and InMemoryGrid.pull_interval ---------------


@pytest.mark.fast
def test_run_simulation_engine_signature() -> None:
    name = "flwr.simulation.run_simulation._run_simulation"
    flower_adapter.import_simulation_without_tensorflow()
    try:
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.telemetry import EventType
    except ImportError as error:
        pytest.fail(changed(name, f"ImportError: {error}"))
    assert hasattr(EventType, "PYTHON_API_RUN_SIMULATION_LEAVE"), changed(
        "flwr.supercore.telemetry.EventType", "it lacks PYTHON_API_RUN_SIMULATION_LEAVE"
    )
    parameters = inspect.signature(_run_simulation).parameters
    used = {
        "num_supernodes",
        "exit_event",
        "client_app",
        "server_app",
        "backend_config",
        "app_dir",
        "server_app_context",
        "is_app",
        "verbose_logging",
    }
    assert used <= set(parameters), changed(name, f"it no longer takes {sorted(used - set(parameters))}")
    required = {key for key, param in parameters.items() if param.default is param.empty}
    assert required <= used, changed(name, f"it requires {sorted(required - used)}")


@pytest.mark.fast
def test_reply_poll_interval_is_an_in_memory_grid_attribute() -> None:
    name = "InMemoryGrid.pull_interval"
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError as error:
        pytest.fail(changed(name, f"ImportError: {error}"))
    default = inspect.signature(InMemoryGrid).parameters.get("pull_interval")
    assert default is not None and isinstance(default.default, float), changed(
        name, "InMemoryGrid() takes no float pull_interval"
    )

    class OtherGrid:  # the Deployment Engine's Grid has no pull_interval: nothing is set
        pass

    other = OtherGrid()
    assert flower_adapter.set_reply_poll_interval(other, 0.01) is False and not hasattr(other, "pull_interval")


PROBE_APP = '''\
"""A ClientApp and a ServerApp that report what the Simulation Engine gave them."""

import json
import os
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedplug import flower_adapter

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg, context):
    return Message(RecordDict({"seen": ConfigRecord({"marker": str(context.run_config["marker"])})}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg, context):
    raise RuntimeError("this ClientApp raises on evaluate")


@server_app.main()
def main(grid, context):
    report = {"server-marker": context.run_config.get("marker"), "grid": type(grid).__name__}
    try:
        nodes = []
        while len(nodes) < 2:
            nodes = list(grid.get_node_ids())
            time.sleep(0.05)
        report["nodes"] = len(nodes)
        report["poll-set"] = flower_adapter.set_reply_poll_interval(grid, 1.5)
        started = time.perf_counter()
        (reply,) = grid.send_and_receive([Message(RecordDict(), dst_node_id=nodes[0], message_type="train")])
        report["slow-exchange"] = time.perf_counter() - started
        if reply.has_error():
            report["node-marker"] = f"the ClientApp failed: {reply.error.reason}"
        else:
            report["node-marker"] = reply.content.config_records["seen"]["marker"]
        flower_adapter.set_reply_poll_interval(grid, 0.01)
        (failed,) = grid.send_and_receive([Message(RecordDict(), dst_node_id=nodes[1], message_type="evaluate")])
        report["error-code"] = failed.error.code if failed.has_error() else None
    finally:
        with open(os.environ["PROBE_REPORT"], "w") as file:
            json.dump(report, file)
'''

RUN_PROBE = """
import os
import ray
from flwr.app import Context, RecordDict

from fedplug import flower_adapter

flower_adapter.import_simulation_without_tensorflow()
flower_adapter.no_flower_source_id()
import probe_app

try:
    flower_adapter.run_simulation_engine(
        num_supernodes=2,
        client_app=probe_app.client_app,
        server_app=probe_app.server_app,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
        app_dir=os.environ["PROBE_APP_DIR"],
        server_app_context=Context(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={"marker": "from-context"}
        ),
        verbose_logging=False,
    )
finally:
    if ray.is_initialized():
        ray.shutdown()
"""


def test_run_simulation_engine_runs_an_app_folder(tmp_path: Path) -> None:
    """A two-node simulation: the nodes read the run config from the app folder, the ServerApp gets its
    Context, the Grid is the in-memory one whose poll interval is honoured, and a ClientApp that raises
    is answered with the adapter's error code."""
    name = "flwr.simulation.run_simulation._run_simulation"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "probe_app.py").write_text(PROBE_APP)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "probe"\nversion = "1.0.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedplug"\n\n'
        '[tool.flwr.app.components]\nserverapp = "probe_app:server_app"\nclientapp = "probe_app:client_app"\n\n'
        '[tool.flwr.app.config]\nmarker = "from-app-dir"\n'
    )
    report_file = tmp_path / "report.json"
    pythonpath = os.pathsep.join([str(tmp_path / "code"), os.environ.get("PYTHONPATH", "")])
    home = tmp_path / "home"
    home.mkdir()
    result = run_python(
        RUN_PROBE,
        home,
        timeout=240,
        PYTHONPATH=pythonpath,
        PROBE_APP_DIR=str(app_dir),
        PROBE_REPORT=str(report_file),
        RAY_USAGE_STATS_ENABLED="0",
    )
    assert report_file.exists(), changed(name, f"the simulation did not run the ServerApp: {result.stderr[-1500:]}")
    report = json.loads(report_file.read_text())
    assert report["server-marker"] == "from-context", changed(name, "the ServerApp did not get server_app_context")
    assert report.get("node-marker") == "from-app-dir", changed(
        name, f"the nodes did not read app_dir's run config: {report.get('node-marker')}"
    )
    assert result.returncode == 0, changed(name, f"the simulation failed: {result.stderr[-1500:]}")
    assert report["nodes"] == 2
    assert report["poll-set"] is True, changed("InMemoryGrid.pull_interval", f"{report['grid']} has no float one")
    # the first poll comes before the reply: the exchange waits one poll interval at least
    assert report["slow-exchange"] >= 1.5, changed(
        "InMemoryGrid.pull_interval", f"setting it to 1.5 s gave a {report['slow-exchange']:.3f} s exchange"
    )
    assert report["error-code"] == flower_adapter.client_app_raised_exception(), changed(
        "flwr.common.constant.ErrorCode", f"a raising ClientApp's reply has code {report['error-code']!r}"
    )
    assert flower_files(home) == [], f"the simulation wrote into ~/.flwr or FLWR_HOME: {flower_files(home)}"


# -- Message(content, metadata=...) ---------------------------------------------------------------


@pytest.mark.fast
def test_message_for_client_app_is_served_by_a_client_app() -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp

    name = "flwr.app.Message(content, metadata=...)"
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        lr = msg.content.config_records["config"]["lr"]
        return Message(RecordDict({"echo": ConfigRecord({"lr": lr, "node": context.node_id})}), reply_to=msg)

    content = RecordDict({"config": ConfigRecord({"lr": 0.5})})
    try:
        message = flower_adapter.message_for_client_app(
            content, message_type=MessageType.TRAIN, run_id=7, message_id="train-1", dst_node_id=3, group_id="1"
        )
    except Exception as error:
        pytest.fail(changed(name, f"{type(error).__name__}: {error}"))
    metadata = message.metadata
    assert (metadata.run_id, metadata.message_id, metadata.dst_node_id, metadata.message_type) == (
        7,
        "train-1",
        3,
        MessageType.TRAIN,
    ), changed(name, f"the message's metadata is {metadata}")
    context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    reply = app(message, context)
    assert not reply.has_error(), changed(name, f"the ClientApp replied with an error: {reply.error}")
    assert reply.metadata.reply_to_message_id == "train-1" and reply.metadata.dst_node_id == 0, changed(
        name, f"the reply's metadata is {reply.metadata}"
    )
    assert dict(reply.content.config_records["echo"]) == {"lr": 0.5, "node": 3}


# -- telemetry source ids ---------------------------------------------------------------------------

FLOWER_EVENT = """
from fedplug import flower_adapter
from flwr.supercore import telemetry

{call}
telemetry.create_event(telemetry.EventType.PING, None)  # what each of Flower's telemetry events runs first
print(telemetry.state["source"])
"""

DATASETS_EVENT = """
from fedplug import flower_adapter
from flwr_datasets.common import telemetry

{call}
telemetry.create_event(telemetry.EventType.PING, None)
print(telemetry.state["source"])
"""


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "package", "script", "call"),
    [
        ("flwr.supercore.telemetry.state", "Flower", FLOWER_EVENT, "flower_adapter.no_flower_source_id()"),
        (
            "flwr_datasets.common.telemetry.state",
            "flwr-datasets",
            DATASETS_EVENT,
            "flower_adapter.no_flwr_datasets_source_id()",
        ),
    ],
)
def test_no_source_id_keeps_telemetry_out_of_the_home(
    tmp_path: Path, name: str, package: str, script: str, call: str
) -> None:
    """Without the adapter a telemetry event (disabled) writes a source id under the home; with it, nothing."""
    bare, given = tmp_path / "bare", tmp_path / "given"
    bare.mkdir(), given.mkdir()
    without = run_python(script.format(call=""), bare)
    assert without.returncode == 0, changed(name, without.stderr.strip()[-600:], package)
    assert any(path.endswith("source") for path in flower_files(bare)), changed(
        name, "a telemetry event no longer writes a source id: no_*_source_id may go", package
    )
    with_id = run_python(script.format(call=call), given)
    assert with_id.returncode == 0, changed(name, with_id.stderr.strip()[-600:], package)
    assert with_id.stdout.strip() == "disabled", changed(name, f"the source id is {with_id.stdout.strip()!r}", package)
    assert flower_files(given) == [], changed(name, f"with a source id given it wrote {flower_files(given)}", package)


@pytest.mark.fast
def test_superexec_reads_its_task_poll_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "flwr.supercore.superexec.run_superexec._TASK_POLL_INTERVAL_ENV"
    try:
        from flwr.supercore.superexec import run_superexec

        read = run_superexec._get_task_poll_interval
    except (ImportError, AttributeError) as error:
        pytest.fail(changed(name, f"{type(error).__name__}: {error}"))
    environment = flower_adapter.superexec_poll_environment(0.05)
    assert list(environment) == ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"], changed(name, f"it is now {list(environment)}")
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert read() == 0.05, changed(name, "the SuperExec no longer reads its poll interval from it")
