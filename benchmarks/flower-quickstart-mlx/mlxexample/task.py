"""mlxexample: A Flower / MLX app."""

from importlib.util import find_spec
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from flwr_datasets.partitioner import IidPartitioner

disable_progress_bar()


class MLP(nn.Module):
    """A simple MLP."""

    def __init__(self, num_layers: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        layer_sizes = [input_dim] + [hidden_dim] * num_layers + [output_dim]
        self.layers = [
            nn.Linear(idim, odim)
            for idim, odim in zip(layer_sizes[:-1], layer_sizes[1:])  # noqa: RUF007 (the tutorial's)
        ]

    def __call__(self, x):
        for l in self.layers[:-1]:  # noqa: E741 (the tutorial's name)
            x = mx.maximum(l(x), 0.0)
        return self.layers[-1](x)


def loss_fn(model, X, y):
    return mx.mean(nn.losses.cross_entropy(model(X), y))


def eval_fn(model, X, y):
    return mx.mean(mx.argmax(model(X), axis=1) == y)


def batch_iterate(batch_size, X, y):
    perm = mx.array(np.random.permutation(y.size))
    for s in range(0, y.size, batch_size):
        ids = perm[s : s + batch_size]
        yield X[ids], y[ids]


# THE ONE CHANGE from Flower's quickstart-mlx: the Hugging Face hub cannot be reached here, so instead of
# FederatedDataset(dataset="ylecun/mnist", partitioners={"train": IidPartitioner(...)}) the partitioner runs
# on the 12,000 training digits embedded in fedplug-core (what `fedplug run mlx` uses offline), shuffled
# with seed 42 as FederatedDataset shuffles (default shuffle=True, seed=42). Only the data file is read:
# fedplug is located, not imported. Everything from `load_partition` on is the tutorial's.
partitioner = None  # built once per process, as Flower's examples cache their FederatedDataset


def embedded_digits() -> Dataset:
    """fedplug-core's embedded training digits (uint8 28x28 images and labels), shuffled like FederatedDataset."""
    spec = find_spec("fedplug")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fedplug-core is not installed: its embedded digits are this app's data")
    with np.load(Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"].astype(np.int64)
    return Dataset.from_dict({"image": images, "label": labels}).shuffle(seed=42)


def load_data(partition_id, num_partitions):
    global partitioner
    if partitioner is None:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = embedded_digits()
    partition = partitioner.load_partition(partition_id)
    partition_splits = partition.train_test_split(test_size=0.2, seed=42)

    partition_splits["train"].set_format("numpy")
    partition_splits["test"].set_format("numpy")

    train_partition = partition_splits["train"].map(
        lambda img: {"img": img.reshape(-1, 28 * 28).squeeze().astype(np.float32) / 255.0},
        input_columns="image",
    )
    test_partition = partition_splits["test"].map(
        lambda img: {"img": img.reshape(-1, 28 * 28).squeeze().astype(np.float32) / 255.0},
        input_columns="image",
    )

    data = (
        np.array(train_partition["img"]),
        np.array(train_partition["label"], dtype=np.uint32),
        np.array(test_partition["img"]),
        np.array(test_partition["label"], dtype=np.uint32),
    )

    train_images, train_labels, test_images, test_labels = map(mx.array, data)
    return train_images, train_labels, test_images, test_labels


def get_params(model):
    layers = model.parameters()["layers"]
    return [np.array(val) for layer in layers for _, val in layer.items()]


def set_params(model, parameters):
    new_params = {}
    new_params["layers"] = [
        {"weight": mx.array(parameters[i]), "bias": mx.array(parameters[i + 1])} for i in range(0, len(parameters), 2)
    ]
    model.update(new_params)
