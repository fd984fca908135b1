"""The serving loop: arrivals -> scheduler -> executor -> telemetry, one iteration at a time.

Two clocks:
- virtual: arrivals follow the trace's clock and each iteration advances it by its
  execution time (measured on the device, or predicted by the simulator), so an hour of
  trace costs only its busy time; an idle engine jumps to the next arrival.
- realtime: the clock is the wall clock; an idle engine sleeps until the next arrival.

Knobs change only between iterations (`set_knobs`, or a controller asked every
iteration); a switch's cost is charged to the clock.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .card import probe_card
from .executor import Executor, MemoryReading, StepResult, SwitchReport
from .knob_space import KNOB_NAMES, LIMIT_KNOBS
from .knobs import Knobs
from .request import Request
from .scheduler import Scheduler
from .telemetry import SLO, IterationStats, Telemetry, summarise

CLOCKS = ("virtual", "realtime")

# A controller sees the engine between iterations and may return new knobs.
Controller = Callable[["Engine"], "Knobs | None"]


_EXECUTOR_KNOBS = tuple(name for name in KNOB_NAMES if name not in LIMIT_KNOBS)


def check_requests(requests: Sequence[Request]) -> None:
    """Refuse requests the loop cannot serve: a NaN or infinite arrival would stall the
    clock, a repeated request or rid would be served twice and counted once, and lengths
    must be whole tokens >= 1. (Traces are checked when loaded; this guards the API.)"""
    rids: set[int] = set()
    for r in requests:
        if not (math.isfinite(r.arrival_s) and r.arrival_s >= 0):
            raise ValueError(f"request {r.rid}: arrival_s must be a finite time >= 0, got {r.arrival_s!r}")
        for name in ("prompt_len", "output_len"):
            n = getattr(r, name)
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"request {r.rid}: {name} must be an integer >= 1, got {n!r}")
        if r.rid in rids:
            raise ValueError(f"request id {r.rid} appears twice (each request must be a distinct rid)")
        rids.add(r.rid)


def _executor_knobs(knobs: Knobs) -> tuple[object, ...]:
    """The knobs an executor acts on (all but the batch limits, which are the scheduler's)."""
    return tuple(getattr(knobs, name) for name in _EXECUTOR_KNOBS)


@lru_cache(maxsize=4096)
def _without_reclaim(knobs: Knobs) -> Knobs:
    """`knobs` with reclaim off (a reclaim acts once); cached, as a policy may ask every step."""
    return knobs.replace(reclaim=False)


@dataclass(slots=True)
class EngineConfig:
    slo: SLO = field(default_factory=SLO)
    clock: str = "virtual"
    full_stats_every: int = 16  # iterations between reads of the allocator's full counters
    max_tries: int = 3
    queue_timeout_s: float | None = None  # reject requests that waited longer (None: never)
    # time the card before serving (engine.card). Only a policy's observation reads it: an
    # engine that no policy or environment observes may skip it (a few decode steps and graph
    # captures on a GPU; they also warm the device up, so `autoopt replay` always probes)
    probe_card: bool = True

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.full_stats_every < 1:
            raise ValueError("full_stats_every must be >= 1")


class Engine:
    """Replays requests through a scheduler and an executor under run-time knobs."""

    def __init__(
        self,
        executor: Executor,
        requests: Sequence[Request],
        knobs: Knobs | None = None,
        config: EngineConfig | None = None,
        controller: Controller | None = None,
    ) -> None:
        self.executor = executor
        self.config = config or EngineConfig()
        check_requests(requests)
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.scheduler = Scheduler(executor.capacity, self.config.max_tries, self.config.queue_timeout_s)
        self.telemetry = Telemetry(self.config.slo)
        self.controller = controller
        self.now_s = 0.0
        self.iteration = 0
        self.last_iteration_ms = 0.0
        self._next_arrival = 0
        self._wall0: float | None = None  # realtime: the clock starts at the first step
        self.last_switch = SwitchReport()
        self.not_applicable: dict[str, str] = {}
        self.knobs = Knobs()
        self._applied: Knobs | None = None
        self._pending_switch_ms = 0.0
        # ms of a reference decode step per attention kernel, timed before serving: the
        # policy's observation tells the card's speed from the load with it (engine.card)
        self.card: dict[str, float | None] | None = probe_card(executor) if self.config.probe_card else None
        self.memory_reading: MemoryReading = executor.memory(full=True)
        self.telemetry.count_retries_from(self.memory_reading.retries)  # not the probe's
        self.set_knobs(knobs or Knobs())

    # -- knobs ------------------------------------------------------------------------
    def set_knobs(self, knobs: Knobs) -> SwitchReport:
        """Bring `knobs` into force before the next iteration and charge the switch."""
        old = self._applied
        if old is not None and _executor_knobs(old) == _executor_knobs(knobs):
            # Only the batch limits moved: they are the scheduler's alone, so the executor
            # has nothing to do and nothing to charge (a policy moves them every decision).
            changed = [n for n in LIMIT_KNOBS if getattr(old, n) != getattr(knobs, n)]
            self._applied = self.knobs = knobs
            self.telemetry.switch_counts.update(changed)
            self.last_switch = SwitchReport(changed=changed, not_applicable=dict(self.not_applicable))
            return self.last_switch
        first = old is None
        report = self.executor.apply_knobs(self._applied, knobs)
        requested = _without_reclaim(knobs) if knobs.reclaim else knobs
        # what runs: the executor's own record where it keeps one, which differs from the
        # request when it refused a switch (a precision cast out of memory on a real card)
        actual = getattr(self.executor, "knobs", requested)
        self._applied = actual if isinstance(actual, Knobs) else requested
        self.knobs = self._applied
        self.last_switch = report
        self.not_applicable = dict(report.not_applicable)
        if self.executor.capacity != self.scheduler.capacity:
            self.scheduler.set_capacity(self.executor.capacity)
        if first:  # bringing up the engine is not a switch
            return report
        tel = self.telemetry
        tel.switch_ms_total += report.ms
        tel.switch_counts.update(report.changed)
        self._pending_switch_ms += report.ms
        return report

    # -- the loop ---------------------------------------------------------------------
    @property
    def next_arrival_s(self) -> float:
        if self._next_arrival < len(self.requests):
            return self.requests[self._next_arrival].arrival_s
        return math.inf

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def exhausted(self) -> bool:
        """No request left to arrive and none in the engine."""
        return self._next_arrival >= len(self.requests) and not self.has_work

    def _admit_arrivals(self) -> int:
        reqs, i, n, now = self.requests, self._next_arrival, len(self.requests), self.now_s
        start = i
        add = self.scheduler.add
        while i < n and reqs[i].arrival_s <= now:
            add(reqs[i])
            i += 1
        self._next_arrival = i
        return i - start

    def _wait_for_arrival(self) -> None:
        nxt = self.next_arrival_s
        if math.isinf(nxt):
            return
        if self.config.clock == "virtual":
            self.now_s = max(self.now_s, nxt)
        else:
            assert self._wall0 is not None
            delay = nxt - (time.perf_counter() - self._wall0)
            if delay > 0:
                time.sleep(delay)
            self.now_s = max(nxt, time.perf_counter() - self._wall0)

    def step(self) -> IterationStats | None:
        """Run one iteration (waiting for the next arrival first if idle).

        Returns None when every request has been served or rejected and none is left to
        arrive.
        """
        config, sched = self.config, self.scheduler
        virtual = config.clock == "virtual"
        if not virtual:
            if self._wall0 is None:
                self._wall0 = time.perf_counter() - self.now_s
            self.now_s = time.perf_counter() - self._wall0
        rejected_before = sched.rejected
        arrivals = self._admit_arrivals()
        if not (sched.waiting or sched.running):
            if self._next_arrival >= len(self.requests):
                return None
            self._wait_for_arrival()
            arrivals += self._admit_arrivals()
        if self.controller is not None:
            new = self.controller(self)
            if new is not None and new != self.knobs:
                self.set_knobs(new)
        switch_ms, self._pending_switch_ms = self._pending_switch_ms, 0.0

        sched.expire(self.now_s)
        batch = sched.schedule(self.knobs)
        n_prefill, n_decode, prefill_tokens = len(batch.prefill), len(batch.decode), batch.prefill_tokens
        # Everything queued may just have expired: then there is nothing to run.
        result = StepResult(ms=0.0) if batch.empty else self.executor.execute(batch)
        if not (result.ms >= 0.0 and result.ms < math.inf):  # NaN fails both
            # the clock would stall (NaN), jump past every arrival (inf) or run backwards
            raise ValueError(
                f"the executor reported an iteration time of {result.ms!r} ms (iteration {self.iteration}); "
                "times must be finite and >= 0"
            )
        if virtual:
            self.now_s += (result.ms + switch_ms) / 1e3
        else:
            assert self._wall0 is not None
            self.now_s = time.perf_counter() - self._wall0
        left = sched.complete(batch, self.now_s, result)
        tel = self.telemetry
        finished_ok = finished = 0
        if result.oom:
            tel.ooms += 1
            tokens = 0
        else:
            tokens = n_prefill + n_decode
            for r in batch.prefill:
                if r.generated == 1:
                    tel.on_first_token(r.ttft_s)
            for r in left:
                finished += 1
                finished_ok += tel.on_finish(r)
        if left:
            self.executor.release(left)
        rejected = sched.rejected - rejected_before
        for _ in range(rejected):
            tel.on_reject()
        self.iteration += 1
        self.last_iteration_ms = result.ms
        tel.iterations += 1
        tel.on_interval(self.now_s, arrivals, tokens, result.ms / 1e3)
        full = self.iteration % config.full_stats_every == 0
        self.memory_reading = mem = self.executor.memory(full=full)
        tel.on_iteration(result.oom, mem.retries, result.ms)
        return IterationStats(
            now_s=self.now_s,
            ms=result.ms,
            switch_ms=switch_ms,
            prefill_seqs=n_prefill,
            prefill_tokens=prefill_tokens,
            decode_seqs=n_decode,
            arrivals=arrivals,
            finished=finished,
            finished_ok=finished_ok,
            rejected=rejected,
            queue_len=sched.queued,
            queued_tokens=sched.queued_tokens,
            running=sched.num_running,
            oom=result.oom,
            memory=mem,
        )

    def run(
        self,
        until_s: float | None = None,
        max_iterations: int | None = None,
        on_step: Callable[[IterationStats], None] | None = None,
    ) -> dict[str, Any]:
        """Iterate until the requests are exhausted, the clock passes `until_s`, or
        `max_iterations` ran; then return the report. Requests whose arrival the clock has
        passed join the queue before the report, so each one counts (as queued if no
        iteration took it up); those the clock has not reached count as `not_arrived`."""
        while max_iterations is None or self.iteration < max_iterations:
            if until_s is not None and self.now_s >= until_s:
                break
            stats = self.step()
            if stats is None:
                break
            if on_step is not None:
                on_step(stats)
        return self.report()

    # -- accounting -------------------------------------------------------------------
    def arrived_requests(self) -> list[Request]:
        return self.requests[: self._next_arrival]

    def counts(self) -> dict[str, int]:
        s = self.scheduler
        return {
            "arrived": s.arrived,
            "completed": s.completed,
            "queued": s.queued,
            "running": s.num_running,
            "rejected": s.rejected,
        }

    def report(self) -> dict[str, Any]:
        """The replay's figures so far. Arrivals the clock has passed join the queue first
        (the next step would take them up): each request then counts as arrived or not."""
        self._admit_arrivals()
        arrived = self.arrived_requests()
        start = arrived[0].arrival_s if arrived else 0.0
        summary = summarise(arrived, self.config.slo, self.now_s - start)
        tel = self.telemetry
        mem = self.executor.memory(full=True)
        reasons: dict[str, int] = {}
        for r in arrived:
            if r.reject_reason:
                reasons[r.reject_reason] = reasons.get(r.reject_reason, 0) + 1
        summary.update(
            {
                "ooms": tel.ooms,
                "iterations": self.iteration,
                "fallbacks": tel.fallbacks,
                "reject_reasons": reasons,
                "switch_ms_total": tel.switch_ms_total,
                "switch_counts": dict(tel.switch_counts),
                "knobs": self.knobs.to_dict(),
                "not_applicable": {**self.not_applicable, **getattr(self.executor, "runtime_notes", {})},
                "slo": {"ttft_ms": self.config.slo.ttft_s * 1e3, "tpot_ms": self.config.slo.tpot_s * 1e3},
                "clock": self.config.clock,
                "device": self.executor.device_type,
                "memory": {
                    "used_bytes": mem.used_bytes,
                    "capacity_bytes": mem.capacity_bytes,
                    "fragmentation_bytes": mem.fragmentation_bytes,
                    "retries": mem.retries,
                },
                "balanced": self.scheduler.balanced(),
            }
        )
        # Every request given to the engine is accounted for, counted from the requests'
        # own times and states rather than the loop's pointer: one the loop skipped shows
        # here as lost.
        not_arrived = sum(1 for r in self.requests if r.arrival_s > self.now_s)
        accounted = summary["completed"] + summary["queued"] + summary["running"] + summary["rejected"]
        summary["requests"] = len(self.requests)
        summary["not_arrived"] = not_arrived
        summary["lost"] = len(self.requests) - accounted - not_arrived
        return summary
