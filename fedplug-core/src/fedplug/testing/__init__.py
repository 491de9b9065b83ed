"""The conformance suite: what "supported backend" means, checked the same way everywhere.

A backend's tests run it with two lines::

    from fedplug.testing import BackendConformance

    class TestConformance(BackendConformance):
        backend_name = "mything"

``BackendConformance`` is the mixable tier (the backend can join mixed federations);
``BasicConformance`` the basic tier (it works alone), for a backend that declares
``conformance = "basic"``. ``StrategyConformance`` is the suite of a strategy plugin
(``strategy_name = "..."``). ``fedplug.testing.rebuilds`` counts the calls during which a
framework compiled again; ``fedplug.testing.reference`` measures the gap to the reference's training.

Every check is a test method whose docstring says what it guards and how to fix a
failure; each failure message says what to fix. Install with ``fedplug-core[testing]``.
"""

try:
    import pytest  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fedplug.testing runs on pytest: pip install 'fedplug-core[testing]'") from error

from fedplug.testing.conformance import HEAVY_FRAMEWORKS, ODD_SPEC, SPECS, BackendConformance, BasicConformance
from fedplug.testing.strategies import StrategyConformance

__all__ = ["HEAVY_FRAMEWORKS", "ODD_SPEC", "SPECS", "BackendConformance", "BasicConformance", "StrategyConformance"]
