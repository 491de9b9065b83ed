"""A plugin whose hook raises."""

import fedplug


@fedplug.hookimpl
def fedplug_register_backends(register):
    raise RuntimeError("this plugin fails in its hook")
