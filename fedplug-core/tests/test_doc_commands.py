"""The shell commands of the README and of docs/*.md run, as written, so that they cannot drift.

Sybil (https://sybil.readthedocs.io) reads every ```bash block of the pages; each is one of:

- runnable: every command is a ``fedplug`` command. ``fedplug run`` lines run with ``--check``
  (every check of the run and the resolved run config; nothing started or written); a block
  after ``<!-- run: FLAGS -->`` runs for real, with FLAGS (small settings) appended, and its
  output must have the shape of the ```text block that follows it in the page; every other
  ``fedplug`` command runs as written. Each runs in a fresh temporary folder, which holds the
  files the pages name (``my-digits.parquet``, ``cifar-like.parquet``, ``my_nets.py`` written
  from docs/custom-models.md's PyTorch block, and ``fedplug-runs/20261202-101500-numpy``,
  the folder of the real run above). A command that is written twice runs once.
- not runnable here: the block follows ``<!-- not-run: REASON -->`` (a second machine, the
  package index, the whole suite, a benchmark), and the reason must be given.

The model factories of docs/custom-models.md (```python blocks, one per framework) are each
written to ``my_nets.py`` and checked by ``fedplug run BACKEND --model my_nets:Cnn --check``,
which builds the model and runs a batch through it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
NOT_RUN = re.compile(r"<!-- not-run:(?P<reason>[^>]*)-->\s*$")
REAL_RUN = re.compile(r"<!-- run:(?P<flags>[^>]*)-->\s*$")
RESUMED = "fedplug-runs/20261202-101500-numpy"
"""The run folder the pages resume: the test gives the real run's folder this name."""
SERVING = ("superlink", "supernode")
"""Commands that serve in the foreground until Ctrl-C: never runnable here."""
TIMEOUT = 300


@dataclass
class Block:
    example: Example
    page: str
    mark: str  # "check", "real" or "not-run"
    argument: str  # the reason of not-run, the flags of real

    @property
    def id(self) -> str:
        return f"{self.page}:{self.example.line}"

    def commands(self) -> list[list[str]]:
        return commands(str(self.example.parsed))


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block, as words: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def blocks() -> list[Block]:
    sybil = Sybil(parsers=[CodeBlockParser(language="bash", evaluator=evaluate)])
    found = []
    for path in PAGES:
        document = sybil.parse(path)
        for example in document.examples():
            before = document.text[: example.start].rstrip("\n").rsplit("\n", 1)[-1]
            page = str(path.relative_to(ROOT))
            if match := NOT_RUN.search(before):
                found.append(Block(example, page, "not-run", match.group("reason").strip()))
            elif match := REAL_RUN.search(before):
                found.append(Block(example, page, "real", match.group("flags").strip()))
            else:
                found.append(Block(example, page, "check", ""))
    return found


# -- the folder the commands run in -------------------------------------------------------------


def _digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        return npz["train_images"][:count], npz["train_labels"][:count]


def _write_files(folder: Path) -> None:
    import datasets

    images, labels = _digits(600)
    features = datasets.Features(
        {"img": datasets.Array2D((28, 28), "uint8"), "digit": datasets.ClassLabel(num_classes=10)}
    )
    datasets.Dataset.from_dict({"img": images, "digit": labels}, features=features).to_parquet(
        folder / "my-digits.parquet"
    )
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Array3D((32, 32, 3), "uint8"), "label": datasets.ClassLabel(num_classes=10)}
    )
    colour = {"image": rng.integers(0, 255, (200, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, 200)}
    datasets.Dataset.from_dict(colour, features=features).to_parquet(folder / "cifar-like.parquet")
    custom = (ROOT / "docs" / "custom-models.md").read_text(encoding="utf-8")
    torch_block = next(
        block for block in re.findall(r"```python\n(.*?)```", custom, re.DOTALL) if "my_nets.py" in block
    )
    (folder / "my_nets.py").write_text(torch_block, encoding="utf-8")


def run(words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert words[0] == "fedplug", f"`{shlex.join(words)}` is not a fedplug command"
    return subprocess.run(
        [FEDPLUG, *words[1:]], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=os.environ
    )


def shape(line: str) -> str:
    """A printed line without its numbers and paths: what must not drift."""
    line = re.sub(r"^results: \S+", "results: PATH", line.strip())
    return re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?", "N", line))


def shown_output(block: Block) -> str:
    """The ```text block that follows ``block`` in its page (before any other code block)."""
    text = block.example.document.text[block.example.end :]
    match = re.match(r"(?:(?!```).)*?```text\n(.*?)```", text, re.DOTALL)
    assert match, f"{block.id}: a real run must be followed by the output it prints (a ```text block)"
    return match.group(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the pages name, and the results of the real runs (each checked here)."""
    folder = tmp_path_factory.mktemp("docs")
    _write_files(folder)
    for block in REAL:
        for words in block.commands():
            assert words[:2] == ["fedplug", "run"], f"{block.id}: only fedplug run lines can run for real"
            done = run([*words, *shlex.split(block.argument)], folder)
            assert done.returncode == 0, f"{block.id}: `{shlex.join(words)}` failed:\n{done.stdout}\n{done.stderr}"
            printed = {shape(line) for line in done.stdout.splitlines()}
            for line in shown_output(block).splitlines():
                assert shape(line) in printed, (
                    f"{block.id}: the page shows {line!r}; the command prints:\n{done.stdout}"
                )
    made = sorted((folder / "fedplug-runs").glob("*-numpy"))
    assert len(made) == 1, f"the real runs should leave one numpy run folder to resume, found {made}"
    made[0].rename(folder / RESUMED)
    return folder


@pytest.fixture
def workdir(files: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh folder holding the shared files (as links), so that no command sees another's output."""
    for item in files.iterdir():
        (tmp_path / item.name).symlink_to(item)
    yield tmp_path


# -- the tests ----------------------------------------------------------------------------------

DONE: dict[str, subprocess.CompletedProcess[str]] = {}
"""Commands already run, by their text: the README and docs/getting-started.md share some."""


def evaluate(example: Example) -> None:
    """Sybil's evaluator of a runnable block: every command, in the folder ``example.namespace['cwd']``."""
    cwd: Path = example.namespace["cwd"]
    for words in commands(str(example.parsed)):
        assert words[0] == "fedplug", (
            f"`{shlex.join(words)}` is not a fedplug command: if it cannot run here, mark its block "
            "<!-- not-run: REASON -->"
        )
        assert words[1] not in SERVING, (
            f"`{shlex.join(words)}` serves until Ctrl-C: mark its block <!-- not-run: REASON -->"
        )
        if words[1] == "run" and "--check" not in words:
            words = [*words, "--check"]
        key = shlex.join(words)
        if key not in DONE:
            DONE[key] = run(words, cwd)
        done = DONE[key]
        assert done.returncode == 0, f"`{key}` exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        if words[1] == "run":
            assert "every check passed" in done.stdout, done.stdout


BLOCKS = blocks()
RUNNABLE = [block for block in BLOCKS if block.mark == "check"]
REAL = [block for block in BLOCKS if block.mark == "real"]


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_documented_commands_run(block: Block, workdir: Path) -> None:
    block.example.namespace["cwd"] = workdir
    block.example.evaluate()


def test_real_runs_print_what_the_pages_show(files: Path) -> None:
    """The fixture ran them and compared their output; here: there are some, and they left their folder."""
    assert REAL, "no <!-- run: FLAGS --> block: the README's run that learns should run for real"
    assert (files / RESUMED / "metrics.json").is_file()


def test_every_block_is_run_or_says_why_not() -> None:
    assert RUNNABLE and len(BLOCKS) >= 20, f"found only {len(BLOCKS)} bash blocks: did the parser change?"
    for block in BLOCKS:
        if block.mark == "not-run":
            assert len(block.argument) >= 10, f"{block.id}: <!-- not-run: REASON --> needs a reason"
        else:
            for words in block.commands():
                assert words[0] == "fedplug", (
                    f"{block.id}: `{shlex.join(words)}` cannot run here; mark the block <!-- not-run: REASON -->"
                )


# -- the custom models of docs/custom-models.md -------------------------------------------------


def build_custom_model(example: Example) -> None:
    """Sybil's evaluator of a model block: as ``my_nets.py``, ``--check`` builds it and runs a batch through it."""
    source = str(example.parsed)
    framework = re.match(r"# (\w+)", source)
    assert framework, "a custom-model block starts with a comment naming its framework"
    backend = "torch" if framework.group(1) == "my_nets" else framework.group(1)
    cwd: Path = example.namespace["cwd"]
    (cwd / "my_nets.py").write_text(source, encoding="utf-8")
    done = run(["fedplug", "run", backend, "--model", "my_nets:Cnn", "--check"], cwd)
    assert done.returncode == 0, f"the {backend} model of docs/custom-models.md:{example.line}:\n{done.stderr}"


MODELS = list(
    Sybil(parsers=[CodeBlockParser(language="python", evaluator=build_custom_model)])
    .parse(ROOT / "docs" / "custom-models.md")
    .examples()
)


@pytest.mark.parametrize("example", MODELS, ids=lambda example: f"docs/custom-models.md:{example.line}")
def test_the_custom_model_examples_build_and_give_one_logit_per_class(example: Example, tmp_path: Path) -> None:
    example.namespace["cwd"] = tmp_path
    example.evaluate()


def test_every_framework_has_a_custom_model_example() -> None:
    assert {re.match(r"# (\w+)", str(example.parsed)).group(1) for example in MODELS} == {  # type: ignore[union-attr]
        "my_nets",
        "keras",
        "jax",
        "mlx",
    }


def test_the_pages_name_the_resumed_folder() -> None:
    """The resume commands name the folder the real run is renamed to."""
    assert any(RESUMED in str(block.example.parsed) for block in RUNNABLE)
