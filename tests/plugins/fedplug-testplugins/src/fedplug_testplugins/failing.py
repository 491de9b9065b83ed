"""A backend that loads fine but whose training fails inside the ClientApp."""

import fedplug
from fedplug.numpy_backend import NumpyBackend


class FailingTrain(NumpyBackend):
    name = "failing_train"
    description = "Test backend whose train() raises"

    def train(self, model, x, y, config):
        raise RuntimeError("train() is broken on purpose")


@fedplug.hookimpl
def fedplug_register_backends(register):
    register(FailingTrain())
