"""Canary: does fedplug still work on the newest Flower the package index serves? Not part of CI.

    python benchmarks/flower_canary.py [--package flwr|flwr-nightly] [--version V] [--keep]

fedplug-core pins ``flwr`` to the minor versions it was tested with, because it uses a few of Flower's
private names (all in ``fedplug/flower_adapter.py``). This script tells, before a pin is lifted, what a
newer Flower breaks. It

1. finds the newest Flower pre-release the index serves: the newest of ``pip index versions flwr --pre``
   and ``pip index versions flwr-nightly --pre`` (Flower publishes its nightlies as ``flwr-nightly``, which
   installs the same ``flwr`` package);
2. makes a temporary venv and installs that Flower with the ``simulation`` extra, then ``fedplug-core``
   from this repository with ``--no-deps``, then fedplug-core's other dependencies (read from its
   pyproject.toml) and pytest. ``--no-deps`` rather than a constraint: fedplug-core's own pin
   (``flwr<1.43``) would make pip refuse a newer ``flwr``, and a nightly is another distribution
   (``flwr-nightly``) that no constraint on ``flwr`` can stand in for;
3. runs the adapter tests and the public-API scan (``fedplug-core/tests/test_flower_adapter.py``,
   ``test_flower_public_api.py``), one small simulation (``fedplug run numpy --rounds 1 --nodes 2``) and
   one deployment on loopback (``fedplug superlink --insecure``, two ``fedplug supernode numpy --insecure
   --data embedded``, ``fedplug run numpy --superlink ... --insecure``), all with a temporary ``HOME`` and
   ``FLWR_HOME``, and stops every process it started;
4. prints a table: each step or test, whether it passed, and the first error line of each that broke.

Exit code 0 when everything passed, 1 when something broke. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "fedplug-core"
TESTS = ["fedplug-core/tests/test_flower_adapter.py", "fedplug-core/tests/test_flower_public_api.py"]
RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*: ", re.MULTILINE)
ERROR = re.compile(r"(Error|Exception|error:|Traceback|failed|FAILED|refused|timed out)")


@dataclass
class Row:
    step: str
    passed: bool
    detail: str = ""


def version_key(text: str) -> tuple[int, ...]:
    """A sort key for the versions Flower publishes: X.Y.Z, X.Y.ZrcN, X.Y.Z.devN (dev < a < b < rc < final)."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:(a|b|rc)(\d+))?(?:\.dev(\d+))?", text)
    if not match:
        return (-1,)
    major, minor, patch, pre, pre_number, dev = match.groups()
    stage = {"a": 1, "b": 2, "rc": 3}.get(pre or "", 4)
    release = (int(major), int(minor), int(patch or 0))
    if dev is not None and pre is None:
        return (*release, 0, int(dev))
    return (*release, stage, int(pre_number or 0))


def newest(pip: list[str], package: str) -> str | None:
    shown = subprocess.run([*pip, "index", "versions", package, "--pre"], capture_output=True, text=True, check=False)
    match = re.search(r"Available versions: (.+)", shown.stdout)
    if not match:
        return None
    return max((v.strip() for v in match.group(1).split(",")), key=version_key)


def first_error(text: str) -> str:
    """The line that says what went wrong: the first raised exception (``SomeError: ...``, as a traceback ends
    with it), else the first line that looks like an error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [re.sub(r"^E\s+", "", line) for line in lines if not line.startswith("WARNING: Location")]
    found = next((i for i, line in enumerate(lines) if RAISED.match(line)), None)
    if found is None:
        found = next((i for i, line in enumerate(lines) if ERROR.search(line) and line != "Traceback"), None)
    if found is None:
        return lines[-1][:240] if lines else "(no output)"
    line = lines[found]
    if line.endswith(":") and found + 1 < len(lines):  # a heading: its first item says what
        line = f"{line} {lines[found + 1]}"
    return line[:240]


def run(command: list[str], log: Path, env: dict[str, str], timeout: float, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``command`` in a session of its own; on timeout kill its whole process group. Output goes to log."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(process)
    text = log.read_text(errors="replace")
    return code, text if code is not None else f"timed out after {timeout:.0f} s\n{text}"


def stop_group(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGINT (as Ctrl-C) to the process's group, then SIGKILL whatever is left of it."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)
        try:  # the leader ended: its children may not have
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return


def install(work: Path, package: str, wanted: str, rows: list[Row]) -> Path | None:
    venv = work / "venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    requirements = tomllib.loads((CORE / "pyproject.toml").read_text())["project"]["dependencies"]
    others = [r for r in requirements if re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].strip().lower() != "flwr"]
    steps = [
        ("venv", [sys.executable, "-m", "venv", str(venv)]),
        # no --pre: it would take pre-releases of every dependency too (grpcio-health-checking 1.82.0rc2, built
        # for a protobuf newer than Flower allows); an exact version admits a pre-release of Flower itself
        (f"install {package}[simulation]=={wanted}", [*pip, "install", f"{package}[simulation]=={wanted}"]),
        ("install fedplug-core --no-deps", [*pip, "install", "--no-deps", str(CORE)]),
        ("install fedplug-core's other deps", [*pip, "install", *others, "pytest>=8", "pytest-timeout"]),
    ]
    for name, command in steps:
        code, text = run(command, work / f"{name.split()[0]}-{len(rows)}.log", env, timeout=1800)
        rows.append(Row(name, code == 0, "" if code == 0 else first_error(text)))
        if code != 0:
            return None
    # a dependency that required "flwr" would have installed a second copy over the nightly's package
    probe = [str(python), "-c", "import flwr; print(flwr.__version__)"]
    shown = subprocess.run(probe, capture_output=True, text=True, env=env, check=False)
    dists = subprocess.run([*pip, "list", "--format", "json"], capture_output=True, text=True, env=env, check=False)
    names = {d["name"].lower(): d["version"] for d in json.loads(dists.stdout or "[]")}
    both = "flwr" in names and "flwr-nightly" in names
    if shown.returncode:
        detail = first_error(shown.stderr)
    elif both:
        detail = f"flwr {names['flwr']} and flwr-nightly {names['flwr-nightly']} both installed"
    else:
        detail = "" if shown.stdout.strip() == wanted else f"import flwr gives {shown.stdout.strip()}"
    rows.append(Row(f"import flwr: {shown.stdout.strip() or '?'}", not detail, detail))
    return python


def adapter_tests(python: Path, test_file: str, work: Path, env: dict[str, str], rows: list[Row]) -> None:
    """One test file (each in its own pytest: a file that fails to import hides no other)."""
    name = Path(test_file).stem
    report = work / f"{name}.xml"
    command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", test_file]
    _, text = run(command, work / f"{name}.log", env, timeout=900)
    if not report.exists():
        rows.append(Row(name, False, first_error(text)))
        return
    for case in ET.parse(report).iter("testcase"):
        broken = case.find("failure")
        if broken is None:
            broken = case.find("error")
        name = re.sub(r"\[([^-\]]*)[^\]]*\]", r"[\1]", f"test {case.get('name')}")  # a parameter set by its first id
        if broken is None:
            rows.append(Row(name, case.find("skipped") is None, "skipped" if case.find("skipped") is not None else ""))
        else:
            message = broken.get("message") or broken.text or ""
            rows.append(Row(name, False, first_error(message) if message else "failed"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    """'' once ``text`` is in ``log``, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return ""
        if process.poll() is not None:
            return f"exited with {process.returncode}: {first_error(log.read_text(errors='replace'))}"
        time.sleep(0.5)
    return f"timed out after {timeout:.0f} s waiting for '{text}'"


def flower_log(why: str, log: Path) -> str:
    """``why`` a fedplug command failed, with the error line of Flower's own log when there is one."""
    if why and log.is_file() and RAISED.search(log.read_text(errors="replace")):
        return f"{why} | {log.name}: {first_error(log.read_text(errors='replace'))}"
    return why


def deployment(fedplug: str, work: Path, env: dict[str, str], rows: list[Row]) -> None:
    folder = work / "deployment"
    folder.mkdir()
    address = f"127.0.0.1:{free_port()}"
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = folder / f"{name}.out"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [fedplug, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True
            )
        started.append(process)
        return process, log

    try:
        port = address.rsplit(":", 1)[1]
        link, link_log = start(
            "superlink", "superlink", "--insecure", "--host", "127.0.0.1", "--port", port, "--log", "superlink.log"
        )
        why = flower_log(wait_for(link_log, "SuperLink ready", link, 180), folder / "superlink.log")
        rows.append(Row("deployment: fedplug superlink --insecure", not why, why))
        if why:
            return
        nodes = []
        for index in range(2):
            node = start(
                f"supernode-{index}",
                *("supernode", "numpy", "--superlink", address, "--insecure", "--data", "embedded"),
                *("--partition-id", str(index), "--num-partitions", "2", "--log", f"supernode-{index}.log"),
            )
            nodes.append(node)
        whys = [
            flower_log(wait_for(log, "connected to", node, 180), folder / f"supernode-{index}.log")
            for index, (node, log) in enumerate(nodes)
        ]
        why = "; ".join(w for w in whys if w)
        rows.append(Row("deployment: 2 x fedplug supernode numpy --insecure", not why, why))
        if why:
            return
        out = folder / "results"
        code, text = run(
            [fedplug, "run", "numpy", "--superlink", address, "--insecure", "--rounds", "1", "--out", str(out)],
            folder / "run.out",
            env,
            timeout=600,
            cwd=folder,
        )
        ok = code == 0 and (out / "metrics.json").is_file()
        detail = "" if ok else first_error(text) if code != 0 else "no metrics.json"
        rows.append(Row("deployment: fedplug run numpy --superlink --insecure", ok, detail))
    finally:
        for process in reversed(started):
            stop_group(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", choices=["flwr", "flwr-nightly"], help="default: the one with the newest version")
    parser.add_argument("--version", help="default: the newest the index serves, pre-releases included")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (venv and logs)")
    args = parser.parse_args()

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    offers = {name: newest(pip, name) for name in ([args.package] if args.package else ["flwr", "flwr-nightly"])}
    offers = {name: found for name, found in offers.items() if found}
    if not offers:
        print("flower_canary: the index serves no flwr release; check pip's index settings", file=sys.stderr)
        return 2
    package, found = max(offers.items(), key=lambda item: version_key(item[1]))
    wanted = args.version or found
    print(f"Flower on the index: {', '.join(f'{n} {v}' for n, v in offers.items())}; testing {package} {wanted}")

    work = Path(tempfile.mkdtemp(prefix="fedplug-flower-canary-"))
    home = work / "home"
    home.mkdir()
    rows: list[Row] = []
    started = time.monotonic()
    try:
        python = install(work, package, wanted, rows)
        if python is not None:
            env = {
                **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
                "HOME": str(home),
                "FLWR_HOME": str(work / "flwr-home"),
                "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}",
            }
            for test_file in TESTS:
                adapter_tests(python, test_file, work, env, rows)
            fedplug = str(python.parent / "fedplug")
            out = work / "simulation"
            code, text = run(
                [fedplug, "run", "numpy", "--rounds", "1", "--nodes", "2", "--out", str(out)],
                work / "simulation.log",
                env,
                timeout=600,
                cwd=work,
            )
            ok = code == 0 and (out / "metrics.json").is_file()
            rows.append(Row("simulation: fedplug run numpy --rounds 1 --nodes 2", ok, "" if ok else first_error(text)))
            deployment(fedplug, work, env, rows)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(row.step) for row in rows)
    print(f"\nfedplug on {package} {wanted} ({time.monotonic() - started:.0f} s)")
    print(f"{'step':<{width}}  result  first error line")
    for row in rows:
        print(f"{row.step:<{width}}  {'ok' if row.passed else 'BROKE':<6}  {row.detail}")
    broke = [row for row in rows if not row.passed]
    print(f"\n{len(rows) - len(broke)} passed, {len(broke)} broke")
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
