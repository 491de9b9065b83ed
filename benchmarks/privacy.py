"""The per-round cost of privacy mechanisms at 10 and 100 nodes: the server's aggregation, and each node's step.

    python benchmarks/privacy.py                     # every mechanism, 10 and 100 nodes
    python benchmarks/privacy.py --nodes 10 --repeat 3

What a mechanism adds to a round, measured on its own (no simulation: Ray's and the nodes'
training time would hide it): the server's ``aggregate_train`` over N replies of the numpy
backend's MLP (784-128-10, 101,770 weights) with the mechanism against plain FedAvg, and what a
node's ClientApp step adds (a mod's clipping and noise), with the exact objects a fedplug run builds
(``fedplug.strategies.make_strategy``, ``fedplug.dp.client_mod``).

**Adding a mechanism** (SecAgg+, ...): write a function ``(nodes) -> Case`` and add it to
``MECHANISMS``; a ``Case`` says how to build the server's strategy and what a node's step adds.

Results go to ``benchmarks/results/privacy.json`` with a description of the machine; a table is printed.
This is not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedplug.config import CORE_DEFAULTS
from fedplug.flower_adapter import message_for_client_app
from fedplug.strategies import make_strategy

RESULTS = Path(__file__).parent / "results"
SHAPES = {"layers.0.weight": (128, 784), "layers.0.bias": (128,), "layers.1.weight": (10, 128), "layers.1.bias": (10,)}
"""The numpy backend's default MLP."""


@dataclass
class Case:
    """One mechanism at one node count: its run config over the defaults, and a node's extra step (or None)."""

    config: dict[str, Any]
    node_step: Callable[[Any, Any, Callable[[Any, Any], Any]], Any] | None = None


def dp_case(mode: str) -> Callable[[int], Case]:
    def make(nodes: int) -> Case:
        from fedplug import dp

        config = {"dp": mode, "dp.noise-multiplier": 0.5 if "adaptive" not in mode else 0.3, "dp.clipping-norm": 1.0}
        step = dp.client_mod if mode.startswith("client-") or mode == "local" else None
        return Case(config, step)

    return make


MECHANISMS: dict[str, Callable[[int], Case]] = {
    "none": lambda nodes: Case({}),
    **{f"dp={mode}": dp_case(mode) for mode in ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")},
    "dp=local": dp_case("local"),
}
"""Every mechanism measured; ``none`` is plain FedAvg, the reference."""


def weights(rng: np.random.Generator, scale: float = 0.05) -> dict[str, np.ndarray]:
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(array) for name, array in values.items()})


def replies(global_model: dict[str, np.ndarray], nodes: int, rng: np.random.Generator, norm_bit: bool) -> list[Any]:
    out = []
    for node in range(nodes):
        update = weights(rng, 0.01)
        metrics: dict[str, Any] = {"num-examples": 1200, "loss": 1.0}
        if norm_bit:
            metrics["norm_bit"] = int(node % 2)
        content = RecordDict(
            {
                "arrays": record({k: global_model[k] + update[k] for k in SHAPES}),
                "metrics": MetricRecord(metrics),
            }
        )
        out.append(
            message_for_client_app(
                content,
                message_type="train",
                run_id=1,
                message_id=f"r{node}",
                dst_node_id=0,
                src_node_id=node + 1,
                group_id="1",
            )
        )
    return out


def prime(strategy: Any, arrays: ArrayRecord) -> None:
    """What ``configure_train`` records of the round's global model (its Messages need a running ServerApp)."""
    wrapper = getattr(strategy, "wrapper", None)  # fedplug.dp.DpStrategy
    if wrapper is None:
        return
    if hasattr(wrapper, "current_arrays"):  # server-side clipping: the updates are taken against it
        wrapper.current_arrays = arrays
    wrapper.strategy.current = arrays.to_numpy_ndarrays()  # fedplug.dp.FixedDenominator


def server_seconds(case: Case, nodes: int, repeat: int) -> float:
    """The median time of one round's configure_train + aggregate_train on the server."""
    config = {**CORE_DEFAULTS, "num-supernodes": nodes, **case.config}
    rng = np.random.default_rng(0)
    times = []
    for server_round in range(1, repeat + 1):
        strategy = make_strategy(config)
        global_model = weights(rng)
        prime(strategy, record(global_model))
        received = replies(global_model, nodes, rng, norm_bit="client-adaptive" in str(config.get("dp")))
        started = time.perf_counter()
        aggregated, _ = strategy.aggregate_train(server_round, received)
        times.append(time.perf_counter() - started)
        assert aggregated is not None
    return statistics.median(times)


def node_seconds(case: Case, repeat: int) -> float:
    """The median time a node's extra step adds to its ClientApp call (0 without one)."""
    if case.node_step is None:
        return 0.0
    config = {**CORE_DEFAULTS, **case.config}
    rng = np.random.default_rng(1)
    global_model = weights(rng)
    times = []
    for server_round in range(1, repeat + 1):
        content = RecordDict(
            {
                "arrays": record(global_model),
                "config": ConfigRecord({"server-round": server_round, "clipping_norm": 1.0}),
            }
        )
        message = message_for_client_app(
            content, message_type="train", run_id=1, message_id="m", dst_node_id=1, group_id=str(server_round)
        )
        trained = replies(global_model, 1, rng, norm_bit=False)[0].content

        def train(msg: Any, context: Any, trained: RecordDict = trained) -> Any:
            from flwr.app import Message

            return Message(content=trained, reply_to=msg)

        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=config)
        started = time.perf_counter()
        train(message, context)  # the node's reply without the step: subtracted
        base = time.perf_counter() - started
        started = time.perf_counter()
        case.node_step(message, context, train)
        times.append(max(time.perf_counter() - started - base, 0.0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(MECHANISMS), help="these mechanisms only")
    options = parser.parse_args()
    rows = []
    for name in options.only or MECHANISMS:
        for nodes in options.nodes:
            case = MECHANISMS[name](nodes)
            rows.append(
                {
                    "mechanism": name,
                    "nodes": nodes,
                    "server-aggregate-seconds": round(server_seconds(case, nodes, options.repeat), 4),
                    "node-step-seconds": round(node_seconds(case, options.repeat), 4),
                }
            )
    reference = {row["nodes"]: row["server-aggregate-seconds"] for row in rows if row["mechanism"] == "none"}
    print(f"{'mechanism':<22} {'nodes':>6} {'server s':>10} {'added s':>10} {'node s':>10}")
    for row in rows:
        added = row["server-aggregate-seconds"] - reference.get(row["nodes"], 0.0)
        row["server-added-seconds"] = round(added, 4)
        print(
            f"{row['mechanism']:<22} {row['nodes']:>6} {row['server-aggregate-seconds']:>10.4f} "
            f"{added:>10.4f} {row['node-step-seconds']:>10.4f}"
        )
    RESULTS.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.machine()}
    (RESULTS / "privacy.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
