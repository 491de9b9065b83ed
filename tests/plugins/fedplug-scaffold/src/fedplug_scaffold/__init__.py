"""SCAFFOLD as a fedplug strategy: server and client control variates (Karimireddy et al., 2020).

The descriptor only: Flower is imported by ``server.py`` (the strategy) and ``node.py`` (the node
step) when a run uses them.
"""

import fedplug


class Scaffold(fedplug.Strategy):
    name = "scaffold"
    description = "SCAFFOLD: drift-corrected local training with server and client control variates"
    implementation = "fedplug_scaffold.server:ScaffoldStrategy"
    parameters = (fedplug.Parameter("server-lr", 1.0, "global step size (eta_g)", 0.0, 1.0, low_open=True),)
    needs = frozenset({"reply-arrays", "node-state"})
    reply_records = ("control",)  # each node's change of its control variate, delta c_i
    node_step = "fedplug_scaffold.node:step"
    state = ("current_arrays", "control")  # the round's global model and the server control variate c
    composes = frozenset({"secagg", "cohorts", "fold"})  # means of updates and control deltas: sums suffice


@fedplug.hookimpl
def fedplug_register_strategies(register):
    register(Scaffold())
