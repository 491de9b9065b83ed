"""The conformance suite against a backend that breaks every rule: each check fails and says what to fix.

The backend is tests/plugins/fedplug-broken-example, an installed distribution. The suite
runs in a separate pytest process; its JUnit XML report gives each check's outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, distribution

import pytest

from fedplug.testing import BackendConformance

CHECKS = sorted(name for name in dir(BackendConformance) if name.startswith("test_"))
"""Every check of the suite, so that a new one must be failed here too."""

SAYS = {
    "test_registered_through_entry_point": ["not a fedplug.Backend instance: register("],
    "test_plugin_import_is_light": [
        "importing fedplug_broken_example imports sqlite3: import the framework only in the implementation module",
    ],
    "test_default_config_complete_and_typed": ["default 'lr' must be float like the core's 0.1, got '0.1'"],
    "test_models_build_for_data_specs": ["predicts shape (4, 10), expected (4, 3)"],
    "test_canonical_layout": [
        "layers.0.weight of 'mlp' must have canonical shape (128, 784)",
        "'lenet' weights must be named and ordered ['layers.0.weight', 'layers.0.bias'",
    ],
    "test_weights_round_trip_exactly": ["get(set(layers.0.weight)) changed the values"],
    "test_same_predictions_as_numpy_reference": [
        "'mlp' (pool max) with the reference weights predicts differently",
        "flattening follows channels-first (C, H, W) order",
    ],
    "test_odd_image_sizes_match_reference": [
        "'mlp' on DataSpec(input_shape=(3, 29, 31), num_classes=3) must have the canonical shapes",
        "'lenet' (pool max) with the reference weights predicts differently for DataSpec(input_shape=(3, 29, 31)",
    ],
    "test_training_lowers_loss": ["'mlp': 5 local epochs on a fixed batch did not lower the loss"],
    "test_rounds_differ": ["'mlp': training in round 1 and round 2 gave the same weights"],
    "test_train_keeps_no_state": ["'lenet': training A then B on one model differs from B on a fresh model"],
    "test_optimizer_keys_read_every_call": [
        "'mlp': changing 'lr' from 0.1 to",
        "'lenet': 'lr' = 0.1 gave other weights after a call with",
    ],
    "test_optimizer_keys_honoured_or_declared": [
        "'momentum' ({'optimizer': 'sgd', 'momentum': 0.9}) changed nothing in training",
        "'optimizer=adam' ({'optimizer': 'adam'}) changed nothing in training",
    ],
    "test_train_matches_reference": [
        "from the numpy reference's weights (tolerance 1e-05)",
        "'lenet' trained with {'optimizer': 'adam', 'lr': 0.001} lands",
    ],
    "test_proximal_term_applied": ["did not keep the weights nearer the round's start", "declare unsupported"],
    "test_evaluate_returns_standard_metrics": ["evaluate must return 'loss' as a Python float"],
    "test_same_seed_same_weights": ["differs between two runs with seed 42: seed the model init"],
    "test_save_load_gives_identical_predictions": ["load() used pickle: read the native format", "safetensors"],
    "test_client_app_handles_train_and_evaluate_messages": ["the evaluate reply must carry 'loss' and 'accuracy'"],
    "test_client_app_serves_node_capabilities": ["the same train message gave another update the second time"],
}
"""Per check, what its failure messages must say (each string in at least one failing instance)."""

SUITE = """\
from fedplug.testing import BackendConformance


class TestBrokenExample(BackendConformance):
    backend_name = "broken_example"
"""


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str | None]]:
    """Check name -> the failure message of each of its instances (None for one that did not fail)."""
    try:
        distribution("fedplug-broken-example")
    except PackageNotFoundError:
        pytest.fail("install the broken example first: pip install ./tests/plugins/fedplug-broken-example")
    folder = tmp_path_factory.mktemp("broken")
    (folder / "pytest.ini").write_text("[pytest]\n")  # keep the repository's pytest settings out
    (folder / "test_broken_example.py").write_text(SUITE)
    env = {key: value for key, value in os.environ.items() if key != "FEDPLUG_STRICT"}
    env["FEDPLUG_PLUGINS"] = "broken_example"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "report.xml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 1, f"the suite did not run to its failures:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    outcomes: dict[str, list[str | None]] = {}
    for case in ET.parse(folder / "report.xml").iter("testcase"):
        failure = case.find("failure")
        check = case.get("name", "").split("[")[0]
        outcomes.setdefault(check, []).append(None if failure is None else failure.get("message", ""))
    return outcomes


def test_every_check_has_an_expected_message() -> None:
    assert sorted(SAYS) == CHECKS, "a check was added or renamed: make the broken example fail it and list its message"


@pytest.mark.parametrize("check", CHECKS)
def test_every_check_fails(failures: dict[str, list[str | None]], check: str) -> None:
    assert check in failures, f"{check} did not run"
    assert any(message is not None for message in failures[check]), (
        f"the broken example passes every instance of {check}: break the example so that the check fails"
    )


@pytest.mark.parametrize("check", CHECKS)
def test_each_failure_says_what_to_fix(failures: dict[str, list[str | None]], check: str) -> None:
    messages = [message for message in failures.get(check, []) if message is not None]
    for says in SAYS.get(check, []):
        assert any(says in message for message in messages), f"no failure of {check} says {says!r}: {messages}"
