"""A strategy plugin: one good strategy, and registrations fedplug must refuse without breaking the rest."""

import fedplug


class ExampleMean(fedplug.Strategy):
    name = "example_mean"
    description = "Flower's FedAvg, registered by a third-party plugin"
    implementation = "flwr.serverapp.strategy:FedAvg"
    state = ()
    composes = frozenset({"cohorts"})


class NoState(fedplug.Strategy):
    name = "no_state"
    description = "forgets to declare its checkpoint state"
    implementation = "flwr.serverapp.strategy:FedAdam"


class BadRange(fedplug.Strategy):
    name = "bad_range"
    description = "its parameter's default is outside its own range"
    implementation = "flwr.serverapp.strategy:FedAvg"
    parameters = (fedplug.Parameter("server-lr", -1.0, "a learning rate", 0.0, low_open=True),)
    state = ()


@fedplug.hookimpl
def fedplug_register_strategies(register):
    register(ExampleMean())
    register(NoState())
    register(BadRange())
