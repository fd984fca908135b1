"""What the calibration's parts share: a budget clock, device syncs and cache release,
the transient memory of a call, one engine iteration's time, and the short error text a
failed part leaves in the profile's provenance."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from ..engine.executor import Batch
from ..engine.torch_executor import TorchExecutor


class Clock:
    """Wall time since the run began, against an optional budget (None: no limit)."""

    def __init__(self, budget_s: float | None) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out(self) -> bool:
        return self.budget_s is not None and self.elapsed >= self.budget_s


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_cuda(dev: torch.device) -> None:
    """Drop what the last part left cached, so the next part starts from the same memory."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def run_with_peak(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn`; on CUDA also return the transient bytes it allocated above the baseline."""
    if dev.type != "cuda":
        return fn(), 0
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    return out, max(0, torch.cuda.max_memory_allocated(dev) - base)


def error_text(exc: BaseException) -> str:
    """The exception's type and first line, short enough for provenance['errors']."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def step_ms(ex: TorchExecutor, batch: Batch) -> float:
    """One iteration through the engine's own path (`execute`), as the live engine runs it."""
    res = ex.execute(batch)
    if res.oom:
        raise RuntimeError(f"out of memory: {res.error}")
    return res.ms
