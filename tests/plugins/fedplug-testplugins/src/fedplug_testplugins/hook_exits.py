"""A plugin whose hook calls ``sys.exit(0)``: it must not end the command quietly."""

import sys

import fedplug
from fedplug_testplugins._misbehave import MISBEHAVE


@fedplug.hookimpl
def fedplug_register_backends(register):
    if MISBEHAVE:
        sys.exit(0)
