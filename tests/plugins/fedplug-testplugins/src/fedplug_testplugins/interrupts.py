"""A plugin that raises ``KeyboardInterrupt`` while it is imported."""

from fedplug_testplugins._misbehave import MISBEHAVE

if MISBEHAVE:
    raise KeyboardInterrupt
