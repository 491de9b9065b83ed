"""A federation of separate hosts, as near as CI gets: the SuperLink and each SuperNode in a Linux network
namespace of its own, cabled (veth pairs) to a switch (a bridge in a namespace of its own).

The hosts reach each other only through those cables and know nothing else: each namespace has its
loopback, one address of a /24 the test picked from 10.231.0.0/16 after checking that no interface or
route here or in another namespace uses it, no default route and no DNS server; ``/etc/netns/NS/hosts``
(which ``ip netns exec`` mounts as the namespace's ``/etc/hosts``) names the coordinator. So the TLS
host name, the addresses and the connections are those of separate machines, and only addresses the
test created can be contacted.

On them, fedplug's own commands as the coordinator and three data owners run them (``docs/deploy.md``):
``fedplug certificates`` for the coordinator's host name, ``fedplug superlink`` with TLS and SuperNode
authentication, ``fedplug register``, and three ``fedplug supernode`` with their own parquet file of
digits (cut from the embedded ones) and their own key: numpy and MLX from this environment, MXNet from
the MXNet environment (``FEDPLUG_MXNET_VENV``, else ``.venv-mxnet``; tests/run-all.sh builds it).
A SuperNode that names the coordinator by its address is refused by TLS (the certificate names the host).
``fedplug run --superlink`` submits 4 rounds from the coordinator. In round 2, once the numpy node has
received the model, its cable is pulled at the switch (``ip link set ... down``): its reply is a failure
of round 2 (``train-failures``), the round and the run go on with the other nodes, and when the cable
is back (after round 2) the node trains again in a later round. (The numpy node is the one cut because
it is the quickest to catch up: after a cut of a round's length, TCP's retransmission back-off and
Flower's retries hold its connection up to tens of seconds after the cable is back.)

Why MLX as this environment's framework and a 30 s ``round-timeout``: Flower's SuperNode starts a ClientApp
process per message, which imports the framework every round, and the round with the cut cable lasts the
whole ``round-timeout``. MLX imports in a tenth of a second; PyTorch took 5-30 s per message on a loaded
2-core machine, more than a short ``round-timeout`` (test_mixed_deployment.py federates PyTorch, JAX and
MXNet nodes, with the default ``round-timeout``).

It needs root (``ip netns``): CI runs the suite as root; elsewhere it fails saying so, it never skips.
Everything it made is removed at the end, also when it fails: processes (the commands' own, and then
whatever ``ip netns pids`` still finds), namespaces (with their cables and the bridge) and
``/etc/netns`` entries; the teardown then checks that nothing is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FEDPLUG = str(BIN / "fedplug")
MARK = "FEDPLUG_TEST_PROCESS"
PREFIX = "fedplug-test-"
"""Every namespace of the test is named PREFIX + the test process's id + a random tag + the host."""
ETC_NETNS = Path("/etc/netns")
"""``ip netns exec NS`` mounts the files of ETC_NETNS/NS over those of /etc."""
RANGE = ipaddress.IPv4Network("10.231.0.0/16")
"""The /24 of the test's hosts is one of this range that nothing here uses."""
PORT = 9092  # fedplug superlink's default: the coordinator is a host of its own, no port is taken there
ROUNDS, CUT_ROUND, ROUND_TIMEOUT = 4, 2, 30
IMAGES = 2000
"""Digits per data owner."""
OWNERS = (("owner-1", "numpy"), ("owner-2", "mlx"), ("owner-3", "mxnet"))
"""The data owners' hosts and backends; owner-1's cable is cut in round CUT_ROUND."""
VICTIM = "owner-1"


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"`ip {' '.join(args)}` failed: {done.stderr.strip()}"
    return done.stdout


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address and route of this host's namespace and of every other namespace."""
    outputs = [ip("-4", "-o", "addr", "show"), ip("-4", "route", "show", "table", "all")]
    for line in ip("netns", "list").splitlines():
        name = line.split()[0]
        with suppress(AssertionError):  # a namespace that went away meanwhile
            outputs += [ip("-n", name, "-4", "-o", "addr", "show"), ip("-n", name, "-4", "route", "show")]
    found = re.findall(r"\b(\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?)\b", "\n".join(outputs))
    return [ipaddress.IPv4Network(text, strict=False) for text in found]


def remove_leftovers() -> None:
    """Remove the namespaces (and /etc/netns entries) of earlier runs of this test whose process is gone
    (killed with SIGKILL, so its teardown never ran)."""
    for line in ip("netns", "list").splitlines():
        found = re.match(rf"{PREFIX}(\d+)-", line)
        if found and not psutil.pid_exists(int(found.group(1))):
            name = line.split()[0]
            for pid in ip("netns", "pids", name).split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", name)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def interface_names() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()}


def free_subnet() -> ipaddress.IPv4Network:
    used = networks_in_use()
    candidates = list(RANGE.subnets(new_prefix=24))[1:-1]
    random.shuffle(candidates)
    for subnet in candidates:
        if not any(subnet.overlaps(other) for other in used if other.prefixlen > 0):
            return subnet
    raise AssertionError(f"every /24 of {RANGE} is in use here: cannot give the test hosts their own addresses")


@dataclass
class Network:
    """The switch and the hosts, each a namespace; every name carries the test's tag."""

    tag: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(2)}")
    """The test process's id (to find what a killed test left) and a random part."""
    hosts: tuple[str, ...] = ("coordinator", *(owner for owner, _ in OWNERS))
    made: list[str] = field(default_factory=list)
    """Namespaces made so far, to remove."""
    subnet: ipaddress.IPv4Network = RANGE
    interfaces: set[str] = field(default_factory=set)
    """This host's own interfaces before the test: the same after it."""
    etc_made: bool = False
    """Whether the test made /etc/netns (then it removes it too, if nothing else is in it)."""

    @property
    def coordinator_name(self) -> str:
        return f"coordinator-{self.tag}.fedplug.test"  # .test: a name reserved for tests (RFC 2606)

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    def address(self, host: str) -> str:
        return str(self.subnet.network_address + 1 + 10 * self.hosts.index(host))

    def build(self) -> None:
        remove_leftovers()
        self.interfaces = interface_names()
        self.subnet = free_subnet()
        self.etc_made = not ETC_NETNS.exists()
        switch = self.ns("switch")
        for host in ("switch", *self.hosts):
            ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            ip("-n", self.ns(host), "link", "set", "lo", "up")
        ip("-n", switch, "link", "add", "switch", "type", "bridge")
        ip("-n", switch, "link", "set", "switch", "up")
        hosts = f"127.0.0.1 localhost\n::1 localhost\n{self.address('coordinator')} {self.coordinator_name}\n"
        for host in self.hosts:
            # a cable: eth0 in the host, a port named after the host in the switch
            ip("link", "add", "eth0", "netns", self.ns(host), "type", "veth", "peer", "name", host, "netns", switch)
            ip("-n", switch, "link", "set", host, "master", "switch", "up")
            ip("-n", self.ns(host), "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", self.ns(host), "link", "set", "eth0", "up")
            etc = ETC_NETNS / self.ns(host)
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts)
            (etc / "resolv.conf").write_text("# fedplug's namespace test: no DNS server\n")

    def cable(self, host: str, up: bool) -> None:
        """Plug or pull the host's cable at the switch."""
        ip("-n", self.ns("switch"), "link", "set", host, "up" if up else "down")

    def pids(self) -> dict[str, list[int]]:
        """The processes in each namespace of the test."""
        found = {}
        for name in self.made:
            with suppress(AssertionError):
                found[name] = [int(pid) for pid in ip("netns", "pids", name).split()]
        return found

    def remove(self) -> list[str]:
        """Kill what still runs in the namespaces, remove them (their cables and bridge go with them) and
        their /etc/netns entries; return what could not be removed."""
        for pid in [pid for pids in self.pids().values() for pid in pids]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self.pids().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        problems = [f"processes still in {name}: {pids}" for name, pids in self.pids().items() if pids]
        for name in self.made:
            with suppress(AssertionError):
                ip("netns", "del", name)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        if self.etc_made:
            with suppress(OSError):
                ETC_NETNS.rmdir()
        listed = ip("netns", "list")
        problems += [f"namespace {name} is left" for name in self.made if name in listed]
        problems += [f"/etc/netns/{name} is left" for name in self.made if (ETC_NETNS / name).exists()]
        if self.interfaces:
            problems += [f"interface {name} is left here" for name in interface_names() - self.interfaces]
        return problems


@dataclass
class Lab:
    """The namespaces and the fedplug commands started in them."""

    folder: Path
    env: dict[str, str]
    network: Network = field(default_factory=Network)
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def command_env(self, python_bin: Path, plugins: str) -> dict[str, str]:
        return {**self.env, "FEDPLUG_PLUGINS": plugins, "PATH": f"{python_bin}{os.pathsep}{os.environ['PATH']}"}

    def start(self, host: str, name: str, command: list[str], env: dict[str, str], cwd: Path) -> Path:
        """Start ``command`` on ``host`` (in its namespace); its output goes to the returned file."""
        output = self.folder / f"{name}.out"
        with open(output, "wb") as file:
            self.started[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.network.ns(host), *command],
                stdout=file, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        return output

    def run(self, host: str, command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.network.ns(host), *command],
            capture_output=True, text=True, timeout=180, env=self.command_env(BIN, ""), cwd=cwd,
        )  # fmt: skip

    def wait(self, what: str, condition: Callable[[], bool], timeout: float, running: tuple[str, ...]) -> None:
        """Wait for ``condition`` while the commands named ``running`` keep running (an ended one fails at once)."""
        deadline = time.monotonic() + timeout
        while not condition():
            ended = [name for name in running if self.started[name].poll() is not None]
            assert not ended, f"{', '.join(ended)} ended while waiting for {what}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s:\n{self.logs()}"
            time.sleep(0.05)

    def logs(self) -> str:
        files = [*self.folder.glob("*.out"), *self.folder.glob("*/*.log")]
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in files)

    def stop(self) -> list[int]:
        """Ctrl-C to every command, as a person would; return the processes that outlived them (then killed)."""
        for process in self.started.values():
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        for process in self.started.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        left = [pid for pids in self.network.pids().values() for pid in pids]
        for proc in psutil.process_iter():
            with suppress(psutil.Error):
                if proc.environ().get(MARK) == self.env[MARK] and proc.pid not in left:
                    left.append(proc.pid)
                    proc.kill()
        return left


def mxnet_bin() -> Path:
    venv = Path(os.environ.get("FEDPLUG_MXNET_VENV") or ROOT / ".venv-mxnet")
    assert (venv / "bin" / "fedplug").is_file(), (
        f"the MXNet test environment {venv} is missing: run tests/run-all.sh (it builds it and sets "
        "FEDPLUG_MXNET_VENV), or set FEDPLUG_MXNET_VENV=/path/to/.venv-mxnet"
    )
    return venv / "bin"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    assert os.geteuid() == 0 and shutil.which("ip"), (
        "this test puts each host of a federation in a Linux network namespace: it needs root and iproute2's "
        "`ip` (CI runs the suite as root); run it as root, e.g. `sudo -E tests/run-all.sh`"
    )
    mxnet_bin()  # before anything is made
    base = {k: v for k, v in os.environ.items() if k != "FEDPLUG_PLUGINS"}
    env = {**base, "FLWR_HOME": str(tmp_path / "flwr-home-must-stay-unused"), "FLWR_TELEMETRY_ENABLED": "0",
           MARK: f"netns-{secrets.token_hex(8)}"}  # fmt: skip
    made = Lab(tmp_path, env)
    left: list[int] = []
    problems: list[str] = []
    try:
        made.network.build()
        yield made
    finally:
        try:
            left = made.stop()
        finally:
            problems = made.network.remove()
    assert not problems, problems
    assert not left, f"processes outlived their fedplug command (killed now): {left}"
    assert not (tmp_path / "flwr-home-must-stay-unused").exists(), "a fedplug command used the caller's FLWR_HOME"


def write_owner_data(folders: list[Path]) -> None:
    """Each data owner's own parquet file: IMAGES digits cut from the embedded training digits, disjoint."""
    import datasets

    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"], npz["train_labels"]
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(num_classes=10)}
    )
    order = np.random.default_rng(0).permutation(len(labels))
    for index, folder in enumerate(folders):
        part = order[index * IMAGES : (index + 1) * IMAGES]
        dataset = datasets.Dataset.from_dict({"image": images[part], "label": labels[part]}, features=features)
        dataset.to_parquet(folder / "digits.parquet")


def received_train_message(log: Path, server_round: int) -> bool:
    """Whether the SuperNode's Flower log says it received its ``server_round``-th train message, model and all
    (the node trains in every round: ``fraction-train`` is 1)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    parts = text.split("Receiving: train message")
    return len(parts) > server_round and "Received successfully" in parts[server_round]


def completed_rounds(metrics: Path) -> list[dict[str, Any]]:
    with suppress(OSError, ValueError):  # not written yet, or being written
        return list(json.loads(metrics.read_text())["rounds"])
    return []


def peers_of_superlink(network: Network) -> set[str]:
    """Addresses with a TCP connection to the SuperLink's port, as the coordinator sees them."""
    text = ip("netns", "exec", network.ns("coordinator"), "ss", "-Htn", "state", "established", f"( sport = :{PORT} )")
    return {line.split()[-1].rsplit(":", 1)[0] for line in text.splitlines() if line.strip()}


def test_a_federation_of_separate_hosts_survives_a_cut_cable(lab: Lab) -> None:
    net = lab.network
    for host in net.hosts:  # each host reaches its /24 and nothing else
        routes = ip("-n", net.ns(host), "route", "show").splitlines()
        assert routes == [f"{net.subnet} dev eth0 proto kernel scope link src {net.address(host)} "], routes
        assert "default" not in ip("-n", net.ns(host), "-6", "route", "show")
    coordinator = lab.folder / "coordinator"
    coordinator.mkdir()
    owners = [lab.folder / owner for owner, _ in OWNERS]
    for folder in owners:
        folder.mkdir()
    write_owner_data(owners)
    superlink = f"{net.coordinator_name}:{PORT}"

    # the coordinator: certificates for its host name, the SuperLink, the data owners' keys registered
    made = lab.run("coordinator", [FEDPLUG, "certificates", "certs", "--host", net.coordinator_name,
                                   "--supernodes", str(len(OWNERS))], coordinator)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    link_out = lab.start(
        "coordinator", "superlink", [FEDPLUG, "superlink", "--certificates", "certs", "--port", str(PORT)],
        lab.command_env(BIN, ""), coordinator,
    )  # fmt: skip
    lab.wait("SuperLink", lambda: "SuperLink ready" in link_out.read_text(), 120, running=("superlink",))
    assert "TLS · SuperNode authentication on" in link_out.read_text()
    keys = [f"certs/supernode-{i}.pub" for i in range(1, len(OWNERS) + 1)]
    registered = lab.run(
        "coordinator", [FEDPLUG, "register", *keys, "--superlink", superlink, "--ca-cert", "certs/ca.crt"],
        coordinator,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stdout + registered.stderr + lab.logs()

    # the data owners: each gets ca.crt and its own key, and joins with its backend and its data
    def supernode(python_bin: Path, backend: str, address: str, log: str) -> list[str]:
        return [str(python_bin / "fedplug"), "supernode", backend, "--superlink", address, "--ca-cert", "ca.crt",
                "--key", "supernode.key", "--data", "digits.parquet", "--log", log]  # fmt: skip

    outputs = []
    for index, ((owner, backend), folder) in enumerate(zip(OWNERS, owners), start=1):
        shutil.copy(coordinator / "certs" / "ca.crt", folder / "ca.crt")
        shutil.copy(coordinator / "certs" / f"supernode-{index}.key", folder / "supernode.key")
        python_bin = mxnet_bin() if backend == "mxnet" else BIN
        environment = lab.command_env(python_bin, "" if backend == "numpy" else backend)
        outputs.append(lab.start(owner, owner, supernode(python_bin, backend, superlink, "supernode.log"),
                                 environment, folder))  # fmt: skip
    # the certificate names the coordinator's host name, not its address: TLS refuses the address
    by_address = lab.start(
        "owner-2", "by-address", supernode(BIN, "numpy", f"{net.address('coordinator')}:{PORT}", "by-address.log"),
        lab.command_env(BIN, ""), owners[1],
    )  # fmt: skip
    nodes = ("superlink", *(owner for owner, _ in OWNERS))
    lab.wait("SuperNodes", lambda: all("connected to" in out.read_text() for out in outputs), 180, running=nodes)
    assert lab.started["by-address"].wait(timeout=120) == 1, by_address.read_text()
    refused = " ".join(by_address.read_text().split())
    assert "refused this SuperNode" in refused and "CERTIFICATE_VERIFY_FAILED" in refused, refused
    assert f"IP address mismatch, certificate is not valid for '{net.address('coordinator')}'" in refused, refused
    # the SuperLink's connections come from the data owners' own addresses
    expected = {net.address(owner) for owner, _ in OWNERS}
    lab.wait(f"connections from {expected}", lambda: peers_of_superlink(net) >= expected, 30, running=nodes)

    # a run of ROUNDS rounds, submitted on the coordinator; the victim's cable is pulled in round CUT_ROUND
    results = coordinator / "results"
    run_out = lab.start(
        "coordinator", "run",
        [FEDPLUG, "run", "numpy", "--superlink", superlink, "--ca-cert", "certs/ca.crt", "--model", "mlp",
         "--rounds", str(ROUNDS), "--dataset", "embedded", "--fraction-evaluate", "0",
         "--run-config", f"hidden-dims='32' round-timeout={ROUND_TIMEOUT}", "--out", str(results)],
        lab.command_env(BIN, ""), coordinator,
    )  # fmt: skip
    run, running = lab.started["run"], (*nodes, "run")
    victim_log, metrics = lab.folder / VICTIM / "supernode.log", results / "metrics.json"
    lab.wait("the model on the victim", lambda: received_train_message(victim_log, CUT_ROUND), 240, running)
    net.cable(VICTIM, up=False)
    sent = victim_log.read_text(errors="replace").count("Sending: train message")
    assert sent == CUT_ROUND - 1, f"the cut came too late: the node had sent its reply of round {CUT_ROUND} already"
    lab.wait("the end of the round", lambda: len(completed_rounds(metrics)) > CUT_ROUND, 120, running)
    net.cable(VICTIM, up=True)
    assert run.wait(timeout=240) == 0, run_out.read_text() + lab.logs()

    rounds = completed_rounds(metrics)
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1)), rounds
    backend_of = {int(p): b for r in rounds[1:] for p, b in r["partition-backends"].items()}
    assert sorted(backend_of.values()) == sorted(backend for _, backend in OWNERS), backend_of
    victim = next(p for p, b in backend_of.items() if b == dict(OWNERS)[VICTIM])

    def failed(record: dict[str, Any]) -> set[int]:
        return {failure["partition"] for failure in record["train-failures"]}

    # one federation of both environments: every node's backend trains (on a loaded machine a node may miss a
    # round's round-timeout, so not necessarily in every round)
    assert {b for r in rounds[1:] for b in r["train-backends"]} == {b for _, b in OWNERS}, rounds
    # the victim trains before the cut
    assert victim in rounds[1]["train-partitions"] and victim not in failed(rounds[1]), rounds[1]
    # the cut: the victim's reply is a failure of its round, which goes on with the other nodes
    cut = rounds[CUT_ROUND]
    assert victim in failed(cut) and "skipped" not in cut and cut["train-nodes"] >= 1, cut
    assert re.search(rf"round +{CUT_ROUND} .*failed", run_out.read_text()), run_out.read_text()
    # back on the network, the victim trains again in a later round
    assert any(victim in r["train-partitions"] and victim not in failed(r) for r in rounds[CUT_ROUND + 1 :]), rounds
    assert rounds[-1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"], rounds
