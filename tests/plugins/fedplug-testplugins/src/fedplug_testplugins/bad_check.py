"""A backend whose ``check_available`` raises something other than ``BackendUnavailable``."""

import fedplug
from fedplug.numpy_backend import NumpyBackend


class BadCheck(NumpyBackend):
    name = "badcheck"
    description = "Test backend whose check_available() has a bug"

    def check_available(self):
        raise KeyError("CUDA_HOME")


@fedplug.hookimpl
def fedplug_register_backends(register):
    register(BadCheck())
