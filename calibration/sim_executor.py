"""The simulator: an executor whose time and memory come from a calibrated profile.

It implements the same `Executor` protocol as the torch engine, so the engine's scheduler
and loop run unchanged on top of it. An iteration costs a prefill of the admitted
requests (padded to the longest, as the torch engine pads) plus one decode step of the
running set; memory is weights + the KV cache in use + the iteration's transient
activations, and the allocator model decides, per config and headroom, whether the
batch hits an OOM or an allocator retry.

Deterministic under its seed; run-to-run noise (the measured ms_min..ms_max spread) is
optional and drawn from the same seeded generator.
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.executor import Batch, Capacity, MemoryReading, StepResult, SwitchReport, kv_token_budget
from ..engine.knobs import Knobs, not_applicable
from ..engine.request import Request
from .alloc_model import AllocatorState
from .profile import Profile, load_profile, profile_path

# Latency lookups are memoised on inputs rounded to this relative step (~3%): the model
# is smooth, and a dictionary hit costs far less than a prediction.
_LOG_STEP = 0.03


_LOADED: dict[tuple[str, int], Profile] = {}


def cached_profile(name_or_path: str) -> Profile:
    """A profile loaded (and its models fitted) once per process and file version: an
    environment resets thousands of times and must not refit the latency model each time."""
    path = profile_path(name_or_path).resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _LOADED:
        profile = load_profile(path)
        profile.latency()._sim_memo = {}  # latency lookups shared by every executor of this profile
        _LOADED[key] = profile
    return _LOADED[key]


def _bucket(x: float) -> int:
    return int(round(math.log(max(x, 1.0)) / _LOG_STEP))


def _graph_bucket(b: int) -> int:
    return 1 << max(0, (b - 1).bit_length())


class SimExecutor:
    """A profile-driven stand-in for `TorchExecutor` (same protocol, no torch)."""

    def __init__(
        self,
        profile: Profile | str,
        *,
        max_slots: int = 256,
        max_context: int | None = None,
        memory_cap_bytes: int | None = None,
        seed: int = 0,
        noise: bool = False,
    ) -> None:
        self.profile = cached_profile(profile) if isinstance(profile, str) else profile
        self.device_type = self.profile.device["type"]
        self.latency = self.profile.latency()
        self.mem_model = self.profile.memory()
        total = int(self.profile.device["total_mem_bytes"])
        self.capacity_bytes = int(memory_cap_bytes) if memory_cap_bytes else total
        self._max_slots = max_slots
        self._max_context = max_context or int(self.profile.model["max_context"])
        self.capacity = self._capacity("bf16")
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.knobs = Knobs()
        self._alloc: AllocatorState | None = None
        self._cache: dict[tuple, float] = getattr(self.latency, "_sim_memo", {})
        self._graph_buckets: set[int] = set()
        self._context_tokens = 0  # KV tokens held by running requests (mirrors the scheduler)
        self._held: dict[int, int] = {}  # rids holding KV
        self._pending_ms = 0.0
        self._ooms = 0
        self._retries = 0
        self._reserved = 0
        self._frag = 0
        self._used = 0
        self._switch = self.profile.switch

    def _capacity(self, precision: str) -> Capacity:
        mm = self.mem_model
        budget = kv_token_budget(self.capacity_bytes, mm.weight_bytes(precision), mm.kv_bytes_per_token(precision))
        return Capacity(self._max_slots, self._max_context, budget)

    # -- knobs ------------------------------------------------------------------------
    def apply_knobs(self, old: Knobs | None, new: Knobs) -> SwitchReport:
        report = SwitchReport(not_applicable=not_applicable(new, self.device_type))
        sw = self._switch
        if old is None or old.precision != new.precision:
            if old is not None:
                report.cost_ms["precision"] = float(sw.get("precision_change_ms", 0.0))
            self._graph_buckets.clear()
            eff = new.precision if self.device_type == "cuda" or new.precision != "fp32_tf32" else "fp32"
            self.capacity = self._capacity(eff)
        if old is not None and old.attention != new.attention:
            report.cost_ms["attention"] = 0.0
            self._graph_buckets.clear()
        if old is not None and old.cuda_graphs != new.cuda_graphs:
            report.cost_ms["cuda_graphs"] = 0.0  # captures are charged when they happen
        if (old is None or old.allocator != new.allocator) and self.device_type == "cuda":
            if old is not None:
                report.cost_ms["allocator"] = float(sw.get("set_allocator_ms", 0.0))
            self._alloc = AllocatorState(self.profile.allocator_model(), new.allocator)
        if new.reclaim and self.device_type == "cuda":
            report.cost_ms["reclaim"] = float(sw.get("empty_cache_ms", 0.0))
            if self._alloc is not None:
                self._alloc.reclaim()
        if old is not None:
            report.changed = [k for k in new.to_dict() if getattr(old, k) != getattr(new, k)]
        for name in report.not_applicable:
            report.cost_ms.pop(name, None)
        report.ms = sum(report.cost_ms.values())
        self.knobs = new.replace(reclaim=False)
        return report

    # -- execution --------------------------------------------------------------------
    def iteration_ms(self, batch: Batch) -> float:
        """The predicted time of one iteration (charging a graph capture the first time a
        batch-size bucket replays), without touching the memory state."""
        k = self.knobs
        cuda = self.device_type == "cuda"
        attention = k.attention if cuda or k.attention in ("flash", "math") else "flash"
        precision = k.precision if cuda or k.precision != "fp32_tf32" else "fp32"
        graphs = k.cuda_graphs and cuda
        ms = 0.0
        if batch.prefill:
            l_max = max(r.context_len for r in batch.prefill)
            ms += self._prefill_ms(len(batch.prefill), l_max, attention, precision)
        n_dec = len(batch.decode)
        if n_dec:
            c_mean = batch.decode_context_tokens / n_dec
            b = _graph_bucket(n_dec) if graphs else n_dec
            if graphs and b not in self._graph_buckets:
                self._graph_buckets.add(b)
                ms += self.latency.capture_ms(b, c_mean, attention, precision)
            ms += self._decode_ms(b, c_mean, attention, precision, graphs)
        if self.noise:
            ms *= float(self.rng.lognormal(0.0, 0.02))
        return ms

    def execute(self, batch: Batch) -> StepResult:
        ms = self._pending_ms + self.iteration_ms(batch)
        self._pending_ms = 0.0
        precision = self.knobs.precision if self.device_type == "cuda" or self.knobs.precision != "fp32_tf32" else "fp32"
        l_max = max((r.context_len for r in batch.prefill), default=0)
        n_dec = len(batch.decode)
        need, transient = self._need_bytes(batch, l_max, precision)
        self._used = need
        if need > self.capacity_bytes:
            return self._oom(batch, ms)
        if self._alloc is not None:
            out = self._alloc.step(need, self.capacity_bytes, self.rng, transient_bytes=transient)
            self._retries += out.retries
            self._reserved = out.reserved_bytes
            self._frag = out.fragmentation_bytes
            if out.oom:
                return self._oom(batch, ms)
        for r in batch.prefill:
            self._held[r.rid] = 1
            self._context_tokens += r.context_len + 1
        self._context_tokens += n_dec
        return StepResult(ms=ms)

    def _oom(self, batch: Batch, ms: float) -> StepResult:
        self._ooms += 1
        self._pending_ms += float(self._switch.get("empty_cache_ms", 0.0))
        return StepResult(ms=ms, oom=True, error="out of memory (simulated)")

    def _need_bytes(self, batch: Batch, l_max: int, precision: str) -> tuple[int, int]:
        """Bytes the iteration needs at its peak, and the transient (activation) part."""
        mm = self.mem_model
        kv_tokens = self._context_tokens + batch.prefill_tokens + len(batch.decode)
        transient = mm.prefill_activation_bytes(len(batch.prefill), l_max, precision) if batch.prefill else 0
        if batch.decode:
            transient = max(transient, mm.decode_activation_bytes(len(batch.decode), precision))
        return int(mm.weight_bytes(precision) + kv_tokens * mm.kv_bytes_per_token(precision) + transient), int(transient)

    def _prefill_ms(self, b: int, length: int, attention: str, precision: str) -> float:
        key = (0, b, _bucket(length), attention, precision)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = float(self.latency.prefill_ms(b, length, attention, precision))
        return ms

    def _decode_ms(self, b: int, context: float, attention: str, precision: str, graphs: bool) -> float:
        key = (1, b, _bucket(context), attention, precision, graphs)
        ms = self._cache.get(key)
        if ms is None:
            ms = self._cache[key] = float(self.latency.decode_ms(b, context, attention, precision, graphs))
        return ms

    # -- state ------------------------------------------------------------------------
    def release(self, requests: list[Request]) -> None:
        for r in requests:
            if self._held.pop(r.rid, None) is not None:
                self._context_tokens -= r.context_len  # its prompt plus every token generated
        self._context_tokens = max(0, self._context_tokens)

    def memory(self, full: bool) -> MemoryReading:
        return MemoryReading(
            used_bytes=max(self._used, self._reserved),
            capacity_bytes=self.capacity_bytes,
            reserved_bytes=self._reserved,
            allocated_bytes=self._used,
            fragmentation_bytes=self._frag,
            retries=self._retries,
            ooms=self._ooms,
            full=full,
        )
