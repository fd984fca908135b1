"""AIMD adaptive batching, as Clipper does it (Crankshaw et al., NSDI 2017).

The batch limits grow additively while the latency of a batch meets the objective and
shrink multiplicatively when it misses; the other knobs stay at a base config (the
best-static one). The latency objective is the TPOT SLO: an iteration is one decode
step of every running request, so its time is the batch latency each of them sees. An
OOM counts as a miss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..engine.features import FEATURE_NAMES
from ..engine.knob_space import ACTION_TABLES, KNOB_NAMES, LIMIT_KNOBS, LIMIT_MOVES, head_slices, knobs_to_action
from ..engine.knobs import Knobs

if TYPE_CHECKING:
    from ..engine.engine import Engine


class AIMDPolicy:
    name = "aimd"

    def __init__(
        self,
        base: Knobs,
        add_seqs: int = 2,
        add_tokens: int = 256,
        decrease: float = 0.9,
        interval_s: float = 0.25,
        max_seqs: int = 256,
        max_tokens: int = 32768,
    ) -> None:
        if not 0 < decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        self.base = base
        self.add_seqs, self.add_tokens, self.decrease = add_seqs, add_tokens, decrease
        self.interval_s, self.max_seqs, self.max_tokens = interval_s, max_seqs, max_tokens
        self.reset()

    def reset(self) -> None:
        self.seqs = self.base.max_num_seqs
        self.tokens = self.base.max_batched_tokens
        self._next_s = 0.0

    def knobs(self, obs: np.ndarray, engine: Engine) -> Knobs:
        if engine.now_s >= self._next_s:
            self._next_s = engine.now_s + self.interval_s
            # Clipper's signal is the batch's own latency: queueing delay (TTFT) is what a
            # bigger batch cures, so it must not shrink the batch.
            miss = engine.last_iteration_ms / 1e3 > engine.config.slo.tpot_s or engine.telemetry.oom_recent > 0.05
            if miss:
                self.seqs = max(1, int(self.seqs * self.decrease))
                self.tokens = max(256, int(self.tokens * self.decrease))
            else:
                self.seqs = min(self.max_seqs, self.seqs + self.add_seqs)
                self.tokens = min(self.max_tokens, self.tokens + self.add_tokens)
        return self.base.replace(max_num_seqs=self.seqs, max_batched_tokens=self.tokens)


class AIMDTeacher:
    """AIMD in the action space the agent learns in: the teacher that kick-starts PPO.

    It reads only the observation (so the actor can represent it exactly): when the recent
    iteration time is over the TPOT SLO, or OOMs are recent, both batch limits take the
    small step down, otherwise the small step up; the other knobs go to a base config
    (best-static), except before the engine has produced a token, when the observation
    says nothing about the card and the knobs in force are kept, and except the allocator
    once memory is under pressure (see `pressure_allocator`). Moves are applied each
    decision, so it climbs and backs off faster than the 0.25 s AIMD baseline, and holds
    near the limit where a batch meets the SLO.
    """

    def __init__(
        self,
        base: Knobs,
        down: float = 0.95,
        up: float = 1.05,
        oom_threshold: float = 0.05,
        pressure_allocator: str | None = "expandable",
        pressure_headroom: float = 0.0,
    ) -> None:
        self.base_action = knobs_to_action(base)
        self.limit_heads = [KNOB_NAMES.index(name) for name in LIMIT_KNOBS]
        self.down, self.up = LIMIT_MOVES.index(down), LIMIT_MOVES.index(up)
        self._iteration = FEATURE_NAMES.index("iteration_vs_tpot")
        self._ooms = FEATURE_NAMES.index("recent_ooms")
        self._tokens_per_s = FEATURE_NAMES.index("tokens_per_s")
        self.oom_threshold = oom_threshold
        # Memory pressure (an OOM, or headroom under `pressure_headroom`) switches the
        # allocator to `pressure_allocator` for good: on the H100, expandable segments lost
        # almost no batch under pressure where the default allocator lost several.
        self._headroom = FEATURE_NAMES.index("memory_headroom")
        self.pressure_headroom = pressure_headroom
        # (head, entry, its flat mask index, its in-force feature); 0 headroom: OOMs alone
        self._allocator = None
        if pressure_allocator is not None:
            head = KNOB_NAMES.index("allocator")
            entry = ACTION_TABLES[head][1].index(pressure_allocator)
            self._allocator = (
                head,
                entry,
                head_slices()[head].start + entry,
                FEATURE_NAMES.index(f"knob_allocator={pressure_allocator}"),
            )
        # where each categorical knob in force sits in the observation (one-hot or 0/1)
        self._in_force = [
            (
                h,
                [FEATURE_NAMES.index(f"knob_{name}={v}") for v in values]
                if len(values) > 2
                else [FEATURE_NAMES.index(f"knob_{name}")],
            )
            for h, (name, values) in enumerate(ACTION_TABLES)
            if name not in LIMIT_KNOBS
        ]

    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Teacher actions for one observation `[n_features]` or a batch `[n, n_features]`."""
        obs = np.asarray(obs)
        batch = np.atleast_2d(obs)
        miss = (batch[:, self._iteration] > 0.0) | (batch[:, self._ooms] > self.oom_threshold)
        actions = np.tile(self.base_action, (len(batch), 1))
        for h in self.limit_heads:
            actions[:, h] = np.where(miss, self.down, self.up)
        if self._allocator is not None:
            head, entry, flat, in_force = self._allocator
            pressure = (
                (batch[:, self._ooms] > 0.0)
                | (batch[:, self._headroom] < self.pressure_headroom)
                | (batch[:, in_force] > 0.5)
            )
            if mask is not None:  # a device without it (a CPU) keeps the base allocator
                pressure &= np.atleast_2d(mask)[:, flat].astype(bool)
            actions[pressure, head] = entry
        # Before the engine has produced a token the observation says nothing about the
        # card: keep the knobs in force rather than switch on a guess.
        fresh = batch[:, self._tokens_per_s] <= 0.0
        if fresh.any():
            for h, cols in self._in_force:
                now = batch[fresh][:, cols]
                actions[fresh, h] = now.argmax(axis=1) if len(cols) > 1 else np.round(now[:, 0])
        return actions if obs.ndim == 2 else actions[0]
