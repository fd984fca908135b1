"""A trained policy behind the same call as the baselines.

At evaluation the learned policy runs exactly as it will in the engine: an exported
runtime policy (numpy) behind the guard. During training, the live SB3 model answers
the same `act(obs, mask)` call through `SB3Actor`, with its VecNormalize statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.knobs import Knobs
from ..policies.guard import KERNEL_MARGIN, GuardedPolicy, Policy

if TYPE_CHECKING:
    from ..engine.engine import Engine


class SB3Actor:
    """An SB3 (Maskable)PPO model as a runtime-style actor: deterministic, masked."""

    def __init__(self, model: Any, vecnorm: Any | None = None) -> None:
        self.model = model
        self.vecnorm = vecnorm
        self.maskable = "action_masks" in model.predict.__code__.co_varnames

    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        o = self.vecnorm.normalize_obs(obs) if self.vecnorm is not None else obs
        if self.maskable:
            # the engine's masks are shared read-only arrays; torch wants its own copy
            action, _ = self.model.predict(o, deterministic=True, action_masks=None if mask is None else np.array(mask))
        else:
            action, _ = self.model.predict(o, deterministic=True)
        return action


class LearnedPolicy:
    """Any actor with `act(obs, mask)`, guarded as in the engine."""

    def __init__(
        self,
        actor: Policy,
        device_type: str,
        name: str = "ppo",
        fallback: Knobs | None = None,
        max_costly_switches_per_s: float = 1.0,
        decide_every: int | None = None,
        decide_every_s: float | None = None,
        kernel_margin: float = KERNEL_MARGIN,
    ) -> None:
        self.name = name
        self.kernel_margin = kernel_margin
        self.decide_every, self.decide_every_s = decide_every, decide_every_s  # None: the actor's own
        self.actor = actor
        self.device_type = device_type
        self.fallback = fallback
        self.rate = max_costly_switches_per_s
        self.reset()

    def reset(self) -> None:
        self.guard = GuardedPolicy(
            self.actor,
            self.device_type,
            self.fallback,
            self.rate,
            self.decide_every,
            self.decide_every_s,
            kernel_margin=self.kernel_margin,
        )

    def knobs(self, obs: np.ndarray, engine: Engine) -> Knobs:
        return self.guard(engine)
