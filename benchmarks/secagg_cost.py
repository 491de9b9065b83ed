"""Per-round cost of SecAgg+ (secagg=true) at 10 and 100 nodes, against the plain train step.

    python benchmarks/secagg_cost.py                      # 10 and 100 nodes; writes benchmarks/results/secagg.json
    python benchmarks/secagg_cost.py --nodes 10 --hidden-dims 32

One process, no Flower transport: the round's train step as ``fedplug.secagg.secure_train`` runs it,
over the in-process Grid of ``fedplug-core/tests/test_secagg.py`` that hands every message to
fedplug's real ClientApp (numpy backend, embedded digits), so the time is the nodes' training plus
the protocol's work on the nodes and the server, one node after another. ``plain`` is the same
nodes' ordinary train replies averaged (what FedAvg gets). ``secagg-overhead`` = secagg - plain, the
protocol's own cost per round; divide the node-side part by the cores for nodes that run in parallel.
Not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

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
    started = time.perf_counter()
    kit._plain_fedavg(config, arrays, ids)
    plain = time.perf_counter() - started
    grid = kit.RecordingGrid(config)
    started = time.perf_counter()
    with flower_adapter.server_app_identity(run_id=1):
        outcome = secagg.secure_train(grid, kit._train_messages(arrays, ids), examples, config, 1, 600.0)
    secure = time.perf_counter() - started
    assert outcome.aggregate is not None and not outcome.failures
    size = sum(int(array.numpy().size) for array in arrays.values())
    return {
        "nodes": nodes,
        "num-shares": num_shares or nodes,
        "weights": size,
        "plain-seconds": round(plain, 3),
        "secagg-seconds": round(secure, 3),
        "secagg-overhead-seconds": round(secure - plain, 3),
        "overhead-per-node-seconds": round((secure - plain) / nodes, 4),
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
