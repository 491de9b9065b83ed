"""The demo federation of the README on a trusted network: ``fedplug superlink --insecure`` and two
``fedplug supernode --data embedded --partition-id I`` nodes, a run submitted with ``--insecure``.

And nodes never load the coordinator's dataset: a run on a SuperLink ships the data spec in its run
config. Three ``fedplug supernode --data FILE`` nodes: two hold digits of the run's shape, one holds
14x14 images. The coordinator's ``--dataset`` is a file in a folder that only the coordinator has: it
is removed after the run is planned and before it is submitted, so a node that tried to load it would
fail. The run trains on the two fitting nodes; the third is unusable, with a one-line reason naming
both shapes.

Every wait is on a condition; every process is gone at the end (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedplug.api import _run_deployed
from fedplug.data import SPEC_KEYS, DataError, data_spec
from fedplug.node import node_data
from fedplug.plan import plan_run

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
MARK = "FEDPLUG_TEST_PROCESS"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    wanted = "".join(text.split())  # the terminal wraps long lines anywhere
    while wanted not in "".join(path.read_text(errors="replace").split()):
        assert process.poll() is None, f"{process.args} ended:\n{path.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no '{text}' in {path.name} after {timeout} s:\n{path.read_text()}"
        time.sleep(0.2)


def marked(value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get(MARK) == value:
                found.append(proc)
    return found


@contextmanager
def insecure_federation(
    folder: Path, nodes: list[list[str]]
) -> Iterator[tuple[str, dict[str, str], list[tuple[subprocess.Popen[bytes], Path]]]]:
    """``fedplug superlink --insecure`` on loopback and a ``fedplug supernode numpy --insecure`` per entry of
    ``nodes`` (its data options), each connected: yields (address, environment, (process, output) of each command,
    the SuperLink's first).
    After the block every command gets Ctrl-C; each must end with exit code 130 and leave no process behind."""
    port, mark = free_port(), uuid.uuid4().hex
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FEDPLUG_PLUGINS": "", "FLWR_TELEMETRY_ENABLED": "0", MARK: mark}
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        output = folder / f"{name}.out"
        with open(output, "wb") as file:
            process = subprocess.Popen([FEDPLUG, *args], stdout=file, stderr=subprocess.STDOUT, env=env, cwd=folder)
        started.append((process, output))
        return process, output

    try:
        link, link_out = start("superlink", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port))
        wait_for_line(link_out, "SuperLink ready", link)
        for index, data in enumerate(nodes):
            node, node_out = start(
                f"node{index}", "supernode", "numpy", "--superlink", address, "--insecure", *data,
                "--log", f"node{index}.log",
            )  # fmt: skip
            wait_for_line(node_out, "connected to", node)
        yield address, env, list(started)
    finally:
        for process, _ in started:  # Ctrl-C
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for process, _ in started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        left = marked(mark)
        for proc in left:
            with suppress(psutil.Error):
                proc.kill()
    assert not left, f"processes outlived their fedplug command: {left}"
    assert all(process.returncode == 130 for process, _ in started), [p.returncode for p, _ in started]


def test_insecure_demo_federation_with_embedded_partitions(tmp_path: Path) -> None:
    nodes = [["--data", "embedded", "--partition-id", str(index), "--num-partitions", "2"] for index in range(2)]
    with insecure_federation(tmp_path, nodes) as (address, env, started):
        (link, link_out), *_ = started
        assert "--insecure: no TLS and no SuperNode authentication" in link_out.read_text()
        out = tmp_path / "results"
        done = subprocess.run(
            [FEDPLUG, "run", "numpy", "--superlink", address, "--insecure", "--rounds", "1", "--dataset", "embedded",
             "--fraction-evaluate", "0", "--run-config", "hidden-dims='32' secagg=true", "--out", str(out)],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip
        # Ctrl-C on the SuperLink while a run streams its log to `fedplug run`: Flower's SuperLink (uvicorn) waits
        # for that stream to close unless told twice; fedplug superlink still ends within seconds, as on SIGTERM
        streaming = tmp_path / "streaming.out"
        with open(streaming, "wb") as file:
            submitted = subprocess.Popen(
                [FEDPLUG, "run", "numpy", "--superlink", address, "--insecure", "--rounds", "100",
                 "--fraction-evaluate", "0", "--run-config", "hidden-dims='32'", "--out", str(tmp_path / "stopped")],
                stdout=file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            )  # fmt: skip
        try:
            wait_for_line(streaming, "(written by the ServerApp)", submitted, timeout=300)  # the run streams its log
            link.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            link.wait(timeout=60)
            stopped = time.monotonic() - interrupted
            assert link.returncode == 130 and "stopping the SuperLink" in link_out.read_text()
            # it took 26.6 s, and at least 20 s: SIGINT, 15 s, SIGTERM (which uvicorn ignores when stopping), 5 s,
            # SIGKILL; now 10 s at a load of 14 on 2 cores
            assert submitted.wait(timeout=60) != 0, "the run went on without its SuperLink"
        finally:
            with suppress(ProcessLookupError):
                submitted.kill()
            submitted.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["train-nodes"] == 2 and rounds[1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
    assert sorted(rounds[1]["train-partitions"]) == [0, 1]
    assert json.loads((out / "config.json").read_text())["secagg"] is True  # SecAgg+ on the Deployment Engine
    assert stopped < 15, f"fedplug superlink took {stopped:.1f} s to end after Ctrl-C during a run"


def digits(rows: slice, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Embedded training digits ``rows``, at ``side`` x ``side`` pixels (every other pixel for 14)."""
    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"][rows], npz["train_labels"][rows]
    step = 28 // side
    return np.ascontiguousarray(images[:, ::step, ::step]), labels


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    import datasets

    side = images.shape[1]
    features = datasets.Features({"image": datasets.Array2D((side, side), "uint8"), "label": datasets.Value("int64")})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)
    return path


@pytest.mark.fast
def test_a_node_loads_nothing_of_the_coordinators_and_checks_its_data_against_the_shipped_spec(
    tmp_path: Path,
) -> None:
    mine = write_parquet(tmp_path / "node" / "small.parquet", *digits(slice(0, 60), side=14))
    gone = tmp_path / "coordinator" / "no-longer-here.parquet"  # a node that loaded it would fail: it does not exist
    run_config = {"dataset": str(gone), "test-fraction": 0.2, "seed": 42, "image-column": "", "label-column": ""}
    shipped = {**run_config, SPEC_KEYS[0]: "1,14,14", SPEC_KEYS[1]: 10}
    assert tuple(data_spec(shipped).input_shape) == (1, 14, 14) and data_spec(shipped).num_classes == 10
    part = node_data(shipped, {"data": str(mine)})
    assert part.x_train.shape[1:] == (1, 14, 14) and len(part.y_train) + len(part.y_test) == 60
    with pytest.raises(DataError) as refused:
        node_data({**shipped, SPEC_KEYS[0]: "1,28,28"}, {"data": str(mine)})
    message = str(refused.value)
    assert "\n" not in message and "images are (1, 14, 14)" in message and "run's are (1, 28, 28)" in message, message


@pytest.mark.fast
def test_a_run_on_a_superlink_ships_its_data_spec_which_no_user_sets(tmp_path: Path) -> None:
    few = write_parquet(tmp_path / "few.parquet", *digits(slice(0, 20), side=14))
    plan = plan_run("numpy", {"dataset": str(few)}, superlink="127.0.0.1:9", insecure=True, create=False)
    assert (plan.config[SPEC_KEYS[0]], plan.config[SPEC_KEYS[1]]) == ("1,14,14", 10)
    assert plan.notes and "centralized evaluation off" in plan.notes[0]  # one file: no held-out set
    from fedplug.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'data\.num-classes' is set by fedplug"):
        plan_run("numpy", {"data.num-classes": 3}, superlink="127.0.0.1:9", insecure=True, create=False)


def test_a_deployed_run_trains_without_the_coordinators_dataset_and_refuses_a_node_of_another_shape(
    tmp_path: Path,
) -> None:
    files = [
        write_parquet(tmp_path / "owner-1" / "digits.parquet", *digits(slice(0, 600))),
        write_parquet(tmp_path / "owner-2" / "digits.parquet", *digits(slice(600, 1200))),
        write_parquet(tmp_path / "owner-3" / "small-digits.parquet", *digits(slice(1200, 1800), side=14)),
    ]
    coordinator = write_parquet(tmp_path / "coordinator-only" / "digits.parquet", *digits(slice(1800, 2000)))
    with insecure_federation(tmp_path, [["--data", str(path)] for path in files]) as (address, _, _):
        out = tmp_path / "results"
        plan = plan_run(
            "numpy",
            {"dataset": str(coordinator), "num-server-rounds": 1, "fraction-evaluate": 0.0, "hidden-dims": "16"},
            out=out,
            superlink=address,
            insecure=True,
        )
        assert (plan.config[SPEC_KEYS[0]], plan.config[SPEC_KEYS[1]]) == ("1,28,28", 10)
        assert plan.config["centralized-eval"] is False  # a file has no test split: the server evaluates nothing
        shutil.rmtree(coordinator.parent)  # the nodes (and the ServerApp) must not need it
        result = _run_deployed(plan, verbose=False, quiet=True, started=time.monotonic())
    assert result.status == "finished", result.reason
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["train-nodes"] == 2 and not rounds[1]["train-failures"], rounds[1]
    unusable = [entry for record in rounds for entry in record.get("unusable-nodes", [])]
    assert len(unusable) == 1, unusable
    reason = unusable[0]["reason"]
    assert "\n" not in reason and "query raised DataError" in reason, reason
    assert "this node's images are (1, 14, 14)" in reason and "the run's are (1, 28, 28) with 10 classes" in reason
