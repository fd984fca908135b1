"""The one-off cost of each knob switch (precision change, graph capture, reclaim,
allocator settings) and of reading memory stats, for the profile's `switch` block."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..engine.device import apply_allocator
from ..engine.knobs import Knobs
from ..engine.torch_executor import TorchExecutor
from .measure import free_cuda, sync


def measure_switch_costs(
    model_name: str, dev: torch.device, base_precision: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """One-off costs, on an executor of the engine's default size (64 slots, full context)."""
    ex = TorchExecutor(model_name, str(dev), knobs=Knobs(precision=base_precision, attention="math"))
    other = "fp32" if base_precision != "fp32" else "bf16"
    prec = [ex.set_precision(p) for p in (other, base_precision) * 3]
    detail: dict[str, Any] = {
        "executor": {"max_slots": ex.capacity.max_slots, "max_context": ex.capacity.max_context},
        "precision_change_samples_ms": prec,
    }
    sw = {
        "empty_cache_ms": 0.0,
        "set_allocator_ms": 0.0,
        "precision_change_ms": float(statistics.median(prec)),
        "graph_capture_ms": 0.0,
        "read_memory_stats_us": 0.0,
        "mem_get_info_us": 0.0,
    }
    if dev.type == "cuda":
        c = min(256, ex.capacity.max_context)
        for b in (1, 8, 64):  # warm the eager kernels first: a capture should not pay for them
            ex.time_decode(b, c)
        ex.set_cuda_graphs(True)
        caps = {b: ex.time_decode(b, c)[1] for b in (1, 8, 64)}  # None: that capture failed
        captured = [ms for ms in caps.values() if ms is not None]
        if captured:  # else the 0.0 above: no capture to charge (the buckets decode eagerly)
            sw["graph_capture_ms"] = float(statistics.median(captured))
        detail["graph_capture_ms_by_bucket"] = caps
        ex.set_cuda_graphs(False)
        del ex
        free_cuda(dev)
        ec = []
        for _ in range(3):
            x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            del x
            sync(dev)
            t0 = time.perf_counter()
            torch.cuda.empty_cache()
            sync(dev)
            ec.append((time.perf_counter() - t0) * 1e3)
        sw["empty_cache_ms"] = float(statistics.median(ec))
        detail["empty_cache_freed_mb"] = 256
        sa, notes = [], []
        for name in ("expandable", "default") * 2:
            ms, note = apply_allocator(name)
            sa.append(ms)
            if note:
                notes.append(note)
        sw["set_allocator_ms"] = float(statistics.median(sa))
        if notes:
            detail["set_allocator_notes"] = sorted(set(notes))
        sw["read_memory_stats_us"] = _time_us(lambda: torch.cuda.memory_stats(dev), 50)
        sw["mem_get_info_us"] = _time_us(lambda: torch.cuda.mem_get_info(dev), 200)
    else:
        # No allocator on the CPU: the readings are the executor's own bookkeeping.
        sw["read_memory_stats_us"] = _time_us(lambda: ex.memory(True), 200)
        sw["mem_get_info_us"] = _time_us(lambda: ex.memory(False), 200)
        detail["cpu_note"] = "empty_cache, allocator settings and CUDA graphs do not exist on the CPU: 0.0"
        del ex
    return sw, detail


def _time_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6
