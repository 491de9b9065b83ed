"""A good plugin that registers two backends from one hook call."""

import fedplug
from fedplug.numpy_backend import NumpyBackend


class ExampleA(NumpyBackend):
    name = "example_a"
    description = "Test backend A (NumPy)"


class ExampleB(NumpyBackend):
    name = "example_b"
    description = "Test backend B (NumPy)"


@fedplug.hookimpl
def fedplug_register_backends(register):
    register(ExampleA())
    register(ExampleB())
