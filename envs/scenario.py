"""A scenario is what one episode or one evaluation replays; this builds its engine.

The environment, the baselines' search and the evaluation all build engines here, so a
policy is trained, searched and judged on exactly the same replay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from ..engine.engine import Controller, Engine, EngineConfig
from ..engine.knobs import Knobs
from ..engine.telemetry import SLO
from ..engine.traces import Trace, load_trace

GIB = 1 << 30
# Clients give up on a request that waited this many TTFT SLOs in the queue: the engine
# rejects it with that reason. Training, search and evaluation all run under the same rule.
QUEUE_TIMEOUT_SLOS = 4.0


def engine_config(slo: SLO) -> EngineConfig:
    return EngineConfig(slo=slo, queue_timeout_s=QUEUE_TIMEOUT_SLOS * slo.ttft_s)


@dataclass(frozen=True)
class Scenario:
    """A trace window at a load scale, under a memory cap, on a profile (sim) or a model (live).

    `time_scale` (sim only) runs the profile's card that many times slower (> 1) or faster:
    a card the policy has not seen, at the same model and memory.
    """

    trace: str
    load_scale: float = 1.0
    memory_cap_gib: float | None = None
    profile: str | None = "h100-gpt2-small"
    start_s: float = 0.0
    duration_s: float = 600.0
    name: str = ""
    time_scale: float = 1.0

    def label(self) -> str:
        if self.name:
            return self.name
        cap = f", cap {self.memory_cap_gib:g} GiB" if self.memory_cap_gib else ""
        card = f", card x{self.time_scale:g} time" if self.time_scale != 1.0 else ""
        return f"{self.trace} x{self.load_scale:g}{cap}{card}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.time_scale == 1.0:  # the card as calibrated: the dict (and caches keyed on it) as before
            del d["time_scale"]
        return d


@lru_cache(maxsize=32)
def cached_trace(spec: str) -> Trace:
    """Traces are immutable; load each once per process."""
    return load_trace(spec)


def scenario_trace(s: Scenario, max_context: int) -> Trace:
    trace = cached_trace(s.trace).scaled(s.load_scale).window(s.start_s, s.duration_s)
    return trace.clip(max_context)


def build_executor(
    s: Scenario,
    backend: str = "sim",
    *,
    seed: int = 0,
    max_slots: int = 256,
    model: str = "tiny",
    device: str = "cpu",
    noise: bool = False,
    live_clock: str = "measured",
) -> Any:
    """The executor of a scenario. `live_clock="profile"` runs the live engine with its
    clock charged from a profile (reproducible episodes); "measured" uses the stopwatch."""
    cap = int(s.memory_cap_gib * GIB) if s.memory_cap_gib else None
    if backend == "sim":
        from ..calibration.sim_executor import SimExecutor

        return SimExecutor(
            s.profile or "h100-gpt2-small",
            max_slots=max_slots,
            memory_cap_bytes=cap,
            seed=seed,
            noise=noise,
            time_scale=s.time_scale,
        )
    if s.time_scale != 1.0:
        raise ValueError("time_scale applies to the simulator only: a live card runs at its own speed")
    if backend == "live":
        from ..engine.torch_executor import TorchExecutor

        live = TorchExecutor(model, device=device, max_slots=min(max_slots, 64), memory_cap_bytes=cap, seed=seed)
        if live_clock == "profile":
            from ..calibration.profile_clock import ProfileClockExecutor

            return ProfileClockExecutor(
                live, s.profile or ("cpu-tiny" if live.device_type == "cpu" else "h100-gpt2-small")
            )
        return live
    raise ValueError(f"backend must be 'sim' or 'live', got {backend!r}")


def build_engine(
    s: Scenario,
    slo: SLO,
    knobs: Knobs | None = None,
    controller: Controller | None = None,
    backend: str = "sim",
    **executor_kwargs: Any,
) -> Engine:
    executor = build_executor(s, backend, **executor_kwargs)
    trace = scenario_trace(s, executor.capacity.max_context)
    return Engine(executor, trace.to_requests(), knobs, engine_config(slo), controller=controller)


def run_scenario(
    s: Scenario,
    slo: SLO,
    knobs: Knobs | None = None,
    controller: Controller | None = None,
    backend: str = "sim",
    drain_s: float | None = None,
    on_step: Any = None,
    **executor_kwargs: Any,
) -> dict[str, Any]:
    """Replay the scenario's window, drain for up to `drain_s` (default: the window), report.

    Goodput is over the window: requests that arrived in it and met both SLOs, divided by
    its length, so a policy cannot raise it by draining slowly.
    """
    engine = build_engine(s, slo, knobs, controller, backend, **executor_kwargs)
    drain = s.duration_s if drain_s is None else drain_s
    report = engine.run(until_s=s.duration_s + drain, on_step=on_step)
    # The window, cut where the (scaled) trace ends.
    span = min(s.duration_s, cached_trace(s.trace).duration_s / s.load_scale - s.start_s)
    if span <= 0:  # the window's requests all arrive at one instant: it lasts as long as serving them
        span = report["duration_s"]
    report["window_s"] = span
    report["goodput_rps"] = report["met_slo"] / max(span, 1e-9)
    return report  # report["lost"]: the engine's count of requests in no state (0)
