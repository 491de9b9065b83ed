"""SCAFFOLD passes fedplug's strategy conformance suite."""

from fedplug.testing import StrategyConformance


class TestScaffold(StrategyConformance):
    strategy_name = "scaffold"
