"""Per-round metrics to the trackers researchers already use: TensorBoard event files and a local MLflow run.

``track = "tensorboard"``, ``"mlflow"`` or both (``--track tensorboard,mlflow``) adds, inside
the results folder, next to ``metrics.json``:

- ``<out>/tensorboard/``: TensorBoard event files (written with tensorboardX, read by
  ``tensorboard --logdir <out>/tensorboard``): every round's numbers as scalars at
  step = round, the run config and how the run ended as text.
- ``<out>/mlflow/``: an MLflow tracking store, ``mlflow.db`` (SQLite, MLflow's own local
  store; its file store is retired) and ``artifacts/``: one run of experiment ``fedplug`` with
  the run config as parameters, every round's numbers as metrics at step = round, the final
  native model file as an artifact, and its status (``FINISHED``, ``FAILED``, ``KILLED``).

The ServerApp feeds them (:func:`track` in ``fedplug.apps.main``) from the ``fedplug.progress``
log that gets every finished round, so they work alike on the Simulation Engine and on a
SuperLink. The libraries are optional extras (``fedplug-core[tensorboard]``,
``fedplug-core[mlflow]``), imported only when a run tracks.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedplug.backend import Config
from fedplug.config import parse_track
from fedplug.errors import ConfigError

log = logging.getLogger("fedplug.tracking")

LIBRARIES = {"tensorboard": ("tensorboardX", "TensorBoard"), "mlflow": ("mlflow", "MLflow")}
"""Each tracker's import name and library; the extra of fedplug-core that installs it has the tracker's name."""
EXPERIMENT = "fedplug"
"""The MLflow experiment of a run's store."""


def missing_library(track: str) -> str | None:
    """What to install for ``track`` (the run-config value), or None when every library it needs is importable."""
    for name in parse_track(track):
        module, library = LIBRARIES[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module hidden by sys.modules[name] = None
            found = False
        if not found:
            return f"--track {name} needs {library}: pip install 'fedplug-core[{name}]'"
    return None


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one round's record (``metrics.json``), as tracker metrics named by their key.

    Numbers keep their key (``train-loss``, ``evaluate-failed``, ``centralized-accuracy``, ``seconds``);
    the per-backend node counts of a mixed federation become ``train-backends/<backend>``; the failed
    nodes are counted (``train-failed``, ``evaluate-failed``, and ``unusable-nodes`` when some were).
    Lists of partitions and failure reasons stay in ``metrics.json``; non-finite values are left out.
    """
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if key == "round":
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[key] = float(value)
        elif key in ("train-backends", "evaluate-backends") and isinstance(value, Mapping):
            metrics.update({f"{key}/{backend}": float(count) for backend, count in value.items()})
        elif key == "unusable-nodes" and isinstance(value, list):
            metrics[key] = float(len(value))
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


class Tracker:
    """One tracker: started with the run config, given every finished round, ended with the status and model."""

    name = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def start(self, config: Config) -> None:
        raise NotImplementedError

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def end(self, status: str, reason: str, model: Path | None) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``folder``, written with tensorboardX (no TensorFlow, no torch)."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.writer: Any = None

    def start(self, config: Config) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=5)
        rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(config.items()))
        self.writer.add_text("run-config", f"| key | value |\n|---|---|\n{rows}", global_step=0)
        self.writer.flush()

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a round is seconds to minutes: TensorBoard shows it as soon as it is done

    def end(self, status: str, reason: str, model: Path | None) -> None:
        text = status + (f": {reason}" if reason else "") + (f" (model: {model})" if model else "")
        self.writer.add_text("status", text)
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run in a local store in ``folder`` (``mlflow.db`` and ``artifacts/``), no server, offline."""

    name = "mlflow"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.client: Any = None
        self.run_id = ""

    @property
    def uri(self) -> str:
        return f"sqlite:///{(self.folder / 'mlflow.db').resolve()}"

    def start(self, config: Config) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                EXPERIMENT, artifact_location=(self.folder / "artifacts").resolve().as_uri()
            )
        else:
            experiment_id = experiment.experiment_id
        earlier = self.client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
        if earlier:  # a resumed run (--resume): its rounds go on in the same MLflow run
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        out = Path(str(config["out"])) if config.get("out") else self.folder.parent
        run = self.client.create_run(
            experiment_id,
            run_name=out.name,
            tags={"fedplug.backend": str(config["backend"]), "fedplug.out": str(out)},
        )
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in sorted(config.items())]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[first : first + 100])

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def end(self, status: str, reason: str, model: Path | None) -> None:
        if model is not None and model.exists():
            if model.is_dir():  # a native model that is a folder (e.g. a saved model)
                self.client.log_artifacts(self.run_id, str(model), artifact_path=model.name)
            else:
                self.client.log_artifact(self.run_id, str(model))
        self.client.set_tag(self.run_id, "fedplug.status", status)
        if reason:
            self.client.set_tag(self.run_id, "fedplug.reason", reason)
        mlflow_status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


def trackers_for(config: Config, out: Path) -> list[Tracker]:
    """The trackers the run config's ``track`` names, writing inside the results folder ``out``."""
    made: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}
    return [made[name](out / name) for name in parse_track(str(config.get("track", "")))]


class Tracking(logging.Handler):
    """Feeds the trackers from a ``fedplug.progress`` log: each finished round's record, as it is logged."""

    def __init__(self, trackers: list[Tracker]) -> None:
        super().__init__(level=logging.INFO)
        self.trackers = trackers
        self.model: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        round_record = getattr(record, "record", None)
        if not isinstance(round_record, Mapping) or "round" not in round_record:
            return
        metrics = round_metrics(round_record)
        for tracker in list(self.trackers):
            try:
                tracker.log_round(int(round_record["round"]), metrics)
            except Exception:  # the results folder keeps the round: a tracker's failure does not stop the run
                log.warning("tracker %s failed; it gets no more rounds", tracker.name, exc_info=True)
                self.trackers.remove(tracker)

    def finished(self, model: Path | None) -> None:
        """The run's final native model, logged as an artifact when the run ends."""
        self.model = model

    def end(self, status: str, reason: str = "") -> None:
        for tracker in self.trackers:
            try:
                tracker.end(status, reason, self.model)
            except Exception:
                log.warning("tracker %s failed to end its run", tracker.name, exc_info=True)


@contextmanager
def track(config: Config, out: Path, progress: logging.Logger) -> Iterator[Tracking]:
    """Track the run whose rounds are logged to ``progress``, into ``out``, for the duration of the block.

    The trackers start with the run config; the block's end ends them: ``finished`` with the
    model given to :meth:`Tracking.finished`, ``interrupted`` on an interrupt, ``failed`` on an
    error. A tracker's library that is missing is a :class:`~fedplug.errors.ConfigError`.
    """
    if problem := missing_library(str(config.get("track", ""))):
        raise ConfigError(problem)
    tracking = Tracking(trackers_for(config, out))
    if not tracking.trackers:
        yield tracking
        return
    for tracker in tracking.trackers:
        tracker.start(config)
    level = progress.level
    if not progress.isEnabledFor(logging.INFO):  # a ServerApp run without fedplug's CLI, e.g. by `flwr run`
        progress.setLevel(logging.INFO)
    progress.addHandler(tracking)
    try:
        yield tracking
    except BaseException as error:
        stopped = isinstance(error, KeyboardInterrupt | SystemExit)
        tracking.end("interrupted" if stopped else "failed", " ".join(str(error).split())[:240])
        raise
    else:
        tracking.end("finished")
    finally:
        progress.removeHandler(tracking)
        progress.setLevel(level)
