"""Every mistake a user can make before a run starts ends in one line on stderr, before Ray starts.

One row per mistake: the command's arguments, extra environment, the exit code and a
substring of the hint. Each row runs the ``fedplug`` command (in this process: the checks
start nothing) and asserts the exit code, a single ``fedplug: error:`` line holding the
hint, no traceback, nothing written (no results folder, nothing under ``~/.flwr``) and no
process left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from fedplug.plugins import MESSAGE_LIMIT
from fedplug.results import out_problem
from fedplug.testing.runs import cli

pytestmark = pytest.mark.fast


@dataclass(frozen=True)
class Case:
    """``fedplug run BACKEND ARGS`` (``{work}`` is the test's working folder) and what it must say."""

    kind: str
    args: tuple[str, ...]
    code: int
    hint: str
    env: dict[str, str] = field(default_factory=dict)
    backend: str = "numpy"
    out: bool = True
    """Pass ``--out {work}/out`` unless the row gives its own (False: the default folder, ./fedplug-runs/...)."""
    files: tuple[str, ...] = ()
    """Files to make in ``{work}`` (the command's working folder) first."""


def case(kind: str, args: str | tuple[str, ...], hint: str, code: int = 2, **options: object) -> Case:
    return Case(kind, tuple(args.split()) if isinstance(args, str) else args, code, hint, **options)  # type: ignore[arg-type]


def rc(text: str) -> tuple[str, ...]:
    """``--run-config TEXT``: one argument, spaces and quotes kept."""
    return ("--run-config", text)


def st(strategy: str, text: str) -> tuple[str, ...]:
    """``--strategy STRATEGY --run-config TEXT``."""
    return ("--strategy", strategy, *rc(text))


CASES = [
    # run-config values: types pass, ranges do not
    case("seed", "--seed -1", "'seed' must be between 0 and 4294967295"),
    case("seed", "--seed 4294967296", "'seed' must be between 0 and 4294967295"),
    case("lr", rc("lr=-0.1"), "'lr' must be a positive number"),
    case("lr", rc("lr=0"), "'lr' must be a positive number"),
    case("lr", rc("lr=inf"), "'lr' must be a finite number"),
    case("lr", rc("lr=nan"), "'lr' must be a finite number"),
    case("momentum", rc("momentum=1.0"), "'momentum' must be in [0, 1)"),
    case("momentum", rc("momentum=-0.5"), "'momentum' must be in [0, 1)"),
    case("optimizer", rc("optimizer=rmsprop"), "'optimizer' must be one of: sgd, adam; got 'rmsprop'"),
    case("optimizer", rc("weight-decay=-0.1"), "'weight-decay' must be 0 (off) or positive"),
    case("renamed key", rc("keras-backend=jax"), "run-config 'keras-backend' is now 'keras.backend'"),
    case("fractions", "--fraction-train 0", "'fraction-train' must be between 0 and 1 (above 0"),
    case("fractions", "--fraction-evaluate 1.5", "'fraction-evaluate' must be between 0 and 1"),
    case("fractions", rc("test-fraction=nan"), "'test-fraction' must be a finite number"),
    case("counts", rc("batch-size=0"), "'batch-size' must be at least 1"),
    case("counts", "--nodes 1000000", "1000000 nodes are too many for dataset 'embedded' (12000 training"),
    # the model builds for the data spec, checked without a framework
    case("model", rc("hidden-dims='0'"), "hidden-dims must list positive integers"),
    case("model", rc("hidden-dims='64,x'"), "hidden-dims must list positive integers"),
    case("model", ("--model", "lenet", "--dataset", "{work}/tiny8x8.csv"), "lenet needs images of at least 16x16"),
    # strategy parameters: real ranges
    case("strategy range", rc("strategy.fraction-train=1.5"), "'strategy.fraction-train' must be in (0, 1]"),
    case("strategy range", st("fedadam", "strategy.beta-1=1.0"), "'strategy.beta-1' must be in [0, 1)"),
    case("strategy range", st("fedyogi", "strategy.beta-2=-0.1"), "'strategy.beta-2' must be in [0, 1)"),
    case("strategy range", st("fedadam", "strategy.tau=0"), "'strategy.tau' must be in (0, inf)"),
    case("strategy range", st("fedadagrad", "strategy.eta=-1"), "'strategy.eta' must be in (0, inf)"),
    case("strategy range", st("fedtrimmedavg", "strategy.beta=0.5"), "'strategy.beta' must be in [0, 0.5)"),
    case(
        "strategy range",
        st("fedavgm", "strategy.server-momentum=1.5"),
        "'strategy.server-momentum' must be in [0, 1)",
    ),
    case("strategy range", st("fedprox", "strategy.proximal-mu=-1"), "'strategy.proximal-mu' must be"),
    case("strategy range", st("qfedavg", "strategy.q=-1"), "'strategy.q' must be in [0, inf)"),
    case("strategy range", st("fedadam", "strategy.eta=inf"), "'strategy.eta' must be a finite"),
    # strategy parameters against the node count: Flower would wait forever
    case("strategy vs nodes", rc("strategy.min-available-nodes=11"), "the number of nodes (10), got 11"),
    case("strategy vs nodes", ("--nodes", "3", *rc("strategy.min-train-nodes=5")), "'strategy.min-train-nodes'"),
    case("strategy vs nodes", rc("strategy.min-evaluate-nodes=-1"), "'strategy.min-evaluate-nodes' must be between"),
    case(
        "strategy vs nodes",
        ("--nodes", "10", "--fraction-train", "0.05", *rc("strategy.min-train-nodes=0")),
        "no node trains",
    ),
    case("strategy vs nodes", "--strategy bulyan --nodes 2", "needs at least 4 * num-malicious-nodes + 3 = 3"),
    case(
        "strategy vs nodes",
        ("--strategy", "krum", "--nodes", "5", *rc("strategy.num-malicious-nodes=2")),
        "tolerates 2 malicious nodes only with more than 6",
    ),
    case(
        "strategy vs nodes",
        st("multikrum", "strategy.num-nodes-to-select=20"),
        "'strategy.num-nodes-to-select' must be between 1 and the number of nodes",
    ),
    # partitioner parameters: ranges and the data's classes
    case(
        "partitioner",
        ("--partitioner", "dirichlet", *rc("partitioner.alpha=0")),
        "'partitioner.alpha' (Dirichlet concentration) must be",
    ),
    case(
        "partitioner",
        ("--partitioner", "dirichlet", *rc("partitioner.min-partition-size=-1")),
        "'partitioner.min-partition-size' must be an integer of at least 0",
    ),
    case(
        "partitioner",
        ("--partitioner", "pathological", *rc("partitioner.num-classes-per-partition=11")),
        "the dataset has only 10 classes",
    ),
    case(
        "partitioner",
        ("--partitioner", "pathological", *rc("partitioner.class-assignment-mode='sorted'")),
        "must be one of: random, deterministic, first-deterministic",
    ),
    case(
        "partitioner",
        ("--partitioner", "shard", *rc("partitioner.shard-size=0")),
        "'partitioner.shard-size' must be an integer of at least 1",
    ),
    # client resources Ray could never grant
    case("resources", "--client-cpus 0", "--client-cpus must be a positive number"),
    case("resources", "--client-cpus -1", "--client-cpus must be a positive number"),
    case("resources", "--client-cpus nan", "--client-cpus must be a positive number"),
    case("resources", "--client-cpus 100000", "cores; use at most"),
    case("ray cluster", "--ray-address localhost", "--ray-address must be auto or HOST:PORT of a Ray head"),
    case("ray cluster", "--ray-address 127.0.0.1:9", "no Ray cluster answers at 127.0.0.1:9: start one with"),
    case("ray cluster", "--ray-address auto --superlink 127.0.0.1:9092", "--ray-address is for the Simulation Engine"),
    case("counts", rc("eval-every=0"), "'eval-every' must be at least 1"),
    case("resources", "--client-gpus -1", "--client-gpus must be 0 or a positive number"),
    case("resources", "--client-gpus 1", "this machine has no NVIDIA GPU", env={"PATH": "/nonexistent"}),
    case("resources", "--client-gpus 100000", "GPU"),  # no GPU here, or fewer GPUs than that anywhere
    # the output folder
    case("out folder", "--out {work}/afile", "is a file, not a folder"),
    case("out folder", "--out {work}/afile/run", "which is a file; choose a folder path"),
    case("out folder", "--out {work}/oldrun", "already holds a run"),
    case("out folder", "--out /sys/fedplug-test-out/run", "/sys refuses new folders"),
    case("out folder", ("--out", "{work}/" + "x" * 300), "File name too long"),
    case("out folder", ("--out", os.fsdecode(b"{work}/bad-\xff-name")), "is not valid Unicode"),
    case("out folder", "--seed -1", "'seed' must be between", out=False),  # the default folder is not made either
    case("out folder", (), "--out fedplug-runs is a file", out=False, files=("fedplug-runs",)),
    case("out folder", ("--out", ""), "--out is empty"),
    case(
        "data",
        ("--dataset", "{work}/tiny8x8.csv", *rc("centralized-eval=true")),
        "has no test split: centralized-eval=true has nothing to evaluate on",
    ),
    case("data", ("--dataset", ""), "--dataset is empty"),
    # the data: columns, labels, local files and hub ids
    case("columns", rc("image-column='label'"), "dataset 'embedded': its image column is 'image', not 'label'"),
    case("columns", rc("label-column='digit'"), "dataset 'embedded': its label column is 'label', not 'digit'"),
    case(
        "columns",
        ("--dataset", "{work}/tiny8x8.csv", *rc("image-column='label'")),
        "image-column and label-column are both 'label'",
    ),
    case(
        "columns",
        ("--dataset", "{work}/tiny8x8.csv", *rc("image-column='p0' label-column='p0'")),
        "image-column and label-column are both 'p0'",
    ),
    case(
        "columns",
        ("--dataset", "{work}/tiny8x8.csv", *rc("label-column='nope'")),
        "has no column 'nope' (columns: p0, p1, p2, p3, p4, p5, p6, p7, ... (65 columns)); set --run-config",
    ),
    case(
        "labels",
        ("--dataset", "{work}/biglabel.csv"),
        "label column 'label' holds the label 1000000000, which would make 1000000001 classes (at most 10000)",
    ),
    case("local file", "--dataset ./my-digts.csv.gz", "dataset file ./my-digts.csv.gz does not exist; give an"),
    case(
        "local file",
        "--dataset ./tiny8x8.cvs",
        "dataset file ./tiny8x8.cvs does not exist; did you mean tiny8x8.csv?",
    ),
    case("local file", "--dataset ~/nowhere/digits.parquet", "does not exist; give an existing .parquet or .csv"),
    case("local file", "--dataset data/digits/train", "dataset file data/digits/train does not exist"),
    case(
        "local file",
        "--dataset digits.npz",
        "digits.npz: the .npz format is not supported; convert it to .parquet or .csv",
        files=("digits.npz",),
    ),
    case("local file", "--dataset ./TINY8X8.CSV", "./TINY8X8.CSV does not exist; did you mean tiny8x8.csv?"),
    case("dataset name", "--dataset embeded", "unknown dataset 'embeded': did you mean --dataset embedded?"),
    case("dataset name", "--dataset Embedded", "unknown dataset 'Embedded': did you mean --dataset embedded?"),
    case("local file", ("--dataset", "{work}/oldrun"), "; lay it out as a hub dataset (e.g. data/train-*.parquet"),
    case("local file", "--dataset notes.json", "the .json format is not supported", files=("notes.json",)),
    case(
        "local file",
        ("--dataset", "{work}/binary.csv"),
        r"(CSV parse error: Expected 1 columns, got 2: \x0e\x0f",
    ),
    case(
        "hub",
        "--dataset someone/some-digits",
        "cannot load dataset 'someone/some-digits' (",
        env={"HF_ENDPOINT": "http://127.0.0.1:9"},  # a closed loopback port stands for "no network"
    ),
    # backends and their plugins
    case("backend", (), "did you mean 'numpy'?", backend="nunpy"),
    case("backend", (), "did you mean 'torch'? to add it: pip install fedplug-torch", backend="pytorch"),
    case(
        "broken plugin",
        (),
        "its plugin 'badimport' (fedplug-testplugins) is broken: ModuleNotFoundError: No module named "
        "'fedplug_framework_that_does_not_exist'; reinstall it (pip install --force-reinstall fedplug-testplugins)",
        env={"FEDPLUG_PLUGINS": "badimport", "FEDPLUG_QUIET_PLUGINS": "1"},  # its warning line: a row of its own
        backend="badimport",
    ),
    case(
        "plugin check",
        (),
        "backend 'badcheck' from plugin 'badcheck' (fedplug-testplugins 0.0.1) failed its availability check with "
        "KeyError: 'CUDA_HOME'",
        code=1,
        env={"FEDPLUG_PLUGINS": "badcheck"},
        backend="badcheck",
    ),
]


def make_work(work: Path) -> None:
    """The files some rows point at: a file, an earlier run's folder, csv files of 8x8 and 2x2 images."""
    work.mkdir()
    (work / "afile").write_text("not a folder\n")
    (work / "oldrun").mkdir()
    (work / "oldrun" / "config.json").write_text("{}\n")
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    rows = [",".join([*(str((i * 7 + j) % 256) for j in range(64)), str(i % 3)]) for i in range(60)]
    (work / "tiny8x8.csv").write_text("\n".join([header, *rows]) + "\n")
    labels = [10**9 if i == 5 else i % 3 for i in range(10)]  # one typo among 10 labels
    (work / "biglabel.csv").write_text("label,p0,p1,p2,p3\n" + "".join(f"{y},1,2,3,4\n" for y in labels))
    (work / "binary.csv").write_bytes(bytes(range(256)) * 20)


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


def children() -> set[int]:
    """This process's live descendants: anything a command started and left running."""
    return {child.pid for child in psutil.Process().children(recursive=True) if child.status() != "zombie"}


CAPPED = {"columns", "labels", "local file", "dataset name", "hub", "broken plugin"}
"""Kinds of rows whose message is made by the data or plugin layer: at most MESSAGE_LIMIT characters."""


@pytest.mark.parametrize(
    "row",
    CASES,
    ids=[f"{c.kind}:{c.backend} {' '.join(c.args)}"[:80] for c in CASES],
)
def test_mistake_is_one_line_before_anything_starts(row: Case, tmp_path: Path, monkeypatch) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    make_work(work)
    for name in row.files:
        (work / name).write_text("in the way\n")
    home.mkdir()
    before = tree(work)
    args = [arg.replace("{work}", str(work)) for arg in row.args]
    if row.out and "--out" not in args:
        args += ["--out", str(work / "out")]
    monkeypatch.chdir(work)
    before_children, before_env = children(), dict(os.environ)
    done = cli("run", row.backend, *args, env={"FEDPLUG_PLUGINS": "", "HOME": str(home), **row.env})
    lines = done.stderr.splitlines()
    assert done.returncode == row.code, done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedplug: error: "), done.stderr
    assert row.hint in lines[0]
    if row.kind in CAPPED:
        assert len(lines[0].removeprefix("fedplug: error: ")) <= MESSAGE_LIMIT, lines[0]
    assert dict(os.environ) == before_env, "the command changed this process's environment"
    assert "Traceback" not in done.stdout + done.stderr
    assert tree(work) == before, "the command wrote files: no results folder may be made before the run starts"
    assert not (home / ".flwr").exists(), "fedplug wrote to ~/.flwr"
    assert children() <= before_children, "the command left processes behind"


@pytest.mark.parametrize("text", ["", " ", "\t"])
def test_an_empty_out_is_refused_by_name(text: str) -> None:
    assert out_problem(text) == "--out is empty: give the results folder a name (or leave --out out for a new one)"


@pytest.mark.parametrize("text", [".", "runs/first", "~/results"])
def test_a_named_out_passes(text: str) -> None:
    assert out_problem(text) is None


def test_the_reason_a_run_ended_is_one_capped_line(tmp_path: Path) -> None:
    """The CLI's last line after a failed run is status.json's reason: a crash's kilobytes are cut."""
    from fedplug.results import read_status, write_status

    write_status(tmp_path, "failed", "MemoryError: " + "\n".join(["Unable to allocate 954. GiB \x00"] * 100))
    reason = read_status(tmp_path)["reason"]
    assert reason.startswith("MemoryError: Unable to allocate 954. GiB \\x00 Unable")
    assert len(reason) == MESSAGE_LIMIT and reason.endswith("...")


@pytest.mark.parametrize("text", ["", " ", "\t"])
def test_an_empty_dataset_is_refused_by_name(text: str) -> None:
    """For cli.py to check on the text as typed: ``Path('')`` reads as the current folder."""
    from fedplug.data.sources import DataError, dataset_problem, load

    assert dataset_problem(text) == (
        "--dataset is empty: give embedded, a .parquet or .csv file, a dataset folder or a Hugging Face id"
    )
    with pytest.raises(DataError, match="--dataset is empty"):
        load(text, 0, "", "")
    assert dataset_problem("embedded") is None and dataset_problem("ylecun/mnist") is None
