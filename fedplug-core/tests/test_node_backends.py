"""Mixed-framework federations: the ``node-backends`` mapping, its refusals, each node's backend.

The fast tests use the built-in numpy backend and NumPy-based stand-ins registered in-process
(no ML framework); the simulation at the end trains one model with PyTorch, JAX, MLX and NumPy nodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from fedplug import node_backends, plugins
from fedplug.backend import BackendUnavailable, Config, Scalar
from fedplug.config import ConfigError, resolve
from fedplug.display import backends_line, round_line
from fedplug.flower_app import write_flower_app
from fedplug.node_backends import node_run_config
from fedplug.numpy_backend import NumpyBackend
from fedplug.testing.runs import cli


class Alpha(NumpyBackend):
    name = "alpha"
    description = "stand-in: NumPy under another name"
    defaults: ClassVar[Mapping[str, Scalar]] = {**NumpyBackend.defaults, "alpha-depth": 2}

    def environment(self, config: Config) -> dict[str, str]:
        return {"ALPHA_THREADS": "1", "SHARED_SETTING": "a"}


class Beta(NumpyBackend):
    name = "beta"
    description = "stand-in without FedProx and without lenet's avg pool"
    unsupported = frozenset({"proximal-mu"})


class NoFramework(NumpyBackend):
    name = "noframe"
    description = "stand-in whose framework is missing"

    def check_available(self) -> None:
        raise BackendUnavailable("backend 'noframe' needs noframe: pip install 'noframe>=1'")


class Clash(NumpyBackend):
    name = "clash"
    description = "stand-in whose environment contradicts alpha's"

    def environment(self, config: Config) -> dict[str, str]:
        return {"SHARED_SETTING": "b"}


class CnnServer(NumpyBackend):
    name = "cnnserver"
    description = "stand-in that also builds a 'cnn'"
    models = ("cnn", "mlp", "lenet")


class Solo(NumpyBackend):
    name = "solo"
    description = "stand-in that declares the basic tier: it works alone"
    conformance = "basic"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> plugins.Registry:
    """numpy and the stand-ins, registered in this process only."""
    found = plugins.Registry()
    for backend in (NumpyBackend(), Alpha(), Beta(), NoFramework(), Clash(), CnnServer(), Solo()):
        found.backends[backend.name] = plugins.Registered(backend, "test", "test", "0")
    monkeypatch.setattr(plugins, "get_registry", lambda: found)
    return found


def checked(server: str, **overrides: Scalar) -> dict[str, Scalar]:
    config = resolve(plugins.get_backend(server), {"num-supernodes": 6, **overrides})
    node_backends.check(config)
    return config


@pytest.mark.fast
def test_mapping_syntax_ranges_and_single_ids() -> None:
    assert node_backends.parse("0-1:torch, 2:jax ,3 - 4 : mlx") == {
        0: "torch",
        1: "torch",
        2: "jax",
        3: "mlx",
        4: "mlx",
    }
    assert node_backends.parse("") == {} and node_backends.parse("  ") == {}
    assert node_backends.compact({0: "a", 1: "a", 2: "b", 4: "b", 5: "a"}) == "0-1:a,2:b,4:b,5:a"
    assert node_backends.parse(node_backends.compact({3: "x", 4: "x", 7: "y"})) == {3: "x", 4: "x", 7: "y"}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0-1:torch,x", "cannot read 'x'; write PARTITIONS:BACKEND"),
        ("0:", "cannot read '0:'"),
        ("torch:0", "cannot read 'torch:0'"),
        ("-1:jax", "cannot read '-1:jax'"),
        ("3-1:jax", "range 3-1 in '3-1:jax' runs backwards"),
        ("0-2:torch,2:jax", "partition 2 is named twice ('0-2:torch' and '2:jax')"),
    ],
)
def test_malformed_or_overlapping_entries_are_refused_by_every_config_check(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="run-config 'node-backends': ") as caught:
        resolve(NumpyBackend(), {"node-backends": text})  # also what the ServerApp and ClientApp check
    assert message in str(caught.value)


@pytest.mark.fast
def test_a_node_runs_its_node_config_backend_else_its_partitions_else_the_servers(registry) -> None:
    config = checked("numpy", **{"node-backends": "0-1:alpha,4:beta"})
    assert config["node-backends"] == "0-1:alpha,2-3:numpy,4:beta,5:numpy"  # every node, in config.json
    assert node_backends.taking_part(config) == ["numpy", "alpha", "beta"]
    of = node_backends.backend_of
    assert [of(config, {"partition-id": p, "num-partitions": 6}) for p in range(6)] == [
        "alpha", "alpha", "numpy", "numpy", "beta", "numpy"
    ]  # fmt: skip
    assert of(config, {"partition-id": 0, "backend": "beta"}) == "beta"  # the node's operator decides
    assert of(config, {"data": "/my/digits.parquet"}) == "numpy"  # a node with its own data and no partition
    node = node_run_config(config, {"partition-id": 1, "num-partitions": 6})
    assert node["backend"] == "alpha" and "alpha-depth" not in node and node["num-supernodes"] == 6
    assert resolve(Alpha(), node)["alpha-depth"] == 2  # the node's own defaults fill its own keys


@pytest.mark.fast
def test_a_single_backend_mapping_is_no_mixed_run(registry) -> None:
    assert checked("numpy", **{"node-backends": "0-5:numpy"})["node-backends"] == ""
    assert checked("numpy")["node-backends"] == ""


@pytest.mark.fast
@pytest.mark.parametrize(
    ("server", "overrides", "message"),
    [
        ("numpy", {"node-backends": "6:alpha"}, "partition 6 is not a node of this run: it has 6 nodes, ids 0-5"),
        ("numpy", {"node-backends": "0:nosuch"}, "unknown backend 'nosuch'"),
        ("numpy", {"node-backends": "0:alpah"}, "did you mean 'alpha' or 'clash'? (node 0)"),
        ("numpy", {"node-backends": "1-2:noframe"}, "'noframe' needs noframe: pip install 'noframe>=1' (nodes 1-2)"),
        ("cnnserver", {"model": "cnn", "node-backends": "3:alpha"}, "backend 'alpha' (node 3) has no model 'cnn'"),
        ("numpy", {"strategy": "fedprox", "node-backends": "0:beta"}, "backend 'beta' of node 0 refuses this run"),
        ("numpy", {"node-backends": "0:alpha,1:clash"}, "need SHARED_SETTING=a and SHARED_SETTING=b in one"),
    ],
)
def test_a_mixed_run_is_refused_before_it_starts(registry, server: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        checked(server, **overrides)
    assert str(caught.value).startswith("run-config 'node-backends': ") and message in str(caught.value)


@pytest.mark.fast
def test_every_taking_part_backends_environment_is_merged(registry) -> None:
    config = checked("numpy", **{"node-backends": "0:alpha"})
    assert node_backends.environment(config) == {"ALPHA_THREADS": "1", "SHARED_SETTING": "a"}


@pytest.mark.fast
def test_the_exported_app_depends_on_the_core_and_the_servers_backend_only(registry, tmp_path: Path) -> None:
    import tomllib

    config = checked("numpy", **{"node-backends": "0:alpha,1:beta"})
    app = write_flower_app(tmp_path, config)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    names = [pin.split("==")[0] for pin in project["project"]["dependencies"]]
    assert "fedplug-core" in names and not any(name.startswith("fedplug-") and name != "fedplug-core" for name in names)
    assert project["tool"]["flwr"]["app"]["config"]["node-backends"] == "0:alpha,1:beta,2-5:numpy"


@pytest.mark.fast
def test_round_lines_and_summary_say_how_many_nodes_of_each_backend() -> None:
    record = {
        "round": 1,
        "train-nodes": 3,
        "train-partitions": [0, 1, 2],
        "train-backends": {"torch": 2, "jax": 1},
        "partition-backends": {"0": "torch", "1": "torch", "2": "jax"},
        "seconds": 1.0,
    }
    assert "nodes 3 (torch 2, jax 1)" in round_line(record)
    assert "(" not in round_line({**record, "train-backends": {"numpy": 3}})
    assert backends_line([{"round": 0}, record]) == "backends: torch 0-1 · jax 2"
    assert backends_line([{**record, "partition-backends": {"0": "numpy"}}]) == ""


@pytest.mark.fast
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-backends", "0-1:example_a,x"], "cannot read 'x'"),
        (["--node-backends", "0:example_a,0:example_b"], "partition 0 is named twice"),
        (["--nodes", "4", "--node-backends", "4:example_a"], "partition 4 is not a node of this run"),
        (["--node-backends", "0:torchh"], "unknown backend 'torchh'"),
        (["--node-backends", "0:badcheck"], "failed its checks (KeyError"),
        (["--run-config", "node-backends='2-1:example_b'"], "range 2-1"),
    ],
)
def test_the_command_refuses_a_bad_mapping_in_one_line_starting_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    done = cli("run", "numpy", "--out", str(out), *args, env={"FEDPLUG_PLUGINS": "example,badcheck"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("fedplug: error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists(), "a refused run made its results folder"


def test_a_simulation_of_torch_jax_mlx_and_numpy_nodes_trains_one_model(run_fedplug) -> None:
    """One Ray worker per core serves the nodes of every backend in turn; the server is numpy."""
    env = {"FEDPLUG_PLUGINS": "torch,jax,mlx"}
    args = ["--nodes", "4", "--rounds", "2", "--model", "mlp", "--node-backends", "0:torch,1:jax,2:mlx"]
    proc, out = run_fedplug("numpy", *args, "--run-config", "hidden-dims='32'", env=env)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    ran = {"0": "torch", "1": "jax", "2": "mlx", "3": "numpy"}
    for record in rounds[1:]:
        assert record["partition-backends"] == ran, record
        assert record["train-backends"] == {"torch": 1, "jax": 1, "mlx": 1, "numpy": 1}, record
        assert record["evaluate-backends"] == {"torch": 1, "jax": 1, "mlx": 1, "numpy": 1}, record
        assert not record["train-failures"] and not record["evaluate-failures"], record
    accuracy = [record["centralized-accuracy"] for record in rounds]
    assert accuracy[0] < 0.2 < 0.7 < accuracy[1] < accuracy[2], accuracy
    assert json.loads((out / "config.json").read_text())["node-backends"] == "0:torch,1:jax,2:mlx,3:numpy"
    shown = " ".join(proc.stdout.split())
    assert (
        "nodes 4 (torch 1, jax 1, mlx 1, numpy 1)" in shown and "backends: torch 0 · jax 1 · mlx 2 · numpy 3" in shown
    )
    assert (out / "model.npz").is_file()  # the ServerApp's native model: numpy's


@pytest.mark.fast
def test_a_backend_of_the_basic_tier_runs_alone_and_joins_no_mixed_federation(registry: plugins.Registry) -> None:
    assert checked("solo")["node-backends"] == ""  # alone: fine
    for server, mapping in (("numpy", "0-1:solo"), ("solo", "0-1:numpy")):
        with pytest.raises(ConfigError, match=r"backend 'solo' \(nodes? [0-9-,]+\) declares conformance 'basic'"):
            checked(server, **{"node-backends": mapping})
    run_config = resolve(plugins.get_backend("numpy"), {})
    with pytest.raises(ValueError, match="backend 'solo' \\(this node\\) declares conformance 'basic'"):
        node_run_config(run_config, {"backend": "solo"})  # a SuperNode of the basic tier joining a numpy run


@pytest.mark.fast
def test_the_backends_line_counts_deployed_nodes_that_have_their_own_data() -> None:
    """Nodes with their own data stand for a partition with their node id: the line counts them instead."""
    record = {"round": 1, "partition-backends": {"429010618": "torch", "1132468589": "jax", "1791660335": "torch"}}
    assert backends_line([record]) == "backends: torch 2 nodes · jax 1 node"
