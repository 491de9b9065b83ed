"""Checks on every node reply before a strategy sees it, and server-side norm bounding.

A node is somebody else's machine: a bug, a bad GPU, a corrupted partition or a
malicious participant must cost one reply, not the global model. Each check returns
the reason a reply is refused (one short line) or ``None`` when it is fine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedplug.backend import Weights

NUM_EXAMPLES = "num-examples"


def check_weights(weights: Weights, reference: Weights) -> str | None:
    """Same names in the same order, same shapes and dtypes as ``reference``, all values finite."""
    if list(weights) != list(reference):
        missing = [name for name in reference if name not in weights]
        extra = [name for name in weights if name not in reference]
        if missing or extra:
            return f"wrong weight names (missing {missing[:3]}, unexpected {extra[:3]})"
        return "weights in the wrong order"
    for name, array in weights.items():
        expected = reference[name]
        if array.shape != expected.shape:
            return f"wrong shape of {name}: {array.shape}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return f"wrong dtype of {name}: {array.dtype}, expected {expected.dtype}"
        if not np.isfinite(array).all():
            return "non-finite weights"
    return None


def check_metrics(metrics: Mapping[str, object], max_examples: int | None) -> str | None:
    """Finite numeric metrics and a ``num-examples`` that is a positive int the node could have."""
    count = metrics.get(NUM_EXAMPLES)
    if isinstance(count, bool) or not isinstance(count, int | float) or count != int(count) or count < 1:
        return f"'{NUM_EXAMPLES}' must be a positive integer, got {count!r}"
    if max_examples is not None and count > max_examples:
        return f"claims {int(count)} examples but holds {max_examples}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
            return f"non-finite metric '{key}'"
    return None


def update_norm(weights: Weights, reference: Weights) -> float:
    """L2 norm of the update ``weights - reference`` over all arrays (float64)."""
    return math.sqrt(sum(float(np.sum(np.square(weights[k].astype(np.float64) - reference[k]))) for k in reference))


def clip_update(weights: Weights, reference: Weights, max_norm: float) -> Weights:
    """Scale the update ``weights - reference`` down to L2 norm ``max_norm`` if it is larger."""
    norm = update_norm(weights, reference)
    if norm <= max_norm:
        return weights
    scale = max_norm / norm
    return {k: (reference[k] + (weights[k] - reference[k]) * scale).astype(reference[k].dtype) for k in reference}


def all_finite(weights: Weights) -> bool:
    return all(bool(np.isfinite(array).all()) for array in weights.values())
