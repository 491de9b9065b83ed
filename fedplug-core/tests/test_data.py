"""The data layer: embedded MNIST, flwr-datasets partitioners, local files and hub-style folders."""

from __future__ import annotations

import numpy as np
import pytest

from fedplug.config import resolve
from fedplug.data import DataError, data_spec, held_out, load_centralized, load_partition
from fedplug.numpy_backend import NumpyBackend
from fedplug.testing.runs import fedplug

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()


def config(**overrides):
    return resolve(BACKEND, overrides)


def labels_of(cfg, nodes):
    return [load_partition(cfg, i, nodes).y_train for i in range(nodes)]


def test_embedded_dataset_is_real_mnist_split_80_20() -> None:
    cfg = config()
    parts = [load_partition(cfg, i, 4) for i in range(4)]
    assert sum(len(p.y_train) + len(p.y_test) for p in parts) == 12_000
    for part in parts:
        assert part.x_train.dtype == np.float32 and part.x_train.shape[1:] == (1, 28, 28)
        assert part.x_train.min() >= 0.0 and part.x_train.max() <= 1.0
        assert len(part.y_test) == pytest.approx(0.2 * (len(part.y_train) + len(part.y_test)), abs=1)
        assert part.y_train.dtype == np.int64
    assert data_spec(cfg).input_shape == (1, 28, 28) and data_spec(cfg).num_classes == 10
    x_central, y_central = load_centralized(cfg)
    assert x_central.shape == (3_000, 1, 28, 28) and set(np.unique(y_central)) == set(range(10))


def test_partitions_are_cached_per_process() -> None:
    assert load_partition(config(), 1, 4) is load_partition(config(), 1, 4)


def test_iid_partitions_follow_the_seed() -> None:
    a, b = load_partition(config(seed=1), 0, 4), load_partition(config(seed=2), 0, 4)
    assert not np.array_equal(a.y_train[:50], b.y_train[:50])
    counts = np.bincount(a.y_train, minlength=10) / len(a.y_train)
    assert counts.max() < 0.15  # iid: no class dominates


def test_dirichlet_is_skewed() -> None:
    skews = [
        np.bincount(y, minlength=10).max() / len(y)
        for y in labels_of(config(partitioner="dirichlet", **{"partitioner.alpha": 0.1}), 5)
    ]
    assert max(skews) > 0.4


def test_pathological_gives_two_classes_per_node() -> None:
    for y in labels_of(config(partitioner="pathological"), 5):
        assert len(np.unique(y)) <= 2


def test_shard_partitioner_with_parameters() -> None:
    cfg = config(partitioner="shard", **{"partitioner.num-shards-per-partition": 3})
    for i in range(4):
        part = load_partition(cfg, i, 4)
        # 12 label-sorted shards of 1,000 digits: 3 per node, each spanning one or two classes
        assert len(part.y_train) + len(part.y_test) == 3_000
        assert len(np.unique(np.concatenate([part.y_train, part.y_test]))) <= 6


def _mnist_like(n: int = 60):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)


def test_local_parquet_with_colour_images(tmp_path) -> None:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    datasets.Dataset.from_dict({"img": images, "label": list(rng.integers(0, 4, 40))}, features=features).to_parquet(
        tmp_path / "colour.parquet"
    )
    cfg = config(dataset=str(tmp_path / "colour.parquet"))
    spec = data_spec(cfg)
    assert spec.input_shape == (3, 32, 32) and spec.num_classes == 4
    part = load_partition(cfg, 0, 2)
    assert part.x_train.shape[1:] == (3, 32, 32) and part.x_train.max() <= 1.0
    assert load_centralized(cfg) is None  # one file, no held-out split
    assert not held_out(cfg)


def test_local_csv_of_pixel_columns(tmp_path) -> None:
    images, labels = _mnist_like()
    header = "label," + ",".join(f"pixel{i}" for i in range(64))
    rows = [f"{label}," + ",".join(map(str, image.ravel())) for image, label in zip(images, labels)]
    (tmp_path / "digits.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    cfg = config(dataset=str(tmp_path / "digits.csv"))
    assert data_spec(cfg).input_shape == (1, 8, 8) and data_spec(cfg).num_classes == 3
    part = load_partition(cfg, 1, 2)
    assert len(part.y_train) + len(part.y_test) == 30


def test_hub_style_dataset_folder_with_named_columns(tmp_path) -> None:
    """A folder laid out like a hub dataset repo goes through the same FederatedDataset call as a hub id."""
    import datasets

    images, labels = _mnist_like()
    features = datasets.Features({"pixels": datasets.Array2D((8, 8), "uint8"), "digit_class": datasets.Value("int64")})
    (tmp_path / "data").mkdir()
    for split, rows in (("train", slice(0, 40)), ("test", slice(40, 60))):
        datasets.Dataset.from_dict({"pixels": images[rows], "digit_class": labels[rows]}, features=features).to_parquet(
            tmp_path / "data" / f"{split}-00000-of-00001.parquet"
        )
    with pytest.raises(DataError, match="cannot tell the image column"):
        data_spec(config(dataset=str(tmp_path), **{"label-column": "digit_class"}))
    cfg = config(dataset=str(tmp_path), **{"image-column": "pixels", "label-column": "digit_class"})
    assert data_spec(cfg).num_classes == 3
    x_central, _ = load_centralized(cfg)
    assert x_central.shape == (20, 1, 8, 8)
    assert held_out(cfg) and held_out(config())


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        data_spec(config(dataset=str(tmp_path / "nope.parquet")))


def test_hub_id_without_network_says_what_to_do() -> None:
    # a closed loopback port stands for "no network", whatever the machine has
    env = {"FEDPLUG_PLUGINS": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = fedplug("run", "numpy", "--dataset", "ylecun/mnist", env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "cannot load dataset 'ylecun/mnist'" in lines[0] and "--dataset embedded" in lines[0]


def test_a_whole_local_file_is_one_nodes_data(tmp_path) -> None:
    """Deployment Engine: a SuperNode's own data file, split train/test by test-fraction with the seed."""
    from fedplug.data import load_local

    images, labels = _mnist_like(50)
    header = "label," + ",".join(f"pixel{i}" for i in range(64))
    rows = [f"{label}," + ",".join(map(str, image.ravel())) for image, label in zip(images, labels)]
    (tmp_path / "mine.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    part = load_local(config(**{"test-fraction": 0.3}), tmp_path / "mine.csv")
    assert (len(part.y_train), len(part.y_test)) == (35, 15)
    assert part.x_train.shape == (35, 1, 8, 8) and part.x_train.dtype == np.float32 and part.x_train.max() <= 1.0
    both = np.concatenate([part.y_train, part.y_test])
    assert sorted(both.tolist()) == sorted(labels.tolist())
    again = load_local(config(**{"test-fraction": 0.3}), tmp_path / "mine.csv")
    assert np.array_equal(again.x_train, part.x_train)
    other = load_local(config(**{"test-fraction": 0.3, "seed": 1}), tmp_path / "mine.csv")
    assert not np.array_equal(other.y_train, part.y_train)


def test_too_many_nodes_for_the_data_are_refused_with_the_most_it_supports() -> None:
    from fedplug.data import check_data

    with pytest.raises(DataError, match="use --nodes 6000 or fewer"):
        check_data(config(**{"num-supernodes": 10_000}))
    with pytest.raises(DataError, match="use --nodes 4000 or fewer"):  # test-fraction 0.6: 3 examples a node
        check_data(config(**{"num-supernodes": 4_001, "test-fraction": 0.6}))
    assert check_data(config(**{"num-supernodes": 6_000})).num_classes == 10
    part = load_partition(config(), 5_999, 6_000)
    assert len(part.y_train) == len(part.y_test) == 1


def test_thousand_nodes_are_partitioned_once_and_quickly() -> None:
    import time

    cfg = config(**{"num-supernodes": 1_000})
    started = time.process_time()
    sizes = [len(load_partition(cfg, i, 1_000).y_train) for i in range(0, 1_000, 10)]
    assert sizes == [9] * 100  # 12 examples each: 9 train, 3 test
    assert time.process_time() - started < 2.0


def _csv(path, labels, side: int = 2) -> str:
    header = "label," + ",".join(f"p{i}" for i in range(side * side))
    rows = [f"{label}," + ",".join(str((i + j) % 256) for j in range(side * side)) for i, label in enumerate(labels)]
    text = header + "\n" + "\n".join(rows) + "\n"
    if str(path).endswith(".gz"):
        import gzip

        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


def test_gzipped_csv_is_read_as_its_csv(tmp_path) -> None:
    labels = [i % 3 for i in range(20)]
    plain = data_spec(config(dataset=_csv(tmp_path / "digits.csv", labels)))
    zipped = config(dataset=_csv(tmp_path / "digits.csv.gz", labels))
    assert data_spec(zipped) == plain
    part = load_partition(zipped, 0, 2)
    assert len(part.y_train) + len(part.y_test) == 10


def test_classes_are_capped_where_labels_are_made(tmp_path) -> None:
    from fedplug.data.sources import MAX_CLASSES

    top = config(dataset=_csv(tmp_path / "top.csv", [0, 1, MAX_CLASSES - 1] * 4))
    assert data_spec(top).num_classes == MAX_CLASSES
    over = config(dataset=_csv(tmp_path / "over.csv", [0, 1, MAX_CLASSES] * 4))
    with pytest.raises(DataError, match=f"holds the label {MAX_CLASSES}, which would make {MAX_CLASSES + 1} classes"):
        data_spec(over)


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("ylecun/mnist", False),
        ("uoft-cs/cifar10", False),
        ("mnist", False),
        ("hf://datasets/ylecun/mnist", False),
        ("./digits", True),
        ("../data/x", True),
        ("/data/x", True),
        ("~/x", True),
        ("data/digits/train", True),
        ("my-digts.csv.gz", True),
        ("org/digits.parquet", True),
        ("digits.npz", True),
        ("notes.JSON", True),
    ],
)
def test_what_looks_like_a_local_path_never_goes_to_the_hub(name: str, local: bool) -> None:
    from fedplug.data.sources import looks_local

    assert looks_local(name) is local


def test_unreachable_hub_leaves_the_environment_as_it_was(monkeypatch) -> None:
    """The hub loads offline (from the local cache) when it cannot be reached; the run's other processes,
    which inherit this environment, must not be switched offline too."""
    import os

    import datasets.config
    import huggingface_hub.constants

    from fedplug.data.sources import load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed loopback port: no network
    before = dict(os.environ)
    flags = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with pytest.raises(DataError, match="cannot load dataset 'someone/no-such-digits'"):
        load("someone/no-such-digits", 0, "", "")  # datasets is imported already: its flags are switched, briefly
    assert dict(os.environ) == before
    assert flags == (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)


KILLED_CLI = r"""
import sys, time
from fedplug.config import resolve
from fedplug.data import check_data, share_run_data
from fedplug.numpy_backend import NumpyBackend

config = resolve(NumpyBackend(), {"dataset": sys.argv[1], "num-supernodes": 2})
check_data(config)
share_run_data(config, sys.argv[2])
print("shared", flush=True)
time.sleep(120)
"""


def test_a_killed_command_leaves_no_copy_of_the_data(tmp_path) -> None:
    """SIGKILL gives the command no chance to clean up: the shared copy of the dataset still goes."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from fedplug.data import SHARED

    dataset, out = _csv(tmp_path / "digits.csv", [i % 3 for i in range(20)]), tmp_path / "out"
    command = subprocess.Popen([sys.executable, "-c", KILLED_CLI, dataset, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert command.stdout is not None and command.stdout.readline() == "shared\n"
        assert (out / SHARED / "x_train.npy").is_file()
        watchers = psutil.Process(command.pid).children()
        command.send_signal(signal.SIGKILL)
        command.wait()
        deadline = time.monotonic() + 10
        while (out / SHARED).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (out / SHARED).exists(), "the shared data outlived the killed command"
        psutil.wait_procs(watchers, timeout=5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in watchers), "a watcher is left"
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


def test_data_shared_from_a_thread_outlives_the_thread(tmp_path) -> None:
    """Linux's parent-death signal comes when the starting thread ends: a thread's share must not vanish with it."""
    import threading
    import time

    from fedplug.data import SHARED, check_data, remove_run_data, share_run_data

    cfg = config(dataset=_csv(tmp_path / "digits.csv", [i % 3 for i in range(20)]), **{"num-supernodes": 2})
    check_data(cfg)
    thread = threading.Thread(target=share_run_data, args=(cfg, tmp_path / "out"))
    thread.start()
    thread.join()
    time.sleep(1.5)
    assert (tmp_path / "out" / SHARED / "meta.json").is_file()
    remove_run_data(tmp_path / "out")


def test_removing_the_run_data_stops_its_watcher(tmp_path) -> None:
    import psutil

    from fedplug.data import SHARED, check_data, remove_run_data, share_run_data

    cfg = config(dataset=_csv(tmp_path / "digits.csv", [i % 3 for i in range(20)]), **{"num-supernodes": 2})
    check_data(cfg)
    before = {p.pid for p in psutil.Process().children()}
    share_run_data(cfg, tmp_path / "out")
    (watcher,) = [p for p in psutil.Process().children() if p.pid not in before]
    assert (tmp_path / "out" / SHARED / "meta.json").is_file()
    remove_run_data(tmp_path / "out")
    assert not (tmp_path / "out" / SHARED).exists()
    assert not watcher.is_running()
    share_run_data(cfg, tmp_path / "kept", watched=False)  # for a caller that removes it itself
    assert {p.pid for p in psutil.Process().children()} <= before
    remove_run_data(tmp_path / "kept")
    assert not (tmp_path / "kept").joinpath(SHARED).exists()
