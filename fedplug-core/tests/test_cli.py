"""The fedplug command's user-facing behaviour: help, info, and one-line errors."""

from __future__ import annotations

import pytest

from fedplug.testing.runs import cli as fedplug

pytestmark = pytest.mark.fast

QUIET = {"FEDPLUG_PLUGINS": ""}


def test_help_lists_the_commands() -> None:
    done = fedplug("--help")
    assert done.returncode == 0
    for command in ("list", "info", "run", "new-backend"):
        assert command in done.stdout


def test_info_shows_models_and_defaults() -> None:
    done = fedplug("info", "numpy", env={**QUIET, "COLUMNS": "200"})
    assert done.returncode == 0
    assert "models: mlp, lenet" in done.stdout
    assert "num-server-rounds" in done.stdout and "hidden-dims" in done.stdout


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("tensorflw", "did you mean 'keras'? to add it: pip install fedplug-keras"),
        ("nunpy", "did you mean 'numpy'?"),
        ("sklearn", "to add it: pip install fedplug-sklearn"),
    ],
)
def test_unknown_backend_exits_2_with_one_line(name: str, hint: str) -> None:
    done = fedplug("run", name, env=QUIET)
    assert done.returncode == 2
    assert done.stderr.strip() == f"fedplug: error: unknown backend '{name}' (installed: numpy); {hint}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run-config", "lr=fast"], "run-config 'lr' must be float"),
        (["--run-config", "epochs=3"], "unknown run-config key 'epochs'"),
        (["--model", "resnet"], "backend 'numpy' has no model 'resnet'"),
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--partitioner", "dirichlet", "--run-config", "partitioner.beta=2"], "has no parameter 'beta'"),
        (["--rounds", "0"], "'num-server-rounds' must be at least 1"),
    ],
)
def test_bad_run_input_is_one_line_and_exit_2(tmp_path, args, message) -> None:
    done = fedplug("run", "numpy", "--out", str(tmp_path / "out"), *args, env=QUIET)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedplug: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists(), "nothing is written before the config is valid"


def test_typer_usage_errors_do_not_show_tracebacks() -> None:
    done = fedplug("run", "numpy", "--rounds", "many", env=QUIET)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_out_folder_of_an_earlier_run_is_not_overwritten(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    done = fedplug("run", "numpy", "--out", str(tmp_path), env=QUIET)
    assert done.returncode == 2 and "already holds a run" in done.stderr and "--resume" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
