"""A strategy plugin whose hook raises."""

import fedplug


@fedplug.hookimpl
def fedplug_register_strategies(register):
    raise RuntimeError("this strategy plugin fails in its hook")
