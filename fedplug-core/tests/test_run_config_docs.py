"""docs/run-config.md, the run-config reference, is checked against the code both ways.

Every key of ``fedplug.config.CORE_DEFAULTS`` has a row with its type and default, and every row
is such a key; so for each backend's own keys (``<backend>.<key>``), each backend's defaults over
the core's, each backend's presets (``--preset NAME``), the ``strategy.<param>`` parameters of
every strategy (Flower's classes, read by ``fedplug.strategies.strategy_parameters``), the
``partitioner.<param>`` parameters of every partitioner (flwr-datasets' classes, as
``fedplug.data.partition.make_partitioner`` builds them) and which backends do not honour a key
(``Backend.unsupported``). A failure prints the row the code expects.

The backends are the six of this repository. ``fedplug-mxnet`` is not installed in the test
environment (MXNet needs numpy<2): its descriptor, which imports no framework, is read from the
repository's source.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from fedplug.backend import Backend, Scalar
from fedplug.builtin_strategies import FLOWER_CLASSES, PERSONAL
from fedplug.config import CORE_DEFAULTS
from fedplug.data.partition import PARTITIONER_DEFAULTS, PARTITIONERS, make_partitioner
from fedplug.strategies import strategy_parameters

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "run-config.md"
BACKENDS = ("numpy", "torch", "jax", "keras", "mlx", "mxnet")
"""The backends of this repository, in the order the reference lists them."""
PACKAGES = {
    "numpy": "fedplug.numpy_backend",
    "torch": "fedplug_torch",
    "jax": "fedplug_jax",
    "keras": "fedplug_keras",
    "mlx": "fedplug_mlx",
    "mxnet": "fedplug_mxnet",
}
PARTITIONER_SET_BY_FEDPLUG = ("self", "num_partitions", "partition_by", "seed")
"""What fedplug passes to a partitioner itself (the node count, the label column, the run's seed)."""


def _descriptor(module_name: str) -> type[Backend]:
    classes = [
        value
        for value in vars(sys.modules[module_name]).values()
        if isinstance(value, type) and issubclass(value, Backend) and value is not Backend
    ]
    assert len(classes) == 1, f"{module_name} defines {len(classes)} backends"
    return classes[0]


def _from_source(package: str, folder: Path) -> type[Backend]:
    """Import ``package`` from the repository (not installed here), read its descriptor, and forget it again."""
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(
        package, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    try:
        spec.loader.exec_module(module)
        return _descriptor(package)
    finally:
        for name in set(sys.modules) - before:
            if name == package or name.startswith(f"{package}."):
                del sys.modules[name]


def backends() -> dict[str, type[Backend]]:
    found = {}
    for name, package in PACKAGES.items():
        try:
            importlib.import_module(package)
            found[name] = _descriptor(package)
        except ModuleNotFoundError as error:
            if error.name != package:
                raise
            found[name] = _from_source(package, ROOT / f"fedplug-{name}" / "src" / package)
        assert found[name].name == name
    return found


def fmt(value: object) -> str:
    """A value as ``--run-config`` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "unset"
    return repr(value)


def not_honoured(key: str, found: Mapping[str, type[Backend]]) -> str:
    """The backends whose ``unsupported`` names ``key`` (``key=value``: that value only), or ``-``."""
    names = []
    for name, backend in found.items():
        for entry in sorted(backend.unsupported):
            base, _, value = entry.partition("=")
            if base == key:
                names.append(f"`{name}` ({value})" if value else f"`{name}`")
    return ", ".join(names) or "-"


def core_rows_expected() -> dict[str, tuple[str, str, str]]:
    found = backends()
    return {key: (type(value).__name__, fmt(value), not_honoured(key, found)) for key, value in CORE_DEFAULTS.items()}


def own_rows_expected() -> dict[str, tuple[str, str]]:
    return {
        key: (type(value).__name__, fmt(value))
        for name, backend in backends().items()
        for key, value in backend.defaults.items()
        if key.startswith(f"{name}.")
    }


def backend_default_rows_expected() -> dict[str, str]:
    rows = {}
    for name, backend in backends().items():
        changed = [
            f"`{key}={fmt(value)}`"
            for key, value in backend.defaults.items()
            if key in CORE_DEFAULTS and value != CORE_DEFAULTS[key]
        ]
        rows[name] = ", ".join(changed) or "-"
    return rows


def preset_rows_expected() -> dict[str, str]:
    rows = {}
    for name, backend in backends().items():
        presets = [
            f"`{preset}`: " + ", ".join(f"`{key}={fmt(value)}`" for key, value in values.items())
            for preset, values in backend.presets.items()
        ]
        rows[name] = "; ".join(presets) or "-"
    return rows


def strategy_rows_expected() -> dict[str, tuple[str, str, str]]:
    found = backends()
    rows = {}
    for name, cls in FLOWER_CLASSES.items():
        params = ", ".join(f"`{key}` {fmt(value)}" for key, value in strategy_parameters(name).items())
        honour = not_honoured("proximal-mu", found) if "proximal-mu" in strategy_parameters(name) else "-"
        rows[name] = (cls, params, honour)
    for strategy in PERSONAL:  # fedplug's personalised strategies (fedplug.personal): FedAvg on the server
        params = ", ".join(f"`{key}` {fmt(value)}" for key, value in strategy_parameters(strategy.name).items())
        rows[strategy.name] = (strategy.implementation.rpartition(":")[2], params, "-")
    return rows


def partitioner_parameters(name: str) -> tuple[str, dict[str, Scalar | None]]:
    """The flwr-datasets class fedplug builds for ``name`` and the parameters a user may set, with their defaults."""
    config = {**CORE_DEFAULTS, "partitioner": name}
    built = make_partitioner(config, 2)
    signature = inspect.signature(type(built).__init__).parameters
    params: dict[str, Scalar | None] = {}
    for arg, param in signature.items():
        if arg in PARTITIONER_SET_BY_FEDPLUG:
            continue
        key = arg.replace("_", "-")
        params[key] = PARTITIONER_DEFAULTS.get(name, {}).get(key, param.default)
    return type(built).__name__, params


def partitioner_rows_expected() -> dict[str, tuple[str, str]]:
    rows = {}
    for name in PARTITIONERS:
        cls, params = partitioner_parameters(name)
        rows[name] = (cls, ", ".join(f"`{key}` {fmt(value)}" for key, value in params.items()) or "-")
    return rows


# -- the document --------------------------------------------------------------------------------


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def rows(title: str) -> dict[str, list[str]]:
    """The body rows of the tables of section ``title``: first cell (without backticks) -> the other cells."""
    found: dict[str, list[str]] = {}
    for line in section(title).splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            assert key not in found, f"docs/run-config.md, '{title}': `{key}` has two rows"
            found[key] = cells[1:]
    return found


def compare(title: str, documented: dict[str, list[str]], expected: Mapping[str, tuple[str, ...]]) -> None:
    assert set(documented) == set(expected), (
        f"docs/run-config.md, '{title}': undocumented {sorted(set(expected) - set(documented))}, "
        f"documented but gone {sorted(set(documented) - set(expected))}"
    )
    for key, cells in expected.items():
        assert tuple(documented[key][: len(cells)]) == cells, (
            f"docs/run-config.md, '{title}': the row of `{key}` starts {documented[key][: len(cells)]}; "
            f"the code says {list(cells)}"
        )


def strip_ticks(cells: dict[str, list[str]], column: int) -> dict[str, list[str]]:
    return {key: [*row[:column], row[column].strip("`"), *row[column + 1 :]] for key, row in cells.items()}


def test_every_core_key_is_documented_with_its_type_default_and_backends_that_do_not_honour_it() -> None:
    documented = strip_ticks(rows("Every key"), 1)
    expected = {key: (typ, default) for key, (typ, default, _) in core_rows_expected().items()}
    compare("Every key", documented, expected)
    for key, (_, _, honour) in core_rows_expected().items():
        assert documented[key][4] == honour, (
            f"docs/run-config.md: `{key}` is not honoured by {honour} (Backend.unsupported), "
            f"the table says {documented[key][4]}"
        )


def test_every_backend_key_is_documented() -> None:
    compare("Backends' own keys", strip_ticks(rows("Backends' own keys"), 1), own_rows_expected())


def test_every_backends_defaults_are_documented() -> None:
    compare(
        "Each backend's defaults",
        rows("Each backend's defaults"),
        {k: (v,) for k, v in backend_default_rows_expected().items()},
    )


def test_every_backends_presets_are_documented() -> None:
    compare("Presets", rows("Presets"), {name: (text,) for name, text in preset_rows_expected().items()})


def test_every_strategy_and_its_parameters_are_documented() -> None:
    expected = {name: (f"`{cls}`", params, honour) for name, (cls, params, honour) in strategy_rows_expected().items()}
    compare("Strategies: strategy.<param>", rows("Strategies: strategy.<param>"), expected)


def test_every_partitioner_and_its_parameters_are_documented() -> None:
    expected = {name: (f"`{cls}`", params) for name, (cls, params) in partitioner_rows_expected().items()}
    compare("Partitioners: partitioner.<param>", rows("Partitioners: partitioner.<param>"), expected)


def test_every_unsupported_entry_names_a_documented_key() -> None:
    """A backend cannot declare a key the reference has no row for (``proximal-mu`` is FedProx's)."""
    keys = set(CORE_DEFAULTS) | {"proximal-mu"}
    for name, backend in backends().items():
        for entry in backend.unsupported:
            assert entry.partition("=")[0] in keys, f"backend '{name}' declares unsupported '{entry}': no such key"


def test_the_comparison_catches_a_key_that_is_gone_or_undocumented() -> None:
    """The checks above can fail: a key the code lacks, or a key the table lacks, is named."""
    documented = strip_ticks(rows("Every key"), 1)
    expected = {key: (typ, default) for key, (typ, default, _) in core_rows_expected().items()}
    with pytest.raises(AssertionError, match="documented but gone \\['lr'\\]"):
        compare("Every key", documented, {k: v for k, v in expected.items() if k != "lr"})
    with pytest.raises(AssertionError, match="undocumented \\['new-key'\\]"):
        compare("Every key", documented, {**expected, "new-key": ("int", "1")})
    with pytest.raises(AssertionError, match="the row of `lr`"):
        compare("Every key", documented, {**expected, "lr": ("float", "0.5")})


def test_every_flag_the_reference_names_is_an_option_of_its_command() -> None:
    import typer.main

    from fedplug.cli import app

    group = typer.main.get_command(app)

    def options(command: str) -> set[str]:
        params = group.commands[command].params  # type: ignore[attr-defined]
        return {opt for param in params for opt in param.opts + param.secondary_opts}

    for key, cells in rows("Every key").items():
        flag = cells[3]
        if flag in ("-", "BACKEND"):
            continue
        name = flag.split("`")[1]
        command = "supernode" if "(supernode)" in flag else "run"
        assert name in options(command), f"docs/run-config.md: `{key}` names {name}, which `fedplug {command}` lacks"
