"""A plugin that calls ``sys.exit()`` while it is imported."""

import sys

from fedplug_testplugins._misbehave import MISBEHAVE

if MISBEHAVE:
    sys.exit(3)
