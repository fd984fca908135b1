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

    @property
    def knobs(self) -> Knobs:
        """The knobs the live engine runs: a switch it refused (a precision cast out of
        memory) is not in them, and the engine reports these."""
        return self.live.knobs

    @property
    def runtime_notes(self) -> dict[str, str]:
        return dict(getattr(self.live, "runtime_notes", {}))

    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        """The live switch first; the clock then follows what the live engine took up, and
        charges the profile's cost of those knobs only."""
        report = self.live.apply_knobs(old, new)
        predicted = self.timer.apply_knobs(old, self.live.knobs.replace(reclaim=new.reclaim))
        report.cost_ms = {k: ms for k, ms in predicted.cost_ms.items() if k in report.changed}
        report.ms = float(sum(report.cost_ms.values()))
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
