"""A plugin that registers something that is not a Backend."""

import fedplug


@fedplug.hookimpl
def fedplug_register_backends(register):
    register({"name": "dict_backend"})
