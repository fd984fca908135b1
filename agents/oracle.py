"""oracle: with hindsight, the best static config for each window of the trace.

An upper bound for any static choice and a yardstick for the learned policy: it knows
the future load of each window and picks, among candidate configs (the best of the
static search), the one that scores best on that window alone. It then switches at the
window boundaries (paying the switch costs like anyone else).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..engine.knobs import Knobs
from ..engine.telemetry import SLO
from ..envs.scenario import Scenario, run_scenario

if TYPE_CHECKING:
    from ..engine.engine import Engine


class OraclePolicy:
    name = "oracle"

    def __init__(self, starts_s: Sequence[float], configs: Sequence[Knobs]) -> None:
        if len(starts_s) != len(configs) or not configs:
            raise ValueError("one config per window start, at least one window")
        self.starts_s = list(starts_s)
        self.configs = list(configs)

    def reset(self) -> None:
        pass

    def knobs(self, obs: np.ndarray, engine: Engine) -> Knobs:
        i = max(0, bisect.bisect_right(self.starts_s, engine.now_s) - 1)
        return self.configs[i]


def build_oracle(
    scenario: Scenario, slo: SLO, candidates: Sequence[Knobs], window_s: float = 60.0, seed: int = 0
) -> OraclePolicy:
    """Pick, window by window, the candidate with the best goodput on that window."""
    starts = list(np.arange(0.0, scenario.duration_s, window_s))
    configs = []
    for t in starts:
        sub = dataclasses.replace(
            scenario, start_s=scenario.start_s + t, duration_s=min(window_s, scenario.duration_s - t), name=""
        )
        scores = [run_scenario(sub, slo, k, seed=seed)["goodput_rps"] for k in candidates]
        configs.append(candidates[int(np.argmax(scores))])
    return OraclePolicy(starts, configs)
