"""Node-side capabilities a strategy can ask for (``Strategy.needs``), implemented once for every backend.

- ``"reply-arrays"``: the node's train reply carries extra ArrayRecords (``Strategy.reply_records``,
  e.g. SCAFFOLD's control variates) besides the weights. The round loop screens them (finite
  numbers) and passes them to the strategy's ``aggregate_train`` with the weights.
- ``"node-state"``: the node keeps arrays of its own from one round to the next, in its Flower
  ``Context.state`` (kept by Flower on the Simulation Engine and by a SuperNode). A copy travels in
  the train reply (``STATE_RECORD``), which the round loop takes out before the strategy sees the
  reply and saves in the checkpoint; a resumed run sends each node its saved state once, so that
  resume stays exact.

Both are served by the strategy's node-side function (``Strategy.node_step``), which the
ClientApp runs after the backend's ``train`` with a ``NodeStep``. A backend has nothing to do
for them: its ``train`` must keep no state of its own between calls (the backend contract), and
its weights must be the canonical numpy arrays, which the conformance suite checks.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedplug.backend import Config, Weights
from fedplug.errors import ConfigError
from fedplug.plugins import get_registry
from fedplug.records import from_record, to_record
from fedplug.strategy_contract import Strategy

STATE_RECORD = "fedplug.node-state"
"""Key of the ArrayRecord holding a node's state: in its ``Context.state``, its train reply, a resumed run's message."""
BACKEND_DUTIES = {
    "reply-arrays": "nothing: get_weights returns canonical numpy arrays, from which the node step computes them",
    "node-state": "nothing: train keeps no state between calls, so that the node's state is all in the core's hands",
}
"""What a backend must do for each capability (checked by the backend conformance suite's existing checks)."""


@dataclass
class NodeStep:
    """One node's train step as a strategy's node-side function sees it, after the backend trained."""

    before: Weights
    """The global model the node received."""
    after: Weights
    """The model after the backend's ``train``: the function may replace it (what the reply carries)."""
    sent: dict[str, Weights]
    """The extra ArrayRecords of the server's train message, by name (e.g. SCAFFOLD's server control variate)."""
    state: Weights
    """This node's state across rounds, by name: empty in its first round; the function reads and sets it."""
    config: Config
    """The step's run config (``lr``, ``batch-size``, ``local-epochs``, ``server-round``, ``partition-id``)."""
    num_examples: int
    reply: dict[str, Weights] = field(default_factory=dict)
    """Extra ArrayRecords to send back, by name: those the descriptor's ``reply_records`` declares."""
    train: Callable[[Weights, Config], Weights] | None = None
    """Trains other weights with the backend on this node's data (a copy of ``config`` may change keys),
    returning the trained weights: for a personal model (``fedplug.personal``). None where not offered."""

    @property
    def steps(self) -> int:
        """The optimiser steps the backend took: ``local-epochs`` times the mini-batches of ``batch-size``."""
        return int(self.config["local-epochs"]) * math.ceil(self.num_examples / int(self.config["batch-size"]))


def node_function(strategy: Strategy) -> Callable[[NodeStep], Any]:
    """The strategy's node-side function, imported now."""
    module, _, name = strategy.node_step.partition(":")
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"strategy '{strategy.name}': its node_step {strategy.node_step!r} cannot be imported: {error}"
        ) from error


def extend_train_reply(
    content: RecordDict,
    message: RecordDict,
    context_state: RecordDict,
    config: Config,
    num_examples: int,
    train: Callable[[Weights, Config], Weights] | None = None,
) -> None:
    """Run the configured strategy's node step on a train reply holding the trained ``"arrays"``, in place.

    Nothing happens for a strategy that needs no capability. The node's state comes from the message
    when a resumed run sends it (``STATE_RECORD``), else from ``context_state``; the new state is kept
    in ``context_state`` and copied into the reply after the extra records.
    """
    entry = get_registry().strategies.get(str(config["strategy"]))
    if entry is None and set(message.array_records) - {"arrays"}:  # a node without the strategy's plugin
        raise ConfigError(
            f"strategy '{config['strategy']}' needs this node's help, but its plugin is not installed here: "
            "install it on every node"
        )
    if entry is None or not entry.strategy.needs:  # the server's strategy asks nothing of the nodes
        return
    strategy = entry.strategy
    sent = {name: from_record(record) for name, record in message.array_records.items()}
    before = sent.pop("arrays")
    saved = sent.pop(STATE_RECORD, None)
    if saved is None and STATE_RECORD in context_state.array_records:
        saved = from_record(context_state.array_records[STATE_RECORD])
    after = from_record(content.array_records["arrays"])
    data = NodeStep(before, after, sent, dict(saved or {}), config, num_examples, train=train)
    node_function(strategy)(data)
    content["arrays"] = to_record(data.after)
    for name in strategy.reply_records:
        if name not in data.reply:
            raise ValueError(f"strategy '{strategy.name}': its node step set no reply[{name!r}]")
        content[name] = to_record(data.reply[name])
    if "node-state" in strategy.needs:
        context_state[STATE_RECORD] = to_record(data.state)
        content[STATE_RECORD] = to_record(data.state)


def reply_problem(content: RecordDict, strategy: Strategy) -> str | None:
    """Why a train reply's records are not what the strategy declared, or None: weights first, extras finite."""
    expected = ["arrays", *strategy.reply_records] + ([STATE_RECORD] if "node-state" in strategy.needs else [])
    names = list(content.array_records)
    if len(names) == 1 and not strategy.needs:
        return None
    if names != expected:
        return f"reply must carry the ArrayRecords {expected}, got {names}"
    for name in expected[1:]:
        record = content.array_records[name]
        if not all(np.all(np.isfinite(array.numpy())) for array in record.values()):
            return f"non-finite values in the reply's {name!r}"
    return None


def take_state(content: RecordDict) -> Weights | None:
    """Remove the node's state from a screened reply (the strategy never sees it); the state, or None."""
    if STATE_RECORD not in content.array_records:
        return None
    record: ArrayRecord = content.array_records[STATE_RECORD]
    del content[STATE_RECORD]
    return from_record(record)


# -- personalised models (fedplug.personal): where training starts, what evaluation adds ----------


def _personal_function(strategy: Strategy, attribute: str) -> Callable[..., Any] | None:
    target = str(getattr(strategy, attribute, "") or "")
    if not target:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _node_state(message: RecordDict, context_state: RecordDict) -> Weights:
    """The node's state: the one a resumed run sends, else the one kept in ``Context.state``; empty at first."""
    if STATE_RECORD in message.array_records:
        return from_record(message.array_records[STATE_RECORD])
    if STATE_RECORD in context_state.array_records:
        return from_record(context_state.array_records[STATE_RECORD])
    return {}


def train_start(received: Weights, message: RecordDict, context_state: RecordDict, config: Config) -> Weights:
    """The weights a node trains from: the global model, or for a strategy whose descriptor sets
    ``trains_personal`` (FedPer) its ``personal_model`` of the global model and the node's state."""
    entry = get_registry().strategies.get(str(config["strategy"]))
    if entry is None or not getattr(entry.strategy, "trains_personal", False):
        return received
    personal = _personal_function(entry.strategy, "personal_model")
    state = _node_state(message, context_state)
    return received if personal is None or not state else dict(personal(received, state))


def personal_weights(
    received: Weights, message: RecordDict, context_state: RecordDict, config: Config
) -> Weights | None:
    """The node's personalised model for evaluation, from the global model and the node's state: None unless
    the strategy declares a ``personal_model`` (``fedplug.personal``). A node with no state yet (it has not
    trained) evaluates the global model as its personal one. The state is the one the message carries (a
    resumed run's, until the node trains again), else the one kept in ``context_state``."""
    entry = get_registry().strategies.get(str(config["strategy"]))
    personal = None if entry is None else _personal_function(entry.strategy, "personal_model")
    if personal is None:
        return None
    state = _node_state(message, context_state)
    return received if not state else dict(personal(received, state))


class Probe(Strategy):
    """A strategy that needs both capabilities, for the backend conformance suite: FedAvg, plus the node's
    update as an extra reply record and a count of its train steps as its state."""

    name = "fedplug_capability_probe"
    description = "checks the node capabilities (backend conformance suite)"
    implementation = "flwr.serverapp.strategy:FedAvg"
    needs = frozenset({"reply-arrays", "node-state"})
    reply_records = ("update",)
    node_step = "fedplug.capabilities:probe_step"
    state = ()


def probe_step(step: NodeStep) -> None:
    """``Probe``'s node step: the update ``after - before`` in the reply, the count of steps in the state."""
    step.reply["update"] = {key: step.after[key] - step.before[key] for key in step.before}
    step.state["steps"] = np.asarray(step.state.get("steps", np.zeros((), np.int64)) + 1)
