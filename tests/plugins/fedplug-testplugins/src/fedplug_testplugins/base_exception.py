"""A plugin whose hook raises a ``BaseException`` that is not an ``Exception``."""

import fedplug
from fedplug_testplugins._misbehave import MISBEHAVE


class PluginAbort(BaseException):
    pass


@fedplug.hookimpl
def fedplug_register_backends(register):
    if MISBEHAVE:
        raise PluginAbort("this plugin aborts in its hook")
