"""Real federations through fedplug's own commands, on loopback: Flower's SuperLink with TLS and
SuperNode authentication, three SuperNodes each with its own data file, runs submitted to them.

One federation (module fixture) serves every test; the last test kills one of its SuperNodes.
Nothing waits a fixed time: every wait is on a condition (a line printed, a process ended).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedplug.config import resolve
from fedplug.flower_app import write_flower_app
from fedplug.numpy_backend import NumpyBackend

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
FLWR = str(Path(sys.executable).with_name("flwr"))
MARK = "FEDPLUG_TEST_PROCESS"
"""Every process a test starts, and everything those start, carries this variable."""
NODES = 3


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked(value: str) -> list[psutil.Process]:
    """Processes whose environment has MARK=value (or a value starting with it)."""
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get(MARK, "").startswith(value):
                found.append(proc)
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.2)


@dataclass
class Command:
    """A long-running fedplug command with its output in a file."""

    name: str
    process: subprocess.Popen[bytes]
    output: Path
    mark: str

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.is_file() else ""


@dataclass
class Federation:
    folder: Path
    address: str
    certs: Path
    env: dict[str, str]
    mark: str
    superlink: Command | None = None
    nodes: list[Command] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Command:
        mark = f"{self.mark}-{name}"
        output = self.folder / f"{name}.out"
        with open(output, "wb") as file:
            process = subprocess.Popen(
                [FEDPLUG, *args],
                stdout=file,
                stderr=subprocess.STDOUT,
                env={**self.env, MARK: mark},
                cwd=self.folder,
            )
        return Command(name, process, output, mark)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FEDPLUG, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, MARK: f"{self.mark}-run"},
            cwd=self.folder,
        )

    def logs(self) -> str:
        parts = [f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in self.folder.glob("*.out")]
        parts += [f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}" for path in self.folder.glob("*.log")]
        return "\n".join(parts)


def node_files(folder: Path) -> list[Path]:
    """Three node-local parquet files cut from the embedded training digits (disjoint, shuffled)."""
    import datasets

    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"], npz["train_labels"]
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(num_classes=10)}
    )
    order = np.random.default_rng(0).permutation(len(labels))
    paths = []
    for index, part in enumerate(np.array_split(order, NODES)):
        path = folder / f"owner-{index + 1}" / "digits.parquet"
        path.parent.mkdir()
        datasets.Dataset.from_dict({"image": images[part], "label": labels[part]}, features=features).to_parquet(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    folder = tmp_path_factory.mktemp("federation")
    port = free_port()
    env = {
        **os.environ,
        "FEDPLUG_PLUGINS": "",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_HOME": str(folder / "flwr-home-must-stay-unused"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    fed = Federation(folder, f"127.0.0.1:{port}", folder / "certs", env, uuid.uuid4().hex)
    made = fed.run("certificates", "certs", "--host", "127.0.0.1", "--supernodes", str(NODES + 1))
    assert made.returncode == 0, made.stderr
    assert "fedplug register" in made.stdout and "supernode-4.pub" in made.stdout
    data = node_files(folder)
    try:
        fed.superlink = fed.start(
            "superlink", "superlink", "--certificates", "certs", "--host", "127.0.0.1", "--port", str(port)
        )
        wait_until(lambda: "SuperLink ready" in fed.superlink.text(), 120, "the SuperLink", fed.logs)
        assert "SuperNode authentication on" in fed.superlink.text()
        keys = [f"certs/supernode-{i}.pub" for i in range(1, NODES + 1)]
        registered = fed.run("register", *keys, "--superlink", fed.address, "--ca-cert", "certs/ca.crt")
        assert registered.returncode == 0, registered.stdout + registered.stderr
        for index in range(NODES):
            fed.nodes.append(
                fed.start(
                    f"supernode-{index + 1}",
                    "supernode",
                    "numpy",
                    "--superlink",
                    fed.address,
                    "--data",
                    str(data[index]),
                    "--ca-cert",
                    "certs/ca.crt",
                    "--key",
                    f"certs/supernode-{index + 1}.key",
                    "--log",
                    f"supernode-{index + 1}.log",
                )
            )
        for node in fed.nodes:
            wait_until(lambda node=node: "connected to" in node.text(), 120, f"{node.name} to connect", fed.logs)
        yield fed
    finally:
        commands = [*fed.nodes, *([fed.superlink] if fed.superlink else [])]
        for command in commands:  # Ctrl-C, as a person would
            with suppress(ProcessLookupError):
                command.process.send_signal(signal.SIGINT)
        for command in commands:
            with suppress(subprocess.TimeoutExpired):
                command.process.wait(timeout=30)
        left = marked(fed.mark)
        for proc in left:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        assert not (folder / "flwr-home-must-stay-unused").exists(), "a fedplug command used the caller's FLWR_HOME"
        assert not left, f"processes outlived their fedplug command: {left}"


def round_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("round ")]


def test_run_on_the_superlink_trains_on_node_local_data(federation: Federation) -> None:
    out = federation.folder / "results-run"
    done = federation.run(
        "run",
        "numpy",
        "--superlink",
        federation.address,
        "--ca-cert",
        "certs/ca.crt",
        "--rounds",
        "3",
        "--dataset",
        "embedded",  # the coordinator's held-out set: the embedded test split, no node trains on it
        "--fraction-evaluate",
        "0",
        "--run-config",
        "hidden-dims='64'",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr + federation.logs()
    assert [line.split()[1] for line in round_lines(done.stdout)] == ["0", "1", "2", "3"], done.stdout
    unwrapped = "".join(done.stdout.split())  # the terminal wraps long lines anywhere, even inside the path
    assert "".join(f"results: {out} on the SuperLink's machine".split()) in unwrapped, done.stdout
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["train-nodes"] == NODES and not r["train-failures"] for r in rounds[1:]), rounds
    assert rounds[-1]["centralized-accuracy"] >= 0.85, rounds
    assert (out / "model.npz").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "embedded" and config["centralized-eval"] is True


def test_each_supernodes_superexec_looks_for_messages_every_tenth_of_a_second(federation: Federation) -> None:
    from fedplug import flower_adapter
    from fedplug.deployment.serve import SUPEREXEC_POLL

    wanted = flower_adapter.superexec_poll_environment(SUPEREXEC_POLL)
    assert SUPEREXEC_POLL <= 0.1
    for node in federation.nodes:
        superexecs = [p for p in marked(node.mark) if "flower-superexec" in " ".join(p.cmdline())]
        assert len(superexecs) == 1, f"{node.name}: {[p.cmdline() for p in marked(node.mark)]}"
        environment = superexecs[0].environ()
        assert {key: environment.get(key) for key in wanted} == wanted


def test_exported_flower_app_is_portable_and_runs_with_plain_flwr_run(federation: Federation) -> None:
    config = resolve(
        NumpyBackend(),
        {"num-server-rounds": 1, "fraction-evaluate": 0.0, "hidden-dims": "32", "out": str(federation.folder / "x")},
    )
    app = write_flower_app(federation.folder / "exported", config)
    text = (app / "pyproject.toml").read_text()
    assert str(federation.folder) not in text and "/tmp" not in text
    project = tomllib.loads(text)
    pins = project["project"]["dependencies"]
    assert any(pin.startswith("fedplug-core==") for pin in pins) and any(pin.startswith("flwr==") for pin in pins)
    assert project["tool"]["flwr"]["app"]["config"]["out"] == ""
    home = federation.folder / "plain-flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "{federation.address}"\n'
        f'root-certificates = "{federation.certs / "ca.crt"}"\n'
    )
    runs = federation.folder / "fedplug-runs"
    before = set(runs.glob("*"))
    done = subprocess.run(
        [FLWR, "run", str(app), "test", "--stream"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**federation.env, "FLWR_HOME": str(home), MARK: f"{federation.mark}-flwr"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # the ServerApp wrote its results where the SuperLink runs (fedplug superlink's working directory)
    made = set(runs.glob("*")) - before
    assert len(made) == 1, done.stdout[-3000:]
    rounds = json.loads((made.pop() / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["train-nodes"] == NODES


def test_an_unregistered_supernode_is_refused(federation: Federation, tmp_path: Path) -> None:
    data = next(federation.folder.glob("owner-1/*.parquet"))
    done = federation.run(
        "supernode", "numpy", "--superlink", federation.address, "--data", str(data), "--ca-cert", "certs/ca.crt",
        "--key", f"certs/supernode-{NODES + 1}.key", "--log", str(tmp_path / "refused.log"), timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused this SuperNode" in done.stderr and "Failed to activate SuperNode" in done.stderr
    assert "connected to" not in done.stdout


def test_a_supernode_without_the_federations_ca_cannot_connect(federation: Federation, tmp_path: Path) -> None:
    other = federation.run("certificates", str(tmp_path / "other"), "--host", "127.0.0.1", "--supernodes", "0")
    assert other.returncode == 0
    data = next(federation.folder.glob("owner-1/*.parquet"))
    done = federation.run(
        "supernode", "numpy", "--superlink", federation.address, "--data", str(data),
        "--ca-cert", str(tmp_path / "other" / "ca.crt"), "--key", "certs/supernode-1.key",
        "--log", str(tmp_path / "wrong-ca.log"), timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr
    assert "connected to" not in done.stdout


def test_a_supernode_killed_in_round_2_is_counted_and_the_run_completes(federation: Federation) -> None:
    """Last test: it kills a SuperNode of the federation, as a machine that loses power."""
    out = federation.folder / "results-kill"
    victim = federation.nodes[-1]
    command = [
        FEDPLUG, "run", "numpy", "--superlink", federation.address, "--ca-cert", "certs/ca.crt", "--rounds", "2",
        "--fraction-evaluate", "0", "--run-config", "hidden-dims='32' round-timeout=25", "--out", str(out),
    ]  # fmt: skip
    output = federation.folder / "kill-run.out"
    with open(output, "wb") as file:
        run = subprocess.Popen(
            command, stdout=file, stderr=subprocess.STDOUT, env={**federation.env, MARK: f"{federation.mark}-kill"},
            cwd=federation.folder,
        )  # fmt: skip
    try:
        wait_until(lambda: "round   1" in output.read_text(), 240, "round 1 to finish", federation.logs)
        killed = marked(victim.mark)  # fedplug supernode, flower-supernode, its SuperExec and app processes
        assert killed
        for proc in killed:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(killed, timeout=10)
        assert run.wait(timeout=300) == 0, output.read_text() + federation.logs()
    finally:
        if run.poll() is None:
            run.kill()
    text = output.read_text()
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rounds[1]["train-nodes"] == NODES and not rounds[1]["train-failures"]
    assert rounds[2]["train-nodes"] == NODES - 1 and rounds[2]["train-failed"] == 1, rounds[2]
    assert "round   2" in text and "1 failed" in text and "failed: 1 node" in text, text


@pytest.mark.fast
def test_certificates_chain_names_and_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fedplug.deployment.certificates import check_private_key, check_public_key, create_federation_files

    files = create_federation_files(tmp_path / "certs", ["coordinator.example.org", "10.0.0.5"], 2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.superlink_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private, public in files.supernode_keys:
        check_private_key(private)
        check_public_key(public)
        assert private.stat().st_mode & 0o077 == 0, "a private key is readable by others"
        derived = serialization.load_ssh_private_key(private.read_bytes(), None).public_key()
        assert derived.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) in (
            public.read_bytes()
        )
    with pytest.raises(ValueError, match="cannot read"):
        check_public_key(files.superlink_cert)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["superlink", "--certificates", "no-such-folder"], "missing no-such-folder/ca.crt"),
        (["run", "numpy", "--superlink", "no-port", "--insecure"], "'no-port' is not HOST:PORT"),
        (["run", "numpy", "--superlink", "127.0.0.1:9", "--ca-cert", "no.crt"], "CA certificate no.crt not found"),
        (["supernode", "numpy", "--superlink", "127.0.0.1:9", "--data", "no.parquet"], "data no.parquet does not"),
        (["supernode", "numpy", "--superlink", "127.0.0.1:9", "--data", "embedded"], "--partition-id I"),
        (
            [
                "supernode",
                "numpy",
                "--superlink",
                "127.0.0.1:9",
                "--data",
                "embedded",
                "--partition-id",
                "0",
                "--num-partitions",
                "2",
                "--ca-cert",
                "ca.crt",
            ],
            "pass --key",
        ),
        (["register", "missing.pub", "--superlink", "127.0.0.1:9", "--ca-cert", "ca.crt"], "cannot read a public key"),
    ],
)
def test_deployment_commands_refuse_bad_input_before_starting_anything(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "ca.crt").write_text("not used: the command stops before it reads it")
    done = subprocess.run(
        [FEDPLUG, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "FEDPLUG_PLUGINS": ""},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("fedplug: error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.log")), "a process was started"


def _documented_commands() -> list[tuple[str, str]]:
    """Every `fedplug ...` command line in docs/deploy.md (its 'Federate real machines' walk-through included)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    assert "## Federate real machines" in text, "docs/deploy.md lost its walk-through"
    lines = []
    for block in text.split("```")[1::2]:
        joined = block.replace("\\\n", " ")
        lines += [
            ("docs/deploy.md", line.strip()) for line in joined.splitlines() if line.strip().startswith("fedplug ")
        ]
    return lines


@pytest.mark.fast
def test_documented_deployment_commands_use_only_existing_options() -> None:
    import shlex

    import typer.main

    from fedplug.cli import app

    group = typer.main.get_command(app)
    documented = _documented_commands()
    assert {shlex.split(line)[1] for _, line in documented} >= {
        "certificates",
        "superlink",
        "register",
        "supernode",
        "run",
    }
    for where, line in documented:
        words = shlex.split(line.split("#")[0])
        command = group.commands[words[1]]  # type: ignore[attr-defined]
        options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        for word in words[2:]:
            if word.startswith("--"):
                assert word in options, f"{where}: `{line}` uses {word}, which `fedplug {words[1]}` does not have"


def test_with_node_local_data_the_server_evaluates_only_on_a_held_out_set_it_is_given(tmp_path: Path) -> None:
    """The decision is printed before submitting; nothing listens on the port, so the submission fails."""
    port = free_port()
    env = {**os.environ, "FEDPLUG_PLUGINS": "", "FLWR_TELEMETRY_ENABLED": "0"}
    common = ["run", "numpy", "--superlink", f"127.0.0.1:{port}", "--insecure", "--rounds", "1"]
    for extra, expected in (([], "no server held-out set"), (["--dataset", "embedded"], "server held-out set: test")):
        done = subprocess.run(
            [FEDPLUG, *common, *extra], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )
        assert expected in done.stdout.replace("\n", ""), done.stdout
        assert done.returncode == 1 and done.stderr.startswith("fedplug: error: "), done.stdout + done.stderr


def test_a_supernode_gives_up_on_an_unreachable_superlink_after_max_wait(tmp_path: Path) -> None:
    """Flower's SuperNode retries for ever: fedplug supernode stops it after --max-wait, in one line, exit 1."""
    env = {**os.environ, "FEDPLUG_PLUGINS": "", MARK: f"maxwait-{uuid.uuid4().hex}"}
    started = time.monotonic()
    done = subprocess.run(
        [FEDPLUG, "supernode", "numpy", "--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--data",
         "embedded", "--partition-id", "0", "--num-partitions", "2", "--max-wait", "3",
         "--log", str(tmp_path / "supernode.log")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no SuperLink answered at 127.0.0.1:" in lines[0] and "within 3 s" in lines[0]
    assert time.monotonic() - started < 60
    assert marked(env[MARK]) == [], "the SuperNode outlived the command"


class RepliesLater:
    """A Grid whose nodes reply at given seconds after the push (None: never), with Flower's Grid methods."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays, self.pushed_at, self.pulls = delays, 0.0, 0

    def push_messages(self, messages: object) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i in range(len(self.delays))]

    def pull_messages(self, message_ids: list[str]) -> list[object]:
        from types import SimpleNamespace

        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        ready = [f"m{i}" for i, delay in enumerate(self.delays) if delay is not None and delay <= now]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ready if m in message_ids]


@pytest.mark.fast
def test_the_deployed_serverapp_takes_replies_within_a_fraction_of_a_second_not_flowers_3_s() -> None:
    from fedplug.deploy_app import PromptGrid

    inner = RepliesLater([0.3, 0.3, 0.4])
    grid = PromptGrid(inner)  # type: ignore[arg-type]
    started = time.monotonic()
    replies = list(grid.send_and_receive([object(), object(), object()], timeout=30))  # type: ignore[list-item]
    waited = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.4 <= waited < 0.8, waited  # Flower's HttpGrid: 3 s (it pulls, then sleeps 3 s)
    assert inner.pulls == grid.pulls <= 15, "it polls every few ms for ever instead of backing off"


@pytest.mark.fast
def test_the_deployed_serverapp_gives_up_on_a_missing_reply_at_the_timeout() -> None:
    from fedplug.deploy_app import PromptGrid

    inner = RepliesLater([0.05, None])
    started = time.monotonic()
    replies = list(PromptGrid(inner, longest=0.2).send_and_receive([object(), object()], timeout=1.0))  # type: ignore
    waited = time.monotonic() - started
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 1.0 <= waited < 1.3, waited
    assert inner.pulls <= 12, inner.pulls
