"""Custom models: ``--model my_nets:ResNet8`` federates a model the user wrote, with any backend that takes them.

The user's module holds a factory, ``ResNet8(spec, config)``, that receives the data spec
(``spec.input_shape`` ``(C, H, W)``, ``spec.num_classes``) and the run config, and returns
the framework's own model object (what the backend's ``custom_models`` says). The core does
the rest once for every backend:

- :func:`locate` (the CLI, before anything starts) finds the module from the working
  directory (``my_nets`` or ``pkg.nets``) or a file (``./my_nets.py``) and puts its absolute
  path in the run config's ``model-file``; ``model`` becomes ``module:factory``;
- :func:`load_factory` (every process: the CLI's check, the ServerApp, each Ray worker)
  imports the module from ``model-file``'s folder, or, where that path does not exist (a
  Flower App on another machine, which carries the file), by name from ``sys.path``: Flower
  puts the app's folder there;
- :func:`build_custom` calls the factory through the implementation's ``build_custom``
  (seeding, type check, device), checks the output shape on one dummy batch and returns a
  :class:`fedplug.backend.CustomModel`, whose weights travel under the framework's own names.

Every mistake is a ``ModelError`` of one line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedplug.errors import ModelError
from fedplug.types import Config, DataSpec, Weights

if TYPE_CHECKING:
    from fedplug.backend import Backend


@dataclass(frozen=True)
class CustomModel:
    """A model the user wrote (``--model module:factory``), as the core hands it to the backend's operations.

    ``net`` is the framework's own model object, as the implementation's ``build_custom``
    returned it; ``layout`` is its weights' names, in order, with their shapes: the core
    checks every ``set_weights`` against it. Its weights travel under the framework's own
    parameter names (``get_native_weights``), not in the canonical layout.
    """

    ref: str
    net: Any
    layout: tuple[tuple[str, tuple[int, ...]], ...]

    def check(self, weights: Weights) -> None:
        """Raise ``ValueError`` unless ``weights`` has this model's names, in order, and shapes."""
        names = [name for name, _ in self.layout]
        if list(weights) != names:
            missing = [name for name in names if name not in weights]
            extra = [name for name in weights if name not in names]
            problem = f"missing {missing[:3]}, unexpected {extra[:3]}" if missing or extra else "in another order"
            raise ValueError(f"weights do not fit custom model {self.ref}: {problem}")
        for name, shape in self.layout:
            if tuple(np.shape(weights[name])) != shape:
                raise ValueError(
                    f"weights do not fit custom model {self.ref}: {name} has shape "
                    f"{tuple(np.shape(weights[name]))}, the model's is {shape}"
                )


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_NAME}(\.{_NAME})*")
_ATTRIBUTE = re.compile(rf"{_NAME}(\.{_NAME})*")


def is_custom(model: object) -> bool:
    """Whether a ``model`` value names a custom model (``module:factory``) rather than a backend's own."""
    return ":" in str(model)


def split(ref: str) -> tuple[str, str]:
    """``module`` (a dotted name or a ``.py`` path) and ``factory`` of ``ref``; ``ModelError`` if malformed."""
    module, _, attribute = ref.rpartition(":")
    if not module or not _ATTRIBUTE.fullmatch(attribute):
        raise ModelError(f"--model '{ref}' is not module:factory; write e.g. my_nets:ResNet8 or ./my_nets.py:ResNet8")
    if not module.endswith(".py") and "/" not in module and not _MODULE.fullmatch(module):
        raise ModelError(f"--model '{ref}': '{module}' is neither a module name (my_nets) nor a file (./my_nets.py)")
    return module, attribute


def locate(ref: str, cwd: Path) -> tuple[str, str]:
    """``(module:factory, absolute module file)`` of ``ref`` as the user wrote it, looked up from ``cwd``.

    A module name is looked for in ``cwd`` first (``my_nets.py``, ``pkg/nets.py``, ``pkg/__init__.py``),
    then on ``sys.path`` (an installed module: its file is recorded too).
    """
    module, attribute = split(ref)
    if module.endswith(".py") or "/" in module:
        path = (cwd / module).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"--model '{ref}': there is no file {path}; give the path of your .py file")
        if path.suffix != ".py" or not re.fullmatch(_NAME, path.stem):
            raise ModelError(f"--model '{ref}': {path.name} must be a .py file whose name is a Python identifier")
        return f"{path.stem}:{attribute}", str(path)
    relative = Path(*module.split("."))
    for candidate in (cwd / relative.with_suffix(".py"), cwd / relative / "__init__.py"):
        if candidate.is_file():
            return f"{module}:{attribute}", str(candidate.resolve())
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ModelError(
            f"--model '{ref}': no module '{module}' in {cwd} (no {relative.with_suffix('.py')}) nor installed; "
            "run fedplug from the folder of your module or give its path (./my_nets.py:Factory)"
        )
    return f"{module}:{attribute}", str(Path(found.origin).resolve())


def _root(module: str, file: Path) -> Path:
    """The folder to put on ``sys.path`` so that ``import module`` finds ``file``."""
    depth = len(module.split(".")) - (0 if file.name == "__init__.py" else 1)
    return file.parents[depth]


def load_factory(config: Config) -> Callable[..., Any]:
    """The factory named by the run config's ``model``, imported from ``model-file`` (or ``sys.path``)."""
    ref = str(config["model"])
    module_name, attribute = split(ref)
    given = str(config.get("model-file", ""))
    file = Path(given) if given and Path(given).is_absolute() and Path(given).is_file() else None
    if file is not None:
        root = str(_root(module_name, file))
        if root not in sys.path:
            sys.path.insert(0, root)
    # else: a Flower App on another machine carries the module, and Flower puts the app's folder on sys.path
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"cannot import the module of custom model {ref}: {error}") from error
    except Exception as error:  # the module itself raised while importing
        raise ModelError(f"importing the module of custom model {ref} raised {type(error).__name__}: {error}") from None
    if file is not None and Path(str(getattr(module, "__file__", ""))).resolve() != file.resolve():
        raise ModelError(
            f"custom model {ref}: 'import {module_name}' finds {getattr(module, '__file__', 'a built-in module')}, "
            f"not {file}; rename your module"
        )
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"custom model {ref}: module '{module_name}' ({module.__file__}) has no '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"custom model {ref}: '{attribute}' is a {type(target).__name__}, not a callable factory")
    return target  # type: ignore[no-any-return]


def build_custom(backend: Backend, ref: str, spec: DataSpec, config: Config) -> CustomModel:
    """Build the custom model of ``config`` for ``spec`` with ``backend``, checked on one dummy batch."""
    if not backend.custom_models:
        raise ModelError(f"backend '{backend.name}' cannot federate custom models; choose one of {backend.models}")
    factory = load_factory({**config, "model": ref})

    def make() -> Any:
        try:
            return factory(spec, config)
        except Exception as error:
            message = " ".join(str(error).split())[:300]
            raise ModelError(f"custom model {ref}{_call(spec)} raised {type(error).__name__}: {message}") from error

    net = backend.impl.build_custom(make, spec, config)
    batch = np.zeros((2, *spec.input_shape), dtype=np.float32)
    try:
        scores = np.asarray(backend.impl.predict(net, batch))
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise ModelError(
            f"custom model {ref} fails on a batch of 2 images {spec.input_shape} ({backend.custom_models}): "
            f"{type(error).__name__}: {message}"
        ) from error
    if scores.shape != (2, spec.num_classes):
        raise ModelError(
            f"custom model {ref} returns shape {scores.shape} for a batch of 2 images; it must return "
            f"(2, {spec.num_classes}) logits, one per class of the data"
        )
    weights = backend.impl.get_native_weights(net)
    if not weights:
        raise ModelError(f"custom model {ref} has no weights to federate")
    layout = tuple((name, tuple(np.shape(array))) for name, array in weights.items())
    return CustomModel(ref, net, layout)


def _call(spec: DataSpec) -> str:
    return f"(spec(input_shape={spec.input_shape}, num_classes={spec.num_classes}), config)"


def check_same_backend(config: Config, backend: str) -> None:
    """Refuse a node of another framework than the run's when the run federates a custom model."""
    if is_custom(config.get("model", "")) and backend != config.get("backend"):
        raise ModelError(
            f"this node runs backend '{backend}' but the run federates the custom {config.get('backend')} model "
            f"{config['model']}, whose weights cannot be mapped between frameworks; run the node with "
            f"backend '{config.get('backend')}'"
        )


def type_name(value: object) -> str:
    """``module.Class`` of ``value``, to say what a factory returned instead."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


@contextlib.contextmanager
def no_native_output() -> Iterator[None]:
    """Drop what the block writes to stderr, Python's and native code's (fd 2) alike.

    The CLI checks a custom model by importing the user's module and the framework, whose
    C++ start-up lines (TensorFlow's oneDNN notice, XLA's probes) would bury the one line
    that says what is wrong; the simulation log keeps them when the run starts.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as dropped:
        os.dup2(dropped.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
