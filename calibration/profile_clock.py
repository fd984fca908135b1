"""The live engine on a calibrated clock: real torch execution, time from a profile.

Measured wall time makes two live episodes differ even under the same seed and actions
(the host's scheduling jitters). For debugging and for tests that need a reproducible
live episode, this executor runs every batch through the real torch executor — real
kernels, real KV cache, real OOMs — but charges the engine's clock with the profile's
prediction for that batch instead of the stopwatch. Everything but the clock is live.
"""

from __future__ import annotations

from ..engine.executor import Batch, MemoryReading, StepResult, SwitchReport
from ..engine.knobs import Knobs
from ..engine.request import Request
from .sim_executor import SimExecutor


class ProfileClockExecutor:
    def __init__(self, live, profile: str) -> None:
        self.live = live
        self.device_type = live.device_type
        self.timer = SimExecutor(profile, max_slots=live.capacity.max_slots, max_context=live.capacity.max_context)

    @property
    def capacity(self):
        return self.live.capacity

    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        predicted = self.timer.apply_knobs(old, new)
        report = self.live.apply_knobs(old, new)
        report.cost_ms, report.ms = dict(predicted.cost_ms), predicted.ms
        return report

    def reference_decode_ms(self, attention: str) -> float:
        return self.timer.reference_decode_ms(attention)  # the clock is the profile's

    def execute(self, batch: Batch) -> StepResult:
        ms = self.timer.iteration_ms(batch)
        result = self.live.execute(batch)
        return StepResult(ms=ms, oom=result.oom, error=result.error)

    def release(self, requests: list[Request]) -> None:
        self.live.release(requests)

    def memory(self, full: bool) -> MemoryReading:
        return self.live.memory(full)
