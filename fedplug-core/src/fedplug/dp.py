"""Differential privacy for every backend: Flower's DP wrappers and client mods, accounted with dp-accounting.

``dp`` in the run config picks the mechanism (``docs/privacy.md`` says what each protects):

- ``server-fixed`` / ``server-adaptive``: Flower's ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``
  clips each update on the server and adds Gaussian noise to the aggregate;
- ``client-fixed`` / ``client-adaptive``: ``DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping`` on the
  server, ``fixedclipping_mod`` / ``adaptiveclipping_mod`` in the ClientApp (:func:`client_mod`);
- ``local``: Flower's ``LocalDpMod`` in the ClientApp: each node clips its update and adds noise itself.

They act on ``ArrayRecord``s, so every backend and mixed federations work alike. What fedplug adds:

- **Uniform weights, fixed denominator.** Flower's wrappers calibrate the noise to an unweighted mean of
  ``num_sampled_clients`` clipped updates; FedAvg weighs by ``num-examples`` and divides by the replies
  that came. :class:`FixedDenominator` (between the wrapper and FedAvg/FedProx) gives every reply weight 1
  and scales the updates so that the aggregate is ``global + sum(clipped updates) / expected``, where
  ``expected`` is the expected number of sampled nodes (``fraction-train * num-supernodes``): the
  sensitivity the accountant assumes (one node changes the aggregate by at most ``clipping-norm / expected``).
- **Poisson sampling.** With ``fraction-train`` below 1, each node takes part in a round independently
  with that probability (``fedplug.rounds.poisson_draw``, seeded by seed and round), which is what the
  accountant's Poisson-subsampled Gaussian assumes.
- **Accounting** with Google's ``dp-accounting`` (RDP), every round: :class:`Privacy`.
- **With SecAgg+** (``secagg=true``, ``fedplug.secagg``): ``client-fixed`` clips on the nodes before masking,
  and the one reply the strategy gets stands for the sum of the clipped updates, so the same wrapper and
  :class:`FixedDenominator` add the same noise; ``local`` noises before masking; the others are refused.
- **Secret, resumable noise.** Flower's wrappers and mods draw noise with numpy's global generator; fedplug
  seeds it around each call (:func:`seeded`) from a noise key, the round (and the partition, on a node),
  and restores it after. The key is never the run's ``seed`` (whoever read ``config.json`` could subtract
  the noise): it is 128 bits from the operating system's random source (:func:`noise_key`), kept in the
  server's checkpoints so that a resumed run is bit-identical, unless the user sets ``dp.noise-seed`` to
  make the noise reproducible on purpose (research, tests; ``docs/privacy.md``).

Nothing here imports Flower or dp-accounting at import time.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

OFF = ("", "off")
MODES = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive", "local")
CENTRAL = MODES[:4]
ADAPTIVE = ("server-adaptive", "client-adaptive")
CLIENT_SIDE = ("client-fixed", "client-adaptive", "local")
"""The mechanisms whose step runs on the nodes (Flower's mods, on one client's training reply)."""
NOISE_STREAM = 27
"""Mixed into the seed of DP noise so that it never repeats another seeded stream of the run."""
INSTALL = "pip install 'fedplug-core[dp]'"


def mode(config: Mapping[str, Any]) -> str:
    """The configured mechanism, or ``""`` with DP off."""
    value = str(config.get("dp", "off")).strip().lower()
    return "" if value in OFF else value


def central(config: Mapping[str, Any]) -> bool:
    return mode(config) in CENTRAL


def client_side(config: Mapping[str, Any]) -> bool:
    """Whether DP acts on each node's training reply (:data:`CLIENT_SIDE`)."""
    return mode(config) in CLIENT_SIDE


def poisson(config: Mapping[str, Any]) -> bool:
    """Whether training nodes are drawn by Poisson sampling: central DP with ``fraction-train`` below 1."""
    return central(config) and float(config["fraction-train"]) < 1.0


def expected_nodes(config: Mapping[str, Any]) -> float:
    """The expected number of training nodes per round: the fixed denominator of the DP aggregate."""
    return float(config["fraction-train"]) * int(config["num-supernodes"])


def clipped_count_stddev(config: Mapping[str, Any]) -> float:
    """Adaptive clipping's noise on the clipped count: ``dp.clipped-count-stddev``, or Flower's default m/20."""
    value = float(config.get("dp.clipped-count-stddev", 0.0))
    return value if value > 0 else expected_nodes(config) / 20


# -- accounting ------------------------------------------------------------------------


def accounted_multiplier(config: Mapping[str, Any], noise_multiplier: float | None = None) -> float:
    """The noise multiplier of one round's release as the accountant sees it.

    Fixed clipping and local DP: ``dp.noise-multiplier``. Adaptive clipping: Flower splits the
    configured multiplier ``z`` between the update (``(z^-2 - (2 s)^-2)^-1/2``) and the clipped count
    (stddev ``s``), assuming the count's sensitivity is 1/2; Flower's wrappers count clipped updates
    without centring them, so one node changes the count by 1: fedplug accounts the composition with
    sensitivity 1, ``(z_update^-2 + s^-2)^-1/2``, a little below ``z``.
    """
    z = float(config["dp.noise-multiplier"]) if noise_multiplier is None else noise_multiplier
    if mode(config) not in ADAPTIVE:
        return z
    s = clipped_count_stddev(config)
    if z >= 2 * s:
        raise ValueError(f"adaptive clipping needs dp.noise-multiplier below 2 * dp.clipped-count-stddev = {2 * s:g}")
    update = (z**-2 - (2 * s) ** -2) ** -0.5
    return float((update**-2 + s**-2) ** -0.5)


@functools.lru_cache(maxsize=4096)
def _epsilon(z: float, q: float, delta: float, releases: int) -> float:
    if releases <= 0:
        return 0.0
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:  # where the ServerApp runs (a SuperLink's machine): one line, not a traceback
        from fedplug.errors import ConfigError

        raise ConfigError(f"differential privacy needs dp-accounting where the ServerApp runs: {INSTALL}") from None

    event: Any = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    absl = logging.getLogger("absl")  # orders whose series does not converge are dropped (an upper bound)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = rdp.RdpAccountant()
        accountant.compose(event, releases)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class Privacy:
    """A run's privacy accounting: epsilon at ``delta`` after each round, and the budget.

    Every training round is one release (a skipped round too: it is counted, never undercounted).
    Central DP: the Gaussian mechanism on the sum of clipped updates (add or remove one node's data),
    Poisson-subsampled with probability ``sampling`` when ``fraction-train`` is below 1. Local DP: each
    node's own release of its clipped update (any change of its data, sensitivity twice the clipping
    norm), composed over every round (the worst case: a node that trains in every round), with no
    credit for sampling (the server knows whom it sampled).
    """

    mode: str
    noise_multiplier: float
    """As accounted (``accounted_multiplier``)."""
    sampling: float
    delta: float
    max_epsilon: float

    def epsilon(self, releases: int) -> float:
        return _epsilon(self.noise_multiplier, self.sampling, self.delta, releases)

    def allows(self, releases: int) -> bool:
        """Whether ``releases`` rounds stay within ``dp.max-epsilon`` (always, without one)."""
        return self.max_epsilon <= 0 or self.epsilon(releases) <= self.max_epsilon

    def rounds_within_budget(self, rounds: int) -> int:
        """How many of ``rounds`` rounds the budget allows (epsilon grows with the rounds: a bisection)."""
        if self.allows(rounds):
            return rounds
        low, high = 0, rounds  # low rounds are allowed, high are not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.allows(middle) else (low, middle)
        return low

    def record(self, server_round: int) -> dict[str, float | str]:
        """The round record's ``epsilon`` and ``delta`` after ``server_round`` rounds."""
        return {"epsilon": round(self.epsilon(server_round), 6), "delta": self.delta}

    def stop_reason(self, server_round: int) -> str:
        return (
            f"privacy budget: round {server_round + 1} would spend epsilon {self.epsilon(server_round + 1):.3f} "
            f"> dp.max-epsilon {self.max_epsilon:g} (delta {self.delta:g}): stopped after round {server_round}"
        )


def privacy(config: Mapping[str, Any]) -> Privacy | None:
    """The run's accounting, or None with DP off."""
    chosen = mode(config)
    if not chosen:
        return None
    return Privacy(
        chosen,
        accounted_multiplier(config),
        float(config["fraction-train"]) if poisson(config) else 1.0,
        float(config["dp.delta"]),
        float(config["dp.max-epsilon"]),
    )


def noise_for_epsilon(config: Mapping[str, Any]) -> float:
    """The smallest ``dp.noise-multiplier`` (4 significant digits, rounded up) whose epsilon after
    ``num-server-rounds`` rounds is at most ``dp.epsilon``; ValueError if none below 1000 is."""
    target, rounds = float(config["dp.epsilon"]), int(config["num-server-rounds"])
    q = float(config["fraction-train"]) if poisson(config) else 1.0
    delta = float(config["dp.delta"])

    def spent(z: float) -> float:
        return _epsilon(accounted_multiplier(config, z), q, delta, rounds)

    low, high = 1e-2, 1e3
    if mode(config) in ADAPTIVE:  # Flower's split of the noise needs z < 2 * clipped-count-stddev
        high = min(high, 2 * clipped_count_stddev(config) * (1 - 1e-6))
    if spent(high) > target:
        raise ValueError(f"no noise multiplier up to {high:.4g} reaches epsilon {target:g} in {rounds} rounds")
    if spent(low) <= target:
        return low
    for _ in range(24):  # bisection in log space: the bounds end a factor 1e5 ** (1 / 2**24) apart
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= target else (middle, high)
    digits = 3 - math.floor(math.log10(high))
    z = math.ceil(high * 10**digits) / 10**digits
    return z if spent(z) <= target else high


def plan(config: dict[str, Any], overrides: Mapping[str, Any]) -> tuple[str, ...]:
    """The pre-flight checks of a DP run that need the accountant; derives the noise of a target epsilon.

    Returns what the plan decided that the user should know. Raises ``ConfigError`` (one line).
    """
    from fedplug.errors import ConfigError

    chosen = mode(config)
    if not chosen:
        return ()
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ConfigError(f"dp={chosen} needs dp-accounting for its accounting: {INSTALL}") from None
    notes: list[str] = []
    z, target = float(config["dp.noise-multiplier"]), float(config["dp.epsilon"])
    if z > 0 and target > 0 and "dp.noise-multiplier" in overrides:
        raise ConfigError(
            "set dp.noise-multiplier or a target dp.epsilon, not both: fedplug derives the noise from the target"
        )
    if z <= 0 and target <= 0:
        raise ConfigError(f"dp={chosen} needs dp.noise-multiplier (e.g. 1.0) or a target dp.epsilon (e.g. 8)")
    try:
        if z <= 0:
            z = noise_for_epsilon(config)
            config["dp.noise-multiplier"] = z
            notes.append(
                f"dp.noise-multiplier {z:g}: epsilon {target:g} at delta {float(config['dp.delta']):g} "
                f"after {config['num-server-rounds']} rounds"
            )
        accounted_multiplier(config)
    except ValueError as error:
        raise ConfigError(
            f"dp={chosen}: {error}; raise dp.clipped-count-stddev, dp.epsilon or the number of nodes"
        ) from None
    if central(config) and float(config["outlier-factor"]) > 0:
        if "outlier-factor" in overrides:
            raise ConfigError(
                f"outlier-factor drops updates by comparing them with other nodes' (dp={chosen}): one node's data "
                "would decide whether another's counts, which the accounting does not cover; set outlier-factor=0"
            )
        config["outlier-factor"] = 0.0
        notes.append(f"outlier screening off (outlier-factor=0): dp={chosen} bounds each update by clipping")
    accounting = privacy(config)
    assert accounting is not None
    rounds = int(config["num-server-rounds"])
    allowed = accounting.rounds_within_budget(rounds)
    if accounting.max_epsilon > 0 and allowed == 0:
        raise ConfigError(
            f"dp.max-epsilon {accounting.max_epsilon:g} is below one round's epsilon ({accounting.epsilon(1):.3f} "
            f"at delta {accounting.delta:g}): raise dp.max-epsilon or dp.noise-multiplier"
        )
    if allowed < rounds:
        notes.append(f"dp.max-epsilon {accounting.max_epsilon:g} allows {allowed} of the {rounds} rounds")
    return tuple(notes)


# -- seeded noise ------------------------------------------------------------------------


def noise_key(config: Mapping[str, Any]) -> np.ndarray:
    """The key DP noise is drawn from: derived from ``dp.noise-seed`` when it is set, else 128 fresh secret bits.

    A fresh key is never written to ``config.json`` or ``metrics.json``; the server's checkpoints keep theirs
    (``DpStrategy.noise_key``), local DP's nodes draw a new one for every update.
    """
    chosen = int(config.get("dp.noise-seed", 0))
    if chosen:
        return np.random.SeedSequence([NOISE_STREAM, chosen]).generate_state(4)
    return np.array([secrets.randbits(32) for _ in range(4)], dtype=np.uint32)


@contextmanager
def seeded(*key: int) -> Iterator[None]:
    """numpy's global generator seeded from ``key`` inside the block, restored after it.

    Flower's DP wrappers and mods draw their noise from ``np.random`` (the legacy global generator):
    seeding it per round (and node) from a noise key (:func:`noise_key`) makes the noise a function of
    that key, so a resumed run that restores the key repeats it.
    """
    state = np.random.get_state()
    np.random.seed([NOISE_STREAM, *(int(k) for k in key)])
    try:
        yield
    finally:
        np.random.set_state(state)


# -- the server: strategies ------------------------------------------------------------


class FixedDenominator:
    """Between a DP wrapper and FedAvg/FedProx: weight 1 per reply, the aggregate divided by ``expected``.

    With ``m`` replies, each (already clipped) reply ``x_i`` becomes ``g + (m / expected) (x_i - g)``
    (``g``: the round's global model), so the inner strategy's unweighted mean is
    ``g + sum(x_i - g) / expected``: one node changes it by at most ``clipping-norm / expected``,
    whatever the number of replies (Poisson sampling, failed nodes).
    """

    def __init__(self, strategy: Any, expected: float) -> None:
        self.strategy, self.expected = strategy, expected
        self.weight_key: str = strategy.weighted_by_key
        self.current: list[np.ndarray] = []

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        self.current = arrays.to_numpy_ndarrays()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        from flwr.app import Array, ArrayRecord

        replies = list(replies)
        scale = len(replies) / self.expected
        for reply in replies:
            for metrics in reply.content.metric_records.values():
                metrics[self.weight_key] = 1
            for key, record in list(reply.content.array_records.items()):
                arrays = record.to_numpy_ndarrays()
                scaled = [
                    (g + scale * (np.asarray(x) - g)).astype(np.asarray(x).dtype, copy=False)
                    for x, g in zip(arrays, self.current, strict=True)
                ]
                reply.content[key] = ArrayRecord({k: Array(v) for k, v in zip(record.keys(), scaled, strict=True)})
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class DpStrategy:
    """The configured strategy under central DP: Flower's wrapper around :class:`FixedDenominator`.

    The round loop drives it as any strategy. ``aggregate_train`` draws its noise from ``noise_key`` and
    the round; the state a checkpoint keeps is declared in ``checkpoint_state``: the noise key (so a
    resumed run draws the same noise) and adaptive clipping's current clipping norm.
    """

    def __init__(self, wrapper: Any, key: np.ndarray, adaptive: bool) -> None:
        self.wrapper, self.noise_key = wrapper, key
        self.checkpoint_state: tuple[str, ...] = ("noise_key", "clipping_norm") if adaptive else ("noise_key",)

    @property
    def clipping_norm(self) -> float:
        return float(self.wrapper.clipping_norm)

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self.wrapper.clipping_norm = float(value)

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        """The wrapper's aggregate with seeded noise, of the replies whose update is not exactly zero.

        Flower's clipping divides by the update's norm (a zero update raises ZeroDivisionError); a zero
        update adds nothing to the sum divided by the fixed denominator, so leaving it out changes
        nothing of the aggregate (adaptive clipping: it is not counted among the unclipped updates).
        """
        current = self.wrapper.strategy.current  # FixedDenominator: the round's global model
        kept = [reply for reply in replies if not _unchanged(reply, current)]
        with seeded(*self.noise_key, server_round):
            return self.wrapper.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        return self.wrapper.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        return self.wrapper.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.wrapper.summary()


def _unchanged(reply: Any, current: list[np.ndarray]) -> bool:
    """Whether every ArrayRecord of ``reply`` is exactly the round's global model."""
    return all(
        all(np.array_equal(x, g) for x, g in zip(record.to_numpy_ndarrays(), current, strict=True))
        for record in reply.content.array_records.values()
    )


def wrap(strategy: Any, config: Mapping[str, Any]) -> Any:
    """``strategy`` under the configured central DP (unchanged with DP off or local DP)."""
    from flwr.serverapp import strategy as flower

    chosen = mode(config)
    if chosen not in CENTRAL:
        return strategy
    expected = expected_nodes(config)
    inner = FixedDenominator(strategy, expected)
    z, norm = float(config["dp.noise-multiplier"]), float(config["dp.clipping-norm"])
    # Flower's wrappers take the number of sampled clients; the expected number is what the noise needs
    sampled: Any = expected
    wrapper: Any
    cls: Any
    if chosen in ADAPTIVE:
        cls = (
            flower.DifferentialPrivacyServerSideAdaptiveClipping
            if chosen == "server-adaptive"
            else flower.DifferentialPrivacyClientSideAdaptiveClipping
        )
        wrapper = cls(
            inner,
            z,
            sampled,
            initial_clipping_norm=norm,
            target_clipped_quantile=float(config["dp.target-clipped-quantile"]),
            clip_norm_lr=float(config["dp.clip-norm-lr"]),
            clipped_count_stddev=clipped_count_stddev(config),
        )
    else:
        cls = (
            flower.DifferentialPrivacyServerSideFixedClipping
            if chosen == "server-fixed"
            else flower.DifferentialPrivacyClientSideFixedClipping
        )
        wrapper = cls(inner, z, norm, sampled)
    return DpStrategy(wrapper, noise_key(config), chosen in ADAPTIVE)


# -- the ClientApp: mods -----------------------------------------------------------------


def local_mod(config: Mapping[str, Any]) -> Callable[..., Any]:
    """Flower's ``LocalDpMod`` with noise of stddev ``dp.noise-multiplier * 2 * dp.clipping-norm``.

    ``LocalDpMod`` takes an epsilon and draws noise of stddev ``sensitivity * sqrt(2 ln(1.25/delta)) /
    epsilon``; fedplug gives it the sensitivity of a clipped update under any change of the node's data
    (twice the clipping norm) and the epsilon that makes the stddev ``z`` times that sensitivity. The
    accounting (``Privacy``) composes these Gaussian releases with RDP, tighter than LocalDpMod's epsilon.
    """
    from flwr.clientapp.mod import LocalDpMod

    norm, delta = float(config["dp.clipping-norm"]), float(config["dp.delta"])
    z = float(config["dp.noise-multiplier"])
    return LocalDpMod(norm, 2 * norm, math.sqrt(2 * math.log(1.25 / delta)) / z, delta)


def client_mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """The ClientApp's DP step, by ``dp`` in the run config: clipping (client-side central DP) or local DP.

    Acts on training messages only. Local DP's noise comes from a fresh secret key for every update
    (:func:`noise_key`): the server must not be able to regenerate it. With ``dp.noise-seed`` set, from
    that seed, the round and the partition.
    """
    from flwr.app import MessageType
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    config = context.run_config
    chosen = mode(config)
    if chosen not in CLIENT_SIDE or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if chosen == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if chosen == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    sent: Mapping[str, Any] = next(iter(msg.content.config_records.values()), {})
    server_round = int(sent.get("server-round", 0))
    partition = int(context.node_config.get("partition-id", context.node_id))
    with seeded(*noise_key(config), server_round, partition):
        return local_mod(config)(msg, context, call_next)
