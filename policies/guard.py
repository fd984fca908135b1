"""The guard between a runtime policy and the engine: a bad policy never loses a request.

A policy file whose observation or action layout differs from the engine's is refused
when the guard is built, with the differences listed. Every iteration the guard builds
the observation (the environment's own builder), asks
the policy, and checks the answer before it reaches the engine:
- the policy raised, returned NaN, the wrong shape or an index out of range, or the
  observation was not finite -> the last good knobs (or the fallback config) are kept;
- an action the masks forbid (a kernel the device lacks, flash in fp32) -> the same;
- a costly switch (precision, CUDA graphs, attention kernel: they recast weights or
  recapture graphs) is held back to at most `max_costly_switches_per_s`;
- a costly switch the engine refused (a precision cast out of memory on a full card: the
  engine's knobs in force stay the old ones) is not asked for again for `refused_hold_s`
  of engine time: each try costs a failed cast, and the policy, trained on a simulator
  that never refuses, would ask again at every decision;
- a switch to an attention kernel whose reference decode step the engine's card probe
  timed more than `kernel_margin` slower than the kernel in force is held back. The
  probe measured this card; the policy knows only its training cards, and can read an
  unseen card's speed as another card's and take that card's kernel (the shipped policy,
  on a card 3x slower than its profile, took cuDNN, which the probe timed 35% slower than
  flash there). `kernel_holds` counts the decisions it changed.
With `decide_every` = n > 1 the policy is asked every n-th iteration, with `decide_every_s`
= t at the first iteration t seconds (engine clock) after its last decision, and its knobs
hold in between: the cadence it was trained at (the environment's `iterations_per_step`
or `step_s`; by default the cadence a runtime policy's manifest records).
Each fallback is counted with its reason; the scheduler's own accounting is untouched,
so a failing policy can at worst leave the engine on a safe static config.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..engine.argtypes import nonneg_float
from ..engine.features import FEATURE_NAMES, ObservationBuilder
from ..engine.knob_space import ACTION_DIMS, action_mask, action_tables, decode_action
from ..engine.knobs import KnobError, Knobs

if TYPE_CHECKING:
    from ..engine.engine import Engine

COSTLY_KNOBS = ("precision", "cuda_graphs", "attention")
KERNEL_MARGIN = 0.1  # room for a live probe's timing noise; set beforehand, not tuned


def add_kernel_check_args(p: argparse.ArgumentParser, whose: str) -> None:
    """`--kernel-margin M` and `--no-kernel-check`, for the CLIs that run a policy behind the guard."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--kernel-margin",
        type=nonneg_float,
        default=KERNEL_MARGIN,
        help=f"{whose}: hold back a switch to an attention kernel the card probe timed more than this "
        f"fraction slower than the kernel in force (default {KERNEL_MARGIN})",
    )
    group.add_argument(
        "--no-kernel-check", dest="kernel_margin", action="store_const", const=math.inf, help="no kernel check"
    )


class Policy(Protocol):
    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> Any: ...


class GuardedPolicy:
    """A controller for `Engine`: the policy's knobs, validated, rate-limited, with fallbacks."""

    def __init__(
        self,
        policy: Policy,
        device_type: str,
        fallback: Knobs | None = None,
        max_costly_switches_per_s: float = 1.0,
        decide_every: int | None = None,
        decide_every_s: float | None = None,
        refused_hold_s: float = 10.0,
        kernel_margin: float = KERNEL_MARGIN,
    ) -> None:
        # None: the cadence the policy says it was trained at (a runtime policy's manifest),
        # else every iteration
        if decide_every is None:
            decide_every = getattr(policy, "decide_every", 1)
        if decide_every_s is None:
            decide_every_s = getattr(policy, "decide_every_s", None)
        if not isinstance(decide_every, int) or decide_every < 1:
            raise ValueError(f"decide_every must be an integer >= 1, got {decide_every!r}")
        if decide_every_s is not None and not (math.isfinite(decide_every_s) and decide_every_s > 0):
            raise ValueError(f"decide_every_s must be a positive number of seconds or None, got {decide_every_s!r}")
        if not (max_costly_switches_per_s >= 0 and math.isfinite(max_costly_switches_per_s)):
            raise ValueError("max_costly_switches_per_s must be a finite number >= 0")
        if not (refused_hold_s >= 0 and math.isfinite(refused_hold_s)):
            raise ValueError("refused_hold_s must be a finite number of seconds >= 0")
        if not kernel_margin >= 0:  # inf: never hold a kernel back
            raise ValueError(f"kernel_margin must be a number >= 0 (inf: no check), got {kernel_margin!r}")
        # A policy file that declares its layout must match the engine's, or be refused now:
        # valid indices from another layout would silently mean other knobs.
        if hasattr(policy, "check_features") and hasattr(policy, "check_actions"):
            policy.check_features(FEATURE_NAMES)
            policy.check_actions(action_tables())
        self.policy = policy
        self.device_type = device_type
        self.fallback = fallback or Knobs()
        self.min_costly_gap_s = math.inf if max_costly_switches_per_s == 0 else 1.0 / max_costly_switches_per_s
        self.builder = ObservationBuilder()
        self.last_good: Knobs | None = None
        self.fallbacks = 0
        self.held_switches = 0
        self.reasons: Counter[str] = Counter()
        self._last_costly_s = -math.inf
        self._dims = np.array(ACTION_DIMS)
        self.decide_every = decide_every
        self.decide_every_s = decide_every_s
        self._until_decision = 0
        self._next_decision_s = -math.inf
        self.refused_hold_s = refused_hold_s
        self.refused_switches = 0
        self._refused_until: dict[tuple[str, object], float] = {}  # (knob, value) -> engine time
        self.kernel_margin = kernel_margin
        self.kernel_holds = 0

    def _fall_back(self, engine: Engine, reason: str) -> Knobs:
        self.fallbacks += 1
        self.reasons[reason] += 1
        engine.telemetry.fallbacks += 1
        return self.last_good or self.fallback

    def __call__(self, engine: Engine) -> Knobs:
        if self.last_good is not None:
            self._take_refusals(engine)
            if self.decide_every_s is not None:
                hold = engine.now_s < self._next_decision_s
            else:
                hold = self._until_decision > 0
                if hold:
                    self._until_decision -= 1
            if hold:
                return self.last_good.replace(reclaim=False) if self.last_good.reclaim else self.last_good
        self._until_decision = self.decide_every - 1
        if self.decide_every_s is not None:
            self._next_decision_s = engine.now_s + self.decide_every_s
        nonfinite = self.builder.nonfinite
        obs = self.builder.build(engine)
        if self.builder.nonfinite != nonfinite:
            return self._fall_back(engine, "observation not finite")
        mask = action_mask(self.device_type, engine.knobs)
        try:
            raw = self.policy.act(obs, mask)
            action = np.asarray(raw, dtype=np.float64).reshape(-1)
        except Exception as exc:  # a policy failure must never reach the engine
            return self._fall_back(engine, f"policy raised {type(exc).__name__}")
        if action.shape != self._dims.shape or not np.all(np.isfinite(action)):
            return self._fall_back(engine, "action malformed or not finite")
        if np.any(action != np.round(action)) or np.any(action < 0) or np.any(action >= self._dims):
            return self._fall_back(engine, "action index out of range")
        offsets = np.concatenate([[0], np.cumsum(self._dims)[:-1]])
        if not mask[(offsets + action.astype(np.int64))].all():
            return self._fall_back(engine, "action forbidden by the masks")
        knobs, repairs = decode_action(action.astype(np.int64), self.device_type, current=engine.knobs)
        if repairs:
            return self._fall_back(engine, "action invalid for the device")
        knobs = self._rate_limit(engine, self._check_kernel(engine, knobs))
        self.last_good = knobs
        return knobs

    def _take_refusals(self, engine: Engine) -> None:
        """The engine applies what the guard returns at once, so a costly knob of the last
        answer that is not in force was refused: hold that value back, and answer with what
        runs (else every held iteration would ask the engine for the switch again)."""
        current = engine.knobs
        refused = [k for k in COSTLY_KNOBS if getattr(self.last_good, k) != getattr(current, k)]
        if not refused:
            return
        self.refused_switches += 1
        for k in refused:
            self._refused_until[(k, getattr(self.last_good, k))] = engine.now_s + self.refused_hold_s
        self.last_good = self.last_good.replace(**{k: getattr(current, k) for k in refused})

    def _check_kernel(self, engine: Engine, knobs: Knobs) -> Knobs:
        """Keep the kernel in force over one the card probe timed slower by more than the margin."""
        current = engine.knobs
        card = engine.card  # the observation needs it: an engine without a probe got no answer
        new, old = card.get(knobs.attention), card.get(current.attention)
        if knobs.attention == current.attention or new is None or old is None:
            return knobs
        if not new > old * (1.0 + self.kernel_margin):
            return knobs
        self.kernel_holds += 1
        # the masks already keep the kernel in force runnable at the asked precision (from a
        # half-only kernel, only half precisions may be asked for)
        return knobs.replace(attention=current.attention)

    def _rate_limit(self, engine: Engine, knobs: Knobs) -> Knobs:
        current = engine.knobs
        held = [k for k in COSTLY_KNOBS if self._refused_until.get((k, getattr(knobs, k)), -math.inf) > engine.now_s]
        if held:  # a value refused a moment ago: keep what runs (with its kernel, if they go together)
            try:
                knobs = knobs.replace(**{k: getattr(current, k) for k in held})
            except KnobError:
                knobs = knobs.replace(**{k: getattr(current, k) for k in COSTLY_KNOBS})
        costly = [k for k in COSTLY_KNOBS if getattr(knobs, k) != getattr(current, k)]
        if not costly:
            return knobs
        if math.isfinite(self.min_costly_gap_s) and engine.now_s - self._last_costly_s >= self.min_costly_gap_s:
            self._last_costly_s = engine.now_s
            return knobs
        self.held_switches += 1
        return knobs.replace(**{k: getattr(current, k) for k in costly})
