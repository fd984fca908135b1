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
