"""Canonical weights <-> Flower's ArrayRecord, keeping names and order."""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import Array, ArrayRecord

from fedplug.backend import Weights


def to_record(weights: Weights) -> ArrayRecord:
    """Canonical weights -> ArrayRecord."""
    return ArrayRecord(OrderedDict((name, Array(array)) for name, array in weights.items()))


def from_record(record: ArrayRecord) -> Weights:
    """ArrayRecord -> canonical weights (fresh numpy arrays)."""
    return {name: array.numpy() for name, array in record.items()}
