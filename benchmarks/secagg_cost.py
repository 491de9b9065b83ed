"""Per-round cost of SecAgg+ (secagg=true) at 10 and 100 nodes, against the plain train step.

    python benchmarks/secagg_cost.py                      # 10 and 100 nodes; writes benchmarks/results/secagg.json
    python benchmarks/secagg_cost.py --nodes 10 --hidden-dims 32

One process, no Flower transport: the round's train step as ``fedplug.secagg.secure_train`` runs it,
over the in-process Grid of ``fedplug-core/tests/test_secagg.py`` that hands every message to
fedplug's real ClientApp (numpy backend, embedded digits), so the time is the nodes' training plus
the protocol's work on the nodes and the server, one node after another. ``plain`` is the same
nodes' ordinary train replies averaged (what FedAvg gets). The protocol's own cost per round is
``protocol-on-nodes`` (the four stages' work on all nodes together, training excluded: divide by the
cores for nodes that run in parallel; ``protocol-per-node`` is one node's share) plus
``protocol-on-server`` (the server's work: relaying shares, rebuilding secrets, removing masks).
Not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fedplug-core" / "tests"))


def measure(nodes: int, num_shares: int, hidden_dims: str) -> dict[str, float]:
    import test_secagg as kit  # the in-process Grid and helpers of the SecAgg+ tests

    from fedplug import flower_adapter, secagg
    from fedplug.config import resolve
    from fedplug.data import data_spec
    from fedplug.records import to_record

    kit.NODES = nodes
    config = resolve(
        kit.BACKEND,
        {"num-supernodes": nodes, "hidden-dims": hidden_dims, "secagg": True, "secagg.num-shares": num_shares},
    )
    model = kit.BACKEND.build_model("mlp", data_spec(config), config)
    arrays = to_record(kit.BACKEND.get_weights(model))
    ids = list(range(1, nodes + 1))
    examples = {node: kit._examples(config, node) for node in ids}
    kit._plain_fedavg(config, arrays, ids)  # warm-up: each node loads its data and model once
    started = time.process_time()
    kit._plain_fedavg(config, arrays, ids)
    plain = time.process_time() - started
    grid = kit.RecordingGrid(config)
    spent = {"nodes-protocol": 0.0, "nodes-all": 0.0}

    def timed(function: Any, key: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.process_time() - began

        return wrapper

    originals = {
        name: getattr(secagg, name) for name in ("client_setup", "client_share", "client_mask", "client_unmask")
    }
    for name, function in originals.items():  # the ClientApp calls them through the module
        setattr(secagg, name, timed(function, "nodes-protocol"))
    deliver = grid.send_and_receive
    grid.send_and_receive = timed(deliver, "nodes-all")  # type: ignore[method-assign]
    try:
        started = time.process_time()
        with flower_adapter.server_app_identity(run_id=1):
            outcome = secagg.secure_train(grid, kit._train_messages(arrays, ids), examples, config, 1, 600.0)
        secure = time.process_time() - started
    finally:
        for name, function in originals.items():
            setattr(secagg, name, function)
    assert outcome.aggregate is not None and not outcome.failures
    size = sum(int(array.numpy().size) for array in arrays.values())
    return {
        "nodes": nodes,
        "num-shares": num_shares or nodes,
        "weights": size,
        "plain-seconds": round(plain, 3),
        "secagg-seconds": round(secure, 3),
        "protocol-on-nodes-seconds": round(spent["nodes-protocol"], 3),
        "protocol-per-node-seconds": round(spent["nodes-protocol"] / nodes, 4),
        "protocol-on-server-seconds": round(secure - spent["nodes-all"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--hidden-dims", default="128")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "secagg.json"))
    args = parser.parse_args()
    rows = []
    for nodes in args.nodes:
        for shares in sorted({0, 11} if nodes > 11 else {0}):
            rows.append(measure(nodes, shares, args.hidden_dims))
            print(json.dumps(rows[-1]), flush=True)
    machine = {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()}
    Path(args.out).write_text(json.dumps({"machine": machine, "hidden-dims": args.hidden_dims, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
