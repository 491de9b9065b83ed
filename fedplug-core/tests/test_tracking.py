"""--track: every round's metrics to TensorBoard event files and a local MLflow run, read back by their own readers."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from fedplug.config import CORE_DEFAULTS, parse_track
from fedplug.errors import ConfigError
from fedplug.testing.runs import cli
from fedplug.tracking import MlflowTracker, TensorBoardTracker, missing_library, round_metrics, track

CONFIG: dict[str, Any] = {**CORE_DEFAULTS, "num-server-rounds": 2, "lr": 0.05, "node-backends": "0:torch"}
ROUNDS: list[dict[str, Any]] = [  # the shape of metrics.json's records (fedplug.rounds.RoundRecord.to_json)
    {"round": 0, "evaluate-partitions": [0, 1], "evaluate-backends": {"numpy": 1, "torch": 1},
     "partition-backends": {"0": "torch", "1": "numpy"}, "evaluate-nodes": 2, "evaluate-failed": 0,
     "evaluate-failures": [], "evaluate-loss": 2.3, "evaluate-accuracy": 0.1, "centralized-loss": 2.31,
     "centralized-accuracy": 0.09, "seconds": 0.5},
    {"round": 1, "train-partitions": [0, 1], "train-backends": {"numpy": 1}, "train-nodes": 1, "train-failed": 1,
     "train-failures": [{"partition": 0, "reason": "train raised ValueError: boom"}], "train-loss": 1.5,
     "train-accuracy": float("nan"), "unusable-nodes": [{"node": 7, "reason": "no reply"}], "seconds": 1.25},
    {"round": 2, "train-backends": {"numpy": 1, "torch": 1}, "train-nodes": 2, "train-failed": 0, "train-loss": 0.9,
     "centralized-accuracy": 0.8, "seconds": 1.0},
]  # fmt: skip


def _progress() -> logging.Logger:
    logger = logging.getLogger("fedplug.test-tracking")
    logger.propagate = False
    return logger


def _fake_run(out: Path, track_: str, model: Path | None = None, fail_after: int | None = None) -> None:
    """What the ServerApp does: track, log each round to the progress log, end with the model or an error."""
    progress = _progress()
    with track({**CONFIG, "track": track_, "out": str(out)}, out, progress) as tracking:
        for record in ROUNDS:
            if fail_after is not None and record["round"] > fail_after:
                raise RuntimeError("no usable training result in 3 rounds in a row")
            progress.info("round %s finished", record["round"], extra={"record": record})
        tracking.finished(model)
    assert tracking not in progress.handlers


def _events(folder: Path) -> Any:
    """TensorBoard's own reader of event files, on its TensorFlow stub (as without TensorFlow: the fast lane)."""
    # TensorBoard's switch to its stub (its `no_tensorflow` build target) is the module tensorboard.compat.notf
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = _events(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _texts(folder: Path) -> dict[str, str]:
    events = _events(folder)
    events.Reload()
    return {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}


def _mlflow_run(folder: Path) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedplug")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one fedplug run is one MLflow run"
    return client, runs[0]


@pytest.mark.fast
def test_round_metrics_are_the_numbers_with_per_backend_counts_and_failures() -> None:
    metrics = round_metrics(ROUNDS[1])
    assert metrics == {
        "train-backends/numpy": 1.0,
        "train-nodes": 1.0,
        "train-failed": 1.0,
        "train-loss": 1.5,
        "unusable-nodes": 1.0,
        "seconds": 1.25,
    }  # train-accuracy is NaN: left out; lists of partitions and reasons stay in metrics.json


@pytest.mark.fast
def test_tensorboard_events_hold_every_round_config_and_status(tmp_path: Path) -> None:
    model = tmp_path / "model.npz"
    model.write_bytes(b"weights")
    _fake_run(tmp_path, "tensorboard", model)
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["centralized-accuracy"] == [(0, pytest.approx(0.09)), (2, pytest.approx(0.8))]
    assert scalars["train-loss"] == [(1, 1.5), (2, pytest.approx(0.9))]
    assert scalars["train-backends/torch"] == [(2, 1.0)] and scalars["evaluate-backends/torch"] == [(0, 1.0)]
    assert scalars["train-failed"] == [(1, 1.0), (2, 0.0)] and scalars["unusable-nodes"] == [(1, 1.0)]
    assert "train-accuracy" not in scalars and "round" not in scalars
    texts = _texts(tmp_path / "tensorboard")
    assert "| lr | 0.05 |" in texts["run-config/text_summary"]
    assert texts["status/text_summary"] == f"finished (model: {model})"
    assert not (tmp_path / "mlflow").exists()


@pytest.mark.fast
def test_mlflow_run_has_params_metrics_per_round_the_model_and_its_status(tmp_path: Path) -> None:
    model = tmp_path / "model.npz"
    model.write_bytes(b"weights")
    _fake_run(tmp_path, "mlflow", model)
    client, run = _mlflow_run(tmp_path / "mlflow")
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params["lr"] == "0.05" and run.data.params["num-server-rounds"] == "2"
    assert run.data.params["node-backends"] == "0:torch" and run.data.params["track"] == "mlflow"
    history = client.get_metric_history(run.info.run_id, "train-loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 0.9)]
    failed = client.get_metric_history(run.info.run_id, "train-failed")
    assert sorted((m.step, m.value) for m in failed) == [(1, 1.0), (2, 0.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "evaluate-backends/numpy")] == [0]
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["model.npz"]
    stored = Path(client.download_artifacts(run.info.run_id, "model.npz", str(tmp_path / "back")))
    assert stored.read_bytes() == b"weights"
    assert (tmp_path / "mlflow" / "artifacts").is_dir(), "the artifacts stay in the results folder"
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.fast
def test_a_failed_run_ends_failed_and_a_resumed_one_goes_on_in_the_same_mlflow_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _fake_run(tmp_path, "mlflow,tensorboard", fail_after=1)
    client, run = _mlflow_run(tmp_path / "mlflow")
    assert run.info.status == "FAILED" and run.data.tags["fedplug.reason"].startswith("no usable training result")
    assert client.list_artifacts(run.info.run_id) == []
    assert _texts(tmp_path / "tensorboard")["status/text_summary"].startswith("failed: no usable training result")
    # --resume: the ServerApp starts again in the same folder; its rounds go on in the same MLflow run
    tracker = MlflowTracker(tmp_path / "mlflow")
    tracker.start({**CONFIG, "out": str(tmp_path)})
    assert tracker.run_id == run.info.run_id
    tracker.log_round(2, round_metrics(ROUNDS[2]))
    tracker.end("finished", "", None)
    client, run = _mlflow_run(tmp_path / "mlflow")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train-loss")) == [1, 2]


@pytest.mark.fast
def test_a_broken_tracker_does_not_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: TensorBoardTracker, step: int, metrics: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_round", broken)
    _fake_run(tmp_path, "tensorboard,mlflow")  # the run goes on; MLflow still gets every round
    client, run = _mlflow_run(tmp_path / "mlflow")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "seconds")) == [0, 1, 2]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "names"),
    [("", ()), ("tensorboard", ("tensorboard",)), (" MLflow , tensorboard,mlflow", ("mlflow", "tensorboard"))],
)
def test_track_names_one_or_both_trackers(text: str, names: tuple[str, ...]) -> None:
    assert parse_track(text) == names


@pytest.mark.fast
def test_an_unknown_tracker_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    done = cli("run", "numpy", "--out", str(tmp_path / "out"), "--track", "wandb", env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "run-config 'track' names no tracker 'wandb': choose tensorboard, mlflow" in lines[0]
    with pytest.raises(ConfigError, match="no tracker 'tb'"):
        parse_track("mlflow,tb")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "module", "library"), [("mlflow", "mlflow", "MLflow"), ("tensorboard", "tensorboardX", "TensorBoard")]
)
def test_a_missing_library_is_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str, library: str
) -> None:
    assert missing_library(f"{name},tensorboard,mlflow") is None
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    done = cli("run", "numpy", "--out", str(tmp_path / "out"), "--track", name, env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"fedplug: error: --track {name} needs {library}: pip install 'fedplug-core[{name}]'"]
    assert not (tmp_path / "out").exists(), "nothing is written before the check"


def test_a_small_federation_reads_back_in_tensorboard_and_mlflow(tmp_path: Path) -> None:
    import fedplug

    out = tmp_path / "run"
    result = fedplug.run("numpy", rounds=2, nodes=2, track="tensorboard,mlflow", out=out, quiet=True, hidden_dims="16")
    assert result.status == "finished"
    scalars = _scalars(out / "tensorboard")
    accuracy = [(r["round"], r["centralized-accuracy"]) for r in result.rounds]
    assert [(step, pytest.approx(value)) for step, value in scalars["centralized-accuracy"]] == accuracy
    assert [step for step, _ in scalars["train-loss"]] == [1, 2]
    assert scalars["train-nodes"] == [(1, 2.0), (2, 2.0)] and scalars["train-failed"] == [(1, 0.0), (2, 0.0)]
    assert scalars["train-backends/numpy"] == [(1, 2.0), (2, 2.0)]
    client, run = _mlflow_run(out / "mlflow")
    assert run.info.status == "FINISHED" and run.data.params["num-supernodes"] == "2"
    assert run.data.params["hidden-dims"] == "16" and run.data.params["out"] == str(out.resolve())
    losses = client.get_metric_history(run.info.run_id, "evaluate-loss")
    assert sorted((m.step, m.value) for m in losses) == result.metric("evaluate-loss") and len(losses) >= 2
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["model.npz"]
    assert (out / "model.npz").read_bytes() == Path(
        client.download_artifacts(run.info.run_id, "model.npz", str(tmp_path / "back"))
    ).read_bytes()
