"""A working plugin that prints to stdout at import and in its hook, in Python and at file-descriptor level."""

import os

import fedplug
from fedplug.numpy_backend import NumpyBackend
from fedplug_testplugins._misbehave import MISBEHAVE

if MISBEHAVE:
    print("hello from the prints plugin at import")
    os.write(1, b"raw bytes from the prints plugin\n")


class Printing(NumpyBackend):
    name = "printing"
    description = "Test backend whose plugin prints (NumPy)"


@fedplug.hookimpl
def fedplug_register_backends(register):
    if MISBEHAVE:
        print("hello from the prints plugin's hook")
        register(Printing())
