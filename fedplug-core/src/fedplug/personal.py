"""Personalised federated learning as built-in strategies: ``fedper``, ``ditto`` and ``fedbn``, for every backend.

All three are FedAvg on the server and keep a personal part on each node in its node state (the
``node-state`` capability, ``fedplug.capabilities``): saved in simulation checkpoints, so a
killed run resumes exactly. Their descriptors add two attributes the core reads:

- ``personal_model = "module:function"``: ``function(global_weights, state) -> weights``, the
  node's personalised model; evaluation reports its metrics as ``personal-loss`` and
  ``personal-accuracy`` next to the global model's.
- ``trains_personal``: the node trains from its personalised model rather than the global one.

**FedPer** (Arivazhagan et al., 2019): the shared model's head, its last layer's weight and bias,
stays on the node. The head is backend-neutral: the last two arrays of the model's fixed weight
order (``HEAD_ARRAYS``), which every backend's layout of ``mlp``, ``lenet`` and ``lenet-bn`` ends with (checked
by ``fedplug-core/tests/test_personal.py``). The node trains global body + own head; its reply
carries the global head unchanged, so FedAvg averages only the body.

**Ditto** (Li et al., 2021): the global model trains as in FedAvg; each node also trains a personal
model ``v`` on its data from its last ``v`` with the backend's own ``train``, then pulls it toward
the global model ``w`` it received: the proximal term ``lambda/2 ||v - w||^2``, taken as its proximal
step ``v <- (v + lr * lambda * w) / (1 + lr * lambda)`` (the gradient step ``v - lr * lambda * (v - w)``
to first order in ``lr * lambda``, and stable for any) for each of the ``K`` local steps, is applied
after training in closed form, ``v <- w + (1 + lr * lambda)^-K (v - w)`` (exact when the data gradients
do not depend on the pull, an approximation otherwise, as SCAFFOLD's correction is).

**FedBN** (Li et al., 2021): the normalisation layers' parameters and running statistics stay on the node;
everything else is FedAvg. Which arrays those are is backend-neutral: the canonical names beginning with
``fedplug.models.NORM_PREFIX`` (``lenet-bn``'s ``norm.<i>.*``). As in FedPer, the node trains the global
weights with its own normalisation arrays and replies with the global ones unchanged, so the average leaves
them as they were. A model without normalisation layers is refused before the run starts (``FedBN.check_run``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from fedplug.errors import ConfigError
from fedplug.models import NORMALISED_MODELS, norm_keys
from fedplug.strategy_contract import Parameter, Strategy
from fedplug.types import Scalar

if TYPE_CHECKING:
    from fedplug.backend import Weights
    from fedplug.capabilities import NodeStep

HEAD_ARRAYS = 2
"""The head of a shared model: the last two arrays of its weight order, the last layer's weight and bias."""


def head_keys(weights: Weights) -> list[str]:
    """The names of the model's head: its last ``HEAD_ARRAYS`` arrays."""
    return list(weights)[-HEAD_ARRAYS:]


class PersonalStrategy(Strategy):
    """A personalised strategy: FedAvg on the server, a personal part in each node's state."""

    implementation = "flwr.serverapp.strategy:FedAvg"
    needs = frozenset({"node-state"})
    state = ()
    composes = frozenset({"fold"})  # node state travels in the reply: no secagg; a node per client: no cohorts
    personal_model: ClassVar[str] = ""
    trains_personal: ClassVar[bool] = False


class FedPer(PersonalStrategy):
    name = "fedper"
    description = "FedPer: FedAvg of the body; each node keeps its own head (the last layer)"
    node_step = "fedplug.personal:fedper_step"
    personal_model = "fedplug.personal:fedper_model"
    trains_personal = True


class Ditto(PersonalStrategy):
    name = "ditto"
    description = "Ditto: FedAvg, and a personal model on each node pulled toward the global one"
    parameters = (Parameter("lambda", 0.1, "pull of each personal model toward the global one (0: purely local)", 0.0),)
    node_step = "fedplug.personal:ditto_step"
    personal_model = "fedplug.personal:ditto_model"

    def arguments(self, kwargs: dict[str, Any], config: Mapping[str, Scalar]) -> dict[str, Any]:
        """FedAvg's arguments: ``lambda`` acts on the nodes, which read it from the run config."""
        return {key: value for key, value in kwargs.items() if key != "lambda"}


class FedBN(PersonalStrategy):
    name = "fedbn"
    description = "FedBN: FedAvg of all but the normalisation layers, which each node keeps (--model lenet-bn)"
    node_step = "fedplug.personal:fedbn_step"
    personal_model = "fedplug.personal:fedper_model"  # the global weights with the node's own arrays
    trains_personal = True

    def check_run(self, config: Mapping[str, Scalar]) -> None:
        """Refuse a model without normalisation layers: FedBN would be FedAvg under another name."""
        if config.get("model") not in NORMALISED_MODELS:
            raise ConfigError(
                f"strategy 'fedbn' keeps each node's normalisation layers, but model '{config.get('model')}' has "
                f"none: use --model {' or '.join(NORMALISED_MODELS)}"
            )


def fedper_model(received: Weights, state: Weights) -> Weights:
    """The global body with the node's own head."""
    return {key: state.get(key, value) for key, value in received.items()}


def fedper_step(step: NodeStep) -> None:
    """Keep the trained head in the node's state; send the body with the global head (FedAvg of the body)."""
    head = head_keys(step.after)
    step.state.clear()
    step.state.update({key: step.after[key] for key in head})
    step.after = {key: step.before[key] if key in head else value for key, value in step.after.items()}


def ditto_model(received: Weights, state: Weights) -> Weights:
    """The node's personal model ``v`` (its whole state)."""
    return {key: state.get(key, value) for key, value in received.items()}


def ditto_step(step: NodeStep) -> None:
    """Train the personal model from its last value (the global one at first), then pull it toward the global."""
    if step.train is None:
        raise ValueError("strategy 'ditto' needs the node's trainer (fedplug.capabilities.NodeStep.train)")
    start = ditto_model(step.before, step.state)
    trained = step.train(start, step.config)
    lam = float(step.config.get("strategy.lambda", Ditto.parameters[0].default))
    keep = (1.0 + float(step.config["lr"]) * lam) ** -step.steps  # stable for any lr * lambda
    step.state.clear()
    step.state.update({key: (w + keep * (trained[key] - w)).astype(w.dtype) for key, w in step.before.items()})


def fedbn_step(step: NodeStep) -> None:
    """Keep the trained normalisation arrays in the node's state; send the rest with the global ones (FedAvg)."""
    norm = set(norm_keys(step.after))
    step.state.clear()
    step.state.update({key: step.after[key] for key in norm})
    step.after = {key: step.before[key] if key in norm else value for key, value in step.after.items()}
