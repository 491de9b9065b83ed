"""A plugin that registers a backend name that is already taken."""

import fedplug
from fedplug.numpy_backend import NumpyBackend


@fedplug.hookimpl
def fedplug_register_backends(register):
    register(NumpyBackend())
