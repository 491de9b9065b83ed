"""fedplug.run(): the Python API makes the CLI's checks, raises its one-line errors, and returns the run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedplug
from fedplug.api import RunResult, overrides_of
from fedplug.errors import ConfigError, FedplugError, RunError


@pytest.mark.fast
def test_keyword_arguments_become_run_config_keys() -> None:
    overrides = overrides_of("strategy.proximal-mu=0.1", {"batch_size": 16, "lr": 0.05}, {"rounds": 2, "seed": None})
    assert overrides == {"strategy.proximal-mu": 0.1, "batch-size": 16, "lr": 0.05, "num-server-rounds": 2}
    assert overrides_of({"keras.backend": "jax"}, {}, {}) == {"keras.backend": "jax"}
    with pytest.raises(ConfigError, match="must be a bool, int, float or string"):
        overrides_of(None, {"lr": [0.1]}, {})  # type: ignore[dict-item]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "nosuch"}, "unknown backend 'nosuch'"),
        ({"backend": "numpy", "lr": -1.0}, "run-config 'lr' must be a positive number"),
        ({"backend": "numpy", "learning_rate": 0.1}, "unknown run-config key 'learning-rate'"),
        ({"backend": "numpy", "strategy": "fedadam", "run_config": "strategy.beta-1=1"}, "'strategy.beta-1' must be"),
        ({"backend": "numpy", "client_cpus": 0.0}, "--client-cpus must be a positive number"),
        ({"backend": None}, "name a backend"),
        ({"backend": "numpy", "superlink": "nocolon"}, "is not HOST:PORT"),
        (  # a run on a SuperLink: the strategy's ranges are checked too, though its nodes are not known yet
            {
                "backend": "numpy",
                "strategy": "fedadam",
                "superlink": "127.0.0.1:9",
                "insecure": True,
                "run_config": "strategy.beta-1=1.0",
            },
            "'strategy.beta-1' must be in [0, 1)",
        ),
    ],
)
def test_mistakes_raise_one_line_errors_before_anything_starts(
    kwargs: dict[str, object], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FedplugError) as caught:
        fedplug.api.run(**kwargs, quiet=True)  # type: ignore[arg-type]
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
    assert list(tmp_path.iterdir()) == [], "a refused run created files"


@pytest.mark.fast
def test_a_resumed_run_refuses_a_changed_experiment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'lr' would change the experiment"):
        fedplug.api.run(resume=tmp_path, lr=0.5, quiet=True)
    with pytest.raises(ConfigError, match="is not a fedplug run folder"):
        fedplug.api.run(resume=tmp_path, rounds=4, quiet=True)


def test_the_documented_example_runs_and_returns_the_rounds_the_results_folder_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/api.md's example, as written: its result is the results folder's content."""
    text = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, RunResult) and result.status == "finished"
    out = tmp_path / "fedplug-runs" / "api-example"
    assert Path(result.out).resolve() == out.resolve()
    assert result.rounds == json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert result.config["hidden-dims"] == "16" and result.config["strategy.fraction-evaluate"] == 1.0
    assert result.accuracy == result.rounds[-1]["centralized-accuracy"] and result.accuracy is not None
    assert [r for r, _ in namespace["losses"]] == [1, 2]  # type: ignore[attr-defined]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"

    diverged = tmp_path / "diverged"  # a run that starts and cannot finish raises RunError; its folder keeps it all
    with pytest.raises(RunError, match="training diverged") as caught:
        fedplug.api.run("numpy", rounds=2, nodes=2, out=diverged, quiet=True, hidden_dims="16", lr=1e30)
    assert caught.value.exit_code == 1 and caught.value.out == diverged
    assert (diverged / "metrics.json").is_file()


@pytest.mark.fast
def test_check_makes_every_check_and_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = fedplug.api.run("numpy", rounds=4, nodes=3, lr=0.05, check=True, quiet=True)
    assert result.status == "checked" and result.rounds == []
    assert result.config["num-server-rounds"] == 4 and result.config["lr"] == 0.05  # the resolved run config
    assert list(tmp_path.iterdir()) == [], "--check wrote something"
    with pytest.raises(ConfigError, match="'lr' must be a positive number"):
        fedplug.api.run("numpy", lr=0.0, check=True, quiet=True)

    from fedplug.testing.runs import cli

    done = cli("run", "numpy", "--nodes", "3", "--check", env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 0 and "every check passed; nothing was started or written" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_a_preset_is_applied_over_the_defaults_and_under_the_users_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedplug import plugins
    from fedplug.numpy_backend import NumpyBackend

    class Shipped(NumpyBackend):
        name = "shipped"
        description = "stand-in that ships a preset"
        presets = {"quickstart": {"num-server-rounds": 7, "lr": 0.01}}  # noqa: RUF012

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="backend 'numpy' has no preset 'quickstart'; it ships none"):
        fedplug.api.run("numpy", preset="quickstart", check=True, quiet=True)
    found = plugins.Registry()
    found.backends["shipped"] = plugins.Registered(Shipped(), "test", "test", "0")
    monkeypatch.setattr(plugins, "get_registry", lambda: found)
    monkeypatch.setattr("fedplug.availability.get_registry", lambda: found)
    config = fedplug.api.run("shipped", preset="quickstart", check=True, quiet=True).config
    assert (config["num-server-rounds"], config["lr"]) == (7, 0.01)
    config = fedplug.api.run("shipped", preset="quickstart", lr=0.2, check=True, quiet=True).config
    assert (config["num-server-rounds"], config["lr"]) == (7, 0.2)
    with pytest.raises(ConfigError, match="backend 'shipped' has no preset 'fast'; its presets: quickstart"):
        fedplug.api.run("shipped", preset="fast", check=True, quiet=True)
