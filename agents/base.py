"""The one call every policy answers, learned or not: given the state, the knobs to use.

`KnobPolicy.knobs(obs, engine)` receives the observation the environment builds (the same
vector the runtime policy sees) and the live engine, for baselines that read raw state
(AIMD reads latencies against the SLO; the oracle reads the clock). A policy is also an
engine controller: `as_controller` adapts it so the engine asks it every iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..engine.features import ObservationBuilder
from ..engine.knobs import Knobs

if TYPE_CHECKING:
    from ..engine.engine import Engine


class KnobPolicy(Protocol):
    name: str

    def reset(self) -> None:
        """Forget per-episode state before a new replay."""
        ...

    def knobs(self, obs: np.ndarray, engine: Engine) -> Knobs:
        """The knobs for the next iteration."""
        ...


def as_controller(policy: KnobPolicy, builder: ObservationBuilder | None = None) -> Callable[[Engine], Knobs]:
    """An engine controller that builds the observation and asks `policy`."""
    builder = builder or ObservationBuilder()

    def control(engine: Engine) -> Knobs:
        return policy.knobs(builder.build(engine), engine)

    return control


class StaticPolicy:
    """One config for the whole run: the defaults, or a searched best-static config."""

    def __init__(self, knobs: Knobs, name: str = "static") -> None:
        self.name = name
        self.config = knobs

    def reset(self) -> None:
        pass

    def knobs(self, obs: np.ndarray, engine: Engine) -> Knobs:
        return self.config


def default_policy() -> StaticPolicy:
    """What a user runs without tuning: the engine's default knobs."""
    return StaticPolicy(Knobs(), name="default")
