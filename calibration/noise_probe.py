"""The host-noise probe: back-to-back decode steps that measure how a host's speed
wanders and for how long it stays off (the model fitted to them: host_noise.py)."""

from __future__ import annotations

import time

import numpy as np

from ..engine.executor import Batch
from ..engine.request import Request
from ..engine.torch_executor import TorchExecutor
from .host_noise import HostNoise, fit_host_noise
from .measure import step_ms

PROBE_CYCLE = 100  # decode steps per cycle of the host-noise probe


def probe_host_noise(ex: TorchExecutor, combo: tuple[str, str], batch: int, seconds: float) -> HostNoise:
    """Time back-to-back decode steps of `batch` sequences for `seconds` (as a serving loop
    runs them, with no pause between) and fit how the host's speed wanders (host_noise.py).

    The steps run in cycles of PROBE_CYCLE from the same context, so the context grows the
    same way in every cycle; a step's multiplier is its time over the median of the steps at
    the same place in their cycles, which takes the context's own effect out."""
    prec, backend = combo
    ex.set_precision(prec)
    ex.set_attention(backend)
    ex.set_cuda_graphs(False)
    steps = min(PROBE_CYCLE, ex.capacity.max_context // 2)
    start = max(1, min(ex.capacity.max_context // 4, ex.capacity.max_context - steps - 2))
    batch = max(1, min(batch, ex.capacity.max_slots))
    ends: list[float] = []
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reqs = [Request(i, 0.0, start, steps + 1) for i in range(batch)]
        try:
            step_ms(ex, Batch(reqs, [], batch * start, 0))
            decode = Batch([], reqs, 0, 0)
            for _ in range(steps):
                times.append(step_ms(ex, decode))
                ends.append(time.perf_counter())
        finally:
            ex.release(reqs[::-1])
    cycles = len(times) // steps
    if cycles < 3:
        raise RuntimeError(
            f"the noise probe ran {cycles} cycles of {steps} steps in {seconds} s: at least 3 are needed"
        )
    n = cycles * steps
    by_place = np.asarray(times[:n]).reshape(cycles, steps)
    multipliers = (by_place / np.median(by_place, axis=0)).ravel()
    return fit_host_noise(ends[:n], multipliers)
